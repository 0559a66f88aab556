"""What every page shares: the store check, the range picker, key display and links to key search."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode, urljoin

import pandas as pd
import streamlit as st

from dashboard import queries, runtime

SEARCH_PAGE = "pages/search.py"
NO_EVENTS = (
    "No events yet: is a TracedProducer pointed at this collector? Switch the import to "
    "`from collector import TracedProducer` and give it `sink=...` (or set KEYTRACE_SINK)."
)
STATUS_ICONS = {"ok": "🟢 ok", "idle": "⚪ idle", "degraded": "🟠 degraded", "failing": "🔴 failing"}


def require_store() -> str:
    """The open store's cache token; stops the page with an explanation when there is no store."""
    try:
        s = queries.store()
    except Exception as exc:
        st.error(f"The trace store cannot be opened: {exc}")
        st.stop()
    if s is None:
        st.error(
            "No trace store is configured. Start the dashboard with `keytrace serve`, "
            "`keytrace demo`, or `keytrace dashboard --db FILE`."
        )
        st.stop()
    return queries.db_token()


def has_events(db: str) -> bool:
    return any(queries.counts(db).values())


def range_picker(key: str, default: str | None = None) -> str:
    """Time range control; pass its label to queries.window() where the data is read.

    A live store opens on recent minutes; a store under review opens on everything it holds.
    """
    default = default or ("last 15 min" if runtime.get().mode in ("serve", "demo") else "all")
    label = st.segmented_control(
        "Time range", list(queries.RANGES), default=default, key=key, required=True, help="Relative to the newest data"
    )
    return label or default


def live_toggle(key: str) -> float | None:
    """Auto-refresh interval for the page's live fragment, or None when paused."""
    live_by_default = runtime.get().mode in ("serve", "demo")
    on = st.toggle("Live", value=live_by_default, key=key, help="Refresh the charts every 2 seconds")
    return 2.0 if on else None


def time_caption(db: str, label: str, bucket_s: int) -> str:
    end = queries.anchor(db)
    basis = "now" if runtime.get().mode in ("serve", "demo") else "the newest record in this store"
    return f"{label}, up to {end:%Y-%m-%d %H:%M:%S} UTC ({basis}); one point per {bucket_s} s."


def key_text(key: Any) -> str:
    """A key as a person reads it: UTF-8 text when it is printable, hex otherwise."""
    if key is None:
        return "(null key)"
    raw = bytes(key)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + raw.hex()
    return text if text.isprintable() else "hex:" + raw.hex()


def key_params(key: Any) -> dict[str, str]:
    """Query parameters that open key search on this exact key."""
    raw = bytes(key)
    shown = key_text(raw)
    if shown.startswith("hex:") or not shown:
        return {"key": raw.hex(), "mode": "hex"}
    return {"key": shown}


def search_href(key: Any) -> str | None:
    """A link (relative to the app root) that opens key search on a key."""
    return None if key is None else "./?" + urlencode(key_params(key))


def app_url() -> str:
    """The app's root URL as the browser sees it, for links pasted outside the app."""
    url = st.context.url
    if url:
        return urljoin(url, "./")
    host = st.get_option("server.address") or "localhost"
    return f"http://{host}:{st.get_option('server.port')}/"


def with_key_links(df: pd.DataFrame, key_col: str = "key") -> pd.DataFrame:
    """Replace a BLOB key column with readable text plus a `search` link column."""
    out = df.copy()
    keys = out[key_col].map(lambda k: None if k is None or k is pd.NA or isinstance(k, float) else bytes(k))
    out[key_col] = keys.map(key_text)
    out.insert(0, "search", keys.map(search_href))
    return out


KEY_LINK = st.column_config.LinkColumn("search", display_text="open ↗", width="small", help="Open in key search")


def table(df: pd.DataFrame, **column_config: Any) -> None:
    config = {"search": KEY_LINK} if "search" in df.columns else {}
    config.update(column_config)
    st.dataframe(df, hide_index=True, column_config=config, width="stretch")


def status_table(df: pd.DataFrame, name_col: str, rule: Any) -> pd.DataFrame:
    """Apply a status rule to each row; returns status, name and reason first."""
    if df.empty:
        return df
    rows = []
    for row in df.to_dict("records"):
        status, reason = rule(row)
        rows.append({"status": STATUS_ICONS[status], name_col: row[name_col], "reason": reason})
    return pd.DataFrame(rows).merge(df, on=name_col, how="left")
