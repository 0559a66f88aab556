"""Arrow schemas of the three record kinds keytrace ships: events, stats, configs.

One Arrow record batch is one unit everywhere: a message on the events topic,
a file in the spool directory, an insert into DuckDB. The schema metadata says
which table the batch belongs to and which schema version wrote it, so a batch
is self-describing wherever it lands.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "1"
META_TABLE = b"keytrace.table"
META_VERSION = b"keytrace.version"

# Event kinds. A message's lifecycle uses the first seven; the others are
# client-level events that have no key.
SEND = "send"
ACK = "ack"
ERROR = "error"
REJECT = "reject"
RESEND = "resend"
CONSUME = "consume"
COMMIT = "commit"
REBALANCE = "rebalance"
CLIENT_ERROR = "client_error"
KINDS = (SEND, ACK, ERROR, REJECT, RESEND, CONSUME, COMMIT, REBALANCE, CLIENT_ERROR)

_TS = pa.timestamp("us", tz="UTC")


def _schema(table: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={META_TABLE: table.encode(), META_VERSION: SCHEMA_VERSION.encode()})


# (src, seq) is the event id: src is a random 64-bit id of one traced client
# instance, seq counts every record that instance ships, across all tables.
EVENTS = _schema(
    "events",
    [
        pa.field("src", pa.uint64(), nullable=False),
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("ts", _TS, nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("client_id", pa.string()),
        pa.field("topic", pa.string()),
        pa.field("partition", pa.int32()),
        pa.field("offset", pa.int64()),
        pa.field("key", pa.binary()),
        pa.field("value_size", pa.int32()),
        # The trace number every attempt of one message shares (resend policy on);
        # null means the event's own seq. The trace id is hex(src) || hex(trace_seq).
        pa.field("trace_seq", pa.uint64()),
        pa.field("attempt", pa.int16()),
        # ack/error: msg.latency(); consume: now - message timestamp.
        pa.field("latency_us", pa.int64()),
        pa.field("msg_ts_ms", pa.int64()),
        pa.field("error_code", pa.int32()),
        pa.field("error_name", pa.string()),
        pa.field("error_retriable", pa.bool_()),
        pa.field("error_message", pa.string()),
        pa.field("group_id", pa.string()),
        pa.field("member_id", pa.string()),
        # JSON for events with a list payload: commit offsets, rebalance
        # partitions, reject reasons.
        pa.field("detail", pa.string()),
    ],
)

# One row per statistics emit of one client. Histograms are per-window values
# (librdkafka resets them at every emit), so the store keeps every window.
STATS = _schema(
    "stats",
    [
        pa.field("src", pa.uint64(), nullable=False),
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("ts", _TS, nullable=False),
        pa.field("client_id", pa.string()),
        pa.field("client_type", pa.string()),
        pa.field("name", pa.string()),
        pa.field("group_id", pa.string()),
        pa.field("msg_cnt", pa.int64()),
        pa.field("msg_max", pa.int64()),
        pa.field("msg_size", pa.int64()),
        pa.field("msg_size_max", pa.int64()),
        pa.field("tx", pa.int64()),
        pa.field("txmsgs", pa.int64()),
        pa.field("txmsg_bytes", pa.int64()),
        pa.field("rxmsgs", pa.int64()),
        pa.field("txerrs", pa.int64()),
        pa.field("txretries", pa.int64()),
        pa.field("req_timeouts", pa.int64()),
        pa.field("connects", pa.int64()),
        pa.field("disconnects", pa.int64()),
        # Sum over partitions of txmsgs - msgs: librdkafka's internal retries.
        pa.field("partition_retries", pa.int64()),
        pa.field("rtt_p50_us", pa.int64()),
        pa.field("rtt_p99_us", pa.int64()),
        pa.field("int_latency_p50_us", pa.int64()),
        pa.field("int_latency_p99_us", pa.int64()),
        pa.field("outbuf_latency_p50_us", pa.int64()),
        pa.field("outbuf_latency_p99_us", pa.int64()),
        pa.field("batchsize_p50", pa.int64()),
        pa.field("batchsize_p99", pa.int64()),
        pa.field("batchsize_avg", pa.float64()),
        pa.field("batchcnt_p50", pa.int64()),
        pa.field("batchcnt_p99", pa.int64()),
        pa.field("batchcnt_avg", pa.float64()),
        pa.field("throttle_ms", pa.int64()),
        pa.field("consumer_lag", pa.int64()),
        pa.field("brokers_up", pa.int32()),
        pa.field("brokers_total", pa.int32()),
        # keytrace's own counters for this client, totals since it started.
        pa.field("kt_events", pa.int64()),
        pa.field("kt_spooled", pa.int64()),
        pa.field("kt_dropped", pa.int64()),
        pa.field("kt_internal_errors", pa.int64()),
        pa.field("raw", pa.string()),
    ],
)

# One row per client instance: its effective configuration, secrets removed.
CONFIGS = _schema(
    "configs",
    [
        pa.field("src", pa.uint64(), nullable=False),
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("ts", _TS, nullable=False),
        pa.field("client_id", pa.string()),
        pa.field("client_type", pa.string()),
        pa.field("group_id", pa.string()),
        pa.field("config", pa.string()),
    ],
)

SCHEMAS = {"events": EVENTS, "stats": STATS, "configs": CONFIGS}


class BatchError(ValueError):
    """A record batch that keytrace cannot accept (wrong schema, bad bytes)."""


def table_of(batch: pa.RecordBatch) -> str:
    """Return the table a batch belongs to, checking name, version and columns."""
    meta = batch.schema.metadata or {}
    table = meta.get(META_TABLE, b"").decode("utf-8", "replace")
    version = meta.get(META_VERSION, b"").decode("utf-8", "replace")
    if table not in SCHEMAS:
        raise BatchError(f"unknown table {table!r} in batch metadata")
    if version != SCHEMA_VERSION:
        raise BatchError(f"schema version {version!r} of table {table!r} is not supported (expected {SCHEMA_VERSION})")
    expected = SCHEMAS[table]
    got = [(f.name, f.type) for f in batch.schema]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        diff = sorted({n for n, _ in got} ^ {n for n, _ in want}) or [
            n for (n, t), (_, u) in zip(got, want, strict=False) if t != u
        ]
        raise BatchError(f"columns of a {table!r} batch do not match schema version {SCHEMA_VERSION}: {diff}")
    return table


# One thread: on a busy application host Arrow's thread pool costs more CPU than it saves.
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd", use_threads=False)

# The wire form of an events batch (what travels to Kafka and sits in the spool) is
# smaller than the store's form, which matters because the traced application pays
# for every byte it compresses and ships:
#   - a constant `src` and a consecutive `seq` travel in the metadata, not as columns;
#   - columns that are null in every row are left out;
#   - low-cardinality strings travel dictionary-encoded.
# The native recorder's batches (collector.native.drain) also travel encoded, marked
# "compact2" (what zstd does with these is in docs/NATIVE.md):
#   - an integer column whose field metadata says `keytrace.enc: delta` holds each row's
#     difference from the previous row, starting from `keytrace.base`; a null row's
#     difference is 0. It is as narrow as int8 when all but a few differences fit: those
#     few are stored as 0 and listed in `keytrace.patch` ("row:difference,...");
#   - `key` travels as `key_len` (lengths, null for a null key) and `key_data` (the
#     keys' bytes back to back, in the first row);
#   - key_len and the other integer columns may be narrower than the store's type
#     (partition as int8, say); they are widened back.
# `from_ipc` turns it back into the store's form, so nothing past it sees the difference.
META_WIRE = b"keytrace.wire"
META_SRC = b"keytrace.src"
META_SEQ_LO = b"keytrace.seq_lo"
WIRE_COMPACT = b"compact"
WIRE_ENCODED = b"compact2"
META_ENC = b"keytrace.enc"
META_BASE = b"keytrace.base"
META_PATCH = b"keytrace.patch"
ENC_DELTA = b"delta"
_DICT_COLUMNS = frozenset({"kind", "client_id", "topic", "error_name", "group_id", "member_id"})
_EVENT_TYPES = {f.name: f.type for f in EVENTS}
# Columns that only the encoded wire form has, standing for `key`.
_KEY_PARTS = ("key_len", "key_data")
_INT_TYPES = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64}


def to_wire(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The compact wire form of an events batch; any other batch is returned unchanged."""
    if is_wire(batch) or batch.schema.metadata != EVENTS.metadata or batch.schema != EVENTS or batch.num_rows == 0:
        return batch
    src, seq = batch.column("src"), batch.column("seq")
    if src.null_count or seq.null_count:  # not storable anyway: keep it as it is, for the receiver to reject
        return batch
    n = batch.num_rows
    columns: dict[str, pa.Array] = {}
    src_id: int | None = src[0].as_py()
    if not pc.all(pc.equal(src, pa.scalar(src_id, pa.uint64()))).as_py():
        columns["src"], src_id = src, None
    seq_lo: int | None = seq[0].as_py()
    if not np.array_equal(seq.to_numpy(), np.arange(seq_lo, seq_lo + n, dtype=np.uint64)):
        columns["seq"], seq_lo = seq, None
    for f, col in zip(EVENTS, batch.columns, strict=True):
        if f.name in ("src", "seq") or col.null_count == n:
            continue
        if f.name in _DICT_COLUMNS:
            col = pc.dictionary_encode(col)
            if len(col.dictionary) <= 127:
                col = pa.DictionaryArray.from_arrays(col.indices.cast(pa.int8()), col.dictionary)
        columns[f.name] = col
    return wire_batch(columns, n, src=src_id, seq_lo=seq_lo)


def wire_batch(
    columns: dict[str, pa.Array],
    n: int,
    *,
    src: int | None,
    seq_lo: int | None,
    bases: dict[str, int] | None = None,
    patches: dict[str, list[tuple[int, int]]] | None = None,
) -> pa.RecordBatch:
    """A batch in the compact wire form from its columns (by name, any order; absent ones are all null).

    With `src` and `seq_lo`, rows have the event ids (src, seq_lo), (src, seq_lo + 1), ...,
    carried in the metadata; without them, `src` and `seq` are among the columns.
    `bases` names the delta-encoded columns, with their bases, and `patches` their
    (row, difference) pairs stored as 0; `key_len` and `key_data` may stand for `key`.
    Either makes it the encoded form ("compact2").
    """
    bases = bases or {}
    patches = patches or {}
    meta = dict(EVENTS.metadata)
    encoded = bool(bases) or any(name in columns for name in _KEY_PARTS)
    meta[META_WIRE] = WIRE_ENCODED if encoded else WIRE_COMPACT
    if src is not None:
        meta[META_SRC] = str(src).encode()
    if seq_lo is not None:
        meta[META_SEQ_LO] = str(seq_lo).encode()
    names: list[str] = []
    for f in EVENTS:
        if f.name == "key" and "key" not in columns:
            names.extend(k for k in _KEY_PARTS if k in columns)
        elif f.name in columns:
            names.append(f.name)
    fields = []
    for name in names:
        nullable = name == "key_len" or name not in _EVENT_TYPES or EVENTS.field(name).nullable
        field_meta = _delta_meta(bases[name], patches.get(name, ())) if name in bases else None
        fields.append(pa.field(name, columns[name].type, nullable, metadata=field_meta))
    if not fields:
        raise BatchError("a batch needs at least one column")
    arrays = [columns[f.name] for f in fields]
    if any(len(a) != n for a in arrays):
        raise BatchError("columns of unequal length")
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def _delta_meta(base: int, patches: Iterable[tuple[int, int]]) -> dict[bytes, bytes]:
    meta = {META_ENC: ENC_DELTA, META_BASE: str(base).encode()}
    text = ",".join(f"{row}:{value}" for row, value in patches)
    if text:
        meta[META_PATCH] = text.encode()
    return meta


def _patches(f: pa.Field, n: int) -> list[tuple[int, int]]:
    """A delta column's patches, checked: rows within the batch, 64-bit differences."""
    text = (f.metadata or {}).get(META_PATCH)
    if not text:
        return []
    try:
        out = [(int(row), int(value)) for row, _, value in (p.partition(b":") for p in text.split(b","))]
    except ValueError as exc:
        raise BatchError(f"column {f.name}: malformed patches") from exc
    if any(not 0 <= row < n or not -(2**63) <= value < 2**63 for row, value in out):
        raise BatchError(f"column {f.name}: a patch outside the batch or beyond 64 bits")
    return out


def _deltas(f: pa.Field, col: pa.Array, patches: list[tuple[int, int]] | None = None) -> np.ndarray:
    """A delta column's differences, its patches put back (as int64 then; else the column's own buffer)."""
    values = _delta_values(col)
    patches = _patches(f, len(col)) if patches is None else patches
    if patches:
        values = values.astype(np.int64)
        for row, value in patches:
            values[row] = value
    return values


def slice_batch(batch: pa.RecordBatch, offset: int, length: int) -> pa.RecordBatch:
    """batch.slice(), keeping a wire-form batch's ids and encoded columns right.

    The first seq moves with the offset, a delta column's base becomes the value just
    before the slice, and `key_data` keeps only the slice's keys.
    """
    return _slices(batch, [offset], length)[0]


def split_batch(batch: pa.RecordBatch, rows: int) -> list[pa.RecordBatch]:
    """The batch in slices of at most `rows` rows (as slice_batch makes them, in one pass)."""
    n = batch.num_rows
    return [batch] if n <= rows else _slices(batch, list(range(0, n, rows)), rows)


def _slices(batch: pa.RecordBatch, starts: list[int], length: int) -> list[pa.RecordBatch]:
    meta = batch.schema.metadata or {}
    if not is_wire(batch):
        return [batch.slice(start, length) for start in starts]
    if meta.get(META_WIRE) != WIRE_ENCODED:
        return [_move_seq(batch.slice(start, length), meta, start) for start in starts]
    # A slice's base is the value just before it, its keys a part of the bytes: running sums
    # at the slices' bounds only, piece by piece (numpy sums in small buffered chunks, no copy).
    n = batch.num_rows
    bounds = sorted({0, n, *(min(n, s) for s in starts), *(min(n, s + length) for s in starts)})

    def sums_at_bounds(v: np.ndarray) -> dict[int, int]:
        total, at = 0, {0: 0}
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            total += int(v[lo:hi].sum(dtype=np.int64))
            at[hi] = total
        return at

    patches = {f.name: _patches(f, n) for f in batch.schema if (f.metadata or {}).get(META_ENC) == ENC_DELTA}
    bases_at = {
        f.name: sums_at_bounds(_deltas(f, col, patches[f.name]))
        for f, col in zip(batch.schema, batch.columns, strict=True)
        if f.name in patches
    }
    has_keys = "key_len" in batch.schema.names and "key_data" in batch.schema.names
    if has_keys:
        keys_at = sums_at_bounds(_key_lengths(batch.column("key_len")))
        key_bytes = _blob_bytes(batch.column("key_data"))
    out = []
    for start in starts:
        part = batch.slice(start, length)
        if not start and len(part) == n:
            out.append(part)
            continue
        fields, arrays = [], []
        for f, col in zip(part.schema, part.columns, strict=True):
            if f.name in bases_at:
                base = (int(f.metadata[META_BASE]) + bases_at[f.name][start] + 2**63) % 2**64 - 2**63
                mine = [(row - start, v) for row, v in patches[f.name] if start <= row < start + len(part)]
                f = f.with_metadata(
                    {**{k: v for k, v in f.metadata.items() if k != META_PATCH}, **_delta_meta(base, mine)}
                )
            elif f.name == "key_data" and has_keys:
                first, last = keys_at[start], keys_at[start + len(part)]
                col = _blob(key_bytes.slice(first, last - first), len(part))
            fields.append(f)
            arrays.append(col)
        out.append(_move_seq(pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=meta)), meta, start))
    return out


def _move_seq(part: pa.RecordBatch, meta: dict, start: int) -> pa.RecordBatch:
    if not start or META_SEQ_LO not in meta:
        return part
    return part.replace_schema_metadata({**meta, META_SEQ_LO: str(int(meta[META_SEQ_LO]) + start).encode()})


def is_wire(batch: pa.RecordBatch) -> bool:
    return (batch.schema.metadata or {}).get(META_WIRE) in (WIRE_COMPACT, WIRE_ENCODED)


def _delta_values(col: pa.Array) -> np.ndarray:
    """The differences stored in a delta column (its nulls' slots included), as numpy, without a copy."""
    dtype = _INT_TYPES.get(col.type)
    if dtype is None:
        raise BatchError(f"a delta-encoded column must be a signed integer, not {col.type}")
    return np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col), offset=col.offset * np.dtype(dtype).itemsize)


def _key_lengths(col: pa.Array) -> np.ndarray:
    dtype = _INT_TYPES.get(col.type)
    if dtype is None or col.type == pa.int64():
        raise BatchError(f"key_len must be int8, int16 or int32, not {col.type}")
    size = np.dtype(dtype).itemsize
    lens = np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col), offset=col.offset * size)
    if col.null_count:
        lens = np.where(col.is_valid().to_numpy(zero_copy_only=False), lens, 0)
    if len(lens) and lens.min() < 0:
        raise BatchError("negative key length")
    return lens


def _blob_bytes(col: pa.Array) -> pa.Buffer:
    """Every byte of a binary column's rows, back to back."""
    if col.type != pa.binary():
        raise BatchError(f"key_data must be binary, not {col.type}")
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32, count=len(col) + 1, offset=col.offset * 4)
    data = col.buffers()[2]
    return (data if data is not None else pa.py_buffer(b"")).slice(int(offsets[0]), int(offsets[-1] - offsets[0]))


def _blob(data: pa.Buffer, n: int) -> pa.Array:
    """A binary column of n rows whose first row holds all of `data` (the others are empty)."""
    offsets = np.full(n + 1, data.size, dtype=np.int32)
    offsets[0] = 0
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), data])


def _validity(col: pa.Array) -> pa.Buffer | None:
    """A validity bitmap for col's rows that starts at bit 0 (None without nulls)."""
    if not col.null_count:
        return None
    return col.buffers()[0] if col.offset == 0 else col.is_valid().buffers()[1]


def _decode(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    """The columns of an encoded ("compact2") batch, decoded, by name."""
    out: dict[str, pa.Array] = {}
    n = batch.num_rows
    for f, col in zip(batch.schema, batch.columns, strict=True):
        enc = (f.metadata or {}).get(META_ENC)
        if enc is None:
            typ = _EVENT_TYPES.get(f.name)
            if typ is not None and pa.types.is_integer(col.type) and col.type != typ:
                if not pa.types.is_integer(typ) or col.type.bit_width > typ.bit_width:
                    raise BatchError(f"column {f.name}: {col.type} where {typ} is expected")
                col = col.cast(typ)  # narrowed on the wire
            out[f.name] = col
            continue
        typ = _EVENT_TYPES.get(f.name)
        if enc != ENC_DELTA or typ is None or not (pa.types.is_integer(typ) or pa.types.is_timestamp(typ)):
            raise BatchError(f"column {f.name}: unknown encoding {enc!r}")
        values = np.cumsum(_deltas(f, col), dtype=np.int64)
        values += np.int64(int(f.metadata.get(META_BASE, b"0")))
        physical = pa.int64() if pa.types.is_timestamp(typ) else typ
        if physical != pa.int64():
            values = values.astype(physical.to_pandas_dtype())
        out[f.name] = pa.Array.from_buffers(typ, n, [_validity(col), pa.py_buffer(values)], null_count=col.null_count)
    if "key_len" in out or "key_data" in out:
        if "key_len" not in out or "key_data" not in out or "key" in out:
            raise BatchError("key_len and key_data travel together, instead of key")
        lens_col = out.pop("key_len")
        data = _blob_bytes(out.pop("key_data"))
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(_key_lengths(lens_col), out=offsets[1:])
        if offsets[-1] != data.size:
            raise BatchError(f"key_len adds up to {offsets[-1]} bytes, key_data has {data.size}")
        if offsets[-1] > np.iinfo(np.int32).max:
            raise BatchError("more than 2 GiB of keys in one batch")
        out["key"] = pa.Array.from_buffers(
            pa.binary(),
            n,
            [_validity(lens_col), pa.py_buffer(offsets.astype(np.int32)), data],
            null_count=lens_col.null_count,
        )
    return out


def _u64(text: bytes, count: int) -> int:
    """An id from the metadata, checked so that `count` consecutive ids from it fit in 64 bits."""
    value = int(text)
    if value < 0 or value + max(count, 1) - 1 >= 2**64:
        raise ValueError(f"id {value} (+{count}) does not fit in 64 bits")
    return value


def from_wire(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The store's form of a batch in wire form (a batch already in that form is returned unchanged)."""
    if not is_wire(batch):
        return batch
    meta = batch.schema.metadata
    if meta.get(META_TABLE) != b"events":
        raise BatchError("only events batches travel in the compact wire form")
    names = batch.schema.names
    encoded = meta.get(META_WIRE) == WIRE_ENCODED
    allowed = _EVENT_TYPES.keys() | (set(_KEY_PARTS) if encoded else set())
    unknown = [name for name in names if name not in allowed]
    if unknown or len(set(names)) != len(names):
        raise BatchError(f"unknown or repeated columns in a compact events batch: {unknown or names}")
    n = batch.num_rows
    arrays = []
    try:
        columns = _decode(batch) if encoded else dict(zip(names, batch.columns, strict=True))
        for f in EVENTS:
            if f.name in columns:
                col = columns[f.name]
                if pa.types.is_dictionary(col.type):
                    col = col.dictionary_decode()
                arrays.append(col)
            elif f.name == "src" and META_SRC in meta:
                arrays.append(pa.array(np.full(n, _u64(meta[META_SRC], 1), dtype=np.uint64)))
            elif f.name == "seq" and META_SEQ_LO in meta:
                lo = _u64(meta[META_SEQ_LO], n)
                arrays.append(pa.array(np.arange(lo, lo + n, dtype=np.uint64)))
            else:
                arrays.append(pa.nulls(n, f.type))
        # The store's form carries the table and version only; table_of checks the columns.
        keep = {k: v for k, v in meta.items() if k in (META_TABLE, META_VERSION)}
        return pa.RecordBatch.from_arrays(
            arrays,
            schema=pa.schema(
                [pa.field(f.name, a.type, f.nullable) for f, a in zip(EVENTS, arrays, strict=True)], metadata=keep
            ),
        )
    except (ValueError, OverflowError, pa.ArrowException) as exc:
        raise BatchError(f"malformed compact events batch: {exc}") from exc


def to_ipc(batch: pa.RecordBatch) -> bytes:
    """Serialise one record batch, in its wire form, as a zstd-compressed Arrow IPC stream (wire and spool format)."""
    try:
        batch = to_wire(batch)
    except (pa.ArrowException, ValueError, TypeError):  # pragma: no cover - ship it uncompacted instead
        pass
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_IPC_OPTIONS) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> list[pa.RecordBatch]:
    """Parse an Arrow IPC stream into batches in the store's form; raises BatchError on anything malformed."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = []
        for b in reader:
            # Reading a stream checks its framing, not its contents: offsets past the data or
            # dictionary indices out of range would make the decoding read out of bounds.
            try:
                b.validate(full=True)
            except pa.ArrowException as exc:
                raise BatchError(f"invalid Arrow data: {exc}") from exc
            batches.append(from_wire(b))
    except BatchError:
        raise
    # Any of these from a stream of bytes off the network means the bytes are bad, not the
    # program: corrupt framing, an unknown dictionary id, an integer type Arrow has no name for.
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
        raise BatchError(f"not an Arrow IPC stream: {exc}") from exc
    for b in batches:
        table_of(b)
    return batches
