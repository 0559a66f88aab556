"""Anomalies: messages that failed, were never acknowledged, never consumed, consumed twice, or reordered."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import queries
from dashboard.pages import common

ROWS = 500

st.title("Anomalies")
st.caption("Messages whose lifecycle broke somewhere. Each key opens its full lifecycle in key search.")

db = common.require_store()
if not common.has_events(db):
    st.info(common.NO_EVENTS)
    st.stop()

c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
with c1:
    label = common.range_picker("anomalies-range", default="all")
with c2:
    grace = int(
        st.number_input(
            "Pending for more than (s)",
            min_value=1,
            max_value=86_400,
            value=30,
            help="How long a message may wait for its ack, or for a group to read it, before it counts",
        )
    )
since, _, _ = queries.window(db, label)
found = queries.anomalies(db, since, queries.anchor(db), grace)
TIME = st.column_config.DatetimeColumn(format="HH:mm:ss.SSS")


def section(title: str, explanation: str, df: pd.DataFrame, by: list[str], **config: object) -> None:
    capped = " (first 500)" if len(df) >= ROWS else ""
    st.subheader(f"{title} · {len(df):,}{capped}")
    st.caption(explanation)
    if df.empty:
        st.success("None.")
        return
    by = [c for c in by if c in df.columns]
    if by:
        st.dataframe(df.groupby(by, dropna=False).size().reset_index(name="messages"), hide_index=True)
    common.table(common.with_key_links(df), **config)


section(
    "Failed",
    "The last attempt ended in a delivery error, or produce() raised BufferError; no attempt was acked.",
    found["failed"],
    ["topic", "status", "error_name"],
    sent_at=TIME,
    last_attempt_at=TIME,
)
section(
    "Never acknowledged",
    f"No delivery report {grace} s after the last attempt: the producer may have exited without flush(), "
    "or its trace events were lost.",
    found["never_acked"],
    ["client_id", "topic"],
    sent_at=TIME,
    last_attempt_at=TIME,
)
section(
    "Acked but not consumed",
    "A group that reads the partition skipped the message (it consumed a later offset), "
    f"or has not reached it {grace} s after the ack.",
    found["not_consumed"],
    ["group_id", "topic", "reason"],
    acked_at=TIME,
)
section(
    "Consumed twice",
    "One group consumed the same offset more than once: a rebalance or a restart before its commit.",
    found["consumed_twice"],
    ["group_id", "topic"],
    first_ts=TIME,
    last_ts=TIME,
)
section(
    "Out of order",
    "A message sent later by the same producer was stored before an earlier one, within a partition or a key, "
    "or a key moved partition. Usual cause: retries with several requests in flight and no idempotence.",
    found["out_of_order"],
    ["scope", "topic", "reason"],
    sent_at=TIME,
)
