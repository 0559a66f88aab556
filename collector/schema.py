"""Arrow schemas of the three record kinds keytrace ships: events, stats, configs.

One Arrow record batch is one unit everywhere: a message on the events topic,
a file in the spool directory, an insert into DuckDB. The schema metadata says
which table the batch belongs to and which schema version wrote it, so a batch
is self-describing wherever it lands.
"""

from __future__ import annotations

import pyarrow as pa

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


_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def to_ipc(batch: pa.RecordBatch) -> bytes:
    """Serialise one record batch as a zstd-compressed Arrow IPC stream (the wire and spool format)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_IPC_OPTIONS) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> list[pa.RecordBatch]:
    """Parse an Arrow IPC stream; raises BatchError on anything malformed."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as exc:
        raise BatchError(f"not an Arrow IPC stream: {exc}") from exc
    for b in batches:
        table_of(b)
    return batches
