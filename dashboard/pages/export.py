"""Export: trace events (all, one key, or a time range) as Parquet, CSV or a DuckDB file."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from dashboard import queries
from dashboard.pages import common

st.title("Export")
st.caption(
    "Take trace events out for an incident ticket or a colleague: a DuckDB file opens in "
    "`keytrace dashboard --db FILE`; Parquet and CSV open anywhere."
)

db = common.require_store()
if not common.has_events(db):
    st.info(common.NO_EVENTS)
    st.stop()

scope = st.radio("What", ["everything", "one key", "a time range"], horizontal=True)
key: bytes | None = None
since: dt.datetime | None = None
until: dt.datetime | None = None
if scope == "one key":
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    text = c1.text_input("Message key", key="export-key", placeholder="order-42")
    as_hex = c2.checkbox("hex", key="export-hex", help="The key is hex bytes")
    if not text:
        st.caption("Type the key to export.")
        st.stop()
    try:
        key = bytes.fromhex(text) if as_hex else text.encode("utf-8", "surrogateescape")
    except ValueError:
        st.error(f"{text!r} is not hex.")
        st.stop()
elif scope == "a time range":
    end = queries.anchor(db).replace(tzinfo=None, microsecond=0)
    c1, c2 = st.columns(2)
    since_local = c1.datetime_input("From (UTC)", value=end - dt.timedelta(minutes=15), step=60, key="export-since")
    until_local = c2.datetime_input("To (UTC)", value=end + dt.timedelta(minutes=1), step=60, key="export-until")
    since = since_local.replace(tzinfo=dt.UTC) if since_local else None
    until = until_local.replace(tzinfo=dt.UTC) if until_local else None

fmt = st.segmented_control(
    "Format",
    list(queries.EXPORT_FORMATS),
    format_func=lambda f: queries.EXPORT_FORMATS[f][0],
    default="parquet",
    required=True,
    key="export-format",
)
fmt = fmt or "parquet"
n = queries.export_count(db, key, since, until)
st.markdown(f"**{n:,} events** match.")
st.caption("The file is built in memory for the download; for a whole large store, `keytrace export` writes to disk.")
if not n:
    st.warning("Nothing to export with this choice.")
    st.stop()

choice = (fmt, key, since, until)
if st.button("Prepare the file", type="primary"):
    with st.spinner("Exporting…"):
        data, written = queries.export_bytes(fmt, key, since, until)
    st.session_state["export-file"] = (choice, data, written)

ready = st.session_state.get("export-file")
if ready is not None and ready[0] == choice:
    _, data, written = ready
    label, ext, mime = queries.EXPORT_FORMATS[fmt]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    st.download_button(
        f"Download {label} ({written:,} events, {len(data) / 1024:,.0f} KiB)",
        data,
        file_name=f"keytrace-{stamp}.{ext}",
        mime=mime,
        icon=":material/download:",
    )
