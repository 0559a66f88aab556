"""What recording a send costs the thread that calls produce(), in ns per call.

Two producers in one process, both pointed at a port where no broker listens, so that
nothing but produce() itself runs: a plain confluent_kafka.Producer, and one whose
config loads the native recorder (collector.native.configure), whose on_send
interceptor records every message. They take turns producing chunks of messages
(20,000 by default, 100-byte values, 10,000 keys), in alternating order, and the
figure is the median over the chunk pairs of (recorder - plain) in CPU time of the
producing thread per call. Pairing adjacent chunks cancels most of the machine's
drift; a run still lands in a fast or a slow phase of this shared machine, so compare
builds by the difference relative to the plain figure of the same run.

Queued messages are purged after each chunk and the recorder is drained every five
chunk pairs (neither is timed). To compare two builds of the plugin, point
KEYTRACE_NATIVE_PLUGIN at each in turn:

    .venv/bin/python bench/bench_record_cost.py --pairs 60
    KEYTRACE_NATIVE_PLUGIN=/path/to/other.so .venv/bin/python bench/bench_record_cost.py --pairs 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import confluent_kafka

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector import native  # noqa: E402

SRC = 0x5EC0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60, help="chunk pairs (the first is a warm-up)")
    ap.add_argument("--chunk", type=int, default=20_000, help="messages per chunk")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"the native recorder is not available: {native.unavailable_reason()}")

    keys = [f"customer-{i}".encode() for i in range(10_000)]
    value = b"v" * 100
    conf = {
        "bootstrap.servers": "127.0.0.1:1",  # nothing listens: no broker work, no acks
        "queue.buffering.max.messages": 2_000_000,
        "linger.ms": 5,
        "log_level": 0,
    }
    clients = {
        "plain": confluent_kafka.Producer(dict(conf)),
        "recorder": confluent_kafka.Producer(native.configure(dict(conf), SRC)),
    }
    plain_ns: list[float] = []
    extra_ns: list[float] = []
    for r in range(args.pairs):
        order = ("plain", "recorder") if r % 2 else ("recorder", "plain")
        took = {}
        for name in order:
            p = clients[name]
            t0 = time.thread_time_ns()
            for i in range(args.chunk):
                p.produce("bench", value, keys[i % 10_000])
            took[name] = (time.thread_time_ns() - t0) / args.chunk
            p.purge()
            p.poll(0)
        if r % 5 == 4:
            native.drain(SRC)
        if r:
            plain_ns.append(took["plain"])
            extra_ns.append(took["recorder"] - took["plain"])
    native.drain(SRC)
    for p in clients.values():
        p.purge()
        p.flush(1)
    plain = statistics.median(plain_ns)
    extra = statistics.median(extra_ns)
    print(
        f"pairs={args.pairs - 1} chunk={args.chunk} clock={native.clock()}\n"
        f"plain produce(): median {plain:.0f} ns per call (CPU time of the producing thread)\n"
        f"recorder - plain: median {extra:.0f} ns per call ({extra / plain:.1%} of plain), "
        f"mean {statistics.mean(extra_ns):.0f}"
    )


if __name__ == "__main__":
    main()
