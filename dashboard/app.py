"""keytrace's Streamlit entrypoint: navigation plus a sidebar that says what this dashboard is looking at."""

from __future__ import annotations

import os
import time
from typing import Any

import streamlit as st

from dashboard import runtime

st.set_page_config(layout="wide", page_title="keytrace", page_icon="🔑")

MODES = {
    "serve": "live: collecting from Kafka",
    "demo": "demo: mock cluster with faults",
    "dashboard": "read-only review of a store file",
}

# URL paths differ from the file names on purpose. Until st.navigation() has run once in a
# process, Streamlit treats a pages/ folder beside the entrypoint as its legacy layout and runs
# a page file whose name matches the URL on its own, without this entrypoint.
pages = [
    st.Page("pages/search.py", title="Key search", icon=":material/search:", url_path="key-search", default=True),
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", url_path="status"),
    st.Page("pages/producers.py", title="Producer health", icon=":material/upload:", url_path="producer-health"),
    st.Page("pages/consumers.py", title="Consumers", icon=":material/download:", url_path="consumer-groups"),
    st.Page("pages/anomalies.py", title="Anomalies", icon=":material/warning:", url_path="anomaly-report"),
    st.Page("pages/config_review.py", title="Config review", icon=":material/tune:", url_path="config-review"),
    st.Page("pages/export.py", title="Export", icon=":material/file_download:", url_path="export-traces"),
]


def _compact(n: int) -> str:
    """Counts short enough for half the sidebar: 104,482 -> 104.5k."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def _ago(ts: float | None) -> str:
    return "never" if ts is None else f"{max(0.0, time.time() - ts):.0f} s ago"


@st.fragment(run_every=5)
def _collector_status(collector: Any) -> None:
    stats = getattr(collector, "stats", None)
    if stats is None:
        return
    st.markdown("**Collector**")
    c1, c2 = st.columns(2)
    c1.metric("records", _compact(stats.records), help="Messages read from the events topic")
    c2.metric("rows stored", _compact(stats.rows))
    c1.metric(
        "dead letters", _compact(stats.dead_letters), help="Records on the events topic that were not keytrace batches"
    )
    c2.metric("store errors", _compact(getattr(stats, "store_errors", 0)))
    st.caption(f"last ingest {_ago(getattr(stats, 'last_ingest_at', None))}")
    if stats.last_error:
        st.error(f"last error: {stats.last_error}", icon="⚠️")


def _demo_faults(demo: Any) -> None:
    st.markdown("**Inject a fault**")
    for name, description in demo.faults():
        if st.button(name.replace("_", " "), key=f"fault-{name}", help=description, width="stretch"):
            try:
                st.toast(demo.inject(name), icon="💥")
            except Exception as exc:
                st.error(f"{name}: {exc}")


page = st.navigation(pages)
with st.sidebar:
    rt = runtime.get()
    st.markdown(f"### keytrace\n{MODES.get(rt.mode, rt.mode)}")
    path = rt.extras.get("db") or os.environ.get(runtime.DB_ENV) or getattr(rt.store, "path", None)
    st.caption(f"store: `{path}`" if path else "store: none configured")
    if rt.bootstrap_servers:
        st.caption(
            f"cluster: `{rt.bootstrap_servers}`" + (f" · events topic `{rt.events_topic}`" if rt.events_topic else "")
        )
    if rt.collector is not None:
        _collector_status(rt.collector)
    if rt.demo is not None:
        _demo_faults(rt.demo)

page.run()
