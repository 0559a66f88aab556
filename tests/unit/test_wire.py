"""The compact wire form of events batches: what travels restores exactly, and bad input is refused."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from collector.schema import (
    EVENTS,
    META_SEQ_LO,
    META_SRC,
    META_WIRE,
    WIRE_ENCODED,
    BatchError,
    from_ipc,
    is_wire,
    slice_batch,
    split_batch,
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


@pytest.mark.parametrize("src", [1, 2**63 - 1, 2**63, 2**64 - 1])
def test_any_64_bit_client_id_travels_in_the_metadata(src: int) -> None:
    # Client ids are random 64-bit numbers: half of them are 2**63 or more.
    batch = events(10, src=src)
    wire = to_wire(batch)
    assert is_wire(wire) and "src" not in wire.schema.names and wire.schema.metadata[META_SRC] == str(src).encode()
    (back,) = from_ipc(to_ipc(batch))
    assert back.equals(batch)


def test_store_form_batches_are_still_accepted() -> None:
    batch = events(10)
    (back,) = from_ipc(raw_ipc(batch))
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


def raw_ipc(batch: pa.RecordBatch) -> bytes:
    """An IPC stream of the batch exactly as it is: no wire form, no compression."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def wire_with(meta: dict[bytes, bytes] | None = None, **columns: pa.Array) -> bytes:
    base = to_wire(events(4))
    arrays = {name: base.column(name) for name in base.schema.names}
    arrays.update(columns)
    schema_meta = {**base.schema.metadata, **(meta or {})}
    batch = pa.RecordBatch.from_arrays(list(arrays.values()), names=list(arrays))
    batch = batch.replace_schema_metadata(schema_meta)
    return raw_ipc(batch)


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
            "malformed|not an Arrow|invalid Arrow data",
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


# The encoded form ("compact2") that the native recorder ships. `encode` is a reference
# encoder in numpy, written from the description in collector/schema.py; the plugin's C
# encoder is checked against it in tests/unit/test_native.py.
DELTA_COLUMNS = ("ts", "offset", "latency_us", "msg_ts_ms")


NARROW = {1: (pa.int8(), np.int8), 2: (pa.int16(), np.int16), 4: (pa.int32(), np.int32), 8: (pa.int64(), np.int64)}


def fewest_bytes(values: np.ndarray) -> int:
    return next(w for w in (1, 2, 4, 8) if not len(values) or np.abs(values).max() < 2 ** (8 * w - 1))


def encode(batch: pa.RecordBatch, force64: bool = False, narrow: bool = False, patch_row: int = -1) -> pa.RecordBatch:
    """The encoded form. With `narrow`, delta columns take the fewest bytes that hold every
    difference but the one at `patch_row`, which travels as a patch if it does not fit; the
    plain integer columns take the fewest bytes that hold them."""
    wire = to_wire(batch)
    columns = {name: wire.column(name) for name in wire.schema.names}
    bases = {}
    patches: dict[str, list[tuple[int, int]]] = {}
    for name in DELTA_COLUMNS:
        if name not in columns:
            continue
        col = columns[name]
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        raw = col.cast(pa.int64()).fill_null(0).to_numpy()
        plain = raw.copy()
        first = np.flatnonzero(valid)
        base = int(raw[first[0]]) if len(first) else 0
        prev = base
        for i in range(len(plain)):  # a null repeats the previous value
            plain[i] = raw[i] if valid[i] else prev
            prev = plain[i]
        diffs = np.diff(plain, prepend=np.int64(base))
        if narrow:
            others = np.delete(diffs, patch_row) if 0 <= patch_row < len(diffs) else diffs
            width = fewest_bytes(others)
            if 0 <= patch_row < len(diffs) and fewest_bytes(diffs[patch_row : patch_row + 1]) > width:
                patches[name] = [(patch_row, int(diffs[patch_row]))]
                diffs[patch_row] = 0
        else:
            width = 4 if not force64 and diffs.min() >= -(2**31) and diffs.max() < 2**31 else 8
        bases[name] = base
        typ, dtype = NARROW[width]
        columns[name] = pa.Array.from_buffers(
            typ,
            len(col),
            [col.buffers()[0] if col.null_count else None, pa.py_buffer(diffs.astype(dtype))],
            null_count=col.null_count,
        )
    key = columns.pop("key")
    lengths = pc.binary_length(key).fill_null(0).cast(pa.int32())
    if narrow:
        lengths = lengths.cast(NARROW[fewest_bytes(lengths.to_numpy())][0])
        for name in ("partition", "value_size", "attempt", "error_code"):
            if name in columns:
                col = columns[name]
                columns[name] = col.cast(NARROW[fewest_bytes(col.fill_null(0).to_numpy())][0])
    columns["key_len"] = pa.Array.from_buffers(
        lengths.type,
        len(key),
        [key.buffers()[0] if key.null_count else None, lengths.buffers()[1]],
        key.null_count,
    )
    data = b"".join(k for k in key.to_pylist() if k)
    columns["key_data"] = pa.array([data] + [b""] * (len(key) - 1), pa.binary())
    meta = wire.schema.metadata
    return wire_batch(
        columns, len(key), src=int(meta[META_SRC]), seq_lo=int(meta[META_SEQ_LO]), bases=bases, patches=patches
    )


def timed_events(n: int) -> pa.RecordBatch:
    """events(n) with message timestamps and latencies, some far apart (64-bit differences), and null keys."""
    batch = events(n)
    rng = np.random.default_rng(7)
    msg_ts = np.where(np.arange(n) % 7 == 0, 978_307_200_000, 1_790_000_000_000 + np.arange(n))
    latency = rng.integers(0, 5_000_000, n)
    kinds = batch.column("kind").to_pylist()
    extra = {
        "msg_ts_ms": pa.array(
            [None if k == "send" else int(v) for k, v in zip(kinds, msg_ts, strict=True)], pa.int64()
        ),
        "latency_us": pa.array(
            [None if k == "send" else int(v) for k, v in zip(kinds, latency, strict=True)], pa.int64()
        ),
        "key": pa.array(
            [None if i % 11 == 5 else b"" if i % 13 == 0 else k for i, k in enumerate(batch.column("key").to_pylist())],
            pa.binary(),
        ),
    }
    for name, arr in extra.items():
        batch = batch.set_column(EVENTS.get_field_index(name), EVENTS.field(name), arr)
    return batch


@pytest.mark.parametrize("force64", [False, True], ids=["narrowed", "int64"])
def test_encoded_batches_come_back_identical_whole_and_sliced(force64: bool) -> None:
    batch = timed_events(1001)
    enc = encode(batch, force64)
    assert enc.schema.metadata[META_WIRE] == WIRE_ENCODED and "key" not in enc.schema.names
    # Small differences were narrowed; the message timestamps jump by 25 years, so stay 64-bit.
    assert enc.schema.field("ts").type == (pa.int64() if force64 else pa.int32())
    assert enc.schema.field("msg_ts_ms").type == pa.int64()
    (back,) = from_ipc(to_ipc(enc))
    assert back.equals(batch)
    for offset, length in [(0, 10), (1, 1), (40, 25), (500, 1000), (1000, 1)]:
        (part,) = from_ipc(to_ipc(slice_batch(enc, offset, length)))
        assert part.equals(batch.slice(offset, length)), (offset, length)
    parts = split_batch(enc, 97)
    assert [p.num_rows for p in parts] == [97] * 10 + [31]
    assert pa.concat_batches([from_ipc(to_ipc(p))[0] for p in parts]).equals(batch)


def test_narrowed_columns_and_their_patch_come_back_identical_whole_and_sliced() -> None:
    """Differences in 1 or 2 bytes, the one that does not fit as a patch, small integers narrowed."""
    batch = timed_events(1001)
    ts = np.arange(1001, dtype=np.int64) * 3 + 1_790_000_000_000_000
    ts[600:] -= 5_000_000  # the reports start earlier than the last sends: one far jump back
    batch = batch.set_column(
        EVENTS.get_field_index("ts"), EVENTS.field("ts"), pa.array(ts).cast(EVENTS.field("ts").type)
    )
    latency = pa.array([None if i % 2 == 0 else 40_000 + (i % 50) * 300 for i in range(1001)], pa.int64())
    batch = batch.set_column(EVENTS.get_field_index("latency_us"), EVENTS.field("latency_us"), latency)
    enc = encode(batch, narrow=True, patch_row=600)
    types = {f.name: f.type for f in enc.schema}
    assert types["ts"] == pa.int8() and enc.schema.field("ts").metadata[b"keytrace.patch"] == b"600:-4999997"
    assert types["latency_us"] == pa.int16() and b"keytrace.patch" not in enc.schema.field("latency_us").metadata
    assert types["offset"] == pa.int8() and types["msg_ts_ms"] == pa.int64()  # 25 years apart
    assert (types["partition"], types["value_size"], types["key_len"]) == (pa.int8(), pa.int8(), pa.int8())
    (back,) = from_ipc(to_ipc(enc))
    assert back.equals(batch)
    for offset, length in [(0, 600), (0, 601), (599, 2), (600, 1), (601, 400), (300, 701), (1000, 1)]:
        part = slice_batch(enc, offset, length)
        has_patch = offset <= 600 < offset + length
        assert (b"keytrace.patch" in part.schema.field("ts").metadata) == has_patch, (offset, length)
        (back,) = from_ipc(to_ipc(part))
        assert back.equals(batch.slice(offset, length)), (offset, length)
    parts = split_batch(enc, 97)
    assert pa.concat_batches([from_ipc(to_ipc(p))[0] for p in parts]).equals(batch)


def patched(text: bytes) -> bytes:
    enc = encode(events(4), narrow=True)
    f = enc.schema.field("ts")
    odd = enc.schema.set(enc.schema.get_field_index("ts"), f.with_metadata({**f.metadata, b"keytrace.patch": text}))
    return raw_ipc(pa.RecordBatch.from_arrays(enc.columns, schema=odd))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"4:1", "outside the batch"),
        (b"-1:1", "outside the batch"),
        (b"1:x", "malformed"),
        (b"1", "malformed"),
        (b"1:99999999999999999999", "beyond 64 bits"),
    ],
)
def test_a_bad_patch_is_refused_with_a_reason(text: bytes, reason: str) -> None:
    (good,) = from_ipc(patched(b"1:7"))  # a well-formed patch replaces that row's difference
    assert good.column("ts")[1].value - good.column("ts")[0].value == 7
    with pytest.raises(BatchError, match=reason):
        from_ipc(patched(text))


def test_a_narrowed_plain_column_wider_than_the_store_is_refused() -> None:
    with pytest.raises(BatchError, match="int64 where int32 is expected"):
        from_ipc(encoded_with(partition=pa.array([1, 2, 3, 4], pa.int64())))


def test_encoding_makes_the_payload_smaller() -> None:
    batch = timed_events(5000)
    assert len(to_ipc(encode(batch))) < 0.8 * len(to_ipc(batch))


def encoded_with(**columns: pa.Array | None) -> bytes:
    enc = encode(events(4))
    arrays = {name: enc.column(name) for name in enc.schema.names}
    fields = {f.name: f for f in enc.schema}
    for name, arr in columns.items():
        if arr is None:
            del arrays[name], fields[name]
        else:
            arrays[name] = arr
            fields[name] = fields.get(name, pa.field(name, arr.type)).with_type(arr.type)
    batch = pa.RecordBatch.from_arrays(
        list(arrays.values()), schema=pa.schema(list(fields.values()), enc.schema.metadata)
    )
    return raw_ipc(batch)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (lambda: encoded_with(key_len=pa.array([1, 2, 3, 4], pa.int32())), "adds up"),
        (lambda: encoded_with(key_len=pa.array([-1, 2, 3, 4], pa.int32())), "negative"),
        (lambda: encoded_with(key_data=None), "together"),
        (lambda: encoded_with(key_len=pa.array([1, 2, 3, 4], pa.int64())), "int8, int16 or int32"),
        (lambda: encoded_with(ts=pa.array([1.0, 2.0, 3.0, 4.0])), "signed integer"),
    ],
    ids=["key bytes missing", "negative length", "key_len alone", "key_len int64", "delta of floats"],
)
def test_a_malformed_encoded_batch_is_refused_with_a_reason(payload, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BatchError, match=reason):
        from_ipc(payload())


def test_an_unknown_encoding_is_refused() -> None:
    enc = encode(events(4))
    f = enc.schema.field("ts")
    odd = enc.schema.set(enc.schema.get_field_index("ts"), f.with_metadata({b"keytrace.enc": b"rle"}))
    with pytest.raises(BatchError, match="unknown encoding"):
        from_ipc(raw_ipc(pa.RecordBatch.from_arrays(enc.columns, schema=odd)))


@pytest.mark.parametrize("form", ["compact", "compact2"])
@pytest.mark.parametrize("compressed", [False, True], ids=["plain IPC", "zstd IPC"])
def test_corrupted_payloads_are_refused_never_crash(form: str, compressed: bool) -> None:
    """A payload with a few random bytes changed either still parses or is refused with a BatchError.

    Before from_ipc validated what it read, some of these crashed the process (a dictionary
    decode reading out of bounds) or raised errors the collector did not expect.
    """
    batch = encode(timed_events(300)) if form == "compact2" else to_wire(timed_events(300))
    good = to_ipc(batch) if compressed else raw_ipc(batch)
    rng = random.Random(11)
    refused = 0
    for _ in range(1500):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        try:
            for b in from_ipc(bytes(bad)):
                b.validate(full=True)
        except BatchError:
            refused += 1
    assert refused > 100  # most changes land somewhere that matters
