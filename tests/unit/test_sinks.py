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


_HANDLES = """
import os, time
def handles():
    # librdkafka gives each client handle one thread named rdk:main.
    n = 0
    for t in os.listdir("/proc/self/task"):
        try:
            n += open(f"/proc/self/task/{t}/comm").read().strip() == "rdk:main"
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended (either error)
            pass
    return n
def settled(n, deadline=10.0):
    end = time.monotonic() + deadline
    while handles() != n and time.monotonic() < end:
        time.sleep(0.05)
    return handles()
"""


@pytest.mark.parametrize("reachable", [True, False])
def test_close_releases_the_sinks_producer_at_once(mock_cluster: Any, tmp_path: Path, reachable: bool) -> None:
    """After close() no librdkafka handle of the client or its Kafka sink is left running.

    The client object stays referenced (as an application or a reference cycle keeps it),
    so only close() itself can have ended the handles. An unreachable sink must not make
    close() wait out its message timeout, and its events go to the spool.
    """
    servers = mock_cluster.bootstrap_servers if reachable else "127.0.0.1:1"
    spool = tmp_path / "spool"
    script = _HANDLES + textwrap.dedent(
        f"""
        from collector import TracedProducer
        base = handles()
        p = TracedProducer({{"bootstrap.servers": "{mock_cluster.bootstrap_servers}"}},
                           sink="kafka://{servers}/t-sink-close", trace_options={{"spool_dir": "{spool}"}})
        assert settled(base + 2) == base + 2, handles()
        for i in range(100):
            p.produce("t-sink-close-data", b"v", b"k%d" % i)
        p.flush(10)
        t = time.monotonic()
        p.close()
        took = time.monotonic() - t
        print(base, settled(base), round(took, 3), p.trace_status()["spooled"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    base, after, took, spooled = result.stdout.split()
    assert after == base, (result.stdout, result.stderr[-2000:])
    if not reachable:
        # One bounded wait of 3 s for the sink, after the application's own flush (it was 9 s).
        assert float(took) < 7.5, took
        assert int(spooled) > 0, result.stdout
