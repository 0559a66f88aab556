"""The issue's acceptance scenario on the mock cluster: 10,000 keyed messages, a broker
outage longer than message.timeout.ms, two consumer groups, and `keytrace trace`."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest

from collector import TracedConsumer, TracedProducer
from collector.cli import main as cli_main
from collector.mockcluster import MockCluster
from collector.store import Store

N = 10_000
TOPIC = "orders"


def produce_with_outage(cluster: MockCluster, sink: str) -> dict[str, Any]:
    """Send N keyed messages; broker 2 is down for longer than message.timeout.ms meanwhile."""
    acked: dict[bytes, tuple[int, int]] = {}
    failed: dict[bytes, str] = {}

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            acked[msg.key()] = (msg.partition(), msg.offset())
        else:
            failed[msg.key()] = err.name()

    p = TracedProducer(
        {
            "bootstrap.servers": cluster.bootstrap_servers,
            "client.id": "orders-svc",
            "linger.ms": 5,
            "message.timeout.ms": 1500,
            "on_delivery": on_delivery,
        },
        sink=sink,
    )
    leader = p.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions[0].leader
    for i in range(N):
        if i == N // 3:
            cluster.broker_down(leader, seconds=3.0)  # twice message.timeout.ms
        if i % 100 == 0:
            time.sleep(0.02)  # spread the sends over about two seconds, across the outage
        while True:
            try:
                p.produce(TOPIC, b"x" * 100, f"order-{i}".encode())
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    assert p.flush(30) == 0
    p.close()
    assert len(acked) + len(failed) == N
    return {"acked": acked, "failed": failed}


def consume_all(cluster: MockCluster, group: str, expect: int, sink: str | None) -> dict[bytes, tuple[int, int]]:
    conf = {
        "bootstrap.servers": cluster.bootstrap_servers,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    }
    c = TracedConsumer(conf, sink=sink) if sink else confluent_kafka.Consumer(conf)
    c.subscribe([TOPIC])
    seen: dict[bytes, tuple[int, int]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < expect and time.monotonic() < deadline:
        for m in c.consume(500, 0.5):
            if m.error() is None:
                seen[m.key()] = (m.partition(), m.offset())
    c.close()
    return seen


@pytest.fixture
def outage_cluster() -> Any:
    with MockCluster(num_brokers=3) as cluster:
        cluster.create_topic(TOPIC, partitions=6, replication_factor=3)
        yield cluster


def check_store(db: Path, outcome: dict[str, Any], plain: dict[bytes, tuple[int, int]]) -> None:
    acked, failed = outcome["acked"], outcome["failed"]
    assert failed, "the outage should have failed some deliveries"
    assert set(failed.values()) == {"_MSG_TIMED_OUT"}
    assert plain == acked, "a plain consumer reads exactly the acked messages"
    with Store(db, read_only=True) as store:
        counts = store.counts()
        assert counts["send"] == N
        assert counts["ack"] == len(acked)
        assert counts["error"] == len(failed)
        assert counts["consume"] == 2 * len(acked)
        # Every message at once (what `keytrace trace order- --prefix` prints), then a
        # sample through the exact-key path that `keytrace trace KEY` uses.
        everything = store.trace_json(b"order-", prefix=True, limit=2 * N)
        by_key = {m["key"].encode(): m for m in everything["messages"]}
        assert len(by_key) == N
        sample = random.Random(1).sample(sorted(plain), 200) + sorted(failed)[:100]
        for key in sample:
            [msg] = store.trace_json(key)["messages"]
            same = ("trace_id", "topic", "partition", "offset", "status", "events")
            assert {k: msg[k] for k in same} == {k: by_key[key][k] for k in same}
    for key, (partition, offset) in plain.items():
        msg = by_key[key]
        assert (msg["topic"], msg["partition"], msg["offset"]) == (TOPIC, partition, offset)
        assert msg["status"] == "consumed"
        groups = sorted(e["group"] for e in msg["events"] if e["kind"] == "consume")
        assert groups == ["audit", "billing"], key
    for key in failed:
        msg = by_key[key]
        assert msg["status"] == "failed"
        assert msg["partition"] is None and msg["offset"] is None
        kinds = [e["kind"] for e in msg["events"]]
        assert "ack" not in kinds and kinds.count("error") == 1
        assert next(e for e in msg["events"] if e["kind"] == "error")["error"] == "_MSG_TIMED_OUT"


def test_duckdb_sink_end_to_end(outage_cluster: MockCluster, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "trace.duckdb"
    sink = f"duckdb://{db}"
    outcome = produce_with_outage(outage_cluster, sink)
    expect = len(outcome["acked"])
    assert consume_all(outage_cluster, "billing", expect, sink).keys() == outcome["acked"].keys()
    assert consume_all(outage_cluster, "audit", expect, sink).keys() == outcome["acked"].keys()
    plain = consume_all(outage_cluster, "plain-reader", expect, None)
    check_store(db, outcome, plain)

    # The CLI prints the same lifecycle, as JSON for scripts.
    key, (partition, offset) = next(iter(plain.items()))
    assert cli_main(["trace", key.decode(), "--db", str(db), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key"] == key.decode()
    assert [(m["partition"], m["offset"]) for m in doc["messages"]] == [(partition, offset)]
    assert [e["kind"] for e in doc["messages"][0]["events"]][:2] == ["send", "ack"]
    assert cli_main(["trace", "no-such-key", "--db", str(db)]) == 1
    assert "no trace for key" in capsys.readouterr().err


def collect_proc(cluster: MockCluster, db: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "collector.cli", "collect", "--bootstrap-servers", cluster.bootstrap_servers]
    cmd += ["--db", str(db), "--progress", "0.2", "--idle-exit", "4"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ))


def test_kafka_sink_and_collector_survive_sigkill(outage_cluster: MockCluster, tmp_path: Path) -> None:
    db = tmp_path / "collected.duckdb"
    sink = f"kafka://{outage_cluster.bootstrap_servers}/_keytrace.events"
    outage_cluster.create_topic("_keytrace.events", partitions=4, replication_factor=3)
    first = collect_proc(outage_cluster, db, tmp_path / "collect1.log")
    outcome = produce_with_outage(outage_cluster, sink)
    expect = len(outcome["acked"])
    consume_all(outage_cluster, "billing", expect, sink)
    # Kill the collector partway through ingest: once it has stored something.
    deadline = time.monotonic() + 60
    while not re.search(r"rows=[1-9]", (tmp_path / "collect1.log").read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    consume_all(outage_cluster, "audit", expect, sink)
    plain = consume_all(outage_cluster, "plain-reader", expect, None)
    second = collect_proc(outage_cluster, db, tmp_path / "collect2.log")
    assert second.wait(120) == 0, (tmp_path / "collect2.log").read_text()
    check_store(db, outcome, plain)
    with Store(db, read_only=True) as store:
        cur = store.cursor()
        total, distinct = cur.execute("SELECT count(*), count(DISTINCT (src, seq)) FROM events").fetchone()
        assert total == distinct, "a redelivered batch must not duplicate events"
        kinds = Counter(dict(cur.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall()))
    assert kinds["send"] == N and kinds["consume"] == 2 * expect
