"""The real broker works, and its faults (pause, crash, restart) show up where keytrace will look for them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

BROKER_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kafka_broker.py"


@dataclass(frozen=True)
class Report:
    key: bytes
    error: KafkaError | None
    partition: int
    offset: int
    latency: float


def keys(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def send(producer: Producer, topic: str, batch: list[bytes], reports: list[Report]) -> None:
    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        reports.append(Report(msg.key(), err, msg.partition(), msg.offset(), msg.latency()))

    for key in batch:
        producer.produce(topic, key=key, value=b"v-" + key, on_delivery=on_delivery)


def produce_all(producer: Producer, topic: str, batch: list[bytes], timeout: float = 30.0) -> list[Report]:
    reports: list[Report] = []
    send(producer, topic, batch, reports)
    assert producer.flush(timeout) == 0, "delivery reports still pending"
    return reports


def consume(consumer: Consumer, topic: str, count: int, timeout: float = 60.0) -> list[tuple[bytes, int, int]]:
    consumer.subscribe([topic])
    seen: list[tuple[bytes, int, int]] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        assert msg.value() == b"v-" + msg.key()
        seen.append((msg.key(), msg.partition(), msg.offset()))
    return seen


def errors(reports: list[Report]) -> list[KafkaError]:
    return [r.error for r in reports if r.error is not None]


def test_acks_all_round_trip_through_a_consumer_group(kafka) -> None:
    topic = kafka.create_topic("smoke", partitions=4)
    sent = [f"key-{i % 10}".encode() for i in range(40)]
    reports = produce_all(kafka.producer({"acks": "all", "linger.ms": 5}), topic, sent)

    assert errors(reports) == []
    assert sorted(r.key for r in reports) == sorted(sent)
    offsets: dict[int, list[int]] = defaultdict(list)
    for r in sorted(reports, key=lambda r: (r.partition, r.offset)):
        offsets[r.partition].append(r.offset)
    assert all(offs == list(range(len(offs))) for offs in offsets.values())
    assert len(offsets) > 1
    partition_of_key = {r.key: r.partition for r in reports}
    assert all(partition_of_key[r.key] == r.partition for r in reports)

    consumer = kafka.consumer({"enable.auto.commit": False})
    consumed = consume(consumer, topic, len(sent))
    assert sorted(consumed) == sorted((r.key, r.partition, r.offset) for r in reports)

    consumer.commit(asynchronous=False)
    committed = consumer.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
    expected = {p: len(offsets[p]) if offsets[p] else OFFSET_INVALID for p in range(4)}
    assert {tp.partition: tp.offset for tp in committed} == expected
    consumer.close()


def test_auto_created_topic_gets_four_partitions(kafka, broker) -> None:
    topic = f"auto-{time.monotonic_ns()}"
    reports = produce_all(kafka.producer({"acks": "all"}), topic, keys("auto", 8))

    assert errors(reports) == []
    assert len(kafka.admin().list_topics(topic, timeout=10).topics[topic].partitions) == 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "plain"])
def test_pause_longer_than_request_timeout_shows_in_delivery_reports(kafka, broker, idempotent: bool) -> None:
    pause_s, timeout_ms = 3.0, 1000
    topic = kafka.create_topic("pause")
    # librdkafka's request.timeout.ms is the broker's ack timeout; socket.timeout.ms bounds a request in flight.
    producer = kafka.producer(
        {
            "acks": "all",
            "enable.idempotence": idempotent,
            "request.timeout.ms": timeout_ms,
            "socket.timeout.ms": timeout_ms,
            "message.timeout.ms": 30000,
        }
    )
    before = produce_all(producer, topic, keys("before", 10))
    assert errors(before) == []

    paused: list[Report] = []
    broker.pause()
    try:
        send(producer, topic, keys("paused", 10), paused)
        deadline = time.monotonic() + pause_s
        while time.monotonic() < deadline:
            producer.poll(0.1)
    finally:
        broker.resume()
    assert producer.flush(60) == 0

    # Nothing can be acked while the broker is stopped: each report either failed or waited out the pause.
    assert len(paused) == 10
    assert all(r.error is not None or r.latency >= pause_s for r in paused), paused

    after = produce_all(producer, topic, keys("after", 10))
    assert errors(after) == []
    assert max(r.latency for r in after) < pause_s

    acked = {(r.key, r.partition, r.offset) for r in before + paused + after if r.error is None}
    consumer = kafka.consumer()
    stored = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(4))
    consumed = consume(consumer, topic, stored)
    assert len(consumed) == stored
    assert acked <= set(consumed)
    if idempotent:
        assert stored == len(acked)
    else:
        # The broker ran both the timed-out request and its retry; the delivery report names only one copy.
        assert stored > len(acked)


@pytest.mark.timeout(180)
def test_producer_reconnects_after_kill_and_restart(kafka, broker) -> None:
    topic = kafka.create_topic("restart")
    # A short reconnect backoff so the producer finds the restarted broker soon after it listens again.
    producer = kafka.producer({"acks": "all", "message.timeout.ms": 120000, "reconnect.backoff.max.ms": 500})
    before = produce_all(producer, topic, keys("before", 10))
    assert errors(before) == []

    broker.kill()
    during: list[Report] = []
    send(producer, topic, keys("during", 10), during)
    producer.poll(1.0)
    assert during == [], "a dead broker acked or failed messages"

    broker.restart()
    assert producer.flush(90) == 0
    assert errors(during) == []
    last_before: dict[int, int] = defaultdict(lambda: -1)
    for r in before:
        last_before[r.partition] = max(last_before[r.partition], r.offset)
    assert all(r.offset > last_before[r.partition] for r in during)

    after = produce_all(producer, topic, keys("after", 10))
    assert errors(after) == []

    # Acked with acks=all before the crash, so still there after it; nothing was written twice.
    all_reports = before + during + after
    consumed = consume(kafka.consumer(), topic, len(all_reports))
    assert sorted(consumed) == sorted((r.key, r.partition, r.offset) for r in all_reports)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(180)
def test_script_serves_a_broker_whose_jvm_dies_with_the_script(broker, tmp_path) -> None:
    with open(tmp_path / "script.err", "w") as err:
        script = subprocess.Popen(
            [sys.executable, str(BROKER_SCRIPT), "--workdir", str(tmp_path / "kafka")],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        line = script.stdout.readline() if script.stdout else ""
        assert line.startswith("KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:"), (tmp_path / "script.err").read_text()
        bootstrap = line.strip().split("=", 1)[1]
        assert 1 in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).brokers
        [jvm] = children(script.pid)

        script.kill()  # no atexit, no cleanup: only the kernel can take the JVM down now
        script.wait(10)
        deadline = time.monotonic() + 10
        while alive(jvm) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(jvm)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait(10)


def test_cluster_ids_never_start_with_a_dash() -> None:
    # kafka-storage reads "--cluster-id -xyz" as a missing value: that failed one broker start in 64.
    spec = importlib.util.spec_from_file_location("kafka_broker_ids", BROKER_SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ids = [script.random_cluster_id() for _ in range(5_000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)
