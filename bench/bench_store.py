"""Benchmark of the trace store: ingest rate, key lookup and prefix search latency.

    .venv/bin/python bench/bench_store.py --events 10000000

Synthetic but shaped like real traffic: 4 producers and 2 consumer groups, 200,000
distinct keys, every message sent, acked and consumed by one or two groups, 0.5%
timing out and resent, periodic commits. Batches of at most 50,000 rows are ingested
about 500,000 events per call (`--call-events`: what one poll of the events topic
brings a collector that keeps up with 500,000 events/s). In the same run, the
same batches go into a plain DuckDB table with no key column or order, as the baseline.
Files live in a temporary directory on disk.

Store.ingest's time includes the merges its policy runs (they happen inside ingest);
the lookups run on the store as that policy leaves it. `--compact` then merges all
runs into one and looks up again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collector import store as store_mod
from collector.schema import EVENTS
from collector.store import Store

PARTITIONS = 12
PRODUCERS = (1, 2, 3, 4)
GROUPS = {"billing": 1.0, "audit": 0.5}  # share of messages each group reads
GROUP_SRC = {"billing": 11, "audit": 12}
T0_US = 1_790_000_000_000_000
RATE = 50_000  # simulated events per second


class Traffic:
    """Generates calls (lists of Arrow batches) of keyed message lifecycles."""

    def __init__(self, n_keys: int, batch_rows: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        ids = pa.array(np.arange(n_keys)).cast(pa.string())
        self.keys = pc.binary_join_element_wise("order-", ids, "").cast(pa.binary())
        self.batch_rows = batch_rows
        self.seq = {src: 0 for src in (*PRODUCERS, *GROUP_SRC.values())}
        self.offsets = np.zeros(PARTITIONS, np.int64)
        self.t_us = T0_US
        self.chunk = 0

    def _batch(self, src: int, n: int, cols: dict[str, object]) -> pa.RecordBatch:
        seq = np.arange(self.seq[src] + 1, self.seq[src] + 1 + n, dtype=np.uint64)
        self.seq[src] += n
        arrays = []
        for f in EVENTS:
            v = cols.get(f.name)
            if f.name == "src":
                v = np.full(n, src, np.uint64)
            elif f.name == "seq":
                v = seq
            if v is None:
                arrays.append(pa.nulls(n, f.type))
            elif isinstance(v, pa.Array | pa.ChunkedArray):
                arrays.append(v.cast(f.type))
            else:
                arrays.append(pa.array(v, f.type))
        return pa.RecordBatch.from_arrays(arrays, schema=EVENTS)

    def messages(self) -> list[pa.RecordBatch]:
        """One producer's chunk of messages plus the consumptions (and commits) of it."""
        rng, m = self.rng, self.batch_rows // 2
        src = PRODUCERS[self.chunk % len(PRODUCERS)]
        self.chunk += 1
        kid = rng.integers(0, len(self.keys), m)
        keys = self.keys.take(pa.array(kid))
        part = (kid % PARTITIONS).astype(np.int32)
        span = int(m * 3.5 / RATE * 1e6)
        sent = self.t_us + np.sort(rng.integers(0, span, m))
        self.t_us += span
        lat = rng.lognormal(np.log(4000), 0.6, m).astype(np.int64)
        failed = rng.random(m) < 0.005
        offsets = np.empty(m, np.int64)
        for p in range(PARTITIONS):
            idx = np.nonzero(part == p)[0]
            offsets[idx] = self.offsets[p] + np.arange(len(idx))
            self.offsets[p] += len(idx)
        first_seq = self.seq[src] + 1 + np.arange(m, dtype=np.uint64)
        ok, bad = ~failed, failed
        fkeys = keys.filter(pa.array(bad))
        timeout = 1_500_000
        resent = sent[bad] + timeout + 1_000_000
        ack_ts = np.where(bad, 0, sent + lat)
        ack_ts[bad] = resent + lat[bad]
        kinds = ["send"] * m + ["ack"] * int(ok.sum()) + ["error"] * int(bad.sum())
        kinds += ["resend"] * int(bad.sum()) + ["ack"] * int(bad.sum())
        n_bad = int(bad.sum())
        cols = {
            "ts": np.concatenate([sent, sent[ok] + lat[ok], sent[bad] + timeout, resent, ack_ts[bad]]),
            "kind": kinds,
            "client_id": pa.array(np.full(len(kinds), f"orders-svc-{src}")),
            "topic": pa.array(np.full(len(kinds), "orders")),
            "partition": pa.array(
                np.concatenate([np.zeros(m, np.int32), part[ok], np.zeros(2 * n_bad, np.int32), part[bad]]),
                mask=np.concatenate(
                    [np.ones(m, bool), np.zeros(int(ok.sum()), bool), np.ones(2 * n_bad, bool), np.zeros(n_bad, bool)]
                ),
            ),  # fmt: skip
            "offset": pa.array(
                np.concatenate([np.zeros(m, np.int64), offsets[ok], np.zeros(2 * n_bad, np.int64), offsets[bad]]),
                mask=np.concatenate(
                    [np.ones(m, bool), np.zeros(int(ok.sum()), bool), np.ones(2 * n_bad, bool), np.zeros(n_bad, bool)]
                ),
            ),  # fmt: skip
            "key": pa.concat_arrays([keys, keys.filter(pa.array(ok)), fkeys, fkeys, fkeys]),
            "value_size": np.full(len(kinds), 100, np.int32),
            "trace_seq": pa.array(
                np.concatenate(
                    [np.zeros(m + int(ok.sum()) + n_bad, np.uint64), first_seq[bad], np.zeros(n_bad, np.uint64)]
                ),
                mask=np.concatenate(
                    [np.ones(m + int(ok.sum()) + n_bad, bool), np.zeros(n_bad, bool), np.ones(n_bad, bool)]
                ),
            ),  # fmt: skip
            "attempt": np.concatenate(
                [np.ones(m + int(ok.sum()) + n_bad, np.int16), np.full(n_bad, 2, np.int16), np.ones(n_bad, np.int16)]
            ),  # fmt: skip
            "latency_us": pa.array(
                np.concatenate(
                    [np.zeros(m, np.int64), lat[ok], np.full(n_bad, timeout), np.zeros(n_bad, np.int64), lat[bad]]
                ),
                mask=np.concatenate(
                    [
                        np.ones(m, bool),
                        np.zeros(int(ok.sum()) + n_bad, bool),
                        np.ones(n_bad, bool),
                        np.zeros(n_bad, bool),
                    ]
                ),
            ),  # fmt: skip
            "error_code": pa.array([None] * (m + int(ok.sum())) + [-192] * n_bad + [None] * 2 * n_bad, pa.int32()),
            "error_name": pa.array([None] * (m + int(ok.sum())) + ["_MSG_TIMED_OUT"] * n_bad + [None] * 2 * n_bad),
        }
        out = [self._batch(src, len(kinds), cols)]
        for group, share in GROUPS.items():
            read = rng.random(m) < share
            e2e = rng.lognormal(np.log(15000), 0.5, m).astype(np.int64)[read]
            ts = ack_ts[read] + e2e
            n = int(read.sum())
            commit = json.dumps(
                [{"topic": "orders", "partition": p, "offset": int(self.offsets[p])} for p in range(PARTITIONS)]
            )
            gcols = {
                "ts": np.append(ts, ts.max() + 1000),
                "kind": ["consume"] * n + ["commit"],
                "client_id": pa.array(np.full(n + 1, f"{group}-svc")),
                "topic": pa.array(np.full(n + 1, "orders")),
                "partition": pa.array(np.append(part[read], 0), mask=np.append(np.zeros(n, bool), True)),
                "offset": pa.array(np.append(offsets[read], 0), mask=np.append(np.zeros(n, bool), True)),
                "key": pa.concat_arrays([keys.filter(pa.array(read)), pa.nulls(1, pa.binary())]),
                "latency_us": pa.array(np.append(e2e, 0), mask=np.append(np.zeros(n, bool), True)),
                "group_id": pa.array(np.full(n + 1, group)),
                "member_id": pa.array(np.full(n + 1, f"{group}-member-1")),
                "detail": pa.array([None] * n + [commit], pa.string()),
            }
            out.append(self._batch(GROUP_SRC[group], n + 1, gcols))
        return out

    def calls(self, n_events: int, call_events: int) -> Iterator[list[pa.RecordBatch]]:
        """Lists of whole batches of about call_events rows in all: one collector poll each."""
        made, pending, rows = 0, [], 0
        while made < n_events:
            for b in self.messages():
                # The tracer ships at most batch_rows rows per batch.
                for i in range(0, b.num_rows, self.batch_rows):
                    pending.append(b.slice(i, self.batch_rows))
                    rows += pending[-1].num_rows
                    if rows >= call_events:
                        yield pending
                        pending, rows = [], 0
                made += b.num_rows
        if pending:
            yield pending


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(np.array(values), p))


def timed(fn, *args, **kwargs) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


class PlainTable:
    """A DuckDB file with one events table filled by plain INSERT ... SELECT.

    The baseline has the schema's columns only. With `art`, it also has key_hash and an
    ART index on it: the layout the store does not use, measured for comparison.
    """

    def __init__(self, path: Path, art: bool = False) -> None:
        self.con = duckdb.connect(str(path))
        self.path = path
        extra = ", key_hash UBIGINT" if art else ""
        self.con.execute(f"CREATE TABLE events ({store_mod._columns_ddl(EVENTS)}{extra})")
        if art:
            self.con.execute("CREATE INDEX events_key_hash ON events (key_hash)")
        self.insert = (
            "INSERT INTO events SELECT *, hash(key) FROM data" if art else "INSERT INTO events SELECT * FROM data"
        )
        self.wall = self.cpu = 0.0

    def ingest(self, batches: list[pa.RecordBatch]) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.con.register("data", pa.Table.from_batches(batches))
        self.con.execute("BEGIN")
        self.con.execute(self.insert)
        self.con.execute("COMMIT")
        self.con.unregister("data")
        self.wall += time.perf_counter() - t
        self.cpu += time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument(
        "--call-events",
        type=int,
        default=500_000,
        help="events per Store.ingest call: what one collector poll brings at 500,000 events/s (docs/STORE.md)",
    )
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--prefix-lookups", type=int, default=100)
    ap.add_argument("--baseline-lookups", type=int, default=50)
    ap.add_argument("--compact", action="store_true", help="then also merge all runs into one and look up again")
    ap.add_argument("--compare-art", action="store_true", help="also ingest into a table with an ART index on key_hash")
    ap.add_argument("--dir", help="where the DuckDB files go (default: a new temporary directory, removed after)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--row-group-size", type=int, default=store_mod.ROW_GROUP_SIZE, help="to compare layouts")
    ap.add_argument("--fanin", type=int, default=store_mod.FANIN, help="runs per merge, to compare merge policies")
    ap.add_argument("--max-runs", type=int, default=store_mod.MAX_RUNS, help="runs beyond which large runs merge")
    args = ap.parse_args()
    store_mod.ROW_GROUP_SIZE = args.row_group_size
    store_mod.FANIN = args.fanin
    store_mod.MAX_RUNS = args.max_runs

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="keytrace-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("store", "baseline", "art"):
        for f in (work / f"{name}.duckdb", work / f"{name}.duckdb.wal"):
            f.unlink(missing_ok=True)
    try:
        run(args, work)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    traffic = Traffic(args.keys, args.batch_rows, args.seed)
    raw = PlainTable(work / "baseline.duckdb")
    art = PlainTable(work / "art.duckdb", art=True) if args.compare_art else None
    store_path = work / "store.duckdb"
    store = Store(store_path)
    # The merges ingest runs by itself (its policy) are part of Store.ingest's time; also
    # time them on their own.
    merge_times: list[tuple[float, int]] = []
    policy_time = [0.0]
    plain_merge, plain_auto_merge = store._merge, store._auto_merge

    def timed_merge(run_ids: list[int]) -> None:
        rows = dict(store.runs())
        t = time.perf_counter()
        plain_merge(run_ids)
        merge_times.append((time.perf_counter() - t, sum(rows[r] for r in run_ids)))

    def timed_auto_merge() -> None:  # the merges and the checkpoint after them
        t = time.perf_counter()
        plain_auto_merge()
        policy_time[0] += time.perf_counter() - t

    store._merge = timed_merge  # type: ignore[method-assign]
    store._auto_merge = timed_auto_merge  # type: ignore[method-assign]
    t_store = cpu_store = 0.0
    max_runs = 0
    load_before = os.getloadavg()[0]
    n = calls = 0
    t_start = time.perf_counter()
    for batches in traffic.calls(args.events, args.call_events):
        raw.ingest(batches)
        if art is not None:
            art.ingest(batches)
        c = time.process_time()
        dt_store, rows = timed(store.ingest, batches)
        cpu_store += time.process_time() - c
        t_store += dt_store
        n += rows
        calls += 1
        max_runs = max(max_runs, len(store.runs()))
    t_ckpt_raw, _ = timed(raw.con.execute, "CHECKPOINT")
    t_ckpt_store, _ = timed(store.cursor().execute, "CHECKPOINT")
    wall = time.perf_counter() - t_start
    runs = len(store.runs())
    print(f"ingested {n:,} events in {calls} calls of about {args.call_events:,} (wall {wall:.0f} s with generation)")

    rng = random.Random(args.seed)
    keys = [f"order-{rng.randrange(args.keys)}".encode() for _ in range(args.lookups)]
    # First pass: each lookup reads its row groups from the file. Second pass: from DuckDB's
    # buffer pool, as on a server that has been answering lookups for a while.
    cold = [timed(store.lifecycle, k)[0] for k in keys]
    lookup = [timed(store.lifecycle, k)[0] for k in keys]
    sizes = [len(store.lifecycle(k)) for k in keys[:100]]
    cur = store.cursor()

    def key_query(k: bytes) -> list[tuple]:
        return cur.execute(store_mod._KEY_ROWS, {"key": k}).fetchall()

    key_sql = [timed(key_query, k)[0] for k in keys]
    plan = cur.execute("EXPLAIN ANALYZE " + store_mod._KEY_ROWS, {"key": keys[0]}).fetchall()[0][1]
    scanned = next((line.strip(" │") for line in plan.splitlines() if "Row Groups Scanned" in line), "?")
    scan = [
        timed(lambda k=k: raw.con.execute("SELECT * FROM events WHERE key = ?", [k]).fetchall())[0]
        for k in keys[: args.baseline_lookups]
    ]
    # Drop the last digit of a 5- or 6-digit id: the prefix matches about 11 keys.
    prefixes = [f"order-{rng.randrange(10_000, args.keys)}"[:-1].encode() for _ in range(args.prefix_lookups)]
    prefix = [timed(store.lifecycle, p, prefix=True)[0] for p in prefixes]
    found = [len({m["key"] for m in store.lifecycle(p, prefix=True)}) for p in prefixes[:20]]

    def ms(values: list[float]) -> str:
        return f"{percentile(values, 50) * 1000:8.2f} / {percentile(values, 99) * 1000:8.2f}"

    def row(label: str, value: str) -> None:
        print(f"{label:56s} {value:>19s}")

    print()
    row("measure", "value")
    row("baseline ingest (plain INSERT), events/s", f"{n / raw.wall:,.0f}")
    t_merge = policy_time[0]
    row("Store.ingest, merges included, events/s", f"{n / t_store:,.0f}")
    row("Store.ingest / baseline, wall clock", f"{raw.wall / t_store:.2f}")
    row(
        "  merges inside ingest: count, rows rewritten, s (+ checkpoints)",
        f"{len(merge_times)}, {sum(r for _, r in merge_times):,}, {t_merge:.1f}",
    )
    row(
        "  largest merge, rows, s",
        "-" if not merge_times else f"{max(r for _, r in merge_times):,}, {max(t for t, _ in merge_times):.1f}",
    )
    row("  Store.ingest without its merges, events/s", f"{n / (t_store - t_merge):,.0f}")
    row("CPU per event, ns: baseline / Store.ingest", f"{raw.cpu / n * 1e9:.0f} / {cpu_store / n * 1e9:.0f}")
    if art is not None:
        row("ART index on key_hash: events/s, CPU ns per event", f"{n / art.wall:,.0f}, {art.cpu / n * 1e9:.0f}")
    row("checkpoint after ingest, s: baseline / store", f"{t_ckpt_raw:.1f} / {t_ckpt_store:.1f}")
    row(
        "file size, MiB: baseline / store",
        f"{raw.path.stat().st_size / 2**20:.0f} / {store_path.stat().st_size / 2**20:.0f}",
    )
    row("runs left by the merge policy (most during ingest)", f"{runs} ({max_runs})")
    row("row groups read by one key lookup", scanned.split(":")[-1].strip())
    row("messages per key (mean of 100 keys)", f"{statistics.mean(sizes):.1f}")
    row("Store.lifecycle exact, first read, ms p50 / p99", ms(cold))
    row("Store.lifecycle exact, warm, ms p50 / p99", ms(lookup))
    row("  its key query alone, warm, ms p50 / p99", ms(key_sql))
    if art is not None:
        art_sql = "SELECT * FROM events WHERE key_hash = hash($key::BLOB)"
        for k in keys:
            art.con.execute(art_sql, {"key": k}).fetchall()
        art_lookup = [timed(lambda k=k: art.con.execute(art_sql, {"key": k}).fetchall())[0] for k in keys]
        row("  same query on the ART-indexed table, warm, ms", ms(art_lookup))
    row("baseline full scan (key = ?), ms p50 / p99", ms(scan))
    row(f"Store.lifecycle prefix ({statistics.mean(found):.0f} keys found), ms", ms(prefix))
    if args.compact:
        t_compact, _ = timed(store.compact, True)
        for k in keys:
            store.lifecycle(k)
        after = [timed(store.lifecycle, k)[0] for k in keys]
        after_sql = [timed(key_query, k)[0] for k in keys]
        row("compact(full=True), s", f"{t_compact:.1f}")
        row("after it: Store.lifecycle exact, warm, ms p50 / p99", ms(after))
        row("after it: key query alone, warm, ms p50 / p99", ms(after_sql))
    print(
        f"\n{os.cpu_count()} cores, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after, "
        f"duckdb {duckdb.__version__}, row group size {store_mod.ROW_GROUP_SIZE}, fan-in {store_mod.FANIN}, "
        f"max runs {store_mod.MAX_RUNS}"
    )
    store.close()


if __name__ == "__main__":
    main()
