"""Key-to-partition hashing (checked against librdkafka itself) and the bounded topic read."""

from __future__ import annotations

import confluent_kafka
import pytest

from collector.mockcluster import MockCluster
from dashboard.topic_lookup import find_key_in_topic, murmur2, partition_for

# org.apache.kafka.common.utils.UtilsTest#testMurmur2, plus the empty key.
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
    b"": 275646681,
}


@pytest.mark.parametrize(("data", "expected"), list(KAFKA_VECTORS.items()))
def test_murmur2_matches_the_java_client(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_partition_uses_the_positive_hash() -> None:
    # -790332482 & 0x7fffffff = 1357151166, and 1357151166 % 50 = 16.
    assert partition_for(b"foobar", 50) == 16
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition_for(b"k", 3, "round_robin")
    with pytest.raises(ValueError):
        partition_for(b"k", 0)


def _delivered_partitions(cluster: MockCluster, topic: str, partitioner: str, keys: list[bytes]) -> dict[bytes, int]:
    got: dict[bytes, int] = {}
    producer = confluent_kafka.Producer({"bootstrap.servers": cluster.bootstrap_servers, "partitioner": partitioner})

    def report(err: object, msg: confluent_kafka.Message) -> None:
        assert err is None
        got[msg.key()] = msg.partition()

    for k in keys:
        producer.produce(topic, b"v", k, on_delivery=report)
    assert producer.flush(10) == 0
    return got


@pytest.mark.parametrize("partitioner", ["murmur2_random", "consistent_random", "fnv1a_random"])
def test_partition_agrees_with_librdkafka(mock_cluster: MockCluster, topic_name: str, partitioner: str) -> None:
    mock_cluster.create_topic(topic_name, partitions=7, replication_factor=1)
    keys = [f"order-{i}".encode() for i in range(150)] + [bytes([i, 0xFF - i, 0x80, i]) for i in range(50)]
    delivered = _delivered_partitions(mock_cluster, topic_name, partitioner, keys)
    assert len(delivered) == len(keys)
    assert len(set(delivered.values())) == 7
    assert {k: partition_for(k, 7, partitioner) for k in keys} == delivered


@pytest.fixture
def keyed_topic(mock_cluster: MockCluster, topic_name: str) -> tuple[str, dict[bytes, list[tuple[int, int]]]]:
    """300 messages under 30 keys, murmur2-partitioned; returns where each key's messages landed."""
    mock_cluster.create_topic(topic_name, partitions=3, replication_factor=1)
    placed: dict[bytes, list[tuple[int, int]]] = {}
    producer = confluent_kafka.Producer({"bootstrap.servers": mock_cluster.bootstrap_servers, "partitioner": "murmur2"})
    for i in range(300):
        key = f"user-{i % 30}".encode()
        producer.produce(
            topic_name,
            f"event {i}".encode(),
            key,
            on_delivery=lambda err, m: placed.setdefault(m.key(), []).append((m.partition(), m.offset())),
        )
    assert producer.flush(10) == 0
    return topic_name, placed


def test_lookup_finds_every_message_of_the_key_newest_first(mock_cluster: MockCluster, keyed_topic) -> None:
    topic, placed = keyed_topic
    found = find_key_in_topic(mock_cluster.bootstrap_servers, topic, b"user-7", "murmur2", limit=10_000, chunk=25)
    assert found.error is None and not found.timed_out
    assert found.partition == placed[b"user-7"][0][0]
    assert [m["offset"] for m in found.matches] == sorted((o for _, o in placed[b"user-7"]), reverse=True)
    assert found.matches[0]["value_preview"].startswith("event ")
    assert found.window_complete
    assert found.scanned == found.high - found.low


def test_lookup_reads_only_the_last_limit_messages(mock_cluster: MockCluster, keyed_topic) -> None:
    topic, placed = keyed_topic
    found = find_key_in_topic(mock_cluster.bootstrap_servers, topic, b"user-7", "murmur2", limit=25, chunk=10)
    assert found.scanned == 25
    assert found.first_read == found.high - 25
    assert not found.window_complete
    expected = sorted((o for _, o in placed[b"user-7"] if o >= found.high - 25), reverse=True)
    assert [m["offset"] for m in found.matches] == expected


def test_lookup_of_a_missing_topic_reports_instead_of_raising(mock_cluster: MockCluster, topic_name: str) -> None:
    found = find_key_in_topic(mock_cluster.bootstrap_servers, topic_name + "-absent", b"k", timeout_s=5)
    assert found.error is not None
    assert found.matches == [] and found.partition is None
