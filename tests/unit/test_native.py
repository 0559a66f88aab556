"""The native interceptor plugin: what it records inside librdkafka, and that it leaves the client alone."""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import confluent_kafka
import pyarrow as pa
import pytest
from confluent_kafka import KafkaError, KafkaException

from collector import native
from collector.mockcluster import MockCluster
from collector.schema import EVENTS, META_WIRE, WIRE_ENCODED, from_ipc, from_wire, table_of, to_ipc, wire_batch

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native plugin: {native.unavailable_reason()}")

REPO = Path(__file__).resolve().parents[2]
MAX_KEY_BYTES = 64 * 1024
_srcs = itertools.count(int.from_bytes(os.urandom(4), "big") << 20)


@pytest.fixture
def src() -> Any:
    """A fresh client id whose buffers are released after the test."""
    value = next(_srcs)
    yield value
    native.forget(value)


def rows(batch: pa.RecordBatch | None) -> list[dict[str, Any]]:
    return [] if batch is None else batch.to_pylist()


def test_configure_loads_the_plugin_before_its_properties() -> None:
    conf = native.configure({"bootstrap.servers": "x:1", "plugin.library.paths": "other"}, 7, max_records=10)
    assert list(conf)[0] == "plugin.library.paths"
    assert conf["plugin.library.paths"] == f"other;{native.plugin_path()}"
    assert conf["keytrace.src"] == "7" and conf["keytrace.max.records"] == "10"
    assert conf["bootstrap.servers"] == "x:1"
    with pytest.raises(ValueError):
        native.configure({}, -1)


def test_one_librdkafka_in_the_process() -> None:
    # ctypes must have reached confluent-kafka's own copy, not loaded a second one.
    maps = Path("/proc/self/maps").read_text()
    files = {line.split()[-1] for line in maps.splitlines() if "/librdkafka" in line}
    assert len(files) == 1


def test_every_send_and_ack_with_odd_keys(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    huge = bytes(range(256)) * 4096  # 1 MiB
    keys = [None, b"", b"\xff\xfe\x00binary", b"order-1", huge]
    reports: list[tuple[Any, bytes | None, int, int, float]] = []
    conf = {
        "bootstrap.servers": mock_cluster.bootstrap_servers,
        # A 1 MiB key needs a larger message.max.bytes than librdkafka's default 1,000,000.
        "message.max.bytes": 4_000_000,
        "on_delivery": lambda err, m: reports.append((err, m.key(), m.partition(), m.offset(), m.latency())),
    }
    p = confluent_kafka.Producer(native.configure(conf, src))
    for k in keys:
        p.produce(mock_topic, b"v" * 7, k)
    p.produce(mock_topic, None, b"no-value")
    assert p.flush(10) == 0

    batch = native.drain(src, first_seq=100, client_id="orders-svc")
    assert batch is not None and table_of(batch) == "events" and batch.schema == EVENTS
    batch.validate(full=True)
    events = rows(batch)
    assert [e["seq"] for e in events] == list(range(100, 100 + len(events)))
    assert {e["src"] for e in events} == {src} and {e["client_id"] for e in events} == {"orders-svc"}
    sends = [e for e in events if e["kind"] == "send"]
    acks = [e for e in events if e["kind"] == "ack"]
    assert [e["key"] for e in sends] == [
        None,
        b"",
        b"\xff\xfe\x00binary",
        b"order-1",
        huge[:MAX_KEY_BYTES],
        b"no-value",
    ]
    assert [e["value_size"] for e in sends] == [7] * 5 + [None]
    assert all(e["topic"] == mock_topic and e["attempt"] == 1 for e in sends)
    assert all(e["offset"] is None and e["latency_us"] is None and e["partition"] is None for e in sends)
    # As with the Python recorder: a send's timestamp is ts; its size is not repeated on the ack.
    assert all(e["msg_ts_ms"] is None for e in sends)
    assert all(e["value_size"] is None and e["attempt"] is None for e in acks)

    assert len(acks) == len(reports) == 6
    by_key = {None if r[1] is None else r[1][:MAX_KEY_BYTES]: r for r in reports}
    for e in acks:
        err, _, partition, offset, latency = by_key[e["key"]]
        assert err is None and e["error_code"] is None
        assert (e["topic"], e["partition"], e["offset"]) == (mock_topic, partition, offset)
        # Measured when the broker's answer arrives, so never later than the report inside poll().
        assert 0 < e["latency_us"] <= latency * 1e6 + 1
    sent_at = {e["key"]: e["ts"] for e in sends}
    assert all(sent_at[e["key"]] <= e["ts"] for e in acks)
    assert native.drain(src) is None
    status = native.status(src)
    assert status is not None and (status.recorded, status.dropped, status.buffered) == (12, 0, 0)


def test_drains_travel_encoded_and_far_apart_values_stay_64_bit(
    mock_cluster: MockCluster, mock_topic: str, src: int
) -> None:
    p = confluent_kafka.Producer(native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, src))
    # Message timestamps 25 years apart: their differences (and those of the consumer's
    # end-to-end latencies) do not fit in 32 bits.
    stamps = [978_307_200_000, 1_790_000_000_000, 978_307_200_123, 1_790_000_000_456]
    for i, stamp in enumerate(stamps):
        p.produce(mock_topic, b"v", f"k{i}".encode(), partition=0, timestamp=stamp)
    assert p.flush(10) == 0
    wire = native.drain(src, first_seq=7, client_id="c", wire=True)
    assert wire is not None and wire.schema.metadata[META_WIRE] == WIRE_ENCODED
    # Microseconds apart: one or two bytes per difference. The first ack's time stamp jumps
    # back from the last send's; if that difference does not fit, it travels as a patch.
    ts = wire.schema.field("ts")
    assert ts.type in (pa.int8(), pa.int16())
    assert ts.metadata.get(b"keytrace.patch", b"4:").startswith(b"4:")
    assert wire.schema.field("partition").type == pa.int8() and wire.schema.field("key_len").type == pa.int8()
    assert "key" not in wire.schema.names and wire.column("key_len").to_pylist() == [2] * 8
    (back,) = from_ipc(to_ipc(wire))
    back.validate(full=True)
    events = back.to_pylist()
    assert [e["seq"] for e in events] == list(range(7, 15))
    acks = {e["key"]: e for e in events if e["kind"] == "ack"}
    sends = [e for e in events if e["kind"] == "send"]
    assert [e["key"] for e in sends] == [b"k0", b"k1", b"k2", b"k3"] and len(acks) == 4
    assert all(s["ts"] <= acks[s["key"]]["ts"] for s in sends)
    assert [acks[f"k{i}".encode()]["offset"] for i in range(4)] == sorted(e["offset"] for e in acks.values())

    consumer_src = next(_srcs)
    conf = {
        "bootstrap.servers": mock_cluster.bootstrap_servers,
        "group.id": f"g64-{mock_topic}",
        "auto.offset.reset": "earliest",
    }
    try:
        c = confluent_kafka.Consumer(native.configure(conf, consumer_src))
        c.subscribe([mock_topic])
        got = 0
        deadline = time.monotonic() + 15
        while got < 4 and time.monotonic() < deadline:
            m = c.poll(0.2)
            got += m is not None and not m.error()
        c.close()
        assert got == 4
        wire = native.drain(consumer_src, wire=True)
        assert wire is not None
        assert wire.schema.field("msg_ts_ms").type == pa.int64() and wire.schema.field("latency_us").type == pa.int64()
        (back,) = from_ipc(to_ipc(wire))
        consumed = {e["key"]: e for e in back.to_pylist()}
        assert {k: e["msg_ts_ms"] for k, e in consumed.items()} == {f"k{i}".encode(): t for i, t in enumerate(stamps)}
        for e in consumed.values():
            now_us = e["ts"].timestamp() * 1e6
            assert abs(e["latency_us"] - (now_us - e["msg_ts_ms"] * 1000)) < 2
    finally:
        native.forget(consumer_src)

    # The store's form of a drain is what from_wire makes of the wire form.
    p.produce(mock_topic, b"v", b"again")
    assert p.flush(10) == 0
    again = native.drain(src, first_seq=15)
    assert again is not None and again.schema == EVENTS and [e["key"] for e in rows(again)] == [b"again"] * 2


def test_a_drain_is_the_wire_form_in_one_import_and_frees_its_memory_when_released(
    mock_cluster: MockCluster, mock_topic: str, src: int
) -> None:
    p = confluent_kafka.Producer(native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, src))
    for key in (b"a", None, b"", b"\xff\x00binary", b"k" * 1000):
        p.produce(mock_topic, b"v" * 10, key)
    assert p.flush(10) == 0
    before = native.exports_live()
    wire = native.drain(src, first_seq=3, client_id="app", group_id="", member_id="m-1", wire=True)
    assert wire is not None and wire.num_rows == 10
    wire.validate(full=True)
    # The same batch as collector.schema builds from those columns: names, types, order,
    # nullability, the field metadata of the delta columns, and the schema's metadata.
    bases, patches = {}, {}
    for f in wire.schema:
        if f.metadata and f.metadata.get(b"keytrace.enc") == b"delta":
            bases[f.name] = int(f.metadata[b"keytrace.base"])
            text = f.metadata.get(b"keytrace.patch", b"")
            patches[f.name] = [tuple(map(int, x.split(b":"))) for x in text.split(b",")] if text else []
    columns = dict(zip(wire.schema.names, wire.columns, strict=True))
    reference = wire_batch(columns, wire.num_rows, src=src, seq_lo=3, bases=bases, patches=patches)
    assert wire.schema.equals(reference.schema, check_metadata=True), (wire.schema, reference.schema)
    events = from_wire(wire).to_pylist()
    assert [e["seq"] for e in events] == list(range(3, 13))
    assert {(e["client_id"], e["group_id"], e["member_id"]) for e in events} == {("app", "", "m-1")}
    assert [e["key"] for e in events if e["kind"] == "send"] == [b"a", None, b"", b"\xff\x00binary", b"k" * 1000]
    # The plugin's memory lives as long as any array that pyarrow made from it.
    assert native.exports_live() == before + 1
    kept = wire.column("key_data").slice(0, 1)
    del wire, columns, reference
    gc.collect()
    assert native.exports_live() == before + 1 and kept[0].as_py().startswith(b"a")
    del kept
    gc.collect()
    assert native.exports_live() == before


def test_delivery_failures_are_errors(src: int) -> None:
    with MockCluster(num_brokers=1) as cluster:
        cluster.create_topic("down", partitions=2)
        conf = {"bootstrap.servers": cluster.bootstrap_servers, "message.timeout.ms": 500}
        errors: list[KafkaError] = []
        p = confluent_kafka.Producer(native.configure(dict(conf, on_delivery=lambda err, m: errors.append(err)), src))
        p.produce("down", b"ok", b"before")
        assert p.flush(10) == 0
        cluster.broker_down(1)
        for i in range(5):
            p.produce("down", b"lost", f"k{i}".encode())
        p.flush(10)
        assert len(errors) == 6 and sum(e is not None for e in errors) == 5
        events = rows(native.drain(src))
        del p
    failed = [e for e in events if e["kind"] == "error"]
    assert len(failed) == 5 and sorted(e["key"] for e in failed) == [f"k{i}".encode() for i in range(5)]
    for e in failed:
        assert e["error_code"] == KafkaError._MSG_TIMED_OUT and e["error_name"] == "_MSG_TIMED_OUT"
        assert e["error_message"] and e["offset"] is None and e["latency_us"] >= 400_000
    assert [e["key"] for e in events if e["kind"] == "ack"] == [b"before"]


def test_queue_full_is_not_seen_but_a_bad_partition_is(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    # librdkafka refuses a message over the queue limit before any interceptor sees it; the
    # caller's BufferError is the only trace. A partitioner failure is unrolled through on_acknowledgement.
    conf = {"bootstrap.servers": "127.0.0.1:1", "queue.buffering.max.messages": 3, "message.timeout.ms": 200}
    p = confluent_kafka.Producer(native.configure(conf, src))
    with pytest.raises(BufferError):
        for i in range(10):
            p.produce("nowhere", b"v", f"k{i}".encode())
    p.flush(5)
    events = rows(native.drain(src))
    assert [e["kind"] for e in events].count("send") == 3
    assert [e["kind"] for e in events].count("error") == 3

    other = next(_srcs)
    try:
        q = confluent_kafka.Producer(native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, other))
        q.list_topics(mock_topic, timeout=5)
        with pytest.raises(KafkaException) as excinfo:
            q.produce(mock_topic, b"v", b"bad", partition=99)
        assert excinfo.value.args[0].code() == KafkaError._UNKNOWN_PARTITION
        kinds = [(e["kind"], e["key"], e["partition"], e["error_name"]) for e in rows(native.drain(other))]
        assert kinds == [("send", b"bad", 99, None), ("error", b"bad", 99, "_UNKNOWN_PARTITION")]
        del q
    finally:
        native.forget(other)


def test_two_producers_keep_separate_buffers(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    other = next(_srcs)
    try:
        a = confluent_kafka.Producer(native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, src))
        b = confluent_kafka.Producer(native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, other))
        for i in range(20):
            a.produce(mock_topic, b"a", f"a{i}".encode())
        for i in range(7):
            b.produce(mock_topic, b"b", f"b{i}".encode())
        assert a.flush(10) == 0 and b.flush(10) == 0
        from_a, from_b = rows(native.drain(src)), rows(native.drain(other))
        assert len(from_a) == 40 and {e["key"][:1] for e in from_a} == {b"a"} and {e["src"] for e in from_a} == {src}
        assert len(from_b) == 14 and {e["key"][:1] for e in from_b} == {b"b"} and {e["src"] for e in from_b} == {other}
    finally:
        native.forget(other)


def test_acks_keep_their_topic_when_a_second_topic_appears(
    mock_cluster: MockCluster, mock_topic: str, topic_name: str, src: int
) -> None:
    """While a client has sent to one topic its acks are filed under it without reading the
    topic handle; from the first send to another topic on, each ack's own topic is looked up."""
    second = f"{topic_name}-b"
    mock_cluster.create_topic(second, partitions=2, replication_factor=1)
    reports: dict[bytes, str] = {}
    conf = {
        "bootstrap.servers": mock_cluster.bootstrap_servers,
        "on_delivery": lambda e, m: reports.__setitem__(m.key(), m.topic()),
    }
    p = confluent_kafka.Producer(native.configure(conf, src))
    for i in range(50):
        p.produce(mock_topic, b"v", f"one-{i}".encode())
    assert p.flush(10) == 0
    first = rows(native.drain(src))
    for i in range(200):  # interleaved: acks of both topics arrive in the same drains
        p.produce(second if i % 2 else mock_topic, b"v", f"two-{i}".encode())
    assert p.flush(10) == 0
    later = rows(native.drain(src))
    acks = [e for e in first + later if e["kind"] == "ack"]
    assert len(acks) == 250 and len(reports) == 250
    assert all(e["topic"] == reports[e["key"]] for e in acks)
    assert {e["topic"] for e in acks} == {mock_topic, second}


def test_acks_keep_their_topic_while_a_second_topic_starts_under_load(
    mock_cluster: MockCluster, mock_topic: str, topic_name: str, src: int
) -> None:
    """The same while two threads produce (the second topic's first sends racing the first
    topic's acks) and a third drains all along: no ack may be filed under the wrong topic."""
    second = f"{topic_name}-c"
    mock_cluster.create_topic(second, partitions=3, replication_factor=1)
    truth: dict[bytes, str] = {}
    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers, "linger.ms": 1}
    p = confluent_kafka.Producer(native.configure(conf, src))
    got: list[dict[str, Any]] = []
    stop = threading.Event()

    def drainer() -> None:
        while not stop.is_set():
            got.extend(rows(native.drain(src)))
            time.sleep(0.002)

    def producer(topic: str, prefix: str, n: int, delay: float) -> None:
        time.sleep(delay)
        for i in range(n):
            key = f"{prefix}-{i}".encode()
            truth[key] = topic
            p.produce(topic, b"v", key)
            if i % 100 == 0:
                p.poll(0)

    threads = [
        threading.Thread(target=drainer),
        threading.Thread(target=producer, args=(mock_topic, "a", 20_000, 0.0)),
        threading.Thread(target=producer, args=(second, "b", 5_000, 0.01)),
    ]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    assert p.flush(20) == 0
    stop.set()
    threads[0].join()
    got.extend(rows(native.drain(src)))
    acks = [e for e in got if e["kind"] == "ack"]
    assert len(acks) == 25_000
    wrong = [e for e in acks if e["topic"] != truth[e["key"]]]
    assert not wrong, wrong[:3]


_CLOCK_CHECK = """
import datetime, json, sys, time
import confluent_kafka
from collector import native
src, servers, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
p = confluent_kafka.Producer(native.configure({"bootstrap.servers": servers, "linger.ms": 2}, src))
spans, events = [], []
for n, pause in ((300, 0.05), (5, 0.0), (300, 0.0)):  # a drain right after another: a very short interval
    time.sleep(pause)
    t0 = time.time_ns() // 1000
    for i in range(n):
        p.produce(topic, b"v", b"k%d" % i)
    t1 = time.time_ns() // 1000
    p.flush(10)
    t2 = time.time_ns() // 1000
    rows = native.drain(src).to_pylist()
    for e in rows:  # microseconds since the epoch, exactly
        e["ts"] = (e["ts"] - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1)
    events.append(rows)
    spans.append((t0, t1, t2))
print(json.dumps({"clock": native.clock(), "spans": spans, "events": events}, default=str))
"""


@pytest.mark.parametrize("clock", ["default", "realtime"])
def test_event_times_are_wall_clock_times_with_either_clock(
    mock_cluster: MockCluster, mock_topic: str, src: int, clock: str
) -> None:
    """Sends are stamped between the wall-clock readings around produce(), acks before flush()
    returned, and an ack's time minus its send's is librdkafka's latency: with TSC stamps
    converted at each drain (where the kernel's clocksource is the TSC) as with wall-clock ones."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if clock == "realtime":
        env["KEYTRACE_NATIVE_CLOCK"] = "realtime"
    proc = subprocess.run(
        [sys.executable, "-c", _CLOCK_CHECK, str(src), mock_cluster.bootstrap_servers, mock_topic],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    if clock == "realtime":
        assert out["clock"] == "realtime"
    else:
        assert out["clock"] == (
            "tsc"
            if Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip() == "tsc"
            else "realtime"
        )
    slack = 20  # us: the wall clock is read around, not exactly at, each stamp
    for (t0, t1, t2), events in zip(out["spans"], out["events"], strict=True):
        sends = {e["key"]: e for e in events if e["kind"] == "send"}
        acks = [e for e in events if e["kind"] == "ack"]
        assert len(acks) == len(sends) > 0
        assert all(t0 - slack <= e["ts"] <= t1 + slack for e in sends.values()), (t0, t1, list(sends.values())[:3])
        gaps = []
        for e in acks:
            sent = sends[e["key"]]["ts"]
            assert sent <= e["ts"] <= t2 + slack
            gaps.append((abs((e["ts"] - sent) - e["latency_us"]), e, sent))
        # librdkafka reads its clock a moment before the send's stamp (in msg_new) and
        # after the ack's (in message_latency): a thread preempted in between on a loaded
        # machine stretches one message's gap, while a wrong conversion would shift them all.
        gaps.sort(key=lambda g: g[0])
        assert gaps[int(0.95 * (len(gaps) - 1))][0] <= 200, gaps[len(gaps) // 2 :][:3]
        assert gaps[-1][0] <= 50_000, gaps[-1]


def test_full_buffer_drops_and_counts(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    # The bounds hold per lane: sends, and reports (acks, errors, consumes), each have their own.
    conf = native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, src, max_records=30)
    p = confluent_kafka.Producer(conf)
    for i in range(40):
        p.produce(mock_topic, b"v", f"k{i}".encode())
    assert p.flush(10) == 0
    status = native.status(src)
    assert status is not None and (status.recorded, status.dropped, status.buffered) == (60, 20, 60)
    kept = rows(native.drain(src))
    assert [e["kind"] for e in kept].count("send") == 30 and [e["kind"] for e in kept].count("ack") == 30
    # The drained buffer is empty again, and so is the key arena limit's count.
    small = next(_srcs)
    try:
        q = confluent_kafka.Producer(
            native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, small, max_key_bytes=100)
        )
        q.produce(mock_topic, b"v", b"x" * 60)
        q.produce(mock_topic, b"v", b"y" * 60)
        q.produce(mock_topic, b"v", None)
        assert q.flush(10) == 0
        kept = rows(native.drain(small))
        dropped = native.status(small)
        assert dropped is not None and dropped.dropped == 2
        sends = sorted(repr(e["key"]) for e in kept if e["kind"] == "send")
        acks = [e["key"] for e in kept if e["kind"] == "ack"]
        assert sends == ["None", repr(b"x" * 60)]
        # Acks come back in whatever order the partitions answer: the first 60-byte key fills the arena.
        assert len(acks) == 2 and None in acks and ({b"x" * 60, b"y" * 60} & set(acks))
        del q
    finally:
        native.forget(small)


def test_user_callbacks_still_fire(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    seen: dict[str, list[Any]] = {"dr": [], "stats": [], "error": []}
    conf = {
        "bootstrap.servers": mock_cluster.bootstrap_servers,
        "statistics.interval.ms": 100,
        "on_delivery": lambda err, msg: seen["dr"].append((err, msg.key())),
        "stats_cb": lambda doc: seen["stats"].append(doc),
        "error_cb": lambda err: seen["error"].append(err),
    }
    p = confluent_kafka.Producer(native.configure(conf, src))
    per_message: list[Any] = []
    p.produce(mock_topic, b"v", b"a")
    p.produce(mock_topic, b"v", b"b", on_delivery=lambda err, msg: per_message.append(msg.offset()))
    deadline = time.monotonic() + 5
    while (len(seen["dr"]) < 1 or not per_message or not seen["stats"]) and time.monotonic() < deadline:
        p.poll(0.05)
    assert seen["dr"] == [(None, b"a")] and len(per_message) == 1 and seen["stats"] and not seen["error"]
    assert len(p) == 0 and p.list_topics(mock_topic, timeout=5).topics[mock_topic].partitions
    assert [e["kind"] for e in rows(native.drain(src))].count("ack") == 2


def test_consumer_records_consumptions(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    p = confluent_kafka.Producer({"bootstrap.servers": mock_cluster.bootstrap_servers})
    for i in range(12):
        p.produce(mock_topic, b"v" * 3, f"c{i}".encode())
    assert p.flush(10) == 0
    conf = {
        "bootstrap.servers": mock_cluster.bootstrap_servers,
        "group.id": f"g-{mock_topic}",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    }
    c = confluent_kafka.Consumer(native.configure(conf, src))
    c.subscribe([mock_topic])
    got: list[Any] = []
    deadline = time.monotonic() + 15
    while len(got) < 12 and time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is not None and not m.error():
            got.append((m.key(), m.partition(), m.offset()))
    c.close()
    assert len(got) == 12
    events = rows(native.drain(src, group_id=f"g-{mock_topic}", member_id="m-1"))
    assert {e["kind"] for e in events} == {"consume"}, "partition EOF markers are not consumptions"
    assert sorted((e["key"], e["partition"], e["offset"]) for e in events) == sorted(got)
    assert all(e["topic"] == mock_topic and e["value_size"] == 3 and e["group_id"] == f"g-{mock_topic}" for e in events)
    assert all(e["latency_us"] is not None and e["latency_us"] >= 0 for e in events)


def test_forget_waits_for_the_client_to_be_destroyed(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    p = confluent_kafka.Producer(native.configure({"bootstrap.servers": mock_cluster.bootstrap_servers}, src))
    p.produce(mock_topic, b"v", b"k")
    native.forget(src)
    # Still in use by a live client: the buffer stays valid and keeps recording, but is not drained any more.
    assert p.flush(10) == 0
    status = native.status(src)
    assert status is not None and status.live_clients == 1 and status.recorded == 2
    assert native.drain(src) is None
    del p
    assert native.status(src) is None


def test_a_new_client_takes_over_a_freed_clients_buffers_empty(
    mock_cluster: MockCluster, mock_topic: str, src: int
) -> None:
    # Bounds no other test uses, so that what is stashed can only be this test's.
    bounds = {"max_records": 5_000, "max_key_bytes": 70_000}
    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers}
    old = next(_srcs)
    try:
        p = confluent_kafka.Producer(native.configure(conf, old, **bounds))
        for i in range(50):
            p.produce(mock_topic, b"v", f"old{i}".encode())
        assert p.flush(10) == 0
        native.forget(old)  # 100 events left undrained on purpose
        del p
    finally:
        native.forget(old)
    assert native.stashed_bounds() == (5_000, 70_000)
    q = confluent_kafka.Producer(native.configure(conf, src, **bounds))
    assert native.stashed_bounds() != (5_000, 70_000)  # taken over
    for i in range(3):
        q.produce(mock_topic, b"v", f"new{i}".encode())
    assert q.flush(10) == 0
    status = native.status(src)
    assert status is not None and (status.recorded, status.dropped, status.buffered) == (6, 0, 6)
    got = rows(native.drain(src))
    assert sorted(e["key"] for e in got if e["kind"] == "send") == [b"new0", b"new1", b"new2"]
    assert sorted(e["key"] for e in got if e["kind"] == "ack") == [b"new0", b"new1", b"new2"]
    native.forget(src)
    del q
    assert native.stashed_bounds() == (5_000, 70_000)
    # A client with other bounds cannot use them: they are freed, not kept forever.
    third = next(_srcs)
    try:
        r = confluent_kafka.Producer(native.configure(conf, third, max_records=4_000))
        assert native.stashed_bounds() != (5_000, 70_000)
        del r
    finally:
        native.forget(third)


def test_a_busy_clients_buffers_are_freed_not_kept(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    # 600 keys of 64 KiB: about 38 MiB of keys per lane, and the drain writes twice that
    # ahead, so the client's buffers hold more than the 128 MiB a stash may keep.
    bounds = {"max_records": 5_001, "max_key_bytes": 96 << 20}
    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers, "message.max.bytes": 1_000_000}
    p = confluent_kafka.Producer(native.configure(conf, src, **bounds))
    for i in range(600):
        p.produce(mock_topic, b"v", i.to_bytes(2, "big") * 32_768)
    assert p.flush(30) == 0
    batch = native.drain(src, wire=True)
    assert batch is not None and batch.num_rows == 1_200
    del batch
    native.forget(src)
    del p
    assert native.stashed_bounds() != (5_001, 96 << 20)


class Drainer(threading.Thread):
    """Drains one src every `interval` seconds until stopped; `batches` holds what it got."""

    def __init__(self, src: int, interval: float) -> None:
        super().__init__()
        self.src, self.interval = src, interval
        self.batches: list[pa.RecordBatch] = []
        self.seq = 1
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.drain_once()
            time.sleep(self.interval)

    def drain_once(self) -> pa.RecordBatch | None:
        batch = native.drain(self.src, first_seq=self.seq)
        if batch is not None:
            self.seq += batch.num_rows
            self.batches.append(batch)
        return batch

    def finish(self) -> None:
        """Stop, then drain what is left."""
        self.stopping.set()
        self.join()
        self.drain_once()


def test_draining_while_producing_loses_nothing(mock_cluster: MockCluster, mock_topic: str, src: int) -> None:
    reports: list[tuple[int, int]] = []
    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers, "linger.ms": 1}
    p = confluent_kafka.Producer(native.configure(conf, src))
    drainer = Drainer(src, 0.005)
    drainer.start()
    try:
        for i in range(20_000):
            p.produce(
                mock_topic,
                b"v",
                f"key-{i}".encode(),
                on_delivery=lambda e, m: reports.append((m.partition(), m.offset())),
            )
            p.poll(0)
        assert p.flush(20) == 0
    finally:
        drainer.finish()
    batches = drainer.batches
    table = pa.Table.from_batches(batches)
    assert len(batches) > 2 and table.num_rows == 40_000
    # Earlier batches own their memory: later drains reuse the C buffers without touching them.
    assert table.column("seq").to_pylist() == list(range(1, 40_001))
    events = table.to_pylist()
    assert sorted(e["key"] for e in events if e["kind"] == "send") == sorted(f"key-{i}".encode() for i in range(20_000))
    assert sorted((e["partition"], e["offset"]) for e in events if e["kind"] == "ack") == sorted(reports)
    assert from_ipc(to_ipc(batches[0]))[0].equals(batches[0])


def test_producing_from_several_threads_while_draining_loses_nothing(
    mock_cluster: MockCluster, mock_topic: str, src: int
) -> None:
    # Four application threads append to one send lane (taking turns: produce() keeps the
    # GIL), librdkafka's broker threads to the report lane, and a drainer swaps both every
    # 2 ms without the GIL: each lane's lock is contended, and every record must still come
    # out once, whole.
    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers, "linger.ms": 1}
    p = confluent_kafka.Producer(native.configure(conf, src))

    def producer(t: int) -> None:
        for i in range(5_000):
            while True:
                try:
                    p.produce(mock_topic, b"v" * (i % 50), f"t{t}-{i:05d}-".encode() * (1 + i % 3))
                    break
                except BufferError:
                    p.poll(0.01)
            if i % 100 == 0:
                p.poll(0)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
    drainer = Drainer(src, 0.002)
    drainer.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert p.flush(30) == 0
    finally:
        drainer.finish()
    events = pa.Table.from_batches(drainer.batches).to_pylist()
    expected = sorted(f"t{t}-{i:05d}-".encode() * (1 + i % 3) for t in range(4) for i in range(5_000))
    sends = [e for e in events if e["kind"] == "send"]
    assert sorted(e["key"] for e in sends) == expected
    assert all(e["value_size"] == int(e["key"].split(b"-")[1]) % 50 for e in sends)
    assert sorted(e["key"] for e in events if e["kind"] == "ack") == expected
    status = native.status(src)
    assert status is not None and status.dropped == 0 and status.recorded == 40_000


def test_a_drain_waits_for_a_send_still_being_appended(src: int) -> None:
    # Fault injection, as nothing else holds an append in flight long enough to test: every
    # 64th append pauses 50 us between taking its slot and writing it (kt_test_append_spin),
    # a third of the producing time, and a thread swaps the buffers in a tight loop, so that
    # some swaps land mid-append and the drain converts the buffer while that record is
    # unwritten. (The swaps run without the GIL; between them the thread takes it once, to
    # import the batch, which is why the batches stay in the wire form until the end.)
    conf = {"bootstrap.servers": "127.0.0.1:1", "queue.buffering.max.messages": 1_000_000}
    p = confluent_kafka.Producer(native.configure(conf, src))
    held = native._plugin().held
    batches: list[pa.RecordBatch] = []
    stop = threading.Event()

    def drain() -> None:
        seq = 1
        while not stop.is_set():
            batch = native.drain(src, first_seq=seq, wire=True)
            if batch is not None:
                seq += batch.num_rows
                batches.append(batch)

    drainer = threading.Thread(target=drain)
    held.kt_test_append_spin(50_000)
    drainer.start()
    try:
        for i in range(200_000):
            p.produce("t", b"v", f"k{i:06d}".encode())
    finally:
        held.kt_test_append_spin(0)
        stop.set()
        drainer.join()
        p.purge()
    tail = native.drain(src, first_seq=1 + sum(b.num_rows for b in batches), wire=True)
    batches += [tail] if tail is not None else []
    assert len(batches) >= 10, "the drainer swapped while sends were appended"
    events = [e for b in batches for e in from_wire(b).to_pylist()]
    sends = [e for e in events if e["kind"] == "send"]
    assert [e["key"] for e in sends] == [f"k{i:06d}".encode() for i in range(200_000)]
    assert all(e["topic"] == "t" and e["value_size"] == 1 for e in sends)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_forked_child_records_sends_with_its_own_barrier() -> None:
    # An application that traced before forking (a pre-fork server, multiprocessing): the
    # lock-free send lane's drain calls the expedited membarrier, which the parent
    # registered; the child must be able to call it too (Linux keeps the registration
    # across fork), or its drains would not wait out an append in flight.
    code = """
import os, confluent_kafka
from collector import native
parent_mode = native.lock_free_sends()
pid = os.fork()
if pid == 0:
    p = confluent_kafka.Producer(native.configure({"bootstrap.servers": "127.0.0.1:1"}, 99))
    for i in range(1000):
        p.produce("t", b"v", b"k%d" % i)
    batch = native.drain(99)
    keys = [e["key"] for e in batch.to_pylist()] if batch is not None else []
    ok = keys == [b"k%d" % i for i in range(1000)] and native._plugin().held.kt_barrier_failures() == 0
    print("child", native.lock_free_sends(), ok, flush=True)
    p.purge()
    os._exit(0)
os.waitpid(pid, 0)
print("parent", parent_mode)
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["child"].split()[1] == "True", out.stdout
    assert lines["child"].split()[0] == lines["parent"], "the child keeps the parent's mode"


def test_can_be_switched_off() -> None:
    out = _python(
        "from collector import native; print(native.available(), native.unavailable_reason())", KEYTRACE_NATIVE="0"
    )
    assert out.returncode == 0 and out.stdout.strip() == "False disabled by KEYTRACE_NATIVE"


def test_without_a_compiler_it_is_unavailable_not_broken(tmp_path: Path) -> None:
    env = {"KEYTRACE_NATIVE_DIR": str(tmp_path / "empty"), "PATH": str(tmp_path), "CC": "", "TMPDIR": str(tmp_path)}
    out = _python("from collector import native; print(native.available(), native.unavailable_reason())", **env)
    assert out.returncode == 0 and out.stdout.startswith("False no C compiler found"), out.stdout + out.stderr


def test_plugin_loaded_behind_our_back_fails_clearly() -> None:
    # Without collector.native the plugin has no librdkafka functions; it must refuse, not crash.
    code = (
        "import confluent_kafka\n"
        "try:\n"
        f"    confluent_kafka.Producer({{'plugin.library.paths': {native.plugin_path()!r}}})\n"
        "except confluent_kafka.KafkaException as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = _python(code)
    assert out.returncode == 0 and "refused:" in out.stdout and "kt_bind" in out.stdout


def test_produce_extension_builds_or_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collector.native import build

    built = build.build_extension(tmp_path)
    assert built.is_file() and built.name.startswith("_kt_produce-")
    assert build.build_extension(tmp_path) == built, "built once per source version"
    # Without Python's headers it is not built, and the reason says what is missing.
    monkeypatch.setattr(build.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-include")})
    with pytest.raises(build.BuildError, match="Python.h"):
        build.build_extension(tmp_path / "elsewhere")


def test_produce_descriptor_reads_its_flag_from_a_slot_or_the_instance_dict() -> None:
    produce_type = native.produce_descriptor()
    if produce_type is None:
        pytest.skip(native.produce_descriptor_reason())
    calls: list[tuple] = []

    def base(self: object, *args: object, **kwargs: object) -> str:
        calls.append(("fast", args, kwargs))
        return "base"

    class Slotted:
        __slots__ = ("fast", "__dict__")

        def slow(self, *args: object, **kwargs: object) -> str:
            calls.append(("slow", args, kwargs))
            return "slow"

        def reject(self, args: tuple, kwargs: dict) -> None:
            calls.append(("reject", args, kwargs))

    class WithDict(Slotted):
        pass

    Slotted.produce = produce_type(base, Slotted.__dict__["fast"], "slow", "reject")  # type: ignore[attr-defined]
    obj = Slotted()
    assert obj.produce("t", key=b"k") == "slow"  # slot not set yet: the slow path
    obj.fast = True
    assert obj.produce("t", b"v", key=b"k") == "base"
    obj.fast = False
    assert obj.produce("t") == "slow"
    sub = WithDict()  # a subclass keeps the slot at the same offset
    sub.fast = True
    assert sub.produce("u") == "base"
    assert [c[0] for c in calls] == ["slow", "fast", "slow", "fast"]
    assert calls[1] == ("fast", ("t", b"v"), {"key": b"k"})

    # The name form looks the flag up in the instance dict.
    class Plain:
        def slow(self, *args: object) -> str:
            return "slow"

    Plain.produce = produce_type(base, "fast", "slow", "reject")  # type: ignore[attr-defined]
    plain = Plain()
    assert plain.produce("t") == "slow"
    plain.fast = True
    assert plain.produce("t") == "base"

    with pytest.raises(TypeError, match="__slots__"):
        produce_type(base, type.__dict__["__basicsize__"], "slow", "reject")  # a member, but not an object slot
    with pytest.raises(TypeError, match="attribute name"):
        produce_type(base, 3, "slow", "reject")
