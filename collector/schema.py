"""Arrow schemas of the three record kinds keytrace ships: events, stats, configs.

One Arrow record batch is one unit everywhere: a message on the events topic,
a file in the spool directory, an insert into DuckDB. The schema metadata says
which table the batch belongs to and which schema version wrote it, so a batch
is self-describing wherever it lands.
"""

from __future__ import annotations

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
# `from_ipc` turns it back into the store's form, so nothing past it sees the difference.
META_WIRE = b"keytrace.wire"
META_SRC = b"keytrace.src"
META_SEQ_LO = b"keytrace.seq_lo"
WIRE_COMPACT = b"compact"
_DICT_COLUMNS = frozenset({"kind", "client_id", "topic", "error_name", "group_id", "member_id"})
_EVENT_TYPES = {f.name: f.type for f in EVENTS}


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
    if not pc.all(pc.equal(src, src_id)).as_py():
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


def wire_batch(columns: dict[str, pa.Array], n: int, *, src: int | None, seq_lo: int | None) -> pa.RecordBatch:
    """A batch in the compact wire form from its columns (by name, any order; absent ones are all null).

    With `src` and `seq_lo`, rows have the event ids (src, seq_lo), (src, seq_lo + 1), ...,
    carried in the metadata; without them, `src` and `seq` are among the columns.
    """
    meta = dict(EVENTS.metadata)
    meta[META_WIRE] = WIRE_COMPACT
    if src is not None:
        meta[META_SRC] = str(src).encode()
    if seq_lo is not None:
        meta[META_SEQ_LO] = str(seq_lo).encode()
    fields = [pa.field(f.name, columns[f.name].type, f.nullable) for f in EVENTS if f.name in columns]
    if not fields:
        raise BatchError("a batch needs at least one column")
    arrays = [columns[f.name] for f in fields]
    if any(len(a) != n for a in arrays):
        raise BatchError("columns of unequal length")
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def slice_batch(batch: pa.RecordBatch, offset: int, length: int) -> pa.RecordBatch:
    """batch.slice(), keeping a wire-form batch's ids right (its first seq moves with the offset)."""
    part = batch.slice(offset, length)
    meta = batch.schema.metadata or {}
    if offset and is_wire(batch) and META_SEQ_LO in meta:
        part = part.replace_schema_metadata({**meta, META_SEQ_LO: str(int(meta[META_SEQ_LO]) + offset).encode()})
    return part


def is_wire(batch: pa.RecordBatch) -> bool:
    return (batch.schema.metadata or {}).get(META_WIRE) == WIRE_COMPACT


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
    unknown = [name for name in batch.schema.names if name not in _EVENT_TYPES]
    if unknown or len(set(batch.schema.names)) != len(batch.schema.names):
        raise BatchError(f"unknown or repeated columns in a compact events batch: {unknown or batch.schema.names}")
    n = batch.num_rows
    arrays = []
    try:
        for f in EVENTS:
            if f.name in batch.schema.names:
                col = batch.column(f.name)
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
        batches = [from_wire(b) for b in reader]
    except BatchError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as exc:
        raise BatchError(f"not an Arrow IPC stream: {exc}") from exc
    for b in batches:
        table_of(b)
    return batches
