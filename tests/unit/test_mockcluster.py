import json
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from collector.mockcluster import ApiKey, MockCluster, MockClusterError

pytestmark = pytest.mark.timeout(60)

TOPIC = "orders"

# The mock cluster leaves a downed broker out of Metadata, so a producer finds it again only at its
# next metadata refresh (up to 1 s by default) and then reconnects (backoff capped at 10 s by default).
FAST_RECOVERY = {"topic.metadata.refresh.interval.ms": 200, "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 200}


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    with MockCluster(num_brokers=3) as c:
        yield c


def producer(cluster: MockCluster, **conf: object) -> Producer:
    return Producer({"bootstrap.servers": cluster.bootstrap_servers, "linger.ms": 0, **FAST_RECOVERY, **conf})


def leader_of(p: Producer, topic: str, partition: int) -> int:
    return p.list_topics(topic, timeout=5).topics[topic].partitions[partition].leader


def send(p: Producer, topic: str, partition: int, n: int, timeout: float = 20) -> list[Message]:
    reports: list[Message] = []
    for i in range(n):
        p.produce(
            topic,
            key=f"k{i}".encode(),
            value=b"v" * 100,
            partition=partition,
            on_delivery=lambda e, m: reports.append(m),
        )
    assert p.flush(timeout) == 0
    assert len(reports) == n
    return reports


def test_bootstrap_serves_created_topic_to_real_clients(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=5, replication_factor=3)
    p = producer(cluster)

    md = p.list_topics(TOPIC, timeout=5)
    assert sorted(md.topics[TOPIC].partitions) == [0, 1, 2, 3, 4]
    assert sorted(md.brokers) == cluster.broker_ids
    assert {f"{b.host}:{b.port}" for b in md.brokers.values()} == set(cluster.bootstrap_servers.split(","))

    reports = [m for part in range(5) for m in send(p, TOPIC, part, 4)]
    assert [m.error() for m in reports] == [None] * 20
    assert sorted((m.partition(), m.offset()) for m in reports) == [(q, o) for q in range(5) for o in range(4)]

    c = Consumer({"bootstrap.servers": cluster.bootstrap_servers, "group.id": "g", "enable.auto.commit": False})
    c.assign([TopicPartition(TOPIC, 2, OFFSET_BEGINNING)])
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(got) < 4 and time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            got.append(m.key())
    c.close()
    assert got == [b"k0", b"k1", b"k2", b"k3"]


def test_leader_down_times_out_deliveries_until_it_is_back(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=3, replication_factor=1)
    p = producer(cluster, **{"message.timeout.ms": 1500})
    send(p, TOPIC, 0, 1)
    leader = leader_of(p, TOPIC, 0)
    healthy = next(q for q in range(3) if leader_of(p, TOPIC, q) != leader)

    cluster.broker_down(leader)
    failed = send(p, TOPIC, 0, 5)
    assert {m.error().code() for m in failed} == {KafkaError._MSG_TIMED_OUT}
    assert [m.error() for m in send(p, TOPIC, healthy, 3)] == [None] * 3

    cluster.broker_up(leader)
    recovered = send(p, TOPIC, 0, 5)
    assert [m.error() for m in recovered] == [None] * 5
    assert [m.offset() for m in recovered] == [1, 2, 3, 4, 5]


def test_pushed_produce_errors_are_retried_internally_and_show_in_partition_stats(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=1, replication_factor=1)
    stats: list[dict] = []
    p = producer(cluster, **{"statistics.interval.ms": 100, "stats_cb": lambda s: stats.append(json.loads(s))})
    send(p, TOPIC, 0, 1)

    cluster.push_request_errors(ApiKey.Produce, [KafkaError.NOT_LEADER_FOR_PARTITION] * 3)
    (m,) = send(p, TOPIC, 0, 1)
    assert m.error() is None
    assert m.offset() == 1
    # Each retry waits out retry.backoff.ms (100 ms, growing per retry) and a metadata refresh;
    # an absolute bound, since a loaded machine makes any "baseline" latency noisy.
    assert m.latency() > 0.2

    stats.clear()
    deadline = time.monotonic() + 5
    while not stats and time.monotonic() < deadline:
        p.poll(0.1)
    part = stats[-1]["topics"][TOPIC]["partitions"]["0"]
    assert part["msgs"] == 2
    assert part["txmsgs"] - part["msgs"] == 3
    assert sum(b["txretries"] for b in stats[-1]["brokers"].values()) == 0


def test_broker_error_rtts_fail_and_delay_requests_on_one_broker(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=1, replication_factor=1)
    p = producer(cluster)
    send(p, TOPIC, 0, 1)
    leader = leader_of(p, TOPIC, 0)

    cluster.push_broker_request_error_rtts(
        leader, ApiKey.Produce, [(KafkaError.REQUEST_TIMED_OUT, 200), (KafkaError.NO_ERROR, 300)]
    )
    assert cluster.broker_error_stack_count(leader, ApiKey.Produce) == 2
    (m,) = send(p, TOPIC, 0, 1)
    assert m.error() is None
    assert m.latency() >= 0.5
    assert cluster.broker_error_stack_count(leader, ApiKey.Produce) == 0


def test_rtt_delays_acks(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=1, replication_factor=1)
    p = producer(cluster)
    send(p, TOPIC, 0, 1)
    leader = leader_of(p, TOPIC, 0)
    fast = statistics.median(m.latency() for m in send(p, TOPIC, 0, 10))

    cluster.set_rtt(leader, 300)
    slow = [m.latency() for m in send(p, TOPIC, 0, 3)]
    assert min(slow) >= 0.29
    assert min(slow) > fast + 0.25

    cluster.set_rtt(leader, 0)
    assert statistics.median(m.latency() for m in send(p, TOPIC, 0, 10)) < 0.2


def test_partition_set_leader_moves_the_leader_and_producers_follow(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=2, replication_factor=3)
    p = producer(cluster)
    send(p, TOPIC, 0, 1)
    old, other = leader_of(p, TOPIC, 0), leader_of(p, TOPIC, 1)
    new = next(b for b in cluster.broker_ids if b != old)

    cluster.partition_set_leader(TOPIC, 0, new)
    assert leader_of(p, TOPIC, 0) == new
    assert leader_of(p, TOPIC, 1) == other
    (m,) = send(p, TOPIC, 0, 1)
    assert m.error() is None
    assert m.offset() == 1


def test_timed_outage_ends_by_itself_while_a_producer_runs(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=1, replication_factor=1)
    p = producer(cluster, **{"message.timeout.ms": 10000})
    send(p, TOPIC, 0, 1)
    leader = leader_of(p, TOPIC, 0)

    reports: list[Message] = []
    stop = threading.Event()

    def produce_loop() -> None:
        while not stop.is_set():
            p.produce(TOPIC, value=b"x", partition=0, on_delivery=lambda e, m: reports.append(m))
            p.poll(0.02)

    worker = threading.Thread(target=produce_loop)
    worker.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        cluster.broker_down(leader, seconds=0.8)
        assert time.monotonic() - started < 0.2
        time.sleep(1.5)
    finally:
        stop.set()
        worker.join(5)
    assert p.flush(10) == 0
    assert reports
    assert all(m.error() is None for m in reports)
    assert max(m.latency() for m in reports) > 0.5


def test_broker_outage_context_restores_the_broker(cluster: MockCluster) -> None:
    cluster.create_topic(TOPIC, partitions=1, replication_factor=1)
    p = producer(cluster, **{"message.timeout.ms": 1000})
    send(p, TOPIC, 0, 1)
    leader = leader_of(p, TOPIC, 0)

    with cluster.broker_outage(leader):
        assert send(p, TOPIC, 0, 1)[0].error().code() == KafkaError._MSG_TIMED_OUT
    assert send(p, TOPIC, 0, 1)[0].error() is None


def test_errors_carry_the_kafka_error_code(cluster: MockCluster) -> None:
    with pytest.raises(MockClusterError) as bad_broker:
        cluster.broker_down(42)
    assert bad_broker.value.args[0].code() == KafkaError.BROKER_NOT_AVAILABLE

    cluster.create_topic(TOPIC, partitions=1, replication_factor=1)
    with pytest.raises(MockClusterError) as exists:
        cluster.create_topic(TOPIC, partitions=1, replication_factor=1)
    assert exists.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS

    cluster.close()
    cluster.close()
    with pytest.raises(MockClusterError) as closed:
        cluster.set_rtt(1, 10)
    assert closed.value.args[0].code() == KafkaError._DESTROY
