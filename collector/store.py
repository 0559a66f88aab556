"""The DuckDB trace store: the one owner of a keytrace database file.

Everything that touches DuckDB goes through `Store`, so another engine (DuckLake,
MotherDuck) is another class with the same methods. One writer connection holds the
file; readers in the same process get one cursor per thread (`cursor()`).

Layout (docs/STORE.md has the measurements): each `ingest()` call appends its events
as one *run*, clustered by `key_hash = hash(key)`, in row groups of ROW_GROUP_SIZE
rows. DuckDB keeps min/max per row group, so a key lookup reads about one row group
per run instead of the whole table, and ingest pays for a cheap reordering instead of
maintaining an index. Runs are merged as they accumulate (size-tiered, FANIN at a
time; by ingest itself, small runs at once and larger ones beyond MAX_RUNS runs;
`compact()` for the largest), so that the number of runs, and with it the cost of a
lookup, stays small.

A side table `commits` holds each committed partition offset of the commit events, so
that a lifecycle can show when a group committed past a message.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from collector import lifecycle, queries
from collector.schema import CONFIGS, EVENTS, SCHEMA_VERSION, SCHEMAS, STATS, table_of

log = logging.getLogger("keytrace.store")

ROW_GROUP_SIZE = 16_384
# Runs are merged FANIN at a time, FANIN runs of one size tier (within a factor FANIN of
# each other). With every tier merged eagerly, 4 kept 10 million events of the bench in
# 7 runs for about 1.6 rewrites per event and 8 in 11 runs for about 0.9 (docs/STORE.md).
FANIN = 4
# ingest() merges FANIN runs of one size tier as soon as they exist while the merged run
# has at most EAGER_MERGE_MAX_ROWS: small runs (a collector's polls at low rates, an
# in-process sink's flushes) would otherwise pile up, and merging them costs little. The
# larger runs a busy collector makes (its polls grow with its backlog) are merged only
# once the store holds more than MAX_RUNS runs: each merge rewrites rows that ingest has
# already paid for once, and a lookup costs about as much with MAX_RUNS runs as with a
# few (docs/STORE.md). Either way one merge rewrites at most AUTO_MERGE_MAX_ROWS rows
# while ingest holds the write lock; larger merges are left to compact(), which the
# collector runs with IDLE_MERGE_MAX_ROWS when a poll comes back empty.
EAGER_MERGE_MAX_ROWS = 1_048_576
MAX_RUNS = 24
AUTO_MERGE_MAX_ROWS = 4_194_304
IDLE_MERGE_MAX_ROWS = 16_777_216
# Around a null-key message's produce time, the window paired on its own (see lifecycle).
NULL_KEY_WINDOW = dt.timedelta(seconds=10)
REPORT_HORIZON = dt.timedelta(minutes=15)

_DUCK_TYPES = {
    pa.uint64(): "UBIGINT",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.int16(): "SMALLINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.string(): "VARCHAR",
    pa.binary(): "BLOB",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


def _columns_ddl(schema: pa.Schema) -> str:
    cols = []
    for f in schema:
        cols.append(f'"{f.name}" {_DUCK_TYPES[f.type]}' + ("" if f.nullable else " NOT NULL"))
    return ", ".join(cols)


_DDL = [
    "CREATE TABLE IF NOT EXISTS meta (name VARCHAR PRIMARY KEY, value VARCHAR)",
    f"CREATE TABLE IF NOT EXISTS events ({_columns_ddl(EVENTS)}, key_hash UBIGINT, run UINTEGER)",
    f"CREATE TABLE IF NOT EXISTS stats ({_columns_ddl(STATS)})",
    f"CREATE TABLE IF NOT EXISTS configs ({_columns_ddl(CONFIGS)})",
    """CREATE TABLE IF NOT EXISTS ingested_batches (src UBIGINT, seq_lo UBIGINT, tbl VARCHAR, rows INTEGER,
       ingested_at TIMESTAMPTZ, PRIMARY KEY (src, seq_lo))""",
    "CREATE SEQUENCE IF NOT EXISTS dead_letter_ids",
    """CREATE TABLE IF NOT EXISTS dead_letters (id BIGINT PRIMARY KEY DEFAULT nextval('dead_letter_ids'),
       received_at TIMESTAMPTZ, source VARCHAR, reason VARCHAR, payload BLOB)""",
    """CREATE TABLE IF NOT EXISTS runs (run UINTEGER PRIMARY KEY, rows BIGINT, min_ts TIMESTAMPTZ,
       max_ts TIMESTAMPTZ, created_at TIMESTAMPTZ)""",
    """CREATE TABLE IF NOT EXISTS commits (src UBIGINT, seq UBIGINT, ts TIMESTAMPTZ, group_id VARCHAR,
       topic VARCHAR, "partition" INTEGER, committed BIGINT, error_name VARCHAR)""",
]

_EVENT_COLS = ", ".join(f'"{f.name}"' for f in EVENTS)
# What lifecycle assembly reads of an event.
_ROW_COLS = (
    'src, seq, epoch_us(ts) AS ts_us, kind, topic, "partition", "offset", key, trace_seq, attempt, '
    "latency_us, error_name, error_message, group_id"
)
# Identifiers below come from the schema module, never from input.
# hash(NULL) is a constant, so keyless events cluster too.
_HASHES = "SELECT hash(key) FROM kt_new"
_INSERT_EVENTS = "INSERT INTO events BY NAME SELECT *, $run::UINTEGER AS run FROM kt_run"
_INSERT = {
    "stats": "INSERT INTO stats BY NAME SELECT * FROM kt_new",
    "configs": "INSERT INTO configs BY NAME SELECT * FROM kt_new",
}
_INSERT_COMMITS = """
    INSERT INTO commits
    SELECT src, seq, ts, group_id, e.topic, e."partition", e."offset", coalesce(e.error, error_name)
    FROM (SELECT src, seq, ts, group_id, error_name,
                 unnest(from_json(detail, '[{"topic": "VARCHAR", "partition": "INTEGER", "offset": "BIGINT",
                                             "error": "VARCHAR"}]')) AS e
          FROM kt_commits WHERE json_valid(detail))
"""
_KEY_ROWS = f"SELECT {_ROW_COLS} FROM events WHERE key_hash = hash($key::BLOB)"  # noqa: S608
_KEY_ROWS_SCAN = f"SELECT {_ROW_COLS} FROM events WHERE key IS NOT DISTINCT FROM $key::BLOB"  # noqa: S608
_KEYS_ROWS = (
    f"SELECT {_ROW_COLS} FROM events "  # noqa: S608
    "WHERE key_hash IN (SELECT hash(k) FROM unnest($keys::BLOB[]) AS t(k))"
)
_NULL_KEY_ROWS = (
    f"SELECT {_ROW_COLS} FROM events WHERE key_hash = hash(NULL::BLOB) AND key IS NULL "  # noqa: S608
    "AND src = $src AND topic = $topic AND ts >= $since AND ts < $until"
)
_POSITION_ROWS = (
    f"SELECT {_ROW_COLS} FROM events "  # noqa: S608
    "WHERE topic = $topic AND \"partition\" = $partition AND \"offset\" = $offset AND kind IN ('ack', 'consume')"
)
# Commits that may cover a key's consumptions; lifecycle.py picks each group's first one.
_COMMITS = """
    SELECT epoch_us(ts) AS ts_us, seq, group_id, topic, "partition", committed, error_name FROM commits
    WHERE ts BETWEEN $lo AND $hi AND topic = $topic AND "partition" = $partition
"""
# Keys in [lo, hi), latest first, with the sends that bound how many messages each holds.
# At most $cap events are read; when the cap is hit the prefix is broad and the caller
# asks again for recent events only.
_PREFIX_KEYS = """
    WITH m AS (
        SELECT key, kind, ts FROM events
        WHERE key >= $lo AND ($hi IS NULL OR key < $hi) AND ts >= $since LIMIT $cap
    )
    SELECT key, count(*) FILTER (WHERE kind IN ('send', 'resend', 'reject')) AS sends, count(*) AS events
    FROM m GROUP BY key ORDER BY max(ts) DESC, key
"""
PREFIX_SCAN_CAP = 200_000
_RECENT_KEYS = """
    SELECT key, max(ts) AS last_ts, count(*) AS events,
           CASE WHEN bool_or(kind = 'consume') THEN 'consumed' WHEN bool_or(kind = 'ack') THEN 'acked'
                WHEN bool_or(kind = 'error') THEN 'failed' WHEN bool_or(kind = 'reject') THEN 'rejected'
                ELSE 'pending' END AS status
    FROM events
    WHERE ts >= $since AND key IS NOT NULL AND kind IN ('send', 'resend', 'reject', 'ack', 'error', 'consume')
    GROUP BY key ORDER BY last_ts DESC, key LIMIT $n
"""
# Searches over keys look at recent events first and widen only when that finds too few.
_RECENT_FIRST = (dt.timedelta(seconds=10), dt.timedelta(minutes=10), None)
_EXPORT_EVENTS = f"""
    SELECT {_EVENT_COLS} FROM events
    WHERE ($since IS NULL OR ts >= $since) AND ($until IS NULL OR ts < $until)
      AND ($lo IS NULL OR key >= $lo) AND ($hi IS NULL OR key < $hi)
    ORDER BY ts, src, seq
"""  # noqa: S608
_EXPORT_OTHER = {
    name: f"""
    SELECT * FROM {name}
    WHERE ($since IS NULL OR ts >= $since) AND ($until IS NULL OR ts < $until)
      AND ($srcs IS NULL OR list_contains($srcs, src))
    ORDER BY ts, src, seq
    """  # noqa: S608
    for name in ("stats", "configs")
}


class ReadOnlyStoreError(PermissionError):
    """A write on a store opened with read_only=True."""


class Store:
    """A keytrace DuckDB file. `Store(path)` owns it read-write; `read_only=True` only reads."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cursors_lock = threading.Lock()
        self._closed = False
        config: dict[str, Any] = {}
        if read_only:
            self._con = duckdb.connect(str(self.path), read_only=True, config=config)
            self._check_schema()
        else:
            config["temp_directory"] = str(self.path) + ".tmp"
            self._con = duckdb.connect(config=config)
            # The row group size is not stored in the file, so every writer attaches with it.
            self._con.execute(f"ATTACH ? AS keytrace (ROW_GROUP_SIZE {int(ROW_GROUP_SIZE)})", [str(self.path)])
            self._con.execute("USE keytrace")
            # A run's rows must reach the file in the order ingest clustered them (the default).
            self._con.execute("SET preserve_insertion_order = true")
            self._create_schema()
        self._session(self._con)
        self._hash_ok = self._check_hash()
        self._next_run = self._con.execute("SELECT coalesce(max(run), 0) + 1 FROM runs").fetchone()[0]

    # -- lifecycle of the store -----------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._cursors_lock:
                for cur in self._cursors:
                    try:
                        cur.close()
                    except duckdb.Error:
                        pass
                self._cursors.clear()
            try:
                if not self.read_only:
                    self._con.execute("CHECKPOINT")
            finally:
                self._con.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's read cursor on the store (DuckDB connections are not shared across threads)."""
        if self._closed:
            raise duckdb.ConnectionException("store is closed")
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._local.cursor = self._new_cursor()
        return cur

    def _new_cursor(self) -> duckdb.DuckDBPyConnection:
        with self._cursors_lock:
            cur = self._con.cursor()
            if not self.read_only:
                cur.execute("USE keytrace")
            self._session(cur)
            self._cursors.append(cur)
        return cur

    @staticmethod
    def _session(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("SET TimeZone = 'UTC'")
        # DuckDB draws a progress bar on the terminal during long statements (merges, exports).
        con.execute("SET enable_progress_bar = false")

    def _release(self, cur: duckdb.DuckDBPyConnection) -> None:
        with self._cursors_lock:
            self._cursors.remove(cur)
        cur.close()

    def _create_schema(self) -> None:
        with self._write_lock:
            for ddl in _DDL:
                self._con.execute(ddl)
            version = self._meta("schema_version")
            if version is None:
                self._con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])
                self._con.execute("INSERT INTO meta VALUES ('created_at', ?)", [dt.datetime.now(dt.UTC).isoformat()])
            elif version != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {version}, this keytrace reads {SCHEMA_VERSION}")

    def _check_schema(self) -> None:
        try:
            version = self._meta("schema_version")
        except duckdb.CatalogException as exc:
            raise RuntimeError(f"{self.path} is not a keytrace store") from exc
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version}, this keytrace reads {SCHEMA_VERSION}")

    def _meta(self, name: str) -> str | None:
        row = self._con.execute("SELECT value FROM meta WHERE name = ?", [name]).fetchone()
        return None if row is None else row[0]

    def _check_hash(self) -> bool:
        """key_hash is DuckDB's hash(); if another DuckDB version hashes differently, rehash."""
        probe = str(self._con.execute("SELECT hash('keytrace'::BLOB)").fetchone()[0])
        stored = self._meta("hash_probe")
        if stored == probe:
            return True
        if self.read_only:
            if stored is not None:
                log.warning("%s was written by a DuckDB that hashes differently; key lookups will scan", self.path)
            return stored is None
        with self._write_lock:
            if stored is not None:
                log.warning("%s: DuckDB's hash() changed; recomputing key_hash", self.path)
                self._con.execute("UPDATE events SET key_hash = hash(key)")
            self._con.execute("INSERT OR REPLACE INTO meta VALUES ('hash_probe', ?)", [probe])
        return True

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(f"{self.path} is open read-only")
        if self._closed:
            raise duckdb.ConnectionException("store is closed")

    # -- writes -----------------------------------------------------------------------------

    def ingest(self, batches: Sequence[pa.RecordBatch]) -> int:
        """Store batches in one transaction; returns rows inserted.

        A batch is identified by (src, seq) of its first row. A batch whose id is already
        in `ingested_batches` is skipped whole, so redelivery and spool replay are harmless.
        Raises `BatchError` (before writing anything) on a batch that is not keytrace's.
        """
        self._writable()
        unique: dict[tuple[int, int], tuple[str, pa.RecordBatch]] = {}
        for b in batches:
            table = table_of(b)
            if b.num_rows:
                unique.setdefault((b.column(0)[0].as_py(), b.column(1)[0].as_py()), (table, b))
        if not unique:
            return 0
        ids = pa.table(
            {
                "src": pa.array([k[0] for k in unique], pa.uint64()),
                "seq_lo": pa.array([k[1] for k in unique], pa.uint64()),
                "tbl": [t for t, _ in unique.values()],
                "rows": pa.array([b.num_rows for _, b in unique.values()], pa.int32()),
            }
        )
        with self._write_lock:
            con = self._con
            con.execute("BEGIN")
            try:
                con.register("kt_ids", ids)
                fresh = con.execute(
                    "INSERT OR IGNORE INTO ingested_batches SELECT src, seq_lo, tbl, rows, now() FROM kt_ids "
                    "RETURNING src, seq_lo"
                ).fetchall()
                by_table: dict[str, list[pa.RecordBatch]] = defaultdict(list)
                for k in fresh:
                    table, b = unique[k]
                    by_table[table].append(b.replace_schema_metadata(None))
                rows = 0
                for table, parts in by_table.items():
                    rows += self._insert(table, pa.Table.from_batches(parts))
                con.execute("COMMIT")
            except BaseException:
                # After a failed COMMIT there is no transaction left; keep the real error.
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass
                raise
            finally:
                try:
                    con.unregister("kt_ids")
                except duckdb.Error:
                    pass
            if by_table.get("events"):
                self._auto_merge()
        return rows

    def _insert(self, table: str, data: pa.Table) -> int:
        con = self._con
        con.register("kt_new", data)
        try:
            if table != "events":
                con.execute(_INSERT[table])
                return data.num_rows
            run = self._next_run
            self._next_run += 1
            hashes = con.sql(_HASHES).to_arrow_table().column(0).to_numpy()
            # Clustering, not a full sort: the top 16 bits of the hash make 65,536 buckets, far
            # more than a run has row groups, and a stable sort keeps arrival order in each.
            order = np.argsort((hashes >> np.uint64(48)).astype(np.uint16), kind="stable")
            run_data = data.take(order).append_column("key_hash", pa.array(hashes[order]))
            # Batches of exactly one row group let DuckDB convert and compress them on all its
            # threads (in order: preserve_insertion_order stays on); one large batch, or
            # batches smaller than a row group, go through a single thread.
            run_data = pa.Table.from_batches(run_data.to_batches(max_chunksize=ROW_GROUP_SIZE), run_data.schema)
            con.register("kt_run", run_data)
            try:
                con.execute(_INSERT_EVENTS, {"run": run})
            finally:
                con.unregister("kt_run")
            commits = data.filter(pc.equal(data.column("kind"), "commit"))
            if commits.num_rows:
                con.register("kt_commits", commits)
                try:
                    con.execute(_INSERT_COMMITS)
                finally:
                    con.unregister("kt_commits")
            lo, hi = pc.min_max(data.column("ts")).values()
            con.execute(
                "INSERT INTO runs VALUES ($run, $rows, $lo, $hi, now())",
                {"run": run, "rows": data.num_rows, "lo": lo.as_py(), "hi": hi.as_py()},
            )
            return data.num_rows
        finally:
            con.unregister("kt_new")

    def dead_letter(self, source: str, reason: str, payload: bytes) -> None:
        """Keep a record that could not be ingested, for inspection."""
        self.dead_letter_many([(source, reason, payload)])

    def dead_letter_many(self, rows: Sequence[tuple[str, str, bytes]]) -> None:
        """Keep many such records in one insert (a poll can bring thousands)."""
        self._writable()
        if not rows:
            return
        data = pa.table(
            {
                "source": pa.array([r[0] for r in rows], pa.string()),
                "reason": pa.array([r[1] for r in rows], pa.string()),
                "payload": pa.array([r[2] for r in rows], pa.binary()),
            }
        )
        with self._write_lock:
            con = self._con
            con.execute("BEGIN")
            try:
                con.register("kt_dead", data)
                con.execute(
                    "INSERT INTO dead_letters (received_at, source, reason, payload) "
                    "SELECT now(), source, reason, payload FROM kt_dead"
                )
                con.execute("COMMIT")
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass
                raise
            finally:
                try:
                    con.unregister("kt_dead")
                except duckdb.Error:
                    pass

    # -- runs and their merging -----------------------------------------------------------------

    def runs(self) -> list[tuple[int, int]]:
        """(run, rows) of every run, oldest first."""
        return [
            (int(r), int(n)) for r, n in self.cursor().execute("SELECT run, rows FROM runs ORDER BY run").fetchall()
        ]

    @staticmethod
    def _tier(rows: int) -> int:
        """floor(log_FANIN(rows)): runs of one tier are within a factor FANIN in size.

        Runs smaller than a row group all count as one tier: an in-process sink's inserts
        of any small size merge together instead of spreading over many tiers.
        """
        rows = max(rows, ROW_GROUP_SIZE)
        tier = 0
        while rows >= FANIN:
            rows //= FANIN
            tier += 1
        return tier

    def _merge(self, run_ids: list[int]) -> None:
        """Rewrite runs as one run clustered by key_hash, in one transaction."""
        con = self._con
        new = self._next_run
        self._next_run += 1
        # The runs of one tier need not be neighbours, hence a list rather than a range.
        # Run ids are integers from the runs table, never input.
        runs = ", ".join(str(int(r)) for r in run_ids)
        con.execute("BEGIN")
        try:
            con.execute(
                "INSERT INTO events SELECT * REPLACE ($new::UINTEGER AS run) FROM events "  # noqa: S608
                f"WHERE run IN ({runs}) ORDER BY key_hash >> 48, ts",
                {"new": new},
            )
            con.execute(f"DELETE FROM events WHERE run IN ({runs})")  # noqa: S608
            con.execute(f"DELETE FROM runs WHERE run IN ({runs})")  # noqa: S608
            con.execute(
                "INSERT INTO runs SELECT $new, count(*), min(ts), max(ts), now() FROM events WHERE run = $new",
                {"new": new},
            )
            con.execute("COMMIT")
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise

    def _auto_merge(self) -> None:
        """Merge small runs eagerly, larger ones while there are more than MAX_RUNS (see EAGER_MERGE_MAX_ROWS)."""
        merged = 0
        while True:
            runs = self.runs()
            bound = AUTO_MERGE_MAX_ROWS if len(runs) > MAX_RUNS else min(EAGER_MERGE_MAX_ROWS, AUTO_MERGE_MAX_ROWS)
            if (group := self._next_merge(runs, bound)) is None:
                break
            self._merge(group)
            merged += sum(rows for run, rows in runs if run in group)
        if merged >= ROW_GROUP_SIZE:
            # Frees the merged runs' row groups now: lookups stop visiting them and later
            # writes reuse their blocks instead of growing the file.
            self._con.execute("CHECKPOINT")

    def compact(self, full: bool = False, max_rows: int | None = None, max_merges: int | None = None) -> int:
        """Merge runs: FANIN of one size tier at a time, or all into one (`full`).

        Lookups read about one row group per run, so fewer runs make them faster; a merge
        rewrites its rows once and holds the write lock meanwhile. `max_rows` skips merges
        larger than that and `max_merges` stops after that many, to bound the pause (for a
        collector's idle moments). Returns the number of merges done.
        """
        self._writable()
        merges = 0
        with self._write_lock:
            while max_merges is None or merges < max_merges:
                runs = self.runs()
                if full:
                    group = [r for r, _ in runs] if len(runs) > 1 else None
                else:
                    group = self._next_merge(runs, max_rows)
                if group is None:
                    break
                self._merge(group)
                merges += 1
                if full:
                    break
            if merges:
                self._con.execute("CHECKPOINT")
        return merges

    def _next_merge(self, runs: list[tuple[int, int]], max_rows: int | None) -> list[int] | None:
        """The FANIN oldest runs of the smallest size tier that has FANIN (at most max_rows in all), or None.

        Runs of one tier need not be neighbours: a run of another size between them (a
        busier poll) must not keep them apart for good. Each merge makes a run of a higher
        tier, so a row is rewritten about once per tier, and at most FANIN - 1 runs are
        left in each tier.
        """
        by_tier: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for run, rows in runs:
            by_tier[self._tier(rows)].append((run, rows))
        for tier in sorted(by_tier):
            group = by_tier[tier][:FANIN]
            if len(group) < FANIN:
                continue
            if max_rows is not None and sum(rows for _, rows in group) > max_rows:
                break  # higher tiers are larger still
            return [run for run, _ in group]
        return None

    # -- key lookups ------------------------------------------------------------------------------

    def _rows(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        cur = self.cursor().execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def _key_rows(self, key: bytes | None) -> list[dict[str, Any]]:
        sql = _KEY_ROWS if self._hash_ok else _KEY_ROWS_SCAN
        return [r for r in self._rows(sql, {"key": key}) if r["key"] == key and r["kind"] in lifecycle.LIFECYCLE_KINDS]

    def _commits_for(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Commits of the partitions these rows consumed, from the first consumption on."""
        spans: dict[tuple[str, int], tuple[int, int]] = {}
        for r in rows:
            if r["kind"] == "consume" and r["group_id"] is not None and r["partition"] is not None:
                lo, hi = spans.get((r["topic"], r["partition"]), (r["ts_us"], r["ts_us"]))
                spans[(r["topic"], r["partition"])] = (min(lo, r["ts_us"]), max(hi, r["ts_us"]))
        out: list[dict[str, Any]] = []
        # One query per partition: a key's messages usually share one, and scalar
        # parameters bind faster than lists.
        for (topic, partition), (lo, hi) in spans.items():
            params = {
                "topic": topic,
                "partition": partition,
                "lo": lifecycle.to_datetime(lo),
                "hi": lifecycle.to_datetime(hi) + lifecycle.COMMIT_WINDOW,
            }
            out.extend(self._rows(_COMMITS, params))
        return out

    def lifecycle(self, key: bytes | None, prefix: bool = False, limit: int = 200) -> list[dict[str, Any]]:
        """Messages sent with `key` (or, with `prefix`, with any key starting with it), each with its events.

        At most `limit` messages, the most recent ones, oldest first; in prefix mode grouped
        by key. Values are Python objects (`ts` datetimes, `key` bytes); `trace_json()`
        gives the JSON document.
        """
        if prefix:
            return self._prefix_lifecycle(key or b"", limit)
        rows = self._key_rows(key)
        messages = lifecycle.assemble(rows, self._commits_for(rows))
        return messages[-limit:] if limit else []

    def _since_windows(self) -> list[dt.datetime]:
        """Start times to search from: recent first, then everything."""
        newest = self.cursor().execute("SELECT max(max_ts) FROM runs").fetchone()[0]
        if newest is None:
            return []
        return [lifecycle.EPOCH if span is None else newest - span for span in _RECENT_FIRST]

    def _prefix_lifecycle(self, prefix: bytes, limit: int) -> list[dict[str, Any]]:
        params = {"lo": prefix, "hi": _prefix_end(prefix), "cap": PREFIX_SCAN_CAP, "since": lifecycle.EPOCH}
        found = self.cursor().execute(_PREFIX_KEYS, params).fetchall()
        if sum(r[2] for r in found) >= PREFIX_SCAN_CAP:
            windows = self._since_windows()
            params["since"] = windows[1] if windows else lifecycle.EPOCH
            found = self.cursor().execute(_PREFIX_KEYS, params).fetchall()
        keys: list[bytes] = []
        sends = 0
        for key, n, _ in found:
            if sends >= limit or len(keys) >= limit:
                break
            keys.append(key)
            sends += max(n, 1)
        if not keys:
            return []
        wanted = set(keys)
        by_key: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
        for r in self._rows(_KEYS_ROWS, {"keys": keys}):
            if r["key"] in wanted and r["kind"] in lifecycle.LIFECYCLE_KINDS:
                by_key[r["key"]].append(r)
        out: list[dict[str, Any]] = []
        budget = limit
        for k in keys:  # most recently active first
            if budget <= 0:
                break
            messages = lifecycle.assemble(by_key[k], self._commits_for(by_key[k]))[-budget:]
            budget -= len(messages)
            out.extend(messages)
        out.sort(key=lambda m: m["key"])
        return out

    def message_at(self, topic: str, partition: int, offset: int) -> dict[str, Any] | None:
        """The message stored at (topic, partition, offset), with its whole lifecycle."""
        at = self._rows(_POSITION_ROWS, {"topic": topic, "partition": partition, "offset": offset})
        if not at:
            return None
        at.sort(key=lambda r: (r["kind"] != "ack", r["ts_us"]))
        first = at[0]
        if first["key"] is not None:
            rows = self._key_rows(first["key"])
        elif first["kind"] == "ack":
            rows = self._null_key_rows(first) + [r for r in at if r["kind"] == "consume"]
        else:
            rows = at
        messages = lifecycle.assemble(rows, self._commits_for(rows))
        for m in messages:
            if (m["topic"], m["partition"], m["offset"]) == (topic, partition, offset):
                return m
        return None

    def _null_key_rows(self, ack: dict[str, Any]) -> list[dict[str, Any]]:
        """Sends and reports of a keyless message's producer around its produce time.

        Pairing needs every send of (src, topic, key); for the null key that can be the
        whole topic, so only a window is read: pairs never straddle a produce-time boundary.
        """
        produced = lifecycle.produce_time_us(ack)
        half = int(NULL_KEY_WINDOW / dt.timedelta(microseconds=1))
        params = {
            "src": ack["src"],
            "topic": ack["topic"],
            "since": lifecycle.to_datetime(produced - half),
            "until": lifecycle.to_datetime(produced + half) + REPORT_HORIZON,
        }
        rows = []
        for r in self._rows(_NULL_KEY_ROWS, params):
            if r["kind"] in lifecycle.REPORTS:
                when = lifecycle.produce_time_us(r)
            elif r["kind"] in ("send", "resend", "reject"):
                when = r["ts_us"]
            else:
                continue
            if produced - half <= when < produced + half:
                rows.append(r)
        return rows

    def trace_json(self, key: bytes | None, prefix: bool = False, limit: int = 200) -> dict[str, Any]:
        """The lifecycle as the JSON document scripts read (shape in docs/STORE.md)."""
        return lifecycle.to_json(key, self.lifecycle(key, prefix=prefix, limit=limit), prefix=prefix)

    def recent_keys(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently active keys: key, key_text, last_ts, events and status.

        The status summarises the key's recent events (consumed, acked, failed, rejected or
        pending); it is not an assembled lifecycle.
        """
        rows: list[tuple] = []
        for since in self._since_windows():
            rows = self.cursor().execute(_RECENT_KEYS, {"since": since, "n": limit}).fetchall()
            if len(rows) >= limit:
                break
        return [
            {"key": k, "key_text": lifecycle.display_key(k), "last_ts": ts, "events": int(n), "status": status}
            for k, ts, n, status in rows
        ]

    def counts(self) -> dict[str, int]:
        """Events per kind."""
        rows = self.cursor().execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall()
        return {k: int(n) for k, n in rows}

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        cur = self.cursor().execute(
            "SELECT id, received_at, source, reason, payload FROM dead_letters ORDER BY id DESC LIMIT ?", [limit]
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    # -- aggregates for the dashboard (SQL in collector/queries.py) ---------------------------------

    def throughput(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, bucket_s: int = 1
    ) -> pd.DataFrame:
        return queries.throughput(self.cursor(), since, until, bucket_s)

    def ack_latency(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, bucket_s: int = 10
    ) -> pd.DataFrame:
        return queries.ack_latency(self.cursor(), since, until, bucket_s)

    def errors_by_name(self, since: dt.datetime | None = None, until: dt.datetime | None = None) -> pd.DataFrame:
        return queries.errors_by_name(self.cursor(), since, until)

    def stats_series(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, client_id: str | None = None
    ) -> pd.DataFrame:
        return queries.stats_series(self.cursor(), since, until, client_id)

    def consumer_e2e(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, bucket_s: int = 10
    ) -> pd.DataFrame:
        return queries.consumer_e2e(self.cursor(), since, until, bucket_s)

    def failed_messages(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, limit: int = 500
    ) -> pd.DataFrame:
        return queries.failed_messages(self.cursor(), since, until, limit)

    def never_acked(
        self,
        older_than_s: float = 30.0,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        as_of: dt.datetime | None = None,
        limit: int = 500,
    ) -> pd.DataFrame:
        return queries.never_acked(self.cursor(), older_than_s, since, until, as_of, limit)

    def not_consumed(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        grace_s: float = 60.0,
        as_of: dt.datetime | None = None,
        limit: int = 500,
    ) -> pd.DataFrame:
        return queries.not_consumed(self.cursor(), since, until, grace_s, as_of, limit)

    def consumed_twice(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, limit: int = 500
    ) -> pd.DataFrame:
        return queries.consumed_twice(self.cursor(), since, until, limit)

    def out_of_order(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, limit: int = 500
    ) -> pd.DataFrame:
        return queries.out_of_order(self.cursor(), since, until, limit)

    # -- export -----------------------------------------------------------------------------------

    def export(
        self,
        path: str | Path,
        fmt: str = "parquet",
        key: bytes | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        prefix: bool = False,
    ) -> int:
        """Write events (optionally one key or key prefix, and a time range) for incident review.

        parquet and csv hold the events table; duckdb is a keytrace store with the events
        and the stats and configs of the same clients, openable with `keytrace dashboard --db`.
        Returns the number of events written.
        """
        if fmt not in ("parquet", "csv", "duckdb"):
            raise ValueError(f"export format {fmt!r}: choose parquet, csv or duckdb")
        path = Path(path)
        if path.resolve() == self.path.resolve():
            raise ValueError("export target is the store itself")
        lo = hi = None
        if key is not None:
            lo, hi = (key, _prefix_end(key)) if prefix else (key, key + b"\x00")
        params = {"since": since, "until": until, "lo": lo, "hi": hi}
        # Streams through cursors of its own, so this thread's cursor stays usable meanwhile.
        cur = self._new_cursor()
        try:
            reader = _arrow_reader(cur, _EXPORT_EVENTS, params)
            if fmt == "duckdb":
                return self._export_store(path, reader, params)
            return _write_file(path, fmt, reader)
        finally:
            self._release(cur)

    def _export_store(self, path: Path, reader: pa.RecordBatchReader, params: dict[str, Any]) -> int:
        if path.exists():
            raise FileExistsError(f"{path} exists; an export writes a new store")
        srcs: set[int] = set()
        n = 0
        with Store(path) as out:
            for b in reader:
                b = pa.RecordBatch.from_arrays(b.columns, schema=EVENTS)
                srcs.update(pc.unique(b.column("src")).to_pylist())
                n += out.ingest([b])
            scope = {"since": params["since"], "until": params["until"]}
            scope["srcs"] = sorted(srcs) if params["lo"] is not None else None
            cur = self._new_cursor()
            try:
                for name, sql in _EXPORT_OTHER.items():
                    for b in _arrow_reader(cur, sql, scope):
                        out.ingest([pa.RecordBatch.from_arrays(b.columns, schema=SCHEMAS[name])])
            finally:
                self._release(cur)
            out.compact(full=True)
        return n


def _arrow_reader(
    cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any], rows: int = 100_000
) -> pa.RecordBatchReader:
    rel = cur.sql(sql, params=params)
    # DuckDB 2 renamed fetch_arrow_reader to to_arrow_reader.
    to_reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
    return to_reader(rows)


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _write_file(path: Path, fmt: str, reader: pa.RecordBatchReader) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    n = 0
    writer: Any = None
    try:
        for b in reader:
            if fmt == "csv":
                keys = b.column("key").to_pylist()
                b = b.set_column(
                    b.schema.get_field_index("key"),
                    "key",
                    pa.array([lifecycle.display_key(k) for k in keys], pa.string()),
                ).append_column("key_hex", pa.array([None if k is None else k.hex() for k in keys], pa.string()))
            if writer is None:
                writer = pacsv.CSVWriter(path, b.schema) if fmt == "csv" else pq.ParquetWriter(path, b.schema)
            writer.write_batch(b)
            n += b.num_rows
        if writer is None:
            schema = reader.schema
            if fmt == "csv":
                keyed = schema.set(schema.get_field_index("key"), pa.field("key", pa.string()))
                writer = pacsv.CSVWriter(path, keyed.append(pa.field("key_hex", pa.string())))
            else:
                writer = pq.ParquetWriter(path, schema)
    finally:
        if writer is not None:
            writer.close()
    return n
