"""What the benchmarks share: a mock cluster, the producer loop (keyed messages, poll(0) after each, then flush), a percentile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import confluent_kafka


def mock_cluster(brokers: int = 3) -> tuple[confluent_kafka.Producer, str]:
    """librdkafka's mock cluster in this process: (the client that owns it, its bootstrap servers).

    Keep the client referenced for as long as the cluster is used.
    """
    owner = confluent_kafka.Producer({"test.mock.num.brokers": brokers})
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in owner.list_topics(timeout=10).brokers.values())
    return owner, bootstrap


def produce_all(p: Any, n: int, value: bytes, keys: list[bytes], on_delivery: Callable[..., Any] | None = None) -> None:
    """Produce n messages to topic "bench" (keys in turn), waiting out a full queue, and flush.

    With `on_delivery`, each produce() passes it as the per-message callback.
    """
    nkeys = len(keys)
    extra = {} if on_delivery is None else {"on_delivery": on_delivery}
    for i in range(n):
        while True:
            try:
                p.produce("bench", value, keys[i % nkeys], **extra)
                break
            except BufferError:
                p.poll(0.005)
        p.poll(0)
    p.flush(60)


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (0-100) of values, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
