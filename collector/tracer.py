"""Per-client event buffers and the per-sink shipper thread that empties them.

The traced clients only append tuples to plain lists (the hot path). Once per
`flush_interval_s` one background thread per sink turns what accumulated into
Arrow record batches and ships them. Lists are emptied with `del lst[:n]`, which
only ever removes rows that were already copied, so no lock sits on the hot path.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collector import schema
from collector.options import TraceOptions, default_spool_dir
from collector.sinks import SpoolOnlySink, open_sink
from collector.spool import Spool
from collector.stats import STAT_COLUMNS, parse_stats

log = logging.getLogger("keytrace")

MAX_KEY_BYTES = 64 * 1024
# Keep one Kafka message (one batch) under the broker's default 1 MB limit.
MAX_PAYLOAD_BYTES = 900_000
# A drain ships as one batch up to this many rows (a batch over MAX_PAYLOAD_BYTES once
# encoded is split further). Slicing an encoded batch is numpy work, and each numpy call
# on a large array hands the GIL back and forth with the application's thread: with
# slices of 50,000 rows the application blocked on the GIL about 250 times per 200,000
# messages, with none about 110 times (docs/BENCHMARKS.md). A 200 ms drain holds this
# many events at 2.5 million events/s; the collector decodes one batch at a time.
MAX_BATCH_ROWS = 500_000


def normalize_key(key: Any) -> bytes | None:
    """The key as keytrace stores it: bytes, at most MAX_KEY_BYTES (longer keys keep their head)."""
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogatepass")
    elif not isinstance(key, bytes):
        key = bytes(key)
    return key if len(key) <= MAX_KEY_BYTES else key[:MAX_KEY_BYTES]


# Row layouts of the hot-path tuples, converted to Arrow in one call each.
_SEND_ROW = pa.struct(
    [("ts", pa.int64()), ("topic", pa.string()), ("key", pa.binary()), ("value_size", pa.int32()),
     ("partition", pa.int32()), ("trace_seq", pa.uint64())]
)  # fmt: skip
_ACK_ROW = pa.struct(
    [("ts", pa.int64()), ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()),
     ("latency", pa.float64()), ("key", pa.binary()), ("msg_ts", pa.int64())]
)  # fmt: skip
_CONSUME_ROW = pa.struct(
    [("ts", pa.int64()), ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()),
     ("key", pa.binary()), ("msg_ts", pa.int64()), ("member_id", pa.string())]
)  # fmt: skip


def _fit_keys(arr: pa.Array) -> pa.Array:
    """Over-long keys keep their first MAX_KEY_BYTES."""
    longest = pc.max(pc.binary_length(arr)).as_py()
    if longest is not None and longest > MAX_KEY_BYTES:
        arr = pa.array([normalize_key(k) for k in arr.to_pylist()], pa.binary())
    return arr


def _non_negative(arr: pa.Array) -> pa.Array:
    return pc.if_else(pc.greater_equal(arr, 0), arr, pa.scalar(None, arr.type))


def _plausible_ms(arr: pa.Array) -> pa.Array:
    # librdkafka reports 0 or -1 when there is no timestamp, and the mock cluster
    # answers a fixed log-append time; neither is a wall-clock time.
    return pc.if_else(pc.greater(arr, 10**11), arr, pa.scalar(None, pa.int64()))


def size_of(v: Any) -> int | None:
    if v is None:
        return None
    try:
        return len(v)
    except TypeError:
        return None


class Tracer:
    """The trace buffers of one traced client instance. Appends only; never raises."""

    def __init__(
        self,
        client_type: str,
        client_id: str,
        group_id: str | None,
        options: TraceOptions,
        sink_uri: str,
        native: bool = False,
    ):
        self.src = int.from_bytes(os.urandom(8), "big")
        # With the native recorder, per-message events are kept inside librdkafka
        # (collector/native) and only drained here; the lists below stay empty.
        self.native = native
        self.client_type = client_type
        self.client_id = client_id
        self.group_id = group_id
        self.member_id: str | None = None
        self.options = options
        self.sink_uri = sink_uri
        self._seq = itertools.count(1)
        # Hot-path buffers, one tuple per event.
        self.sends: list[tuple] = []  # (ts_ns, topic, key, value_size, partition)
        self.acks: list[tuple] = []  # (ts_ns, topic, partition, offset, latency_s, key, msg_ts_ms)
        self.failures: list[tuple] = []  # (ts_ns, err, topic, partition, offset, latency_s, key, msg_ts_ms)
        self.consumes: list[tuple] = []  # (ts_ns, topic, partition, offset, key, msg_ts_ms, member_id)
        self.other: list[dict[str, Any]] = []  # rare events, already column-shaped
        self.stats_docs: list[tuple[int, str]] = []
        self.configs: list[tuple[int, str]] = []
        self.internal_errors = 0
        self.events_recorded = 0
        self.spooled = 0
        self.dropped = 0
        self.last_error: str | None = None
        self.closed = False
        self.shipper = Shipper.for_sink(sink_uri, options)
        self.shipper.register(self)

    # -- recording helpers used outside the hot path --------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        try:
            fields["kind"] = kind
            fields.setdefault("ts_ns", time.time_ns())
            self.other.append(fields)
        except Exception as exc:  # pragma: no cover - appending a dict cannot fail in practice
            self.internal_error(exc)

    def config(self, conf: dict[str, Any]) -> None:
        try:
            self.configs.append((time.time_ns(), json.dumps(conf, sort_keys=True, default=repr)))
        except Exception as exc:
            self.internal_error(exc)

    def internal_error(self, exc: BaseException) -> None:
        self.internal_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.internal_errors <= 10 or self.internal_errors % 1000 == 0:
            log.warning("keytrace internal error #%d (tracing continues): %s", self.internal_errors, self.last_error)

    def native_dropped(self) -> int:
        if not self.native:
            return 0
        from collector import native

        st = native.status(self.src)
        return st.dropped if st is not None else 0

    def status(self) -> dict[str, Any]:
        return {
            "sink": self.sink_uri,
            "recorder": "native" if self.native else "python",
            "events_recorded": self.events_recorded,
            "spooled": self.spooled,
            "dropped": self.dropped + self.native_dropped(),
            "internal_errors": self.internal_errors,
            "last_error": self.last_error or self.shipper.last_error,
            "spool_bytes": self.shipper.spool.bytes_used,
            "sink_healthy": self.shipper.healthy,
        }

    def flush(self, timeout: float = 10.0) -> None:
        self.shipper.flush(timeout)

    def close(self, timeout: float = 3.0) -> None:
        """Ship this client's last events, waiting at most `timeout` s for the sink in all.

        What the sink has not confirmed by then is spooled, not lost.
        """
        if self.closed:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self.closed = True
        self.shipper.unregister(self, max(0.0, deadline - time.monotonic()))
        if self.native:
            from collector import native

            native.forget(self.src)

    # -- draining (shipper thread only) ---------------------------------------------

    @staticmethod
    def _take(buf: list) -> list:
        n = len(buf)
        if not n:
            return []
        rows = buf[:n]
        del buf[:n]
        return rows

    def drain(self) -> list[pa.RecordBatch]:
        sends = self._take(self.sends)
        acks = self._take(self.acks)
        failures = self._take(self.failures)
        consumes = self._take(self.consumes)
        other = self._take(self.other)
        stats_docs = self._take(self.stats_docs)
        configs = self._take(self.configs)
        out: list[pa.RecordBatch] = []
        if self.native:
            out.extend(self._native_batches())
        n = len(sends) + len(acks) + len(failures) + len(consumes) + len(other)
        if n:
            self.events_recorded += n
            out.extend(self._events_batches(sends, acks, failures, consumes, other))
        if stats_docs:
            out.append(self._stats_batch(stats_docs))
        if configs:
            out.append(self._configs_batch(configs))
        return out

    def _native_batches(self) -> list[pa.RecordBatch]:
        from collector import native

        first = next(self._seq)
        batch = native.drain(
            self.src,
            first_seq=first,
            client_id=self.client_id,
            group_id=self.group_id,
            member_id=self.member_id,
            wire=True,
        )
        n = batch.num_rows if batch is not None else 0
        self._seq = itertools.count(first + n)
        if batch is None:
            return []
        self.events_recorded += n
        return schema.split_batch(batch, MAX_BATCH_ROWS)

    def _seq_block(self, n: int) -> int:
        """The first of n consecutive seq values, reserved; only the shipper thread advances the counter."""
        first = next(self._seq)
        self._seq = itertools.count(first + n)
        return first

    def _seqs(self, n: int) -> pa.Array:
        first = self._seq_block(n)
        return pa.array(np.arange(first, first + n, dtype=np.uint64))

    def _events_batches(
        self, sends: list, acks: list, failures: list, consumes: list, other: list
    ) -> list[pa.RecordBatch]:
        parts: list[pa.RecordBatch] = []
        for rows, convert in (
            (sends, self._send_cols),
            (acks, self._ack_cols),
            (failures, self._failure_cols),
            (consumes, self._consume_cols),
            (other, self._other_cols),
        ):
            if not rows:
                continue
            try:
                parts.append(self._events_batch(len(rows), convert(rows)))
            except Exception as exc:
                # One malformed row (an unexpected key type, say) must not cost its
                # neighbours: convert row by row and count only what truly fails.
                self.internal_error(exc)
                for row in rows:
                    try:
                        parts.append(self._events_batch(1, convert([row])))
                    except Exception as row_exc:
                        self.internal_error(row_exc)
                        self.dropped += 1
        return [p.slice(i, MAX_BATCH_ROWS) for p in parts for i in range(0, p.num_rows, MAX_BATCH_ROWS)]

    def _events_batch(self, n: int, filled: dict[str, Any]) -> pa.RecordBatch:
        arrays = []
        for f in schema.EVENTS:
            v = filled.get(f.name)
            if f.name == "src":
                arrays.append(pa.repeat(pa.scalar(self.src, pa.uint64()), n))
            elif f.name == "seq":
                arrays.append(self._seqs(n))
            elif f.name == "ts":
                arrays.append(pc.divide(v if isinstance(v, pa.Array) else pa.array(v, pa.int64()), 1000).cast(f.type))
            elif isinstance(v, pa.Array):
                arrays.append(v if v.type == f.type else v.cast(f.type))
            elif isinstance(v, list | tuple):
                arrays.append(pa.array(v, f.type))
            elif v is None:
                arrays.append(pa.nulls(n, f.type))
            else:
                arrays.append(pa.repeat(pa.scalar(v, f.type), n))
        return pa.RecordBatch.from_arrays(arrays, schema=schema.EVENTS)

    def _send_cols(self, sends: list) -> dict[str, Any]:
        ts, topic, key, vsize, part, trace = pa.array(sends, _SEND_ROW).flatten()
        return {
            "ts": ts,
            "kind": schema.SEND,
            "client_id": self.client_id,
            "topic": topic,
            "partition": _non_negative(part) if part.null_count < len(part) else None,
            "key": _fit_keys(key),
            "value_size": vsize,
            "trace_seq": trace if trace.null_count < len(trace) else None,
            "attempt": 1,
        }

    def _ack_cols(self, acks: list) -> dict[str, Any]:
        ts, topic, part, off, lat, key, mts = pa.array(acks, _ACK_ROW).flatten()
        return {
            "ts": ts,
            "kind": schema.ACK,
            "client_id": self.client_id,
            "topic": topic,
            "partition": part,
            "offset": off,
            "key": _fit_keys(key),
            "latency_us": pc.multiply(lat, 1e6).cast(pa.int64(), safe=False),
            "msg_ts_ms": _plausible_ms(mts),
        }

    def _failure_cols(self, failures: list) -> dict[str, Any]:
        err = [f[1] for f in failures]
        ts, topic, _part, _off, lat, key, mts = pa.array([f[:1] + f[2:] for f in failures], _ACK_ROW).flatten()
        return {
            "ts": ts,
            "kind": schema.ERROR,
            "client_id": self.client_id,
            "topic": topic,
            "key": _fit_keys(key),
            "latency_us": pc.multiply(lat, 1e6).cast(pa.int64(), safe=False),
            "msg_ts_ms": _plausible_ms(mts),
            "error_code": [e.code() for e in err],
            "error_name": [e.name() for e in err],
            "error_retriable": [e.retriable() for e in err],
            "error_message": [e.str() for e in err],
        }

    def _consume_cols(self, consumes: list) -> dict[str, Any]:
        ts, topic, part, off, key, mts, member = pa.array(consumes, _CONSUME_ROW).flatten()
        msg_ts = _plausible_ms(mts)
        return {
            "ts": ts,
            "kind": schema.CONSUME,
            "client_id": self.client_id,
            "topic": topic,
            "partition": part,
            "offset": off,
            "key": _fit_keys(key),
            "msg_ts_ms": msg_ts,
            "latency_us": pc.subtract(pc.divide(ts, 1000), pc.multiply(msg_ts, 1000)),
            "group_id": self.group_id,
            "member_id": member,
        }

    def _other_cols(self, other: list) -> dict[str, Any]:
        names = [f.name for f in schema.EVENTS if f.name not in ("src", "seq")]
        cols: dict[str, list] = {name: [] for name in names}
        for ev in other:
            row = dict(ev)
            row["ts"] = row.pop("ts_ns")
            row.setdefault("client_id", self.client_id)
            if "key" in row:
                row["key"] = normalize_key(row["key"])
            if self.client_type == "consumer":
                row.setdefault("group_id", self.group_id)
                row.setdefault("member_id", self.member_id)
            unknown = set(row) - set(names)
            if unknown:
                raise ValueError(f"unknown event fields {sorted(unknown)}")
            for name in names:
                cols[name].append(row.get(name))
        return cols

    # Stats and config rows go through one struct conversion each: every pyarrow call
    # releases and retakes the GIL, and each retake can keep the application waiting.
    def _stats_batch(self, docs: list[tuple[int, str]]) -> pa.RecordBatch:
        n = len(docs)
        first = self._seq_block(n)
        counters = {
            "kt_events": self.events_recorded,
            "kt_spooled": self.spooled,
            "kt_dropped": self.dropped + self.native_dropped(),
            "kt_internal_errors": self.internal_errors,
        }
        rows = []
        for i, (ts, doc) in enumerate(docs):
            try:
                parsed = parse_stats(doc)
            except (ValueError, TypeError) as exc:
                self.internal_error(exc)
                parsed = {}
            row = {name: parsed.get(name) for name in STAT_COLUMNS}
            row["client_type"] = row["client_type"] or self.client_type
            row["group_id"] = row["group_id"] or self.group_id
            row.update(counters, src=self.src, seq=first + i, ts=ts // 1000, client_id=self.client_id, raw=doc)
            rows.append(row)
        return _rows_batch(rows, _STATS_ROW, schema.STATS, self.internal_error)

    def _configs_batch(self, configs: list[tuple[int, str]]) -> pa.RecordBatch:
        first = self._seq_block(len(configs))
        rows = [
            {
                "src": self.src,
                "seq": first + i,
                "ts": ts // 1000,
                "client_id": self.client_id,
                "client_type": self.client_type,
                "group_id": self.group_id,
                "config": doc,
            }
            for i, (ts, doc) in enumerate(configs)
        ]
        return _rows_batch(rows, _CONFIG_ROW, schema.CONFIGS, self.internal_error)


_STATS_ROW = pa.struct(list(schema.STATS))
_CONFIG_ROW = pa.struct(list(schema.CONFIGS))


_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError)


def _rows_batch(
    rows: list[dict[str, Any]], row_type: pa.StructType, table: pa.Schema, on_error: Callable[[Exception], None]
) -> pa.RecordBatch:
    """A batch of `table` from rows as dicts (missing or None values are null), in one conversion.

    A value of the wrong type (a statistics document with a string where a count
    belongs, say) costs only its own row's typed values: that row keeps the columns
    its table cannot do without (ids, time, raw text) and the error is reported.
    """
    try:
        arr = pa.array(rows, row_type)
    except _CONVERSION_ERRORS:
        kept = []
        for row in rows:
            try:
                pa.array([row], row_type)
            except _CONVERSION_ERRORS as exc:
                on_error(exc)
                row = {k: v for k, v in row.items() if k in _ESSENTIAL}
            kept.append(row)
        arr = pa.array(kept, row_type)
    return pa.RecordBatch.from_struct_array(arr).replace_schema_metadata(table.metadata)


# What a stats or config row keeps when its other values do not convert.
_ESSENTIAL = frozenset({"src", "seq", "ts", "client_id", "client_type", "raw", "config"})


def _rows(payload: bytes) -> int:
    try:
        return sum(b.num_rows for b in schema.from_ipc(payload))
    except schema.BatchError:
        return 0


class Shipper:
    """The one background thread per sink: drain tracers, ship, spool on failure, replay."""

    _registry: dict[str, Shipper] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_sink(cls, uri: str, options: TraceOptions) -> Shipper:
        with cls._registry_lock:
            shipper = cls._registry.get(uri)
            if shipper is None or shipper.stopped:
                shipper = cls(uri, options)
                cls._registry[uri] = shipper
            return shipper

    def __init__(self, uri: str, options: TraceOptions):
        self.uri = uri
        self.options = options
        self.sink = open_sink(uri)
        self.spool_only = isinstance(self.sink, SpoolOnlySink)
        spool_dir = self.sink.path if isinstance(self.sink, SpoolOnlySink) else options.spool_dir
        self.spool = Spool(spool_dir or default_spool_dir(uri), options.spool_max_bytes)
        # Strong references: a client dropped without close() still gets its last events shipped.
        self._tracers: set[Tracer] = set()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self.stopped = False
        self.healthy = True
        self._retry_at = 0.0
        self._replaying: set[str] = set()
        # When the spool directory may next hold something to replay: at once after this
        # shipper spooled a batch, else a second after a look found it empty (another
        # process may spool there). Listing it on every pass costs a GIL round trip.
        self._spool_look_at = 0.0
        self.last_error: str | None = None
        self.shipped_batches = 0
        self._hooks: list[weakref.WeakMethod] = []
        self._thread = threading.Thread(target=self._run, name=f"keytrace-shipper[{uri}]", daemon=True)
        self._thread.start()

    def add_hook(self, method: Callable[[], None]) -> None:
        """Run `method` on every shipper pass (resend timers); held weakly."""
        with self._lock:
            self._hooks.append(weakref.WeakMethod(method))

    def register(self, tracer: Tracer) -> None:
        with self._lock:
            self._tracers.add(tracer)

    def unregister(self, tracer: Tracer, timeout: float = 2.0) -> None:
        """Forget a closed client; the last one out stops the shipper and releases the sink."""
        with self._lock:
            self._tracers.discard(tracer)
            last = not self._tracers
        if last:
            with Shipper._registry_lock:
                if Shipper._registry.get(self.uri) is self:
                    del Shipper._registry[self.uri]
            self.stop(timeout=timeout)

    def _run(self) -> None:
        # Encoding and shipping run at a lower priority than the application's threads,
        # on the CPU time they leave (the buffers hold what arrives meanwhile). Linux
        # keeps niceness per thread; elsewhere this would renice the whole process.
        if self.options.shipper_nice and sys.platform.startswith("linux"):
            try:
                tid = threading.get_native_id()  # starts with its creator's niceness
                os.setpriority(
                    os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.options.shipper_nice)
                )
            except OSError as exc:  # pragma: no cover - lowering one's own priority is always allowed
                log.debug("keytrace: shipper thread keeps its priority: %s", exc)
        # pyarrow's first Python-object conversion pays a one-time setup; pay it here, idle.
        pa.array([(0, "", b"", 0, None, None)], _SEND_ROW)
        while not self.stopped:
            self._wake.wait(self.options.flush_interval_s)
            self._wake.clear()
            try:
                self.ship_once()
            except Exception as exc:  # the shipper must outlive any single bad batch
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("keytrace shipper error (continuing)")

    def _owner(self, payload_tracer: Tracer | None) -> list[Tracer]:
        return [payload_tracer] if payload_tracer is not None else list(self._tracers)

    def ship_once(self) -> None:
        for ref in list(self._hooks):
            hook = ref()
            if hook is None:
                self._hooks.remove(ref)
                continue
            try:
                hook()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if self.stopped:  # stop() has spooled what was unfinished and closed the sink
                return
            now = time.monotonic()
            for tracer in list(self._tracers):
                try:
                    batches = tracer.drain()
                except Exception as exc:
                    tracer.internal_error(exc)
                    continue
                for batch in batches:
                    for payload in self._encode(batch):
                        if self.spool_only or not (self.healthy or now >= self._retry_at):
                            self._to_spool(payload, tracer)
                            continue
                        try:
                            self.sink.submit(payload, ("new", tracer))
                        except Exception as exc:
                            self._handle([(("new", tracer), payload, False, f"{type(exc).__name__}: {exc}")])
            self._handle(self.sink.poll())
            if self.healthy and not self._replaying and not self.spool_only:
                self._replay()

    def _encode(self, batch: pa.RecordBatch) -> list[bytes]:
        payload = schema.to_ipc(batch)
        if len(payload) <= MAX_PAYLOAD_BYTES or batch.num_rows <= 1:
            return [payload]
        pieces = -(-len(payload) * 5 // (MAX_PAYLOAD_BYTES * 4))  # aim 20% under the limit
        step = max(1, -(-batch.num_rows // pieces))
        out: list[bytes] = []
        for part in schema.split_batch(batch, step):
            out.extend(self._encode(part))
        return out

    def _to_spool(self, payload: bytes, tracer: Tracer | None) -> None:
        if self.spool.put(payload):
            self._spool_look_at = 0.0
            if tracer is not None:
                tracer.spooled += _rows(payload)
            return
        lost = _rows(payload)
        for t in self._owner(tracer)[:1]:
            t.dropped += lost
        self.last_error = self.spool.last_error
        log.error("keytrace dropped %d trace events: %s", lost, self.spool.last_error)

    def _handle(self, outcomes: list) -> None:
        for token, payload, ok, reason in outcomes:
            origin, ref = token if isinstance(token, tuple) else ("new", None)
            if ok:
                self.shipped_batches += 1
                self.healthy = True
                if origin == "spool":
                    self.spool.remove(ref)
                    self._replaying.discard(str(ref))
                continue
            if self.healthy:
                log.warning("keytrace sink %s failed (%s): spooling to %s", self.uri, reason, self.spool.dir)
            self.healthy = False
            self.last_error = f"sink {self.uri}: {reason}"
            self._retry_at = time.monotonic() + 2.0
            if origin == "spool":
                self._replaying.discard(str(ref))
            else:
                self._to_spool(payload, ref)

    def _replay(self, limit: int = 8) -> bool:
        """Resubmit up to `limit` spooled batches; whether any was submitted."""
        now = time.monotonic()
        if now < self._spool_look_at:
            return False
        submitted = False
        paths = self.spool.oldest(limit)
        if not paths:
            self._spool_look_at = now + 1.0
        for path in paths:
            if str(path) in self._replaying:
                continue
            data = self.spool.read(path)
            if data is None:
                continue
            self._replaying.add(str(path))
            try:
                self.sink.submit(data, ("spool", path))
            except Exception as exc:
                self._handle([(("spool", path), data, False, f"{type(exc).__name__}: {exc}")])
                return submitted
            submitted = True
        return submitted

    def flush(self, timeout: float) -> None:
        """Ship everything buffered now and wait (bounded) for the sink's answers.

        While the sink is failing there is nothing to wait for: batches in flight
        reach the spool when the sink gives up on them, or at exit.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self.ship_once()
            self._wait(deadline)
            # Spooled batches get one replay attempt per flush while the sink works
            # (one listing of the spool directory, whenever the shipper last looked).
            if self.healthy and not self.spool_only:
                self._spool_look_at = 0.0
                if self._replay(limit=64):
                    self._wait(deadline)

    def _wait(self, deadline: float) -> None:
        while self.healthy and self.sink.pending() and time.monotonic() < deadline:
            self._handle(self.sink.flush(min(0.2, max(0.0, deadline - time.monotonic()))))
        self._handle(self.sink.poll())

    def stop(self, timeout: float = 5.0) -> None:
        if self.stopped:
            return
        try:
            self.flush(timeout)
            with self._lock:
                # Spool what is still queued in the sink: a duplicate is harmless
                # (the store skips a batch it already holds), a loss is not.
                for token, payload in self.sink.unfinished():
                    origin, ref = token if isinstance(token, tuple) else ("new", None)
                    if origin != "spool":
                        self._to_spool(payload, ref)
        finally:
            with self._lock:
                self.stopped = True
                self._wake.set()
                self.sink.close()


def _flush_all_at_exit() -> None:
    for shipper in list(Shipper._registry.values()):
        try:
            shipper.stop(timeout=5.0)
        except Exception:  # pragma: no cover - interpreter is shutting down
            pass


# Run before ordinary atexit handlers: DuckDB's own exit hook would otherwise refuse the
# last Arrow insert ("the Python interpreter is shutting down").
try:
    threading._register_atexit(_flush_all_at_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover - other interpreters
    atexit.register(_flush_all_at_exit)


def wrap_callback(tracer: Tracer, record: Callable[..., None], user: Callable[..., Any] | None) -> Callable[..., Any]:
    """A callback that records first, never lets recording fail, and then calls the user's."""

    def callback(*args: Any) -> Any:
        try:
            record(*args)
        except Exception as exc:
            tracer.internal_error(exc)
        if user is not None:
            return user(*args)
        return None

    return callback
