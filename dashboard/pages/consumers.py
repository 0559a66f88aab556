"""Consumers: per group, how fast it reads, how far behind it is, and how often it rebalances."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, queries
from dashboard.pages import common

st.title("Consumers")
st.caption("Per consumer group: messages consumed, end-to-end latency, lag and rebalances.")

db = common.require_store()
groups = queries.consumer_groups(db)
if not groups:
    st.info("No consumer events yet: is a TracedConsumer pointed at this collector?")
    st.stop()

c1, c2, c3 = st.columns([2, 3, 1], vertical_alignment="bottom")
with c1:
    group = st.selectbox("Consumer group (group.id)", groups, key="consumer-group")
with c2:
    label = common.range_picker("consumer-range")
with c3:
    refresh = common.live_toggle("consumer-live")


@st.fragment(run_every=refresh)
def health() -> None:
    since, bucket, span = queries.window(db, label)  # inside the fragment: a live range moves with each refresh
    st.caption(common.time_caption(db, label, bucket))
    rate = queries.consume_rate(db, group, since, bucket)
    e2e = queries.e2e_latency(db, group, since, bucket)
    stats = queries.stats_series(db, "consumer", None, group, since, bucket)
    lag = queries.long(stats, {"lag": group})
    rebal = queries.rebalances(db, group, since, bucket)

    p99 = e2e[e2e["series"] == "p99"]["value"]
    m = st.columns(4)
    m[0].metric("consumed (msg/s)", f"{rate['value'].sum() * bucket / span:,.1f}", help="Average over the range")
    m[1].metric("p99 end-to-end (ms)", f"{p99.iloc[-1]:,.0f}" if len(p99) else "–", help="Latest interval")
    m[2].metric(
        "lag (messages)", f"{int(lag['value'].iloc[-1]):,}" if len(lag) else "–", help="consumer_lag from statistics"
    )
    m[3].metric("rebalance callbacks", f"{int(rebal['value'].sum()) if len(rebal) else 0}")

    a, b = st.columns(2)
    with a:
        st.markdown("**Consumed**")
        st.altair_chart(charts.time_series(rate, "consumed (msg/s)", "topic"), width="stretch")
        st.caption("Messages returned by poll() / consume(), per topic.")
    with b:
        st.markdown("**End-to-end latency**")
        st.altair_chart(charts.time_series(e2e, "end-to-end latency (ms)"), width="stretch")
        st.caption("Consume time minus the message timestamp (its create time on most topics).")
    a, b = st.columns(2)
    with a:
        st.markdown("**Lag**")
        st.altair_chart(charts.lag(lag), width="stretch")
        st.caption("Sum over the group's members and partitions of the messages not yet consumed.")
    with b:
        st.markdown("**Rebalances**")
        st.altair_chart(charts.counter_bars(rebal, "callbacks per interval"), width="stretch")
        st.caption("assign / revoke / lost callbacks; a steady stream of them stalls consumption.")


health()
