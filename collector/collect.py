"""The collector: consume the events topic into the store, at least once, without duplicates.

Offsets are committed only after DuckDB has committed the batches they cover, so a
crash at any point re-delivers, and the store skips batches it already holds.
Records that are not keytrace batches go to the dead-letter table and are counted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
import duckdb
import pyarrow as pa
from confluent_kafka import TopicPartition

from collector.options import DEFAULT_EVENTS_TOPIC
from collector.schema import BatchError, from_ipc
from collector.store import IDLE_MERGE_MAX_ROWS

log = logging.getLogger("keytrace.collect")

# A poll's records are stored in groups of about this many events (see Collector.step).
INGEST_GROUP_ROWS = 2_097_152

# (source "topic/partition@offset", value, its batches) and (source, reason, value).
Record = tuple[str, bytes, list[pa.RecordBatch]]
DeadLetter = tuple[str, str, bytes]


@dataclass
class CollectorStats:
    records: int = 0
    batches: int = 0
    rows: int = 0
    dead_letters: int = 0
    store_errors: int = 0
    merges: int = 0
    last_error: str | None = None
    last_ingest_at: float | None = None
    started_at: float = field(default_factory=time.time)


# Errors that the content of a batch causes (a null id, invalid UTF-8, an out-of-range
# time): that record goes to the dead-letter table. Any other error is the store's.
_DATA_ERRORS = (
    duckdb.ConstraintException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.DataError,
    ArithmeticError,
    ValueError,
    TypeError,
)


def _root(exc: BaseException) -> BaseException:
    """The first error of a chain: a failed ROLLBACK or cleanup must not hide why a write failed."""
    while (nxt := exc.__cause__ or exc.__context__) is not None:
        exc = nxt
    return exc


def _describe(exc: BaseException) -> str:
    root = _root(exc)
    text = f"{type(exc).__name__}: {exc}"
    return text if root is exc else f"{text} (caused by {type(root).__name__}: {root})"


class Collector:
    """Moves batches from the events topic into a Store. One instance per store file."""

    def __init__(
        self,
        store: Any,
        bootstrap_servers: str,
        topic: str = DEFAULT_EVENTS_TOPIC,
        group_id: str = "keytrace-collector",
        consumer_conf: dict[str, Any] | None = None,
        max_records: int = 500,
        idle_merge_max_rows: int | None = IDLE_MERGE_MAX_ROWS,
        group_rows: int = INGEST_GROUP_ROWS,
    ) -> None:
        self.store = store
        self.topic = topic
        self.max_records = max_records
        # A poll's records are decoded and stored in groups of about this many events, so
        # that a backlog of dense records (up to 500,000 events each) is never all in memory.
        self.group_rows = group_rows
        # When a poll comes back empty, merge runs of the store (one merge of at most this
        # many rows per empty poll), so lookups stay fast; None turns it off.
        self.idle_merge_max_rows = idle_merge_max_rows
        conf = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "client.id": "keytrace-collector",
            "auto.offset.reset": "earliest",
            # Offsets move only after the store commits: never let librdkafka commit on its own.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Events batches can be near 1 MB each; fetch several at a time.
            "fetch.max.bytes": 64 * 1024 * 1024,
            "allow.auto.create.topics": True,
            # A collector that crashed holds its partitions until its session expires;
            # 10 s (instead of 45 s) lets a restarted collector resume sooner.
            "session.timeout.ms": 10000,
        }
        conf.update(consumer_conf or {})
        self.consumer = confluent_kafka.Consumer(conf)
        self.consumer.subscribe([topic])
        self.stats = CollectorStats()
        self.store_name = str(getattr(store, "path", type(store).__name__))
        self._stop = threading.Event()

    def step(self, timeout: float = 0.5) -> int:
        """Consume up to max_records, store them, then commit. Returns rows stored.

        Records are stored in groups of about `group_rows` events. Offsets are committed only
        after the last group is stored; if a group fails, the poll is read again, and the
        groups already stored are skipped by event id.
        """
        msgs = self.consumer.consume(self.max_records, timeout)
        if not msgs:
            self._idle_merge()
            return 0
        records: list[Record] = []
        commit: dict[tuple[str, int], int] = {}
        # Where a failed group rewinds to: the poll's first offset of every partition, found
        # before any group is stored (a group may fail before the loop reaches a partition).
        first: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is None:
                first.setdefault((m.topic(), m.partition()), m.offset())
        rows = pending = 0
        dead: list[DeadLetter] = []
        for m in msgs:
            if m.error() is not None:
                if m.error().code() != confluent_kafka.KafkaError._PARTITION_EOF:
                    self.stats.last_error = m.error().str()
                    log.warning("events topic: %s", m.error().str())
                continue
            tp = (m.topic(), m.partition())
            commit[tp] = m.offset() + 1
            self.stats.records += 1
            source = f"{m.topic()}/{m.partition()}@{m.offset()}"
            value = m.value() or b""
            try:
                parsed = from_ipc(value)
            except BatchError as exc:
                dead.append((source, str(exc), value))
                continue
            if not parsed:
                # A stream cut right after its schema parses as empty; keytrace never ships one.
                dead.append((source, "no record batch in the Arrow stream (truncated after its schema?)", value))
                continue
            records.append((source, value, parsed))
            pending += sum(b.num_rows for b in parsed)
            if pending >= self.group_rows:
                rows += self._store_group(records, dead, first)
                records, dead, pending = [], [], 0
        rows += self._store_group(records, dead, first)
        self.stats.last_ingest_at = time.time()
        if commit:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in commit.items()],
                asynchronous=False,
            )
        return rows

    def _store_group(self, records: list[Record], dead: list[DeadLetter], first: dict[tuple[str, int], int]) -> int:
        """Store one group of records and its dead letters; on failure rewind the poll and raise."""
        batches = sum(len(parsed) for _, _, parsed in records)
        try:
            # Ingest is idempotent and dead letters are not: store first, so a retry after a
            # failure does not write the same dead letters twice.
            rows = self._ingest(records, dead)
            self.store.dead_letter_many(dead)
        except Exception as exc:
            # Nothing is committed: rewind so that these records are read again.
            self.stats.store_errors += 1
            self.stats.last_error = f"store {self.store_name} refused {batches} batches: {_describe(exc)}"
            log.error("%s (offsets not committed; will retry)", self.stats.last_error)
            for (topic, partition), offset in first.items():
                try:
                    self.consumer.seek(TopicPartition(topic, partition, offset))
                except confluent_kafka.KafkaException:
                    pass
            raise
        self.stats.dead_letters += len(dead)
        self.stats.batches += batches
        self.stats.rows += rows
        return rows

    def _idle_merge(self) -> None:
        """Nothing to store: merge runs the store's ingest left for compact(), one at a time.

        ingest() merges runs only up to store.AUTO_MERGE_MAX_ROWS rows; larger merges
        happen here, so that a long-running store keeps few runs. One merge per empty poll,
        so the collector looks for new records again between merges.
        """
        compact = getattr(self.store, "compact", None)
        if self.idle_merge_max_rows is None or compact is None:
            return
        try:
            self.stats.merges += compact(max_rows=self.idle_merge_max_rows, max_merges=1)
        except Exception as exc:  # the next ingest reports a store that is really broken
            self.stats.last_error = f"store {self.store_name}: merge failed: {_describe(exc)}"
            log.warning("%s", self.stats.last_error)

    def _ingest(self, records: list[Record], dead: list[DeadLetter]) -> int:
        """Store every record's batches in one transaction; if their content breaks it, one record at a time.

        A record the store rejects for its content is moved to `dead`, so that one bad record
        cannot stop the collector for good. A storage failure propagates.
        """
        batches = [b for _, _, parsed in records for b in parsed]
        if not batches:
            return 0
        try:
            return self.store.ingest(batches)
        except Exception as exc:
            if not isinstance(_root(exc), _DATA_ERRORS):
                raise
        rows = 0
        for source, payload, parsed in records:
            try:
                rows += self.store.ingest(parsed)
            except Exception as exc:
                if not isinstance(_root(exc), _DATA_ERRORS):
                    raise
                dead.append((source, f"the store rejected it: {_describe(exc)}", payload))
        return rows

    def run(self, stop: threading.Event | None = None, retry_backoff_s: float = 2.0, fail_fast: bool = False) -> None:
        stop = stop or self._stop
        while not stop.is_set():
            try:
                self.step()
            except confluent_kafka.KafkaException as exc:
                self.stats.last_error = str(exc)
                log.warning("collector: %s", exc)
                stop.wait(retry_backoff_s)
            except Exception:
                if fail_fast:
                    raise
                stop.wait(retry_backoff_s)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        try:
            self.consumer.close()
        except RuntimeError:
            pass
