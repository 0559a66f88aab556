"""TracedProducer and TracedConsumer are drop-in replacements: every public method behaves as the original's."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest

from collector import TracedConsumer, TracedProducer

pytestmark = pytest.mark.usefixtures("recorder")


def public_methods(cls: type) -> list[str]:
    return sorted(n for n, _ in inspect.getmembers(cls) if not n.startswith("_") and callable(getattr(cls, n)))


def outcome(fn: Any) -> tuple[str, Any]:
    """What a call did: ('ok', type of result) or ('raise', exception type)."""
    try:
        result = fn()
    except Exception as exc:  # the comparison is the point: same exception type as the original
        return "raise", type(exc)
    return "ok", type(result)


def producer_calls(topic: str) -> dict[str, Any]:
    return {
        "abort_transaction": lambda p: p.abort_transaction(0.5),
        "begin_transaction": lambda p: p.begin_transaction(),
        "close": lambda p: p.close(),
        "cluster_id": lambda p: p.cluster_id(5),
        "commit_transaction": lambda p: p.commit_transaction(0.5),
        "flush": lambda p: p.flush(5),
        "init_transactions": lambda p: p.init_transactions(0.5),
        "list_topics": lambda p: p.list_topics(topic, timeout=5),
        "poll": lambda p: p.poll(0),
        "produce": lambda p: p.produce(topic, b"v", b"k"),
        "produce_batch": lambda p: p.produce_batch(topic, [{"value": b"a", "key": b"k1"}, {"value": b"b"}]),
        "purge": lambda p: p.purge(),
        "send_offsets_to_transaction": lambda p: p.send_offsets_to_transaction([], None, 0.5),
        "set_sasl_credentials": lambda p: p.set_sasl_credentials("user", "secret"),
    }


def test_every_producer_method_behaves_like_the_original(mock_cluster: Any, mock_topic: str, tmp_path: Path) -> None:
    calls = producer_calls(mock_topic)
    assert sorted(calls) == public_methods(confluent_kafka.Producer), "a public method is not covered"
    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers}
    sink = f"duckdb://{tmp_path / 'api.duckdb'}"
    for name, call in calls.items():
        plain = confluent_kafka.Producer(conf)
        traced = TracedProducer(conf, sink=sink)
        assert isinstance(traced, confluent_kafka.Producer)
        expected, got = outcome(lambda c=call, p=plain: c(p)), outcome(lambda c=call, p=traced: c(p))
        assert got == expected, f"{name}: plain {expected}, traced {got}"
        for p in (plain, traced):
            if name != "close":
                p.flush(5)
        traced._kt_tracer.close()


def test_producer_dunders(mock_cluster: Any, mock_topic: str, tmp_path: Path) -> None:
    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers, "linger.ms": 1000}
    with TracedProducer(conf, sink=f"duckdb://{tmp_path / 'd.duckdb'}") as p:
        p.produce(mock_topic, b"v", b"k")
        assert len(p) == 1
        assert bool(p) is bool(confluent_kafka.Producer(conf))
        p.flush(5)
        assert len(p) == 0
        # Like a plain Producer, a traced one takes no attributes of the caller's own.
        for client in (p, confluent_kafka.Producer(conf)):
            with pytest.raises(AttributeError):
                client.note = "x"  # type: ignore[attr-defined]


def test_produce_positional_and_keyword_arguments(mock_cluster: Any, mock_topic: str, tmp_path: Path) -> None:
    seen: list[tuple[str, int, bytes | None]] = []

    def cb(err: Any, msg: Any) -> None:
        assert err is None
        seen.append((msg.topic(), msg.partition(), msg.key()))

    conf = {"bootstrap.servers": mock_cluster.bootstrap_servers}
    p = TracedProducer(conf, sink=f"duckdb://{tmp_path / 'a.duckdb'}")
    plain = confluent_kafka.Producer(conf)
    # confluent-kafka's real positional order: partition, callback, on_delivery, timestamp, headers.
    for producer in (plain, p):
        with pytest.raises(TypeError):
            producer.produce(mock_topic, b"v", b"k0", 2, cb, None, 0, "not headers")
    plain.flush(5)
    p.produce(mock_topic, b"v", b"k1", 2, cb, None, 0, [("h", b"1")])
    p.produce(mock_topic, value=b"v", key=b"k2", partition=3, on_delivery=cb, headers={"h": b"2"})
    p.produce(topic=mock_topic, value=b"v", key=b"k3", callback=cb)
    p.produce(mock_topic, b"v", b"k4", partition=1, timestamp=1_700_000_000_000, on_delivery=cb)
    with pytest.raises(TypeError):
        p.produce(mock_topic, b"v", b"k5", 1, partition=2)
    assert p.flush(10) == 0
    assert sorted(k for _, _, k in seen) == [b"k1", b"k2", b"k3", b"k4"]
    assert {k: part for _, part, k in seen if k != b"k3"} == {b"k1": 2, b"k2": 3, b"k4": 1}
    p.close()


def consumer_calls(topic: str) -> dict[str, Any]:
    tp = confluent_kafka.TopicPartition(topic, 0, 0)
    return {
        "assign": lambda c: c.assign([tp]),
        "assignment": lambda c: c.assignment(),
        "close": lambda c: c.close(),
        "cluster_id": lambda c: c.cluster_id(5),
        "commit": lambda c: c.commit(offsets=[confluent_kafka.TopicPartition(topic, 0, 1)], asynchronous=False),
        "committed": lambda c: c.committed([tp], timeout=5),
        "consume": lambda c: c.consume(1, 0.2),
        "consumer_group_metadata": lambda c: c.consumer_group_metadata(),
        "get_watermark_offsets": lambda c: c.get_watermark_offsets(tp, timeout=5),
        "incremental_assign": lambda c: c.incremental_assign([tp]),
        "incremental_unassign": lambda c: c.incremental_unassign([tp]),
        "list_topics": lambda c: c.list_topics(topic, timeout=5),
        "memberid": lambda c: c.memberid(),
        "offsets_for_times": lambda c: c.offsets_for_times([confluent_kafka.TopicPartition(topic, 0, 0)], timeout=5),
        "pause": lambda c: c.pause([tp]),
        "poll": lambda c: c.poll(0.1),
        "position": lambda c: c.position([tp]),
        "resume": lambda c: c.resume([tp]),
        "seek": lambda c: c.seek(tp),
        "set_sasl_credentials": lambda c: c.set_sasl_credentials("user", "secret"),
        "store_offsets": lambda c: c.store_offsets(offsets=[confluent_kafka.TopicPartition(topic, 0, 1)]),
        "subscribe": lambda c: c.subscribe([topic]),
        "unassign": lambda c: c.unassign(),
        "unsubscribe": lambda c: c.unsubscribe(),
    }


def test_every_consumer_method_behaves_like_the_original(mock_cluster: Any, mock_topic: str, tmp_path: Path) -> None:
    calls = consumer_calls(mock_topic)
    assert sorted(calls) == public_methods(confluent_kafka.Consumer), "a public method is not covered"
    sink = f"duckdb://{tmp_path / 'api.duckdb'}"
    for name, call in calls.items():
        conf = {
            "bootstrap.servers": mock_cluster.bootstrap_servers,
            "group.id": f"g-{name}",
            "enable.auto.offset.store": False,
        }
        plain = confluent_kafka.Consumer(conf)
        traced = TracedConsumer(conf, sink=sink)
        assert isinstance(traced, confluent_kafka.Consumer)
        expected, got = outcome(lambda c=call, x=plain: c(x)), outcome(lambda c=call, x=traced: c(x))
        assert got == expected, f"{name}: plain {expected}, traced {got}"
        for c in (plain, traced):
            if name != "close":
                c.close()
