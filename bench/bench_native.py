"""Native interceptor tracing: throughput as a ratio of a plain confluent_kafka.Producer.

Same method as bench_producer.py: one process, one librdkafka mock cluster (3
brokers), 100-byte values, 10,000 distinct keys, a delivery callback in both
producers, rounds alternating plain and traced so that machine noise hits both
alike; the figure is the median of the per-round ratios. The traced producer is
a plain Producer whose config loads the plugin (collector.native.configure),
plus a thread that drains the events into an Arrow batch every 200 ms and
serialises it as the sinks do (zstd Arrow IPC, collector.schema.to_ipc).

    .venv/bin/python bench/bench_native.py --messages 200000 --rounds 15
    .venv/bin/python bench/bench_native.py --messages 200000 --rounds 15 --no-ipc
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import confluent_kafka

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import produce_all  # noqa: E402

from collector import native  # noqa: E402
from collector.mockcluster import MockCluster  # noqa: E402
from collector.schema import to_ipc  # noqa: E402


class Drainer(threading.Thread):
    """Every `interval` seconds: drain one client's events into Arrow and serialise them."""

    def __init__(self, src: int, interval: float, ipc: bool) -> None:
        super().__init__(name="kt-bench-drain", daemon=True)
        self.src, self.interval, self.ipc = src, interval, ipc
        self.stop = threading.Event()
        self.rows = self.ipc_bytes = 0
        self.busy_s = 0.0
        self.seq = 1

    def drain_once(self) -> None:
        t0 = time.perf_counter()
        batch = native.drain(self.src, first_seq=self.seq, client_id="bench", wire=True)
        if batch is not None:
            self.seq += batch.num_rows
            self.rows += batch.num_rows
            if self.ipc:
                self.ipc_bytes += len(to_ipc(batch))
        self.busy_s += time.perf_counter() - t0

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.drain_once()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self.drain_once()


def run(
    conf: dict, n: int, value: bytes, keys: list[bytes], traced: bool, interval: float, ipc: bool
) -> tuple[float, float]:
    """Messages per second, and CPU microseconds per message (all threads, mock brokers included)."""
    delivered = [0]

    def on_delivery(err: object, msg: object) -> None:
        delivered[0] += 1

    conf = dict(conf, on_delivery=on_delivery)
    drainer = None
    if traced:
        src = int.from_bytes(os.urandom(8), "big")
        conf = native.configure(conf, src)
        drainer = Drainer(src, interval, ipc)
        drainer.start()
    p = confluent_kafka.Producer(conf)
    t0, cpu0 = time.perf_counter(), time.process_time()
    produce_all(p, n, value, keys)
    elapsed = time.perf_counter() - t0
    if drainer is not None:
        drainer.finish()
    cpu_us = (time.process_time() - cpu0) / n * 1e6
    if delivered[0] != n:
        raise SystemExit(f"{delivered[0]} of {n} delivery reports")
    if drainer is not None:
        status = native.status(drainer.src)
        del p
        native.forget(drainer.src)
        # One send and one ack per message, all drained.
        if status is None or status.dropped or status.recorded != 2 * n or drainer.rows != 2 * n:
            raise SystemExit(f"tracing lost events: {status}, drained {drainer.rows}")
        print(
            f"    drained {drainer.rows:,} rows, drain thread busy {drainer.busy_s:.2f} s of {elapsed:.2f} s"
            + (f", {drainer.ipc_bytes / 1e6:.1f} MB IPC" if ipc else "")
        )
    return n / elapsed, cpu_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between drains")
    ap.add_argument("--no-ipc", action="store_true", help="build Arrow batches but do not serialise them")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"native plugin unavailable: {native.unavailable_reason()}")

    with MockCluster(num_brokers=3) as cluster:
        conf = {"bootstrap.servers": cluster.bootstrap_servers, "linger.ms": 5}
        value = b"v" * 100
        keys = [f"customer-{i}".encode() for i in range(10_000)]
        ipc = not args.no_ipc
        interval = args.interval
        run(conf, 20_000, value, keys, False, interval, ipc)  # warm up topic/metadata
        run(conf, 20_000, value, keys, True, interval, ipc)
        ratios, plain_rates, traced_rates, cpu_ratios = [], [], [], []
        for r in range(args.rounds):
            plain, plain_cpu = run(conf, args.messages, value, keys, False, interval, ipc)
            traced, traced_cpu = run(conf, args.messages, value, keys, True, interval, ipc)
            plain_rates.append(plain)
            traced_rates.append(traced)
            ratios.append(traced / plain)
            cpu_ratios.append(traced_cpu / plain_cpu)
            print(
                f"round {r + 1}: plain {plain:,.0f} msg/s {plain_cpu:.2f} cpu-us/msg  "
                f"native {traced:,.0f} msg/s {traced_cpu:.2f} cpu-us/msg  ratio {traced / plain:.3f}"
            )
    print(
        f"\nmessages/round={args.messages} drain every {interval * 1000:.0f} ms ipc={ipc}\n"
        f"plain  median {statistics.median(plain_rates):,.0f} msg/s\n"
        f"native median {statistics.median(traced_rates):,.0f} msg/s\n"
        f"ratio  median {statistics.median(ratios):.3f}  (min {min(ratios):.3f}, max {max(ratios):.3f})\n"
        f"cpu time per message, native/plain: median {statistics.median(cpu_ratios):.3f}"
    )


if __name__ == "__main__":
    main()
