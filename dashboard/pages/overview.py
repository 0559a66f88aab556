"""Overview: is every producer and consumer group healthy, and what failed most recently."""

from __future__ import annotations

import streamlit as st

from dashboard import queries
from dashboard.pages import common

st.title("Overview")
st.caption("One line per producer client and per consumer group: ok, degraded or failing, and why.")

db = common.require_store()
if not common.has_events(db):
    st.info(common.NO_EVENTS)
    st.stop()

c1, c2 = st.columns([5, 1], vertical_alignment="bottom")
with c1:
    label = common.range_picker("overview-range", default="last 5 min")
with c2:
    refresh = common.live_toggle("overview-live")


@st.fragment(run_every=refresh)
def status() -> None:
    since, bucket, _ = queries.window(db, label)
    st.caption(common.time_caption(db, label, bucket))

    st.subheader("Producers")
    producers = common.status_table(queries.producer_health(db, since), "client_id", queries.producer_status)
    if producers.empty:
        st.caption("No producer activity in this range.")
    else:
        common.table(
            producers[
                ["status", "client_id", "reason", "sent", "acked", "failed", "rejected", "ack_p99_ms", "last_event"]
            ],
            client_id="client",
            ack_p99_ms=st.column_config.NumberColumn("p99 ack (ms)", format="%.1f"),
            last_event=st.column_config.DatetimeColumn("last event (UTC)", format="HH:mm:ss"),
        )

    st.subheader("Consumer groups")
    groups = common.status_table(queries.consumer_health(db, since), "group_id", queries.consumer_status)
    if groups.empty:
        st.caption("No consumer activity in this range.")
    else:
        common.table(
            groups[["status", "group_id", "reason", "consumed", "lag", "e2e_p99_ms", "rebalances", "last_consume"]],
            group_id="group",
            lag=st.column_config.NumberColumn("lag (messages)", format="%d"),
            e2e_p99_ms=st.column_config.NumberColumn("p99 end-to-end (ms)", format="%.0f"),
            last_consume=st.column_config.DatetimeColumn("last consume (UTC)", format="HH:mm:ss"),
        )

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Recent failures")
        failures = queries.recent_failures(db, 50)
        if failures.empty:
            st.caption("No delivery errors, rejected sends, client errors or failed commits recorded.")
        else:
            common.table(
                common.with_key_links(failures),
                ts=st.column_config.DatetimeColumn("time (UTC)", format="HH:mm:ss.SSS"),
                error_message=st.column_config.TextColumn("message", width="large"),
            )
    with right:
        st.subheader("Recent keys")
        st.caption("Open one in key search.")
        for recent in queries.recent_keys(db, 15):
            st.page_link(
                common.SEARCH_PAGE,
                label=f"{common.key_text(recent['key'])} · {recent['status']}",
                query_params=common.key_params(recent["key"]),
            )


status()
