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
no encoded columns) is measured alongside, as the baseline, and so is the encoded batch
with its narrowed columns widened back to 4 bytes ("compact2 at 32 bits", what the
drain produced before it narrowed them), to show what the narrowing buys.

    .venv/bin/python bench/bench_wire.py --messages 100000 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import confluent_kafka
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import mock_cluster, produce_all  # noqa: E402

from collector import native, schema  # noqa: E402
from collector.tracer import MAX_BATCH_ROWS  # noqa: E402


def widened(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The encoded batch with its narrowed columns at 32 bits (delta columns with their patch put back)."""
    fields, arrays = [], []
    for f, col in zip(batch.schema, batch.columns, strict=True):
        meta = f.metadata or {}
        if meta.get(schema.META_ENC) == schema.ENC_DELTA and col.type.bit_width < 32:
            values = schema._deltas(f, col).astype(np.int32)
            col = pa.Array.from_buffers(pa.int32(), len(col), [col.buffers()[0], pa.py_buffer(values)], col.null_count)
            meta = {k: v for k, v in meta.items() if k != schema.META_PATCH}
        elif pa.types.is_integer(col.type) and col.type.bit_width < 32 and f.name != "attempt":
            col = col.cast(pa.int32())
        elif f.name == "attempt":
            col = col.cast(pa.int16())
        fields.append(pa.field(f.name, col.type, f.nullable, metadata=meta or None))
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


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
        wide = [widened(b) for b in enc]
        wide_payloads, t_wide_enc = timed(lambda parts: [schema.to_ipc(b) for b in parts], wide)
        old, t_old_enc = timed(lambda parts: [schema.to_ipc(b) for b in parts], slices)
        _, t_old_dec = timed(lambda ps: [schema.from_ipc(x) for x in ps], old)
        wide_back = pa.concat_batches([b for x in wide_payloads for b in schema.from_ipc(x)])
        if not wide_back.equals(store):
            raise SystemExit("the widened batch did not decode to the drained events")
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
        add("compact2 at 32 bits: to_ipc ns/event", t_wide_enc / n * 1e9)
        add("compact2 at 32 bits: bytes/event", sum(map(len, wide_payloads)) / n)
        add("compact: to_ipc ns/event", t_old_enc / n * 1e9)
        add("compact: from_ipc ns/event", t_old_dec / n * 1e9)
        add("compact: bytes/event", sum(map(len, old)) / n)
    del p
    native.forget(src)
    print(f"messages/round={args.messages} rounds={args.rounds}, medians")
    for name, values in res.items():
        print(f"{name:36s} {statistics.median(values):10.2f}")


if __name__ == "__main__":
    main()
