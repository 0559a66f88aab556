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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import confluent_kafka

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import mock_cluster, produce_all  # noqa: E402

from collector import TracedProducer, native  # noqa: E402


def run(
    cls: type, conf: dict, n: int, value: bytes, keys: list[bytes], per_message_cb: bool, **kw: object
) -> tuple[float, float]:
    """(messages per wall-clock second, messages per CPU second of this whole process)."""
    delivered = [0]

    def on_delivery(err: object, msg: object) -> None:
        delivered[0] += 1

    conf = dict(conf)
    if not per_message_cb:
        conf["on_delivery"] = on_delivery
    p = cls(conf, **kw)
    t0 = time.perf_counter()
    c0 = time.process_time()
    produce_all(p, n, value, keys, on_delivery if per_message_cb else None)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if delivered[0] != n:
        raise SystemExit(f"{cls.__name__}: {delivered[0]} of {n} delivery reports")
    if isinstance(p, TracedProducer):
        status = p.trace_status()
        p.close()
        if status["dropped"] or status["internal_errors"]:
            raise SystemExit(f"tracing lost events: {status}")
    return n / elapsed, n / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sink", choices=["kafka", "duckdb"], default="kafka")
    ap.add_argument("--per-message-callback", action="store_true", help="pass on_delivery to every produce()")
    ap.add_argument("--flush-interval", type=float, help="TraceOptions.flush_interval_s (default: its default)")
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
    for r in range(args.rounds):
        plain, plain_cpu = run(confluent_kafka.Producer, conf, args.messages, value, keys, args.per_message_callback)
        traced, traced_cpu = run(TracedProducer, conf, args.messages, value, keys, args.per_message_callback, **opts)
        plain_rates.append(plain)
        traced_rates.append(traced)
        ratios.append(traced / plain)
        cpu_ratios.append(traced_cpu / plain_cpu)
        print(
            f"round {r + 1}: plain {plain:,.0f} msg/s  traced {traced:,.0f} msg/s  ratio {traced / plain:.3f}  "
            f"(per CPU-second: {traced_cpu / plain_cpu:.3f})"
        )
    print(
        f"\nmessages/round={args.messages} sink={args.sink} per_message_callback={args.per_message_callback} "
        f"recorder={'native' if native.available() and os.environ.get('KEYTRACE_NATIVE', '1') != '0' else 'python'}\n"
        f"plain  median {statistics.median(plain_rates):,.0f} msg/s\n"
        f"traced median {statistics.median(traced_rates):,.0f} msg/s\n"
        f"ratio  median {statistics.median(ratios):.3f}  (min {min(ratios):.3f}, max {max(ratios):.3f})\n"
        f"messages per CPU-second of the whole process (app, librdkafka, mock brokers, tracing), traced/plain: "
        f"median {statistics.median(cpu_ratios):.3f}  (min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f})"
    )


if __name__ == "__main__":
    main()
