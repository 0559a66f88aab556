"""TracedProducer throughput as a ratio of a plain confluent_kafka.Producer.

Same process, same librdkafka mock cluster (3 brokers), 100-byte values, keyed
messages, a delivery callback in both. Rounds alternate plain and traced so that
machine noise hits both alike; the figure is the median of the per-round ratios. On a
small shared machine single rounds scatter widely (0.4 to 1.4), so use many rounds:

    .venv/bin/python bench/bench_producer.py --messages 200000 --rounds 40
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import confluent_kafka

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import mock_cluster, produce_all  # noqa: E402

from collector import TracedProducer, native  # noqa: E402


class Client:
    """One producer (plain or traced) and the count of its delivery reports."""

    def __init__(self, cls: type, conf: dict, per_message_cb: bool, **kw: object) -> None:
        self.delivered = 0
        self.per_message_cb = per_message_cb
        conf = dict(conf)
        if not per_message_cb:
            conf["on_delivery"] = self.on_delivery
        self.producer = cls(conf, **kw)

    def on_delivery(self, err: object, msg: object) -> None:
        self.delivered += 1

    def round(self, n: int, value: bytes, keys: list[bytes]) -> tuple[float, float]:
        """Produce n messages and flush: (messages per wall-clock second, per CPU second of this process)."""
        before = self.delivered
        t0 = time.perf_counter()
        c0 = time.process_time()
        produce_all(self.producer, n, value, keys, self.on_delivery if self.per_message_cb else None)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        if self.delivered - before != n:
            raise SystemExit(f"{type(self.producer).__name__}: {self.delivered - before} of {n} delivery reports")
        return n / elapsed, n / cpu

    def close(self) -> None:
        if isinstance(self.producer, TracedProducer):
            status = self.producer.trace_status()
            self.producer.close()
            if status["dropped"] or status["internal_errors"]:
                raise SystemExit(f"tracing lost events: {status}")


def run(
    cls: type, conf: dict, n: int, value: bytes, keys: list[bytes], per_message_cb: bool, **kw: object
) -> tuple[float, float]:
    """One round on a new client, closed after it."""
    client = Client(cls, conf, per_message_cb, **kw)
    try:
        return client.round(n, value, keys)
    finally:
        client.close()


def median_interval(values: list[float], resamples: int = 2000, seed: int = 1) -> str:
    """A 95% bootstrap interval of the median: how far the figure could move on a rerun."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return f"{medians[int(0.025 * resamples)]:.3f}-{medians[int(0.975 * resamples) - 1]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sink", choices=["kafka", "duckdb"], default="kafka")
    ap.add_argument("--per-message-callback", action="store_true", help="pass on_delivery to every produce()")
    ap.add_argument("--flush-interval", type=float, help="TraceOptions.flush_interval_s (default: its default)")
    ap.add_argument(
        "--long-lived",
        action="store_true",
        help="one plain and one traced producer for all rounds, as an application keeps them, "
        "instead of a new pair per round (whose start-up and close then fall in or next to the timed part)",
    )
    args = ap.parse_args()

    cluster, bootstrap = mock_cluster()  # `cluster` owns the mock brokers: keep it referenced
    tmp = Path(tempfile.mkdtemp(prefix="kt-bench-"))
    sink = f"kafka://{bootstrap}/_keytrace.events" if args.sink == "kafka" else f"duckdb://{tmp / 'bench.duckdb'}"
    conf = {"bootstrap.servers": bootstrap, "linger.ms": 5}
    value = b"v" * 100
    keys = [f"customer-{i}".encode() for i in range(10_000)]
    trace_options: dict[str, object] = {"spool_dir": str(tmp / "spool")}
    if args.flush_interval is not None:
        trace_options["flush_interval_s"] = args.flush_interval
    opts = {"sink": sink, "trace_options": trace_options}

    run(confluent_kafka.Producer, conf, 20_000, value, keys, args.per_message_callback)  # warm up topic/metadata
    ratios, cpu_ratios, plain_rates, traced_rates = [], [], [], []
    clients = None
    if args.long_lived:
        clients = (
            Client(confluent_kafka.Producer, conf, args.per_message_callback),
            Client(TracedProducer, conf, args.per_message_callback, **opts),
        )
        for c in clients:  # warm up each client: topic metadata, connections, the shipper's first pass
            c.round(20_000, value, keys)
    for r in range(args.rounds):
        if clients is not None:
            plain, plain_cpu = clients[0].round(args.messages, value, keys)
            traced, traced_cpu = clients[1].round(args.messages, value, keys)
        else:
            plain, plain_cpu = run(
                confluent_kafka.Producer, conf, args.messages, value, keys, args.per_message_callback
            )
            traced, traced_cpu = run(
                TracedProducer, conf, args.messages, value, keys, args.per_message_callback, **opts
            )
        plain_rates.append(plain)
        traced_rates.append(traced)
        ratios.append(traced / plain)
        cpu_ratios.append(traced_cpu / plain_cpu)
        print(
            f"round {r + 1}: plain {plain:,.0f} msg/s  traced {traced:,.0f} msg/s  ratio {traced / plain:.3f}  "
            f"(per CPU-second: {traced_cpu / plain_cpu:.3f})"
        )
    if clients is not None:
        for c in clients:
            c.close()
    print(
        f"\nmessages/round={args.messages} sink={args.sink} per_message_callback={args.per_message_callback} "
        f"clients={'long-lived' if clients is not None else 'new per round'} "
        f"recorder={'native' if native.available() and os.environ.get('KEYTRACE_NATIVE', '1') != '0' else 'python'}\n"
        f"plain  median {statistics.median(plain_rates):,.0f} msg/s\n"
        f"traced median {statistics.median(traced_rates):,.0f} msg/s\n"
        f"ratio  median {statistics.median(ratios):.3f}  (min {min(ratios):.3f}, max {max(ratios):.3f}; "
        f"95% bootstrap interval of the median {median_interval(ratios)})\n"
        f"messages per CPU-second of the whole process (app, librdkafka, mock brokers, tracing), traced/plain: "
        f"median {statistics.median(cpu_ratios):.3f}  (min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f})"
    )


if __name__ == "__main__":
    main()
