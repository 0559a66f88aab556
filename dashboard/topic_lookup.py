"""Find a key in the topic itself: hash it to its partition, then read that partition's tail.

This is the fallback for a key keytrace never traced. It reads Kafka, not the trace
store, so it can say where a message sits but not what happened to it on the way.
"""

from __future__ import annotations

import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, TopicPartition

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (seed 0x9747b28c), as a signed 32-bit int like the Java client's Utils.murmur2."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def fnv1a(data: bytes) -> int:
    """32-bit FNV-1a, librdkafka's `fnv1a` partitioner hash (unsigned)."""
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & _MASK
    return h


def _murmur2_partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


def _crc32_partition(key: bytes, n: int) -> int:
    return zlib.crc32(key) % n


def _fnv1a_partition(key: bytes, n: int) -> int:
    # librdkafka treats the hash as a signed int and takes its absolute value.
    h = fnv1a(key)
    signed = h - (1 << 32) if h & 0x80000000 else h
    return abs(signed) % n


# librdkafka's `partitioner` values for keyed messages; "*_random" differ only for null keys.
PARTITIONERS = {
    "murmur2_random": _murmur2_partition,
    "murmur2": _murmur2_partition,
    "consistent_random": _crc32_partition,
    "consistent": _crc32_partition,
    "fnv1a_random": _fnv1a_partition,
    "fnv1a": _fnv1a_partition,
}
JAVA_DEFAULT = "murmur2_random"
LIBRDKAFKA_DEFAULT = "consistent_random"


def partition_for(key: bytes, num_partitions: int, partitioner: str = JAVA_DEFAULT) -> int:
    """The partition a keyed message lands on, as the named partitioner computes it."""
    if num_partitions < 1:
        raise ValueError("num_partitions must be at least 1")
    try:
        fn = PARTITIONERS[partitioner]
    except KeyError:
        raise ValueError(f"unknown partitioner {partitioner!r}; known: {sorted(PARTITIONERS)}") from None
    return fn(key, num_partitions)


@dataclass
class Lookup:
    """What one topic read found. `matches` are newest first."""

    topic: str
    key: bytes
    partitioner: str
    partition: int | None = None
    num_partitions: int | None = None
    low: int | None = None
    high: int | None = None
    first_read: int | None = None
    scanned: int = 0
    limit: int = 0
    matches: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    timed_out: bool = False

    @property
    def window_complete(self) -> bool:
        """True when the read reached the start of the partition (nothing older was left unread)."""
        return self.first_read is not None and self.low is not None and self.first_read <= self.low


def _preview(value: bytes | None, size: int = 120) -> str:
    if value is None:
        return "(null)"
    text = value[:size].decode("utf-8", "replace")
    return text + ("…" if len(value) > size else "")


def _read_range(consumer: Any, tp: TopicPartition, start: int, end: int, deadline: float) -> tuple[list[Any], bool]:
    """Messages of [start, end) in one partition; the flag says the deadline cut the read short."""
    consumer.seek(TopicPartition(tp.topic, tp.partition, start))
    out: list[Any] = []
    want = end - start
    while time.monotonic() < deadline:
        # consume() waits for as many messages as asked, so never ask for more than the range holds.
        left = want - len(out)
        msgs = consumer.consume(max(1, min(500, left)), min(1.0, max(0.01, deadline - time.monotonic())))
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return out, False
                raise confluent_kafka.KafkaException(err)
            if m.offset() >= end:
                return out, False
            if m.offset() >= start:
                out.append(m)
            if m.offset() >= end - 1:
                return out, False
    return out, True


def find_key_in_topic(
    bootstrap_servers: str,
    topic: str,
    key: bytes,
    partitioner: str = JAVA_DEFAULT,
    limit: int = 10_000,
    chunk: int = 2_000,
    timeout_s: float = 15.0,
    conf: dict[str, Any] | None = None,
) -> Lookup:
    """Read the key's partition from the end backwards, at most `limit` messages; never commits."""
    result = Lookup(topic=topic, key=key, partitioner=partitioner, limit=limit)
    deadline = time.monotonic() + timeout_s
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            # A throwaway group id: assign() never joins it and nothing is committed.
            "group.id": f"keytrace-lookup-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "client.id": "keytrace-topic-lookup",
            # At the partition's end the broker would hold each fetch for fetch.wait.max.ms.
            "fetch.wait.max.ms": 50,
            **(conf or {}),
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=max(1.0, deadline - time.monotonic()))
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            reason = tmeta.error.str() if tmeta is not None and tmeta.error is not None else "no partitions"
            result.error = f"topic {topic!r} not readable: {reason}"
            return result
        result.num_partitions = len(tmeta.partitions)
        result.partition = partition_for(key, result.num_partitions, partitioner)
        tp = TopicPartition(topic, result.partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=max(1.0, deadline - time.monotonic()))
        result.low, result.high = low, high
        if high <= low or limit <= 0:
            result.first_read = high
            return result
        consumer.assign([TopicPartition(topic, result.partition, max(low, high - min(chunk, limit)))])
        end = high
        while end > low and result.scanned < limit:
            start = max(low, end - min(chunk, limit - result.scanned))
            msgs, cut = _read_range(consumer, tp, start, end, deadline)
            result.scanned += len(msgs)
            result.first_read = start
            for m in reversed(msgs):
                if m.key() == key:
                    result.matches.append(_match(m))
            if cut:
                result.timed_out = True
                result.first_read = msgs[0].offset() if msgs else end
                break
            end = start
    except confluent_kafka.KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        result.error = err.str() if isinstance(err, KafkaError) else str(err)
    finally:
        consumer.close()
    return result


def _match(m: Any) -> dict[str, Any]:
    ts_type, ts_ms = m.timestamp()
    value = m.value()
    return {
        "partition": m.partition(),
        "offset": m.offset(),
        "timestamp_ms": ts_ms if ts_type != confluent_kafka.TIMESTAMP_NOT_AVAILABLE else None,
        "value_bytes": None if value is None else len(value),
        "value_preview": _preview(value),
        "headers": [h[0] for h in (m.headers() or [])],
    }
