"""Config review: each producer's settings, checked against Kafka producer advice and what it actually did."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import queries
from dashboard.pages import common

RESULT = {"pass": "✅ pass", "warn": "⚠️ warn", "fail": "❌ fail"}

st.title("Config review")
st.caption(
    "The newest config snapshot of each producer client, checked for durability, retries, buffer memory, "
    "batching, idle connections, ordering and keys. Unset values are librdkafka's defaults."
)

db = common.require_store()
configs = queries.latest_configs(db, "producer")
if configs.empty:
    st.info("No producer config snapshots yet: each TracedProducer records its config when it starts.")
    st.stop()

for row in configs.to_dict("records"):
    config = queries.parse_config(row["config"])
    checks = pd.DataFrame(queries.review_producer(config, queries.producer_observed(db, row["client_id"])))
    worst = "fail" if (checks["result"] == "fail").any() else "warn" if (checks["result"] == "warn").any() else "pass"
    with st.container(border=True):
        st.subheader(f"{RESULT[worst].split()[0]} {row['client_id']}")
        st.caption(f"snapshot taken {row['ts']:%Y-%m-%d %H:%M:%S} UTC")
        checks["result"] = checks["result"].map(RESULT)
        st.table(checks.set_index("check"))
        with st.expander("Full config snapshot (secrets removed)"):
            st.json(config)
