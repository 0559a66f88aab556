"""Where shipped batches go: a DuckDB file in this process, or a Kafka topic.

A sink takes Arrow IPC payloads with `submit(payload, token)` and later reports each
outcome from `poll()` as (token, payload, ok, reason). The DuckDB sink answers at once;
the Kafka sink answers from its delivery reports. The shipper spools what failed.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import confluent_kafka

from collector.schema import from_ipc

Outcome = tuple[Any, bytes, bool, str | None]


class SinkError(RuntimeError):
    """A sink URI that cannot be used as given."""


class DuckDBSink:
    def __init__(self, path: str) -> None:
        # Import the store (and pandas, duckdb) now, in the application's thread: a first
        # import on the shipper thread can race interpreter shutdown and fail there.
        import collector.store  # noqa: F401

        self.uri = f"duckdb://{path}"
        self.path = path
        self._store: Any = None
        self._done: list[Outcome] = []
        self.last_error: str | None = None

    def _open(self) -> Any:
        if self._store is None:
            self._store = shared_store(self.path)
        return self._store

    def submit(self, payload: bytes, token: Any = None) -> None:
        try:
            self._open().ingest(from_ipc(payload))
        except Exception as exc:  # disk full, lock held, corrupt file: spool and say why
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._done.append((token, payload, False, self.last_error))
            if self._store is not None and "Conflicting lock" not in str(exc):
                release_store(self.path)
                self._store = None
            return
        self.last_error = None
        self._done.append((token, payload, True, None))

    def poll(self) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def flush(self, timeout: float) -> list[Outcome]:
        return self.poll()

    def pending(self) -> int:
        return 0

    def unfinished(self) -> list[tuple[Any, bytes]]:
        return []

    def close(self) -> None:
        if self._store is not None:
            release_store(self.path)
            self._store = None


class KafkaSink:
    """One Kafka message per batch, on a producer of its own (it may be another cluster)."""

    def __init__(self, servers: str, topic: str, conf: dict[str, Any] | None = None) -> None:
        self.uri = f"kafka://{servers}/{topic}"
        self.topic = topic
        base = {
            "bootstrap.servers": servers,
            "client.id": "keytrace-sink",
            # Each message is an Arrow IPC stream compressed with zstd already.
            "compression.type": "none",
            "linger.ms": 20,
            "acks": "all",
            # Fail a batch within seconds so that it reaches the spool instead of
            # sitting in memory for librdkafka's default five minutes.
            "message.timeout.ms": 10000,
            "queue.buffering.max.kbytes": 65536,
            "message.max.bytes": 1000000,
            # Find a returning cluster within a second, so the spool is replayed promptly.
            "reconnect.backoff.max.ms": 1000,
        }
        base.update(conf or {})
        self._producer = confluent_kafka.Producer(base)
        self._done: list[Outcome] = []
        self._inflight: dict[int, tuple[Any, bytes]] = {}
        self._ids = itertools.count()
        self.last_error: str | None = None

    def submit(self, payload: bytes, token: Any = None) -> None:
        ident = next(self._ids)

        def report(err: Any, msg: Any, token: Any = token, payload: bytes = payload) -> None:
            self._inflight.pop(ident, None)
            if err is None:
                self.last_error = None
                self._done.append((token, payload, True, None))
            else:
                self.last_error = err.str()
                self._done.append((token, payload, False, err.name()))

        try:
            if self._producer is None:
                raise confluent_kafka.KafkaException(confluent_kafka.KafkaError._DESTROY, "sink closed")
            self._inflight[ident] = (token, payload)
            self._producer.produce(self.topic, payload, on_delivery=report)
        except (BufferError, confluent_kafka.KafkaException) as exc:
            self._inflight.pop(ident, None)
            self.last_error = str(exc)
            self._done.append((token, payload, False, str(exc)))

    def poll(self) -> list[Outcome]:
        if self._producer is not None:
            self._producer.poll(0)
        done, self._done = self._done, []
        return done

    def flush(self, timeout: float) -> list[Outcome]:
        if self._producer is not None:
            self._producer.flush(timeout)
        return self.poll()

    def pending(self) -> int:
        return len(self._inflight)

    def unfinished(self) -> list[tuple[Any, bytes]]:
        """Batches still in librdkafka's queue; the shipper spools them before exit."""
        return list(self._inflight.values())

    def close(self) -> None:
        """Release the sink's producer: its threads and connections end now, not at some later GC.

        The shipper has already waited for, or spooled, what was in flight; what is still
        queued is purged (not sent) so that closing never waits on an unreachable cluster.
        """
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.purge(True, True, False)
            producer.poll(0)
        except (confluent_kafka.KafkaException, RuntimeError):  # closing anyway
            pass
        # The purged batches' failure reports are not news: they are spooled already.
        self._done.clear()
        self._inflight.clear()
        close = getattr(producer, "close", None)  # older confluent-kafka has no Producer.close()
        if close is not None:
            close()


def parse_sink(uri: str) -> tuple[str, str, str]:
    """(scheme, location, topic) of a sink URI; raises SinkError with the accepted forms."""
    u = urlparse(uri)
    if u.scheme == "duckdb":
        path = (u.netloc + u.path) if u.netloc else u.path
        if not path:
            raise SinkError(f"sink {uri!r}: expected duckdb:///path/to/file.duckdb")
        return "duckdb", path, ""
    if u.scheme == "kafka":
        topic = u.path.lstrip("/")
        if not u.netloc or not topic:
            raise SinkError(f"sink {uri!r}: expected kafka://host:port[,host:port]/topic")
        return "kafka", u.netloc, topic
    if u.scheme == "spool":
        return "spool", (u.netloc + u.path), ""
    raise SinkError(f"sink {uri!r}: scheme must be duckdb://, kafka:// or spool://")


class SpoolOnlySink:
    """spool://dir keeps every batch in the spool; `keytrace collect` can ingest it later."""

    def __init__(self, path: str) -> None:
        self.uri = f"spool://{path}"
        self.path = Path(path)
        self.last_error = "spool-only sink: batches stay in the spool directory"

    def submit(self, payload: bytes, token: Any = None) -> None:
        raise SinkError("a spool-only sink does not submit; the shipper writes to the spool directly")

    def poll(self) -> list[Outcome]:
        return []

    def flush(self, timeout: float) -> list[Outcome]:
        return []

    def pending(self) -> int:
        return 0

    def unfinished(self) -> list[tuple[Any, bytes]]:
        return []

    def close(self) -> None:
        pass


def open_sink(uri: str) -> DuckDBSink | KafkaSink | SpoolOnlySink:
    scheme, where, topic = parse_sink(uri)
    if scheme == "duckdb":
        return DuckDBSink(where)
    if scheme == "kafka":
        return KafkaSink(where, topic)
    return SpoolOnlySink(where)


_stores: dict[str, list[Any]] = {}
_stores_lock = threading.Lock()


def shared_store(path: str) -> Any:
    """One Store per file per process: DuckDB lets only one connection own a file."""
    from collector.store import Store

    key = str(Path(path).resolve())
    with _stores_lock:
        entry = _stores.get(key)
        if entry is None:
            entry = [Store(key), 0]
            _stores[key] = entry
        entry[1] += 1
        return entry[0]


def adopt_store(store: Any, path: str) -> None:
    """Register a Store opened elsewhere (keytrace serve) so in-process sinks reuse it."""
    key = str(Path(path).resolve())
    with _stores_lock:
        _stores.setdefault(key, [store, 1])


def release_store(path: str) -> None:
    key = str(Path(path).resolve())
    with _stores_lock:
        entry = _stores.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            _stores.pop(key, None)
            try:
                entry[0].close()
            except Exception:
                pass
