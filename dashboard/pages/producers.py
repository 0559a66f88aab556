"""Producer health, live: throughput, ack latency, retries, errors, batching, buffer pressure, connections."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, queries
from dashboard.pages import common

st.title("Producer health")
st.caption("What each producer client saw: delivery reports per message, librdkafka statistics per interval.")

db = common.require_store()
clients = queries.producer_clients(db)
if not clients:
    st.info(common.NO_EVENTS)
    st.stop()

c1, c2, c3, c4 = st.columns([2, 2, 3, 1], vertical_alignment="bottom")
with c1:
    client = st.selectbox("Producer client (client.id)", clients, key="producer-client")
with c2:
    topic_choice = st.selectbox("Topic", ["all topics", *queries.client_topics(db, client)], key="producer-topic")
with c3:
    label = common.range_picker("producer-range")
with c4:
    refresh = common.live_toggle("producer-live")
topic = None if topic_choice == "all topics" else topic_choice
config = queries.client_config(db, client)


def _chart(title: str, chart: object, caption: str) -> None:
    st.markdown(f"**{title}**")
    st.altair_chart(chart, width="stretch")
    st.caption(caption)


@st.fragment(run_every=refresh)
def health() -> None:
    since, bucket, span = queries.window(db, label)  # inside the fragment: a live range moves with each refresh
    st.caption(common.time_caption(db, label, bucket))
    flow = queries.throughput(db, client, topic, since, bucket)
    latency = queries.ack_latency(db, client, topic, since, bucket)
    stats = queries.stats_series(db, "producer", client, None, since, bucket)
    errs = queries.errors(db, client, topic, since)

    per_s = flow.groupby("series")["value"].sum() * bucket / span if len(flow) else {}
    p99 = latency[latency["series"] == "p99"]["value"]
    dropped = int(stats["kt_dropped"].sum()) if len(stats) else 0
    spooled = int(stats["kt_spooled"].sum()) if len(stats) else 0
    m = st.columns(6)
    m[0].metric("sent (msg/s)", f"{per_s.get('sent', 0):,.1f}", help="Average over the range")
    m[1].metric("acked (msg/s)", f"{per_s.get('acked', 0):,.1f}", help="Average over the range")
    m[2].metric("failed (msg/s)", f"{per_s.get('failed', 0):,.2f}", help="Average over the range")
    m[3].metric("p99 ack latency (ms)", f"{p99.iloc[-1]:,.1f}" if len(p99) else "–", help="Latest interval")
    m[4].metric(
        "trace events dropped",
        f"{dropped:,}",
        help="keytrace's own losses in this range: the sink was down and the spool was full",
        delta="events lost" if dropped else None,
        delta_color="inverse",
    )
    m[5].metric("trace events spooled", f"{spooled:,}", help="Shipped late through the local spool directory")
    if dropped:
        st.error(
            f"keytrace dropped {dropped:,} trace events for {client} in this range: some lifecycles are incomplete."
        )

    a, b = st.columns(2)
    with a:
        _chart("Throughput", charts.throughput(flow), "sent = produce() calls; acked / failed = delivery reports.")
    with b:
        _chart(
            "Ack latency",
            charts.time_series(latency, "ack latency (ms)"),
            "msg.latency(): from produce() to the delivery report, including librdkafka's own retries.",
        )

    a, b = st.columns(2)
    with a:
        retries = queries.retries_frame(stats, queries.resends(db, client, topic, since, bucket))
        _chart(
            "Retries and resends",
            charts.counter_bars(retries, "retries per interval"),
            "Internal retries are per-partition txmsgs − msgs; resends are the application's extra attempts.",
        )
    with b:
        if errs.empty:
            st.markdown("**Errors by name**")
            st.success("No errors in this range.")
        else:
            _chart(
                "Errors by name",
                charts.errors_by_name(errs),
                "Delivery-report errors, full-queue rejects and error_cb events.",
            )

    batch_size = queries.configured(config, "batch.size")
    batch_msgs = queries.configured(config, "batch.num.messages")
    linger = queries.configured(config, "linger.ms")
    a, b = st.columns(2)
    with a:
        bytes_ = queries.long(stats, {"batch_bytes_p50": "p50", "batch_bytes_p99": "p99"})
        _chart(
            "Batch size",
            charts.batch_sizes(bytes_, batch_size, "batch size (bytes)", f"batch.size {batch_size:,.0f}"),
            f"Per stats window. Batches close at batch.size or after linger.ms = {linger:,.0f} ms, whichever first.",
        )
    with b:
        msgs = queries.long(stats, {"batch_msgs_p50": "p50", "batch_msgs_p99": "p99"})
        _chart(
            "Messages per batch",
            charts.batch_sizes(msgs, batch_msgs, "messages per batch", f"batch.num.messages {batch_msgs:,.0f}"),
            "Small batches with a high rate mean many requests; full ones mean linger.ms no longer matters.",
        )

    a, b = st.columns(2)
    with a:
        pressure = queries.long(
            stats,
            {"pressure_msgs": "messages (msg_cnt / msg_max)", "pressure_bytes": "bytes (msg_size / msg_size_max)"},
        )
        _chart(
            "Buffer pressure",
            charts.buffer_pressure(pressure),
            "Queued in librdkafka, waiting to be sent or acknowledged.",
        )
    with b:
        rtt = queries.long(stats, {"rtt_p50": "p50", "rtt_p99": "p99"})
        _chart("Broker RTT", charts.time_series(rtt, "broker round trip (ms)"), "Worst broker per stats window.")

    a, b = st.columns(2)
    with a:
        conns = queries.long(
            stats, {"connects": "connects", "disconnects": "disconnects", "req_timeouts": "request timeouts"}
        )
        _chart(
            "Connections",
            charts.counter_bars(conns, "events per interval"),
            "Disconnects without a broker outage often mean an idle connection was closed by a proxy or load balancer.",
        )
    with b:
        own = queries.long(stats, {"kt_dropped": "dropped", "kt_spooled": "spooled"})
        _chart(
            "keytrace's own shipping",
            charts.counter_bars(own, "trace events per interval", {"dropped": "#e45756", "spooled": "#f58518"}),
            "Dropped trace events are lost for good; spooled ones arrive late.",
        )


health()
