"""The compact wire form of events batches: what travels restores exactly, and bad input is refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from collector.schema import (
    EVENTS,
    META_SEQ_LO,
    META_SRC,
    META_WIRE,
    BatchError,
    from_ipc,
    is_wire,
    slice_batch,
    to_ipc,
    to_wire,
    wire_batch,
)


def events(n: int, src: int = 0xFEED, first_seq: int = 1) -> pa.RecordBatch:
    """A store-form events batch: sends and acks of a few topics, one error, one binary key."""
    kinds = ["send", "ack"] * (n // 2) + ["error"] * (n % 2)
    cols = {
        "src": pa.array(np.full(n, src, np.uint64)),
        "seq": pa.array(np.arange(first_seq, first_seq + n, dtype=np.uint64)),
        "ts": pa.array(np.arange(n, dtype=np.int64) + 1_790_000_000_000_000).cast(EVENTS.field("ts").type),
        "kind": pa.array(kinds),
        "client_id": pa.array(["orders-svc"] * n),
        "topic": pa.array([f"topic-{i % 3}" for i in range(n)]),
        "partition": pa.array([None if k == "send" else i % 4 for i, k in enumerate(kinds)], pa.int32()),
        "offset": pa.array([None if k == "send" else i for i, k in enumerate(kinds)], pa.int64()),
        "key": pa.array([b"\xff\x00bin" if i == 3 else f"order-{i}".encode() for i in range(n)], pa.binary()),
        "value_size": pa.array([100 if k == "send" else None for k in kinds], pa.int32()),
        "error_name": pa.array(["_MSG_TIMED_OUT" if k == "error" else None for k in kinds]),
    }
    return pa.RecordBatch.from_arrays(
        [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in EVENTS], schema=EVENTS
    )


def test_events_travel_compact_and_come_back_identical() -> None:
    batch = events(1001)
    wire = to_wire(batch)
    assert is_wire(wire)
    # Ids in the metadata, all-null columns left out, strings dictionary-encoded.
    assert "src" not in wire.schema.names and "seq" not in wire.schema.names
    assert "group_id" not in wire.schema.names and "detail" not in wire.schema.names
    assert pa.types.is_dictionary(wire.schema.field("kind").type)
    payload = to_ipc(batch)
    (back,) = from_ipc(payload)
    assert back.equals(batch) and back.schema.equals(batch.schema, check_metadata=True)
    # The store's form, shipped as it is, is much larger.
    full = pa.BufferOutputStream()
    with pa.ipc.new_stream(full, batch.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_batch(batch)
    assert len(payload) < 0.7 * full.getvalue().size


def test_store_form_batches_are_still_accepted() -> None:
    batch = events(10)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    (back,) = from_ipc(sink.getvalue().to_pybytes())
    assert back.equals(batch)


def test_slices_keep_their_event_ids() -> None:
    batch = events(100, first_seq=500)
    wire = to_wire(batch)
    part = slice_batch(wire, 40, 25)
    (back,) = from_ipc(to_ipc(part))
    assert back.equals(batch.slice(40, 25))
    assert back.column("seq").to_pylist() == list(range(540, 565))


def test_a_batch_whose_ids_do_not_fit_the_metadata_keeps_them_as_columns() -> None:
    mixed = events(6)
    seq = pa.array([1, 2, 3, 10, 11, 12], pa.uint64())
    mixed = mixed.set_column(1, EVENTS.field("seq"), seq)
    wire = to_wire(mixed)
    assert "seq" in wire.schema.names and META_SEQ_LO not in wire.schema.metadata
    (back,) = from_ipc(to_ipc(mixed))
    assert back.column("seq").equals(seq)


def wire_with(meta: dict[bytes, bytes] | None = None, **columns: pa.Array) -> bytes:
    base = to_wire(events(4))
    arrays = {name: base.column(name) for name in base.schema.names}
    arrays.update(columns)
    schema_meta = {**base.schema.metadata, **(meta or {})}
    batch = pa.RecordBatch.from_arrays(list(arrays.values()), names=list(arrays))
    batch = batch.replace_schema_metadata(schema_meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (lambda: wire_with({META_SEQ_LO: b"not a number"}), "malformed"),
        (lambda: wire_with({META_SRC: b"-5"}), "malformed"),
        (lambda: wire_with({META_SEQ_LO: str(2**64 - 2).encode()}), "malformed"),
        (lambda: wire_with(nonsense=pa.array([1, 2, 3, 4])), "unknown"),
        (lambda: wire_with(partition=pa.array(["a", "b", "c", "d"])), "do not match"),
        (
            lambda: wire_with(
                kind=pa.DictionaryArray.from_arrays(
                    pa.array([0, 1, 7, 0], pa.int8()), pa.array(["send", "ack"]), safe=False
                )
            ),
            "malformed|not an Arrow",
        ),
        (lambda: wire_with({b"keytrace.table": b"stats"}), "only events"),
    ],
    ids=["seq_lo not a number", "negative src", "seq overflows", "unknown column", "wrong type", "bad index", "stats"],
)
def test_a_malformed_compact_batch_is_refused_with_a_reason(payload, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BatchError, match=reason):
        from_ipc(payload())


def test_wire_batch_needs_a_column_and_equal_lengths() -> None:
    with pytest.raises(BatchError):
        wire_batch({}, 3, src=1, seq_lo=1)
    with pytest.raises(BatchError):
        wire_batch({"ts": pa.array([1, 2], pa.int64()), "kind": pa.array(["send"])}, 2, src=1, seq_lo=1)
    assert META_WIRE in wire_batch({"kind": pa.array(["send"])}, 1, src=1, seq_lo=1).schema.metadata
