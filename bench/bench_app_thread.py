"""Where the application thread's time goes in the producer bench, and what other threads cost it.

The loop of bench_producer.py (200,000 keyed 100-byte messages, poll(0) after each,
a delivery callback, librdkafka's mock cluster with 3 brokers in the same process),
with the time of every iteration recorded. Iterations longer than 50 µs are the ones
where poll(0) served a burst of delivery reports (or the thread waited for the GIL or a
core); the rest are produce() plus an empty poll(0). Per variant, medians over the
rounds of: the loop's wall time, the median iteration, and the time spent in the long
iterations beyond a median iteration each. flush() is timed on its own.

Variants:
  plain    confluent_kafka.Producer
  plugin   a plain Producer with the native interceptor plugin, never drained
  traced   TracedProducer with the Kafka sink on the same mock cluster
  noship   traced, but shipping only at flush() (flush_interval_s=60): the loop without
           the shipper's passes, and a flush() that drains and ships the whole round
  drain    plugin, plus a thread (at the shipper's niceness) that drains the plugin every
           200 ms (native.drain, the shipper's first step) and throws the batch away: what
           the drain alone costs
  nogil    plugin, plus a Python thread that spends 20 ms every 200 ms in hashlib
           (which releases the GIL): what CPU work on another thread costs the loop
  gil      plugin, plus a thread that spends 20 ms every 200 ms in Python bytecode
           (holding the GIL): what the GIL costs the loop

    .venv/bin/python bench/bench_app_thread.py --rounds 8
    .venv/bin/python bench/bench_app_thread.py --rounds 20 --variants plugin,drain,noship,traced
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import confluent_kafka
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import mock_cluster  # noqa: E402

from collector import TracedProducer, native  # noqa: E402
from collector.options import TraceOptions  # noqa: E402

LONG_NS = 50_000
_srcs = itertools.count(1)
_BIG = b"x" * (1 << 20)


def _busy(stop: threading.Event, step: Callable[[], object]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < 0.02:
            step()
        stop.wait(0.2)


def _drains(stop: threading.Event, src: int) -> None:
    # As nice as the shipper thread, whose first step this is.
    tid = threading.get_native_id()
    nice = TraceOptions().shipper_nice
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    while not stop.wait(0.2):
        native.drain(src, wire=True)


BACKGROUND: dict[str, Callable[[], object] | None] = {
    "plain": None,
    "plugin": None,
    "traced": None,
    "noship": None,
    "drain": None,
    "nogil": lambda: hashlib.sha256(_BIG).digest(),
    "gil": lambda: sum(range(1000)),
}


def one(variant: str, bootstrap: str, n: int, spool: Path) -> tuple[float, float, float, float]:
    """(loop s, median iteration µs, long iterations' excess ms, flush ms) of one round."""
    conf = {"bootstrap.servers": bootstrap, "linger.ms": 5, "on_delivery": lambda err, msg: None}
    if variant == "plain":
        p = confluent_kafka.Producer(conf)
    elif variant in ("traced", "noship"):
        options: dict[str, object] = {"spool_dir": str(spool)}
        if variant == "noship":
            options["flush_interval_s"] = 60
        p = TracedProducer(conf, sink=f"kafka://{bootstrap}/_keytrace.events", trace_options=options)
    else:
        src = next(_srcs)
        p = confluent_kafka.Producer(native.configure(conf, src, max_records=4 * n))
    stop = threading.Event()
    step = BACKGROUND[variant]
    if variant == "drain":
        worker: threading.Thread | None = threading.Thread(target=_drains, args=(stop, src), daemon=True)
    else:
        worker = threading.Thread(target=_busy, args=(stop, step), daemon=True) if step else None
    if worker:
        worker.start()
    value, keys = b"v" * 100, [f"customer-{i}".encode() for i in range(10_000)]
    stamps = np.empty(n + 1, np.int64)
    clock = time.perf_counter_ns
    stamps[0] = clock()
    for i in range(n):
        while True:
            try:
                p.produce("bench", value, keys[i % 10_000])
                break
            except BufferError:
                p.poll(0.005)
        p.poll(0)
        stamps[i + 1] = clock()
    t_flush = time.perf_counter()
    p.flush(60)
    flush_ms = (time.perf_counter() - t_flush) * 1e3
    stop.set()
    if worker:
        worker.join()
    if isinstance(p, TracedProducer):
        p.close()
    elif variant != "plain":
        del p
        native.forget(src)
    iters = np.diff(stamps)
    median = float(np.median(iters))
    long = iters[iters > LONG_NS]
    return (stamps[-1] - stamps[0]) / 1e9, median / 1e3, float(long.sum() - len(long) * median) / 1e6, flush_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--variants", default="plain,plugin,traced,nogil,gil")
    args = ap.parse_args()
    variants = args.variants.split(",")
    cluster, bootstrap = mock_cluster()  # `cluster` owns the mock brokers: keep it referenced
    spool = Path(tempfile.mkdtemp(prefix="kt-bench-")) / "spool"
    for v in variants:  # warm up: topic metadata, first-use builds
        one(v, bootstrap, 20_000, spool)
    results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            results[v].append(one(v, bootstrap, args.messages, spool))
    print(f"messages/round={args.messages} rounds={args.rounds}, medians")
    print(f"{'variant':8s} {'loop s':>8s} {'iteration µs':>13s} {'long iterations, excess ms':>27s} {'flush ms':>9s}")
    for v, rows in results.items():
        loop, it, excess, flush = (statistics.median(col) for col in zip(*rows, strict=True))
        print(f"{v:8s} {loop:8.3f} {it:13.2f} {excess:27.1f} {flush:9.1f}")


if __name__ == "__main__":
    main()
