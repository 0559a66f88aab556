"""Choosing a sink, and pending events reaching it at flush, close, `with` exit and interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from collector.options import DEFAULT_EVENTS_TOPIC, TraceOptions, resolve_sink
from collector.sinks import SinkError, parse_sink
from collector.store import Store


def test_sink_comes_from_argument_then_environment_then_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = {"bootstrap.servers": "b1:9092,b2:9092"}
    assert resolve_sink("duckdb:///x.duckdb", conf) == "duckdb:///x.duckdb"
    monkeypatch.setenv("KEYTRACE_SINK", "kafka://other:9092/traces")
    assert resolve_sink(None, conf) == "kafka://other:9092/traces"
    monkeypatch.delenv("KEYTRACE_SINK")
    assert resolve_sink(None, conf) == f"kafka://b1:9092,b2:9092/{DEFAULT_EVENTS_TOPIC}"
    with pytest.raises(ValueError, match="no trace sink"):
        resolve_sink(None, {})


def test_sink_uris_are_checked() -> None:
    assert parse_sink("kafka://h1:9092,h2:9093/events") == ("kafka", "h1:9092,h2:9093", "events")
    assert parse_sink("duckdb:///var/lib/kt.duckdb") == ("duckdb", "/var/lib/kt.duckdb", "")
    for bad in ("kafka://h:9092", "duckdb://", "http://x/y"):
        with pytest.raises(SinkError):
            parse_sink(bad)
    with pytest.raises(ValueError, match="must start with"):
        TraceOptions(sink="s3://bucket/x")


@pytest.mark.parametrize("ending", ["flush", "close", "with", "exit"])
def test_pending_events_are_written_when_the_client_ends(mock_cluster: Any, tmp_path: Path, ending: str) -> None:
    db = tmp_path / f"{ending}.duckdb"
    body = {
        "flush": "p.produce('t-exit', b'v', b'k'); p.flush(10); p._kt_tracer.close()",
        "close": "p.produce('t-exit', b'v', b'k'); p.flush(10); p.close()",
        "with": "with p:\n    p.produce('t-exit', b'v', b'k')",
        # No flush, no close: the interpreter's exit hook must ship the events.
        "exit": "p.produce('t-exit', b'v', b'k'); p.poll(1.0)",
    }[ending]
    script = (
        textwrap.dedent(
            f"""
        from collector import TracedProducer
        p = TracedProducer({{"bootstrap.servers": "{mock_cluster.bootstrap_servers}"}}, sink="duckdb://{db}")
        """
        )
        + body
        + "\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with Store(db, read_only=True) as store:
        counts = store.counts()
    assert counts.get("send") == 1, (counts, result.stderr[-2000:])
    if ending != "exit":
        assert counts.get("ack") == 1, counts
