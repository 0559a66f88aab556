"""Key search: every message under a key, with its lifecycle from send to each group's consume."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import streamlit as st

from dashboard import charts, queries, runtime, topic_lookup
from dashboard.pages import common

MAX_MESSAGES = 50
LOOKUP_LIMIT = 200


def parse_key(text: str, mode: str) -> bytes | None:
    if mode != "hex":
        return text.encode("utf-8", "surrogateescape")
    try:
        return bytes.fromhex(text.removeprefix("hex:").removeprefix("0x").replace(" ", ""))
    except ValueError:
        return None


def render_message(m: dict[str, Any], show_key: bool) -> None:
    """One message: where it landed, a timeline of its events and the same events as a table."""
    where = (
        f"{m.get('topic')} · partition {m.get('partition')} · offset {m.get('offset')}"
        if m.get("offset") is not None
        else f"{m.get('topic')} · no partition/offset (never stored)"
    )
    with st.container(border=True):
        shown_key = f" · key `{common.key_text(m.get('key'))}`" if show_key else ""
        st.markdown(f"**{where}** — {m.get('status', '?')}{shown_key}")
        events = queries.lifecycle_events(m)
        chart_col, table_col = st.columns([1, 1])
        with chart_col:
            st.altair_chart(charts.lifecycle(events), width="stretch")
        with table_col:
            details = events.assign(time=events["ts"].dt.strftime("%H:%M:%S.%f").str[:-3])
            st.dataframe(
                details[["time", "kind", "lane", "latency_ms", "detail"]],
                hide_index=True,
                width="stretch",
                column_config={
                    "time": st.column_config.TextColumn("time (UTC)", width="small"),
                    "kind": st.column_config.TextColumn("event", width="small"),
                    "lane": "where",
                    "latency_ms": st.column_config.NumberColumn("latency (ms)", format="%.1f"),
                },
            )
        if m.get("trace_id"):
            st.caption(f"trace id {m['trace_id']}")


def render_lookup(db: str, key: bytes) -> None:
    """The topic-read fallback for a key keytrace never traced."""
    st.subheader("Look it up in the topic instead")
    st.caption(
        "keytrace hashes the key to its partition the way the producer's partitioner does, "
        "then reads only that partition, newest first, up to the limit below."
    )
    c1, c2, c3 = st.columns(3)
    with c1:
        topic = st.selectbox("Topic", queries.topics(db), index=None, accept_new_options=True, placeholder="orders")
    suggested = queries.topic_partitioners(db, topic) if topic else []
    choices = list(topic_lookup.PARTITIONERS)
    default = suggested[0] if suggested and suggested[0] in choices else topic_lookup.JAVA_DEFAULT
    with c2:
        partitioner = st.selectbox(
            "Partitioner",
            choices,
            index=choices.index(default),
            help="murmur2_random is the Java client's default; librdkafka's own default is consistent_random (CRC32).",
        )
    with c3:
        limit = st.number_input("Read at most (messages)", min_value=100, max_value=1_000_000, value=10_000, step=1_000)
    servers = st.text_input("Bootstrap servers", value=runtime.get().bootstrap_servers or "", placeholder="host:9092")
    if suggested:
        st.caption(f"Producers that sent to {topic} were configured with partitioner {', '.join(suggested)}.")
    if st.button("Read the topic", disabled=not (topic and servers), type="primary"):
        with st.spinner(f"Reading the tail of {topic}…"):
            st.session_state["lookup"] = topic_lookup.find_key_in_topic(servers, topic, key, partitioner, int(limit))
    found = st.session_state.get("lookup")
    if found is None or found.key != key:
        return
    st.info("This is a topic read, not a trace: it shows where the message sits, not what happened to it.")
    if found.error:
        st.error(f"Topic read failed: {found.error}")
        return
    last = (found.high or 0) - 1
    st.markdown(
        f"`{common.key_text(key)}` → partition **{found.partition}** of {found.num_partitions} ({found.partitioner}). "
        f"Read offsets {found.first_read}–{last} ({found.scanned:,} messages); the partition holds {found.low}–{last}."
    )
    if found.timed_out:
        st.warning("The read stopped at its time limit before covering the whole window.")
    if not found.matches:
        more = "" if found.window_complete else " Older messages were not read: raise the limit to look further back."
        st.warning(f"No message with this key in the window.{more}")
        return
    st.dataframe(found.matches, hide_index=True, width="stretch")


st.title("Key search")
st.caption("What happened to the message with key K: sent, retried, acknowledged where, consumed by whom and when.")

db = common.require_store()

left, right = st.columns([4, 2], vertical_alignment="bottom")
with left:
    text = st.text_input(
        "Message key",
        key="key",
        bind="query-params",
        placeholder="order-42",
        help="Exact key, a prefix of keys, or hex bytes for binary keys",
    )
with right:
    mode = st.segmented_control("Match", ["exact", "prefix", "hex"], default="exact", key="mode", bind="query-params")
mode = mode or "exact"
position = {k: st.query_params.get(k) for k in ("topic", "partition", "offset")}

if text:
    if any(position.values()):
        for name in position:
            st.query_params.pop(name, None)
    key = parse_key(text, mode)
    if key is None:
        st.error(f"{text!r} is not hex: use pairs of 0-9a-f digits, such as `6f72646572`.")
        st.stop()
    messages = queries.lifecycle(db, key, mode == "prefix", LOOKUP_LIMIT)
    link = {"key": text, **({"mode": mode} if mode != "exact" else {})}
elif all(position.values()):
    try:
        topic, partition, offset = str(position["topic"]), int(str(position["partition"])), int(str(position["offset"]))
    except ValueError:
        st.error("A position link needs `?topic=T&partition=P&offset=O` with whole numbers.")
        st.stop()
    found = queries.message_at(db, topic, partition, offset)
    if found is None:
        st.warning(
            f"keytrace has no trace of {topic} partition {partition} offset {offset}: "
            "no ack and no consumption of it was recorded."
        )
        st.stop()
    key, messages, link = found["key"], [found], {"topic": topic, "partition": partition, "offset": offset}
    st.info(f"The message at {topic} p{partition}@{offset} has key `{common.key_text(key)}`.")
    if key is not None:
        st.page_link(common.SEARCH_PAGE, label="Every message under this key", query_params=common.key_params(key))
else:
    if not common.has_events(db):
        st.info(common.NO_EVENTS)
        st.stop()
    st.markdown("Type a key above, or open one of the most recently active:")
    cols = st.columns(3)
    for i, recent in enumerate(queries.recent_keys(db, 12)):
        with cols[i % 3]:
            st.page_link(
                common.SEARCH_PAGE,
                label=f"{common.key_text(recent['key'])} · {recent['status']}",
                query_params=common.key_params(recent["key"]),
                icon="🔑",
            )
    st.stop()

if not messages:
    if not common.has_events(db):
        st.info(common.NO_EVENTS)
        st.stop()
    what = "no traced key starts with" if mode == "prefix" else "keytrace never saw the key"
    st.warning(f"Not found: {what} `{common.key_text(key)}`.")
    st.caption("Check the match mode (binary keys need hex), or whether the producer was traced at that time.")
    if mode != "prefix" and key is not None:
        render_lookup(db, key)
    st.stop()

st.caption("Link to this lifecycle, for an incident ticket:")
st.code(common.app_url() + "?" + urlencode(link), language=None)

statuses: dict[str, int] = {}
for m in messages:
    statuses[m.get("status", "?")] = statuses.get(m.get("status", "?"), 0) + 1
summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
under = "keys starting with" if mode == "prefix" and text else "key"
many = "at least " if len(messages) >= LOOKUP_LIMIT else ""
st.markdown(f"**{many}{len(messages)} message(s)** under {under} `{common.key_text(key)}`: {summary}")
if len(messages) > 1:
    st.dataframe(
        [
            {
                "key": common.key_text(m.get("key")),
                "topic": m.get("topic"),
                "partition": m.get("partition"),
                "offset": m.get("offset"),
                "status": m.get("status"),
                "sent (UTC)": next((e["ts"] for e in m.get("events", []) if e.get("kind") == "send"), None),
            }
            for m in messages
        ],
        hide_index=True,
        width="stretch",
        height=min(400, 38 + 35 * len(messages)),
    )
if len(messages) > MAX_MESSAGES:
    st.caption(f"Timelines of the {MAX_MESSAGES} most recent follow; narrow the search to see older ones.")
for m in messages[-MAX_MESSAGES:]:
    render_message(m, show_key=mode == "prefix")
