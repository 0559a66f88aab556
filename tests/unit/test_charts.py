"""Chart builders, checked through the Vega-Lite spec each one produces."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from dashboard import charts

T = pd.date_range("2026-11-26 10:00", periods=3, freq="5s", tz="UTC")


def long_frame(series: list[str], values: list[float] | None = None) -> pd.DataFrame:
    rows = [(t, s) for s in series for t in T]
    vals = values or [float(i) for i in range(len(rows))]
    return pd.DataFrame({"t": [r[0] for r in rows], "series": [r[1] for r in rows], "value": vals})


def layers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("layer", [spec])


def data_of(spec: dict[str, Any], layer: dict[str, Any]) -> list[dict[str, Any]]:
    return spec["datasets"][layer.get("data", spec.get("data"))["name"]]


def rule_of(spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    [rule] = [layer for layer in layers(spec) if layer["mark"]["type"] == "rule"]
    return rule, data_of(spec, rule)


def test_time_series_is_a_utc_line_per_series() -> None:
    spec = charts.time_series(long_frame(["p50", "p99"]), "ack latency (ms)").to_dict()
    assert spec["mark"]["type"] == "line"
    enc = spec["encoding"]
    assert enc["x"]["field"] == "t" and enc["x"]["type"] == "temporal" and enc["x"]["scale"]["type"] == "utc"
    assert enc["x"]["title"] == "time (UTC)"
    assert enc["y"] == {"field": "value", "title": "ack latency (ms)", "type": "quantitative"}
    assert enc["color"]["field"] == "series"
    assert spec["height"] == charts.HEIGHT


def test_counter_bars_stack_per_interval_counts_with_fixed_colours() -> None:
    frame = long_frame(["dropped", "spooled"])
    spec = charts.counter_bars(
        frame, "trace events per interval", {"dropped": "#e45756", "spooled": "#f58518"}
    ).to_dict()
    assert spec["mark"]["type"] == "bar"
    y = spec["encoding"]["y"]
    assert (y["aggregate"], y["field"], y["stack"], y["title"]) == ("sum", "value", "zero", "trace events per interval")
    assert y["axis"]["tickMinStep"] == 1
    assert spec["encoding"]["color"]["scale"] == {"domain": ["dropped", "spooled"], "range": ["#e45756", "#f58518"]}
    assert "scale" not in charts.counter_bars(frame, "events").to_dict()["encoding"]["color"]


def test_throughput_colours_outcomes_and_dashes_topics() -> None:
    frame = long_frame(["acked", "sent", "failed"]).assign(topic="orders")
    spec = charts.throughput(frame).to_dict()
    enc = spec["encoding"]
    assert enc["y"]["title"] == "messages per second (msg/s)"
    assert enc["color"]["scale"]["domain"] == ["sent", "acked", "failed"]  # the fixed order, not the data's
    assert enc["color"]["scale"]["range"] == [charts.OUTCOME_COLORS[s] for s in ("sent", "acked", "failed")]
    assert enc["strokeDash"]["field"] == "topic"


@pytest.mark.parametrize("limit", [1_000_000.0, 10_000.0])
def test_batch_sizes_draw_the_configured_ceiling(limit: float) -> None:
    spec = charts.batch_sizes(
        long_frame(["p50", "p99"]), limit, "batch size (bytes)", f"batch.size {limit:,.0f}"
    ).to_dict()
    rule, rows = rule_of(spec)
    assert rule["encoding"]["y"]["field"] == "limit"
    assert rows == [{"limit": limit, "label": f"batch.size {limit:,.0f}"}]
    [line] = [layer for layer in layers(spec) if layer["mark"]["type"] == "line"]
    assert line["encoding"]["y"]["scale"]["type"] == "symlog"
    assert any(layer["mark"]["type"] == "text" for layer in layers(spec))


def test_without_a_limit_there_is_no_rule() -> None:
    spec = charts.batch_sizes(long_frame(["p50"]), None, "messages per batch", "").to_dict()
    assert [layer["mark"]["type"] for layer in layers(spec)] == ["line"]


def test_buffer_pressure_has_its_limit_at_100_percent() -> None:
    frame = long_frame(["messages (msg_cnt / msg_max)", "bytes (msg_size / msg_size_max)"])
    spec = charts.buffer_pressure(frame).to_dict()
    rule, rows = rule_of(spec)
    assert rows[0]["limit"] == 100.0 and "BufferError" in rows[0]["label"]
    assert rule["mark"]["color"] == "#e45756"
    [line] = [layer for layer in layers(spec) if layer["mark"]["type"] == "line"]
    assert line["encoding"]["y"]["title"] == "queue used (% of limit)"
    assert line["encoding"]["y"]["scale"]["domain"] == [0, 110]


def test_errors_by_name_grows_with_the_number_of_names() -> None:
    frame = pd.DataFrame(
        {"error_name": ["_MSG_TIMED_OUT", "_QUEUE_FULL", "_TRANSPORT"], "kind": ["a", "b", "c"], "count": [9, 3, 1]}
    )
    spec = charts.errors_by_name(frame).to_dict()
    assert spec["mark"]["type"] == "bar"
    assert spec["encoding"]["y"]["field"] == "error_name" and spec["encoding"]["y"]["sort"] == "-x"
    assert spec["encoding"]["x"]["aggregate"] == "sum" and spec["encoding"]["x"]["title"] == "events"
    assert spec["height"] > charts.errors_by_name(frame.head(1)).to_dict()["height"]


def test_lag_is_in_messages_per_group() -> None:
    spec = charts.lag(long_frame(["billing"])).to_dict()
    assert spec["encoding"]["y"]["title"] == "lag (messages)"
    assert spec["encoding"]["color"]["title"] == "group"


def lifecycle_events() -> pd.DataFrame:
    at = pd.Timestamp("2026-11-26 10:00:00", tz="UTC")
    rows = [
        (0, "producer", "send", "send #1"),
        (8, "broker", "ack", "ack p2@41 · 8.0 ms"),
        (900, "group billing", "consume", "consumed +900.0 ms"),
        (950, "group billing", "commit", "committed"),
        (1200, "group audit", "consume", "consumed +1,200.0 ms"),
    ]
    return pd.DataFrame(
        {
            "ts": [at + pd.Timedelta(milliseconds=ms) for ms, *_ in rows],
            "lane": [r[1] for r in rows],
            "kind": [r[2] for r in rows],
            "label": [r[3] for r in rows],
        }
    )


def test_lifecycle_has_lanes_in_order_points_and_labels() -> None:
    spec = charts.lifecycle(lifecycle_events()).to_dict()
    path, points, labels = spec["layer"]
    assert [path["mark"]["type"], points["mark"]["type"], labels["mark"]["type"]] == ["line", "point", "text"]
    assert points["encoding"]["y"]["sort"] == ["producer", "broker", "group billing", "group audit"]
    assert points["encoding"]["x"]["scale"]["type"] == "utc"
    assert points["encoding"]["color"]["scale"]["domain"] == ["send", "ack", "consume", "commit"]
    assert labels["encoding"]["text"]["field"] == "label"
    assert labels["transform"] == [{"filter": "(datum.kind !== 'commit')"}]
    assert spec["height"] == 110 + 48 * 4


def test_lifecycle_route_branches_once_per_group() -> None:
    spec = charts.lifecycle(lifecycle_events()).to_dict()
    rows = data_of(spec, spec["layer"][0])
    by_path: dict[str, list[str]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r["kind"])
    assert by_path == {"group billing": ["send", "ack", "consume", "commit"], "group audit": ["send", "ack", "consume"]}


def test_lifecycle_of_a_failed_message_has_one_route() -> None:
    events = lifecycle_events().head(2).assign(kind=["send", "error"], label=["send #1", "_MSG_TIMED_OUT"])
    spec = charts.lifecycle(events).to_dict()
    assert {r["path"] for r in data_of(spec, spec["layer"][0])} == {"message"}
    assert spec["layer"][1]["encoding"]["color"]["scale"]["range"] == ["#4c78a8", "#e45756"]
