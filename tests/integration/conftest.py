"""Integration tier: a real Apache Kafka broker, started once per session by scripts/kafka_broker.py.

Set KAFKA_BOOTSTRAP_SERVERS to use an existing cluster instead. When no broker can be had the tier is
skipped, unless KEYTRACE_REQUIRE_KAFKA=1 (as in CI), which turns that into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

HERE = Path(__file__).resolve().parent
BROKER_SCRIPT = HERE.parents[1] / "scripts" / "kafka_broker.py"


def _load_broker_module() -> Any:
    spec = importlib.util.spec_from_file_location("kafka_broker", BROKER_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kafka_broker = _load_broker_module()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


class KafkaCluster:
    """What a test needs from the cluster: its address, clients bound to it, and fresh topics."""

    def __init__(self, bootstrap_servers: str, broker: Any = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.broker = broker
        self._consumers: list[Consumer] = []

    def producer(self, conf: Mapping[str, Any] | None = None) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap_servers, **(conf or {})})

    def consumer(self, conf: Mapping[str, Any] | None = None) -> Consumer:
        defaults = {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
        consumer = Consumer({**defaults, **(conf or {})})
        self._consumers.append(consumer)
        return consumer

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap_servers})

    def create_topic(self, prefix: str, partitions: int = 4, timeout: float = 30.0) -> str:
        """Create a uniquely named topic and wait until every partition has a leader."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin = self.admin()
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            topic = admin.list_topics(name, timeout=5).topics.get(name)
            if topic and topic.error is None and len(topic.partitions) == partitions:
                if all(p.leader >= 0 and p.error is None for p in topic.partitions.values()):
                    return name
            time.sleep(0.1)
        raise TimeoutError(f"topic {name} has no leader for all {partitions} partitions after {timeout} s")

    def close(self) -> None:
        for consumer in self._consumers:
            with contextlib.suppress(RuntimeError):
                consumer.close()


def _unavailable(reason: str) -> None:
    if os.environ.get("KEYTRACE_REQUIRE_KAFKA") == "1":
        pytest.fail(f"KEYTRACE_REQUIRE_KAFKA=1 but no Kafka broker: {reason}", pytrace=False)
    pytest.skip(f"no Kafka broker: {reason}")


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaCluster]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None
    if external:
        cluster = KafkaCluster(external)
        try:
            cluster.admin().list_topics(timeout=15)
        except KafkaException as exc:
            _unavailable(f"KAFKA_BOOTSTRAP_SERVERS={external} does not answer: {exc}")
    else:
        broker = kafka_broker.KafkaBroker()
        try:
            broker.start()
        except Exception as exc:
            broker.close()
            _unavailable(f"{type(exc).__name__}: {exc}")
        cluster = KafkaCluster(broker.bootstrap_servers, broker)
    try:
        yield cluster
    finally:
        cluster.close()
        if broker is not None:
            broker.close()


@pytest.fixture
def broker(kafka: KafkaCluster) -> Iterator[Any]:
    """The broker process itself, for fault tests; left running and unpaused for the next test."""
    if kafka.broker is None:
        pytest.skip("fault tests need the broker this suite starts, not KAFKA_BOOTSTRAP_SERVERS")
    yield kafka.broker
    if kafka.broker.paused:
        kafka.broker.resume()
    if not kafka.broker.running:
        kafka.broker.restart()


@pytest.fixture(scope="module")
def proxied_broker() -> Iterator[tuple[Any, Any]]:
    """A second broker whose client listener is advertised at an IdleProxy, so that every client
    connection after bootstrap runs through the proxy; yields (broker, proxy)."""
    from idle_proxy import IdleProxy

    broker: Any = None
    proxy = IdleProxy(lambda: ("127.0.0.1", broker.port), idle_s=30.0).start()
    # Only the PLAINTEXT listener is overridden; the controller keeps advertising its own address.
    broker = kafka_broker.KafkaBroker(config={"advertised.listeners": f"PLAINTEXT://127.0.0.1:{proxy.port}"})
    try:
        broker.start()
    except Exception as exc:
        broker.close()
        proxy.close()
        _unavailable(f"{type(exc).__name__}: {exc}")
    try:
        yield broker, proxy
    finally:
        broker.close()
        proxy.close()
