"""Chart builders: DataFrame in, `alt.Chart` out. No Streamlit here, so each is testable via `.to_dict()`.

Time-series frames are long: a `t` column (UTC timestamps), a `series` column and a
`value` column, so that one builder serves every metric that shares a unit.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

TIME_AXIS = alt.X("t:T", title="time (UTC)", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%H:%M:%S"))
# Streamlit fits the whole chart (axes and legend included) into the height, so leave room for them.
HEIGHT = 300

# The same meaning keeps the same colour on every page.
OUTCOME_COLORS = {
    "sent": "#4c78a8",
    "acked": "#54a24b",
    "resent": "#f58518",
    "failed": "#e45756",
    "rejected": "#b279a2",
}
KIND_COLORS = {
    "send": "#4c78a8",
    "resend": "#f58518",
    "reject": "#b279a2",
    "ack": "#54a24b",
    "error": "#e45756",
    "consume": "#72b7b2",
    "commit": "#9d755d",
}


def _scale(colors: dict[str, str], present: pd.Series) -> alt.Scale:
    seen = set(present)
    names = [n for n in colors if n in seen] + sorted(seen - set(colors))
    return alt.Scale(domain=names, range=[colors.get(n, "#888888") for n in names])


def time_series(df: pd.DataFrame, y_title: str, color_title: str = "") -> alt.Chart:
    """Lines of `value` over `t`, one per `series`."""
    return (
        alt.Chart(df, height=HEIGHT)
        .mark_line(point=alt.OverlayMarkDef(size=18))
        .encode(
            x=TIME_AXIS,
            y=alt.Y("value:Q", title=y_title),
            color=alt.Color("series:N", title=color_title or None, legend=alt.Legend(orient="bottom")),
            tooltip=[
                alt.Tooltip("t:T", title="time", format="%H:%M:%S"),
                alt.Tooltip("series:N"),
                alt.Tooltip("value:Q", format=",.2f"),
            ],
        )
    )


def counter_bars(df: pd.DataFrame, y_title: str, colors: dict[str, str] | None = None) -> alt.Chart:
    """Stacked bars of per-interval counts (deltas of cumulative counters) over `t`."""
    scale = _scale(colors, df["series"]) if colors else alt.Undefined
    return (
        alt.Chart(df, height=HEIGHT)
        .mark_bar()
        .encode(
            x=TIME_AXIS,
            y=alt.Y("sum(value):Q", title=y_title, stack="zero", axis=alt.Axis(format="d", tickMinStep=1)),
            color=alt.Color("series:N", title=None, scale=scale, legend=alt.Legend(orient="bottom")),
            tooltip=[alt.Tooltip("t:T", title="time", format="%H:%M:%S"), "series:N", alt.Tooltip("value:Q")],
        )
    )


def throughput(df: pd.DataFrame) -> alt.Chart:
    """Messages per second by outcome (`series` = sent/acked/failed/...), one dash per topic."""
    return (
        alt.Chart(df, height=HEIGHT)
        .mark_line(point=alt.OverlayMarkDef(size=18))
        .encode(
            x=TIME_AXIS,
            y=alt.Y("value:Q", title="messages per second (msg/s)"),
            color=alt.Color("series:N", title="outcome", scale=_scale(OUTCOME_COLORS, df["series"])),
            strokeDash=alt.StrokeDash("topic:N", title="topic"),
            tooltip=[
                alt.Tooltip("t:T", title="time", format="%H:%M:%S"),
                "topic:N",
                alt.Tooltip("series:N", title="outcome"),
                alt.Tooltip("value:Q", title="msg/s", format=",.1f"),
            ],
        )
    )


def with_limit(base: alt.Chart, limit: float | None, label: str) -> alt.Chart | alt.LayerChart:
    """Overlay a dashed horizontal rule at `limit` with a text label."""
    if limit is None:
        return base
    frame = pd.DataFrame({"limit": [float(limit)], "label": [label]})
    rule = alt.Chart(frame).mark_rule(color="#e45756", strokeDash=[6, 4], size=2).encode(y="limit:Q")
    text = (
        alt.Chart(frame)
        .mark_text(align="left", baseline="bottom", dx=4, dy=-2, color="#e45756")
        .encode(y="limit:Q", text="label:N", x=alt.value(0))
    )
    return alt.layer(base, rule, text).properties(height=HEIGHT)


def batch_sizes(df: pd.DataFrame, limit: float | None, y_title: str, limit_label: str) -> alt.LayerChart:
    """Batch size percentiles per stats window against the configured ceiling.

    A symlog axis keeps batches of a few hundred bytes readable under a 1 MB ceiling.
    """
    base = time_series(df, y_title).encode(y=alt.Y("value:Q", title=y_title, scale=alt.Scale(type="symlog")))
    return with_limit(base, limit, limit_label)


def buffer_pressure(df: pd.DataFrame) -> alt.LayerChart:
    """Producer queue fill in % of its limits; at 100 % produce() raises BufferError."""
    base = time_series(df, "queue used (% of limit)")
    base = base.encode(y=alt.Y("value:Q", title="queue used (% of limit)", scale=alt.Scale(domain=[0, 110])))
    return with_limit(base, 100.0, "limit: produce() raises BufferError")


def errors_by_name(df: pd.DataFrame) -> alt.Chart:
    """Horizontal bars: `error_name`, `count`, coloured by `kind` (delivery error, rejected, client error)."""
    return (
        alt.Chart(df, height=150 + 34 * df["error_name"].nunique())
        .mark_bar()
        .encode(
            y=alt.Y("error_name:N", title=None, sort="-x"),
            x=alt.X("sum(count):Q", title="events"),
            color=alt.Color("kind:N", title="where", legend=alt.Legend(orient="bottom")),
            tooltip=["error_name:N", "kind:N", alt.Tooltip("sum(count):Q", title="events")],
        )
    )


def lag(df: pd.DataFrame) -> alt.Chart:
    """Consumer lag in messages per group (`series`)."""
    return time_series(df, "lag (messages)", "group")


def _paths(events: pd.DataFrame) -> pd.DataFrame:
    """The message's route: producer and broker events, then one branch per consumer group."""
    core = events[events["lane"].isin(["producer", "broker"])]
    branches = [lane for lane in dict.fromkeys(events["lane"]) if lane not in ("producer", "broker")]
    if not branches:
        return core.assign(path="message")
    return pd.concat(
        [pd.concat([core, events[events["lane"] == lane]]).assign(path=lane) for lane in branches],
        ignore_index=True,
    )


def lifecycle(events: pd.DataFrame) -> alt.LayerChart:
    """One message's lifecycle: a lane per actor, a point per event, labels with latencies.

    Columns: `ts` (UTC), `lane` (producer / broker / group name), `kind`, `label`.
    Commits get a point but no label: they sit right after a consume and would overprint it.
    """
    lanes = list(dict.fromkeys(events["lane"]))
    x = alt.X(
        "ts:T",
        title="time (UTC)",
        scale=alt.Scale(type="utc", padding=48),
        axis=alt.Axis(format="%H:%M:%S.%L", labelAngle=0, tickCount=4),
    )
    y = alt.Y("lane:N", title=None, sort=lanes, axis=alt.Axis(labelLimit=220))
    base = alt.Chart(events, height=110 + 48 * len(lanes))
    path = (
        alt.Chart(_paths(events))
        .mark_line(color="#bbbbbb", strokeDash=[3, 3])
        .encode(x=x, y=y, detail="path:N", order="ts:T")
    )
    points = base.mark_point(filled=True, size=140, opacity=1).encode(
        x=x,
        y=y,
        color=alt.Color(
            "kind:N", title="event", scale=_scale(KIND_COLORS, events["kind"]), legend=alt.Legend(orient="bottom")
        ),
        shape=alt.Shape("kind:N", legend=None),
        tooltip=[alt.Tooltip("ts:T", title="time (UTC)", format="%H:%M:%S.%L"), "lane:N", "kind:N", "label:N"],
    )
    labels = (
        base.transform_filter(alt.datum.kind != "commit")
        .mark_text(align="center", baseline="bottom", dy=-9, fontSize=11)
        .encode(x=x, y=y, text="label:N")
    )
    return alt.layer(path, points, labels)
