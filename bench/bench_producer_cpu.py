"""Where a TracedProducer's extra CPU goes: CPU time per message, per group of threads.

The same workload as bench_producer.py (one process, librdkafka's mock cluster with 3
brokers, 100-byte values, 10,000 keys, a delivery callback, poll(0) after each
produce), run round by round for each variant. Each thread's CPU time is read from
/proc/self/task (Linux) before and after the timed part, and summed per group:
`app` (the thread calling produce/poll), `shipper` (keytrace's shipper and any other
Python thread), `rdk:broker` (librdkafka's broker threads, the sink's included),
`rdk:mock` (the mock brokers). Medians over the rounds.

Variants:
  plain    confluent_kafka.Producer
  plugin   a plain Producer with the native interceptor plugin loaded (collector.native.configure),
           never drained: the cost of recording alone
  traced   TracedProducer with the Kafka sink on the same mock cluster (recording, drain, encoding, shipping)

    .venv/bin/python bench/bench_producer_cpu.py --messages 200000 --rounds 11
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import confluent_kafka

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import mock_cluster, produce_all  # noqa: E402

from collector import TracedProducer, native  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, tuple[str, float]]:
    """{tid: (thread name, user + system CPU seconds)} for every thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def group(tid: int, name: str, app_tid: int) -> str:
    if tid == app_tid:
        return "app"
    if name.startswith("rdk:broker"):
        return "rdk:broker"
    if name.startswith("rdk:"):
        return name
    return "shipper"


def run(variant: str, conf: dict, n: int, value: bytes, keys: list[bytes], sink: str, spool: str) -> tuple:
    delivered = [0]

    def on_delivery(err: object, msg: object) -> None:
        delivered[0] += 1

    conf = dict(conf, on_delivery=on_delivery)
    src = None
    if variant == "plain":
        p = confluent_kafka.Producer(conf)
    elif variant == "plugin":
        src = int.from_bytes(os.urandom(7), "big")
        p = confluent_kafka.Producer(native.configure(conf, src, max_records=4 * n))
    else:
        p = TracedProducer(conf, sink=sink, trace_options={"spool_dir": spool})
    app = threading.get_native_id()
    before = thread_cpu()
    t0 = time.perf_counter()
    produce_all(p, n, value, keys)
    elapsed = time.perf_counter() - t0
    after = thread_cpu()
    if delivered[0] != n:
        raise SystemExit(f"{variant}: {delivered[0]} of {n} delivery reports")
    per_group: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        spent = cpu - before.get(tid, (name, 0.0))[1]
        key = group(tid, name, app)
        per_group[key] = per_group.get(key, 0.0) + spent
    if isinstance(p, TracedProducer):
        p.close()
    del p
    if src is not None:
        native.forget(src)
    return n / elapsed, per_group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--variants", default="plain,plugin,traced")
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("reads /proc/self/task: Linux only")
    variants = args.variants.split(",")

    cluster, bootstrap = mock_cluster()  # `cluster` owns the mock brokers: keep it referenced
    tmp = Path(tempfile.mkdtemp(prefix="kt-bench-cpu-"))
    sink = f"kafka://{bootstrap}/_keytrace.events"
    conf = {"bootstrap.servers": bootstrap, "linger.ms": 5}
    value = b"v" * 100
    keys = [f"customer-{i}".encode() for i in range(10_000)]
    run("plain", conf, 20_000, value, keys, sink, str(tmp / "spool"))  # warm up topic/metadata

    results: dict[str, list[tuple]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            results[v].append(run(v, conf, args.messages, value, keys, sink, str(tmp / "spool")))
    groups = sorted({g for rs in results.values() for _, pg in rs for g in pg})
    groups = [g for g in ("app", "shipper", "rdk:broker", "rdk:mock") if g in groups] + [
        g for g in groups if g not in ("app", "shipper", "rdk:broker", "rdk:mock")
    ]
    print(f"messages/round={args.messages} rounds={args.rounds}, CPU microseconds per message (median)")
    print(f"{'variant':10s} {'msg/s':>10s} " + " ".join(f"{g:>11s}" for g in groups) + f" {'total':>8s}")
    for v in variants:
        rate = statistics.median(r for r, _ in results[v])
        cells = [statistics.median(pg.get(g, 0.0) for _, pg in results[v]) * 1e6 / args.messages for g in groups]
        print(f"{v:10s} {rate:10,.0f} " + " ".join(f"{c:11.2f}" for c in cells) + f" {sum(cells):8.2f}")
    print(f"\n{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
