"""What one shipment of native events costs, per event: drain, encode (zstd IPC), decode in the collector.

The producer benchmark's workload (librdkafka's mock cluster with 3 brokers, 100-byte
values, 10,000 keys) through a plain producer with the native plugin, drained after
each round of messages. For each round's batch (a send and an ack per message), the
median over the rounds of:
  - `native.drain(..., wire=True)`: the C conversion and the Python wrapping;
  - `schema.to_ipc` on the batch as the shipper sends it (slices of MAX_BATCH_ROWS);
  - `schema.from_ipc` on those payloads, as the collector reads them;
  - bytes per event on the wire.
The same batch in the earlier compact form (`schema.to_wire` of the store's form,
no encoded columns) is measured alongside, as the baseline.

    .venv/bin/python bench/bench_wire.py --messages 100000 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import confluent_kafka

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import mock_cluster, produce_all  # noqa: E402

from collector import native, schema  # noqa: E402
from collector.tracer import MAX_BATCH_ROWS  # noqa: E402


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"native plugin unavailable: {native.unavailable_reason()}")
    cluster, bootstrap = mock_cluster()  # `cluster` owns the mock brokers: keep it referenced
    keys = [f"customer-{i}".encode() for i in range(10_000)]
    src = 0xB17E
    conf = {"bootstrap.servers": bootstrap, "linger.ms": 5, "on_delivery": lambda err, msg: None}
    p = confluent_kafka.Producer(native.configure(conf, src))
    res: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        res.setdefault(name, []).append(value)

    for r in range(args.rounds + 1):
        produce_all(p, args.messages, b"v" * 100, keys)
        wire, t_drain = timed(lambda: native.drain(src, first_seq=1, client_id="bench", wire=True))
        n = wire.num_rows
        enc, t_split = timed(schema.split_batch, wire, MAX_BATCH_ROWS)
        payloads, t_enc = timed(lambda parts: [schema.to_ipc(b) for b in parts], enc)
        decoded, t_dec = timed(lambda ps: [schema.from_ipc(x) for x in ps], payloads)
        store = schema.from_wire(wire)
        # The same rows in the compact form (dictionaries, no encoded columns), built untimed.
        slices = [schema.to_wire(store.slice(i, MAX_BATCH_ROWS)) for i in range(0, n, MAX_BATCH_ROWS)]
        old, t_old_enc = timed(lambda parts: [schema.to_ipc(b) for b in parts], slices)
        _, t_old_dec = timed(lambda ps: [schema.from_ipc(x) for x in ps], old)
        back = [b for batches in decoded for b in batches]
        if sum(b.num_rows for b in back) != n or not back[0].equals(store.slice(0, back[0].num_rows)):
            raise SystemExit("the encoded batch did not decode to the drained events")
        if r == 0:
            continue  # warm-up: first-use allocations and page faults
        add("events per drain", n)
        add("drain ns/event", t_drain / n * 1e9)
        add("split ns/event", t_split / n * 1e9)
        add("compact2: to_ipc ns/event", t_enc / n * 1e9)
        add("compact2: from_ipc ns/event", t_dec / n * 1e9)
        add("compact2: bytes/event", sum(map(len, payloads)) / n)
        add("compact: to_ipc ns/event", t_old_enc / n * 1e9)
        add("compact: from_ipc ns/event", t_old_dec / n * 1e9)
        add("compact: bytes/event", sum(map(len, old)) / n)
    del p
    native.forget(src)
    print(f"messages/round={args.messages} rounds={args.rounds}, medians")
    for name, values in res.items():
        print(f"{name:30s} {statistics.median(values):10.2f}")


if __name__ == "__main__":
    main()
