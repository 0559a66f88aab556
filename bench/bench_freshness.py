"""Freshness in `keytrace serve`: from a message's ack to that message being visible in key search.

    .venv/bin/python bench/bench_freshness.py --messages 400 --rate 50

The same pieces as `keytrace serve`, in one process: librdkafka's mock cluster (3
brokers), a TracedProducer with the default Kafka sink, the collector thread consuming
the events topic into a DuckDB store, and the query the search page runs
(`Store.lifecycle`). For every message, the time from its delivery callback to the first
lifecycle lookup that shows its partition and offset. A checker thread looks every 10 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import pct  # noqa: E402

from collector import TracedProducer  # noqa: E402
from collector.app_commands import start_collector  # noqa: E402
from collector.mockcluster import MockCluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--rate", type=float, default=50, help="messages per second")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kt-fresh-"))
    topic = "_keytrace.events"
    with MockCluster(num_brokers=3) as cluster:
        cluster.create_topic("orders", partitions=6, replication_factor=3)
        cluster.create_topic(topic, partitions=4, replication_factor=3)
        store, collector, loop = start_collector(str(tmp / "serve.duckdb"), cluster.bootstrap_servers, topic)
        acked: dict[bytes, tuple[int, int, float]] = {}
        visible: dict[bytes, float] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                with lock:
                    acked[msg.key()] = (msg.partition(), msg.offset(), time.monotonic())

        def checker() -> None:
            while not stop.is_set():
                with lock:
                    pending = [(k, v) for k, v in acked.items() if k not in visible]
                for key, (partition, offset, _) in pending:
                    for m in store.lifecycle(key):
                        if m.get("partition") == partition and m.get("offset") == offset:
                            visible[key] = time.monotonic()
                stop.wait(0.01)

        check = threading.Thread(target=checker, daemon=True)
        check.start()
        p = TracedProducer(
            {"bootstrap.servers": cluster.bootstrap_servers, "client.id": "fresh", "linger.ms": 5},
            sink=f"kafka://{cluster.bootstrap_servers}/{topic}",
            on_delivery=on_delivery,
        )
        # Warm up: the first batch creates the topic metadata, the store's first run, etc.
        p.produce("orders", b"warm", b"warm-up")
        p.flush(10)
        deadline = time.monotonic() + 30
        while b"warm-up" not in visible and time.monotonic() < deadline:
            time.sleep(0.05)
        with lock:
            acked.clear()
            visible.clear()
        interval = 1.0 / args.rate
        next_at = time.monotonic()
        for i in range(args.messages):
            p.produce("orders", b"x" * 100, f"order-{i}".encode())
            p.poll(0)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        p.flush(10)
        deadline = time.monotonic() + 30
        while len(visible) < len(acked) and time.monotonic() < deadline:
            p.poll(0.05)
        p.close()
        stop.set()
        check.join(2)
        loop.stop()
        collector.close()
        store.close()
    lat = [visible[k] - acked[k][2] for k in acked if k in visible]
    missing = len(acked) - len(lat)
    print(f"messages acked: {len(acked)}, visible in search: {len(lat)}, never visible: {missing}")
    print(
        "ack -> visible in search (s): "
        f"p50 {pct(lat, 50):.3f}  p95 {pct(lat, 95):.3f}  p99 {pct(lat, 99):.3f}  max {max(lat):.3f}  "
        f"mean {statistics.mean(lat):.3f}"
    )


if __name__ == "__main__":
    main()
