"""What the traced clients record, and that tracing never harms the application."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import confluent_kafka
import pyarrow.compute as pc
import pytest
from spool_reader import read_spool

from collector import TracedConsumer, TracedProducer
from collector.mockcluster import MockCluster
from collector.tracer import MAX_KEY_BYTES

pytestmark = pytest.mark.usefixtures("recorder")


def events_of(directory: Path) -> list[dict[str, Any]]:
    tables = read_spool(directory)
    return tables["events"].to_pylist() if "events" in tables else []


def test_send_and_ack_are_recorded(mock_cluster: MockCluster, mock_topic: str, spool_sink: tuple[str, Path]) -> None:
    sink, directory = spool_sink
    acks: list[tuple[int, int]] = []
    p = TracedProducer(
        {"bootstrap.servers": mock_cluster.bootstrap_servers, "client.id": "orders-svc"},
        sink=sink,
        on_delivery=lambda err, msg: acks.append((msg.partition(), msg.offset())),
    )
    for i in range(50):
        p.produce(mock_topic, b"x" * 10, f"order-{i}".encode())
    assert p.flush(10) == 0
    p.close()
    events = events_of(directory)
    sends = [e for e in events if e["kind"] == "send"]
    got_acks = [e for e in events if e["kind"] == "ack"]
    assert len(sends) == 50 and len(got_acks) == 50
    assert {(e["partition"], e["offset"]) for e in got_acks} == set(acks)
    assert {e["client_id"] for e in events} == {"orders-svc"}
    assert all(e["value_size"] == 10 and e["attempt"] == 1 for e in sends)
    assert all(e["latency_us"] > 0 for e in got_acks)
    assert len({(e["src"], e["seq"]) for e in events}) == len(events), "event ids must be unique"
    configs = read_spool(directory)["configs"].to_pylist()
    assert json.loads(configs[0]["config"])["client.id"] == "orders-svc"


def test_odd_keys_are_recorded_and_do_no_harm(
    mock_cluster: MockCluster, mock_topic: str, spool_sink: tuple[str, Path]
) -> None:
    sink, directory = spool_sink
    huge = b"k" * (1024 * 1024)
    keys = [None, b"", b"\xff\xfe\x00binary", "unicode-\u00e9", huge]
    delivered: list[Any] = []
    # A 1 MiB key needs a larger message.max.bytes than librdkafka's default 1,000,000.
    p = TracedProducer({"bootstrap.servers": mock_cluster.bootstrap_servers, "message.max.bytes": 4_000_000}, sink=sink)
    for k in keys:
        p.produce(mock_topic, b"v", k, on_delivery=lambda err, msg: delivered.append(err))
    assert p.flush(10) == 0
    p.close()
    assert delivered == [None] * len(keys)
    events = events_of(directory)
    sent = [e["key"] for e in events if e["kind"] == "send"]
    assert sent[:4] == [None, b"", b"\xff\xfe\x00binary", "unicode-\u00e9".encode()]
    assert sent[4] == huge[:MAX_KEY_BYTES]
    assert sorted((e["key"] or b"") for e in events if e["kind"] == "ack") == sorted((k or b"") for k in sent)


def test_user_callbacks_still_fire_with_the_same_arguments(mock_cluster: MockCluster, mock_topic: str) -> None:
    seen: dict[str, list[Any]] = {"dr": [], "stats": [], "error": []}
    conf = {
        "bootstrap.servers": mock_cluster.bootstrap_servers,
        "statistics.interval.ms": 100,
        "on_delivery": lambda err, msg: seen["dr"].append((err, type(msg))),
        "stats_cb": lambda doc: seen["stats"].append(doc),
        "error_cb": lambda err: seen["error"].append(err),
    }
    p = TracedProducer(conf, sink="spool:///dev/null/never-written")
    p.produce(mock_topic, b"v", b"k")
    deadline = time.monotonic() + 5
    while (not seen["stats"] or not seen["dr"]) and time.monotonic() < deadline:
        p.poll(0.1)
    assert seen["dr"] == [(None, confluent_kafka.Message)]
    assert isinstance(seen["stats"][0], str) and json.loads(seen["stats"][0])["type"] == "producer"

    # error_cb: a client whose bootstrap server refuses connections.
    errors: list[Any] = []
    q = TracedProducer({"bootstrap.servers": "127.0.0.1:1", "error_cb": errors.append}, sink="spool:///dev/null/x")
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        q.poll(0.2)
    assert errors and isinstance(errors[0], confluent_kafka.KafkaError)
    p.close()
    q.purge()


def test_user_callback_exception_reaches_the_user(
    mock_cluster: MockCluster, mock_topic: str, spool_sink: tuple[str, Path]
) -> None:
    sink, directory = spool_sink

    def boom(err: Any, msg: Any) -> None:
        raise ValueError("user bug")

    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers, "on_delivery": boom}
    plain = confluent_kafka.Producer(conf)
    plain.produce(mock_topic, b"v", b"k")
    with pytest.raises(ValueError, match="user bug"):
        plain.flush(10)

    traced = TracedProducer(conf, sink=sink)
    traced.produce(mock_topic, b"v", b"k")
    with pytest.raises(ValueError, match="user bug"):
        traced.flush(10)
    traced.produce(mock_topic, b"v", b"k2", on_delivery=boom)
    with pytest.raises(ValueError, match="user bug"):
        traced.flush(10)
    traced._kt_tracer.close()
    kinds = [e["kind"] for e in events_of(directory)]
    assert kinds.count("ack") == 2, "the ack is recorded even though the user's callback raised"
    assert traced.trace_status()["internal_errors"] == 0


def test_buffer_error_is_recorded_and_reraised(mock_topic: str, spool_sink: tuple[str, Path]) -> None:
    sink, directory = spool_sink
    # A cluster that never answers keeps messages queued, so the queue fills.
    p = TracedProducer({"bootstrap.servers": "127.0.0.1:1", "queue.buffering.max.messages": 5}, sink=sink)
    for i in range(5):
        p.produce(mock_topic, b"v", f"k{i}".encode())
    with pytest.raises(BufferError):
        p.produce(mock_topic, b"v", b"rejected-key")
    p.purge()
    p.poll(0)
    p._kt_tracer.close()
    rejects = [e for e in events_of(directory) if e["kind"] == "reject"]
    assert [e["key"] for e in rejects] == [b"rejected-key"]
    assert rejects[0]["error_name"] == "_QUEUE_FULL"


def test_buffer_error_with_keyword_arguments_and_a_failing_recorder(
    mock_topic: str, spool_sink: tuple[str, Path], recorder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collector import native

    sink, directory = spool_sink
    p = TracedProducer({"bootstrap.servers": "127.0.0.1:1", "queue.buffering.max.messages": 2}, sink=sink)
    if recorder == "native" and native.produce_descriptor() is not None:
        # The C method descriptor (collector/native/kt_produce.c) is what the application calls.
        assert type(TracedProducer.__dict__["produce"]).__name__ == "Produce"
    p.produce(mock_topic, b"v", b"a")
    p.produce(topic=mock_topic, value=b"v", key=b"b")
    with pytest.raises(BufferError):
        p.produce(topic=mock_topic, value=b"vv", key=b"kw-rejected", partition=0)
    with pytest.raises(BufferError):
        p.produce(mock_topic, b"v", key=b"mixed-rejected")

    # A failure inside keytrace's own recording must not replace the application's BufferError.
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("recorder bug")

    monkeypatch.setattr(p._kt_tracer, "event", broken)
    with pytest.raises(BufferError):
        p.produce(mock_topic, b"v", b"lost-reject")
    monkeypatch.undo()
    p.purge()
    p.poll(0)
    p._kt_tracer.close()
    rejects = [e for e in events_of(directory) if e["kind"] == "reject"]
    assert [(e["key"], e["value_size"], e["partition"]) for e in rejects] == [
        (b"kw-rejected", 2, 0),
        (b"mixed-rejected", 1, None),
    ]
    assert p.trace_status()["internal_errors"] == 1


def test_unreachable_sink_never_blocks_or_raises(mock_cluster: MockCluster, mock_topic: str, tmp_path: Path) -> None:
    spool = tmp_path / "outage-spool"
    delivered = []
    p = TracedProducer(
        {"bootstrap.servers": mock_cluster.bootstrap_servers, "on_delivery": lambda e, m: delivered.append(e)},
        sink="kafka://127.0.0.1:1/_keytrace.events",
        trace_options={"spool_dir": str(spool), "flush_interval_s": 0.05},
    )
    t0 = time.monotonic()
    for i in range(2000):
        p.produce(mock_topic, b"v" * 100, f"k{i}".encode())
        p.poll(0)
    assert p.flush(10) == 0
    elapsed = time.monotonic() - t0
    assert delivered == [None] * 2000
    assert elapsed < 5, f"the application waited {elapsed:.1f}s on an unreachable trace sink"
    # The sink gives up on its batches after message.timeout.ms; then they are in the spool.
    p._kt_tracer.shipper.stop(timeout=1)
    tables = read_spool(spool)
    kinds = pc.value_counts(tables["events"]["kind"]).to_pylist()
    assert {d["values"]: d["counts"] for d in kinds} == {"send": 2000, "ack": 2000}
    assert p.trace_status()["dropped"] == 0


def test_resend_policy_traces_every_attempt_under_one_trace(spool_sink: tuple[str, Path]) -> None:
    sink, directory = spool_sink
    final: list[Any] = []
    with MockCluster(num_brokers=1) as cluster:
        cluster.create_topic("resend", partitions=1, replication_factor=1)
        p = TracedProducer(
            {
                "bootstrap.servers": cluster.bootstrap_servers,
                "message.timeout.ms": 800,
                # Reconnect quickly once the broker is back, so a later attempt can succeed.
                "reconnect.backoff.ms": 20,
                "reconnect.backoff.max.ms": 100,
            },
            sink=sink,
            resend_attempts=3,
            resend_backoff_ms=300,
        )
        p.list_topics("resend", timeout=5)
        cluster.broker_down(1)
        p.produce("resend", b"v", b"order-1", on_delivery=lambda err, msg: final.append(err))
        deadline = time.monotonic() + 10
        while not any(e["kind"] == "resend" for e in events_of(directory)) and time.monotonic() < deadline:
            p.poll(0.05)
        cluster.broker_up(1)
        assert p.flush(15) == 0
        p.close()
    events = [e for e in events_of(directory) if e["key"] == b"order-1"]
    assert final == [None], f"the user's callback fires once, with the final outcome: {events}"
    kinds = [(e["kind"], e["attempt"], e["error_name"]) for e in sorted(events, key=lambda e: e["ts"])]
    assert kinds[0] == ("send", 1, None)
    assert kinds[1] == ("error", None, "_MSG_TIMED_OUT")
    assert ("resend", 2, None) in kinds
    assert kinds[-1][0] == "ack"
    resends = [e for e in events if e["kind"] == "resend"]
    assert len({e["trace_seq"] for e in resends}) == 1
    send = next(e for e in events if e["kind"] == "send")
    assert send["trace_seq"] == resends[0]["trace_seq"], "every attempt carries the same trace"


def test_consumer_records_consume_commit_and_rebalance(
    mock_cluster: MockCluster, mock_topic: str, spool_sink: tuple[str, Path]
) -> None:
    sink, directory = spool_sink
    producer = confluent_kafka.Producer({"bootstrap.servers": mock_cluster.bootstrap_servers})
    for i in range(20):
        producer.produce(mock_topic, b"v", f"k{i}".encode())
    producer.flush(10)
    commits: list[Any] = []
    c = TracedConsumer(
        {
            "bootstrap.servers": mock_cluster.bootstrap_servers,
            "group.id": f"billing-{mock_topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "on_commit": lambda err, parts: commits.append(err),
        },
        sink=sink,
    )
    assigned: list[Any] = []
    c.subscribe([mock_topic], on_assign=lambda consumer, parts: assigned.append(len(parts)))
    got = 0
    deadline = time.monotonic() + 20
    while got < 20 and time.monotonic() < deadline:
        got += len(c.consume(10, 0.5))
    c.commit(asynchronous=True)
    deadline = time.monotonic() + 5
    while not commits and time.monotonic() < deadline:
        c.poll(0.1)
    # librdkafka calls no on_commit for a synchronous commit; keytrace records it anyway.
    c.commit(offsets=[confluent_kafka.TopicPartition(mock_topic, 0, 1)], asynchronous=False)
    c.close()
    assert got == 20 and assigned == [4]
    assert [err is None for err in commits] == [True], "the user's on_commit fires once, as before"
    events = events_of(directory)
    consumes = [e for e in events if e["kind"] == "consume"]
    assert len(consumes) == 20
    assert {e["group_id"] for e in consumes} == {f"billing-{mock_topic}"}
    assert all(e["member_id"] for e in consumes)
    assert all(e["latency_us"] is not None and e["latency_us"] >= 0 for e in consumes)
    commit_events = [e for e in events if e["kind"] == "commit"]
    assert len(commit_events) == 2, "both the synchronous and the asynchronous commit are recorded"
    assert all(e["error_name"] is None for e in commit_events)
    assert {d["topic"] for d in json.loads(commit_events[0]["detail"])} == {mock_topic}
    rebalances = [json.loads(e["detail"]) for e in events if e["kind"] == "rebalance"]
    assert rebalances[0]["change"] == "assign" and len(rebalances[0]["partitions"]) == 4


def test_statistics_become_typed_rows(mock_cluster: MockCluster, mock_topic: str, spool_sink: tuple[str, Path]) -> None:
    sink, directory = spool_sink
    user_docs: list[str] = []
    p = TracedProducer(
        {
            "bootstrap.servers": mock_cluster.bootstrap_servers,
            "statistics.interval.ms": 200,
            "stats_cb": user_docs.append,
            "sasl.password": "hunter2",
        },
        sink=sink,
    )
    deadline = time.monotonic() + 5
    while len(user_docs) < 2 and time.monotonic() < deadline:
        p.produce(mock_topic, b"v" * 100, b"k")
        p.poll(0.05)
    p.flush(5)
    p.close()
    tables = read_spool(directory)
    stats = tables["stats"].to_pylist()
    assert len(stats) >= 2
    row = stats[-1]
    assert row["client_type"] == "producer"
    assert row["msg_max"] > 0 and row["msg_size_max"] > 0
    assert row["brokers_total"] == 3 and row["brokers_up"] >= 1
    assert row["raw"] in user_docs
    config = json.loads(tables["configs"].to_pylist()[0]["config"])
    assert config["sasl.password"] == "[redacted]"
    assert "hunter2" not in str(tables["configs"].to_pylist())


def test_a_statistics_value_of_the_wrong_type_costs_only_its_own_columns(spool_sink: tuple[str, Path]) -> None:
    # librdkafka writes well-formed documents, so the bad ones are put straight into the
    # client's stats buffer, where its stats_cb puts what librdkafka hands it.
    sink, directory = spool_sink
    p = TracedProducer({"bootstrap.servers": "127.0.0.1:1"}, sink=sink, trace_options={"stats_interval_ms": 0})
    good = json.dumps({"type": "producer", "msg_cnt": 7, "msg_max": 100})
    wrong_type = json.dumps({"type": "producer", "msg_cnt": "seven", "msg_max": 100})
    not_json = "{not json"
    now = time.time_ns()
    p._kt_tracer.stats_docs.extend([(now, good), (now + 1000, wrong_type), (now + 2000, not_json)])
    p.purge()
    p.close()
    rows = sorted(read_spool(directory)["stats"].to_pylist(), key=lambda r: r["ts"])
    assert [r["raw"] for r in rows] == [good, wrong_type, not_json], "every document is kept"
    assert rows[0]["msg_cnt"] == 7 and rows[0]["msg_max"] == 100
    assert rows[1]["msg_cnt"] is None and rows[1]["msg_max"] is None, "the row that does not convert keeps its raw text"
    assert rows[1]["client_type"] == rows[2]["client_type"] == "producer"
    assert len({r["seq"] for r in rows}) == 3
    assert p.trace_status()["internal_errors"] == 2, "the wrong type and the bad JSON are both reported"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_shipper_thread_runs_at_lower_priority(mock_topic: str, spool_sink: tuple[str, Path]) -> None:
    sink, _ = spool_sink
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    p = TracedProducer({"bootstrap.servers": "127.0.0.1:1"}, sink=sink, trace_options={"shipper_nice": 7})
    try:
        shipper = p._kt_tracer.shipper
        deadline = time.monotonic() + 5
        nice = None
        while time.monotonic() < deadline:
            stat = Path(f"/proc/self/task/{shipper._thread.native_id}/stat").read_text()
            nice = int(stat[stat.rindex(")") + 2 :].split()[16])
            if nice == min(19, base + 7):
                break
            time.sleep(0.01)
        assert nice == min(19, base + 7), "the shipper thread is reniced"
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base, "the application's thread is not"
    finally:
        p.purge()
        p._kt_tracer.close()
