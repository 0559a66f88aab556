"""The DuckDB trace store: ingest, de-duplication, lifecycle assembly, queries, export."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collector import store as store_mod
from collector.schema import CONFIGS, EVENTS, STATS, BatchError
from collector.store import ReadOnlyStoreError, Store

T0 = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)


def at(ms: float) -> dt.datetime:
    return T0 + dt.timedelta(microseconds=round(ms * 1000))


class Client:
    """One traced client instance (one src) that records events as the tracer would."""

    def __init__(self, src: int, client_id: str = "orders-svc", group: str | None = None) -> None:
        self.src, self.client_id, self.group = src, client_id, group
        self.seq = 0
        self.rows: list[dict[str, Any]] = []

    def _add(self, kind: str, ms: float, **fields: Any) -> int:
        self.seq += 1
        row = {f.name: None for f in EVENTS}
        row.update(src=self.src, seq=self.seq, ts=at(ms), kind=kind, client_id=self.client_id, topic="orders")
        if self.group is not None:
            row["group_id"] = self.group
        row.update(fields)
        self.rows.append(row)
        return self.seq

    def send(self, key: bytes | None, ms: float, **kw: Any) -> int:
        return self._add("send", ms, key=key, attempt=1, value_size=100, **kw)

    def resend(self, key: bytes | None, ms: float, trace: int, attempt: int) -> int:
        return self._add("resend", ms, key=key, trace_seq=trace, attempt=attempt, value_size=100)

    def reject(self, key: bytes | None, ms: float) -> int:
        return self._add("reject", ms, key=key, attempt=1, error_name="_QUEUE_FULL", error_message="queue full")

    def ack(self, key: bytes | None, ms: float, partition: int, offset: int, latency_ms: float, **kw: Any) -> int:
        return self._add(
            "ack", ms, key=key, partition=partition, offset=offset, latency_us=round(latency_ms * 1000), **kw
        )

    def error(self, key: bytes | None, ms: float, latency_ms: float, name: str = "_MSG_TIMED_OUT") -> int:
        return self._add(
            "error",
            ms,
            key=key,
            latency_us=round(latency_ms * 1000),
            error_code=-192,
            error_name=name,
            error_retriable=True,
            error_message="Local: Message timed out",
        )

    def consume(self, key: bytes | None, ms: float, partition: int, offset: int, e2e_ms: float) -> int:
        return self._add(
            "consume", ms, key=key, partition=partition, offset=offset, latency_us=round(e2e_ms * 1000), member_id="m-1"
        )

    def commit(self, ms: float, offsets: dict[int, int]) -> int:
        detail = [{"topic": "orders", "partition": p, "offset": o} for p, o in offsets.items()]
        return self._add("commit", ms, detail=json.dumps(detail))

    def batch(self) -> pa.RecordBatch:
        b = pa.RecordBatch.from_pylist(self.rows, schema=EVENTS)
        self.rows = []
        return b


def stats_batch(src: int, rows: list[dict[str, Any]]) -> pa.RecordBatch:
    # seq counts every record a client ships, events and stats alike: stay clear of the events.
    full = []
    for i, r in enumerate(rows, 1000):
        row = {f.name: None for f in STATS}
        row.update(src=src, seq=i, client_id="orders-svc", client_type="producer")
        row.update(r)
        full.append(row)
    return pa.RecordBatch.from_pylist(full, schema=STATS)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "trace.duckdb") as s:
        yield s


def one_message(store: Store, key: bytes) -> dict[str, Any]:
    [m] = store.lifecycle(key)
    return m


def kinds(message: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in message["events"]]


# -- ingest ---------------------------------------------------------------------------------


def test_ingest_counts_rows_per_kind(store: Store) -> None:
    p = Client(1)
    p.send(b"k", 0)
    p.ack(b"k", 3, 0, 7, 3)
    c = Client(2, group="billing")
    c.consume(b"k", 10, 0, 7, 10)
    configs = pa.RecordBatch.from_pylist(
        [{"src": 1, "seq": 99, "ts": T0, "client_id": "orders-svc", "client_type": "producer", "config": "{}"}],
        schema=CONFIGS,
    )
    n = store.ingest([p.batch(), c.batch(), stats_batch(1, [{"ts": T0, "msg_cnt": 3}]), configs])
    assert n == 5
    assert store.counts() == {"send": 1, "ack": 1, "consume": 1}
    cur = store.cursor()
    assert cur.execute("SELECT count(*) FROM stats").fetchone()[0] == 1
    assert cur.execute("SELECT count(*) FROM configs").fetchone()[0] == 1


def test_reingested_batch_is_skipped(store: Store) -> None:
    p = Client(1)
    for i in range(10):
        p.send(f"k{i}".encode(), i)
    first = p.batch()
    p.send(b"later", 20)
    second = p.batch()
    assert store.ingest([first]) == 10
    # Redelivery of the same batch, alone, twice in one call, and beside a new batch.
    assert store.ingest([first]) == 0
    assert store.ingest([first, first]) == 0
    assert store.ingest([second, first, second]) == 1
    assert store.counts() == {"send": 11}
    total, distinct = store.cursor().execute("SELECT count(*), count(DISTINCT (src, seq)) FROM events").fetchone()
    assert total == distinct == 11


def test_bad_batch_is_refused_before_anything_is_written(store: Store) -> None:
    p = Client(1)
    p.send(b"k", 0)
    foreign = pa.record_batch({"src": pa.array([1], pa.uint64())})
    with pytest.raises(BatchError):
        store.ingest([p.batch(), foreign])
    assert store.counts() == {}


def test_dead_letters_keep_the_payload(store: Store) -> None:
    store.dead_letter("_keytrace.events/0@17", "not an Arrow IPC stream", b"\x00garbage")
    [row] = store.dead_letters()
    assert (row["source"], row["reason"], row["payload"]) == (
        "_keytrace.events/0@17",
        "not an Arrow IPC stream",
        b"\x00garbage",
    )
    assert isinstance(row["received_at"], dt.datetime)


# -- lifecycle assembly ------------------------------------------------------------------------


def test_reordered_reports_pair_by_produce_time(store: Store) -> None:
    """Three sends of one key whose reports arrive in a different order than they were sent."""
    p = Client(1)
    p.send(b"k", 0.0)  # acked after 50 ms, reported last
    p.send(b"k", 1.0)  # acked after 10 ms, reported first
    p.send(b"k", 2.0)  # acked after 30 ms
    p.ack(b"k", 11.0, 3, 101, 10)
    p.ack(b"k", 32.0, 3, 102, 30)
    p.ack(b"k", 50.0, 3, 100, 50)
    store.ingest([p.batch()])
    messages = store.lifecycle(b"k")
    assert [(m["offset"], m["events"][0]["ts"]) for m in messages] == [(100, at(0)), (101, at(1)), (102, at(2))]
    assert [m["events"][1]["latency_ms"] for m in messages] == [50.0, 10.0, 30.0]
    assert all(kinds(m) == ["send", "ack"] and m["status"] == "acked" for m in messages)


def test_missing_report_leaves_that_send_pending(store: Store) -> None:
    p = Client(1)
    p.send(b"k", 0)  # its report was lost
    p.send(b"k", 500)
    p.ack(b"k", 504, 0, 9, 4)
    store.ingest([p.batch()])
    first, second = store.lifecycle(b"k")
    assert (first["status"], first["offset"]) == ("pending", None)
    assert (second["status"], second["offset"]) == ("acked", 9)


def test_failed_delivery_has_error_and_no_position(store: Store) -> None:
    p = Client(1)
    p.send(b"k", 0)
    p.error(b"k", 1500, 1500)
    store.ingest([p.batch()])
    m = one_message(store, b"k")
    assert (m["status"], m["partition"], m["offset"]) == ("failed", None, None)
    assert kinds(m) == ["send", "error"]
    assert m["events"][1]["error"] == "_MSG_TIMED_OUT"
    assert m["events"][1]["latency_ms"] == 1500.0


def test_resend_attempts_group_under_one_trace(store: Store) -> None:
    p = Client(1)
    first = p.send(b"k", 0)
    p.error(b"k", 1500, 1500)
    p.resend(b"k", 2500, trace=first, attempt=2)
    p.ack(b"k", 2504, 1, 40, 4)
    c = Client(2, group="billing")
    c.consume(b"k", 2520, 1, 40, 16)
    store.ingest([p.batch(), c.batch()])
    m = one_message(store, b"k")
    assert kinds(m) == ["send", "error", "resend", "ack", "consume"]
    assert [e.get("attempt") for e in m["events"] if e["kind"] in ("send", "resend")] == [1, 2]
    assert (m["status"], m["partition"], m["offset"]) == ("consumed", 1, 40)
    assert m["trace_id"] == f"{1:016x}{first:016x}"


def test_resend_trace_numbered_by_the_producer(store: Store) -> None:
    """The producer may number traces itself: every attempt, the first included, carries it."""
    p = Client(1)
    p.send(b"k", 0, trace_seq=7)
    p.error(b"k", 100, 100)
    p.resend(b"k", 1200, trace=7, attempt=2)
    p.error(b"k", 1300, 100)
    store.ingest([p.batch()])
    m = one_message(store, b"k")
    assert kinds(m) == ["send", "error", "resend", "error"]
    assert m["status"] == "failed" and m["trace_id"].endswith(f"{7:016x}")


def test_failed_then_pending_resend_is_pending(store: Store) -> None:
    p = Client(1)
    first = p.send(b"k", 0)
    p.error(b"k", 100, 100)
    p.resend(b"k", 1200, trace=first, attempt=2)
    store.ingest([p.batch()])
    assert one_message(store, b"k")["status"] == "pending"


def test_rejected_send(store: Store) -> None:
    p = Client(1)
    p.reject(b"k", 0)
    store.ingest([p.batch()])
    m = one_message(store, b"k")
    assert (m["status"], kinds(m)) == ("rejected", ["reject"])
    assert m["events"][0]["error"] == "_QUEUE_FULL"


def test_consumes_join_by_position_and_commits_follow(store: Store) -> None:
    p = Client(1)
    p.send(b"k", 0)
    p.ack(b"k", 4, 2, 1841, 4)
    billing, audit = Client(2, group="billing"), Client(3, group="audit")
    billing.consume(b"k", 20, 2, 1841, 16)
    billing.commit(25, {2: 1841})  # does not cover the message yet
    billing.commit(30, {2: 1842, 3: 10})
    audit.consume(b"k", 40, 2, 1841, 36)
    audit.consume(b"other-position", 41, 2, 1842, 37)
    store.ingest([p.batch(), billing.batch(), audit.batch()])
    m = one_message(store, b"k")
    assert kinds(m) == ["send", "ack", "consume", "commit", "consume"]
    commit = m["events"][3]
    assert commit == {"kind": "commit", "ts": at(30), "group": "billing", "partition": 2, "offset": 1842, "error": None}
    assert {e["group"] for e in m["events"] if e["kind"] == "consume"} == {"billing", "audit"}


def test_consume_without_traced_producer(store: Store) -> None:
    c = Client(2, group="billing")
    c.consume(b"k", 20, 0, 5, 16)
    store.ingest([c.batch()])
    m = one_message(store, b"k")
    assert (m["status"], m["trace_id"], m["offset"], kinds(m)) == ("consumed", None, 5, ["consume"])


def test_message_at_position(store: Store) -> None:
    p = Client(1)
    p.send(b"a", 0)
    p.send(b"b", 1)
    p.ack(b"a", 5, 0, 10, 5)
    p.ack(b"b", 6, 0, 11, 5)
    c = Client(2, group="billing")
    c.consume(b"b", 20, 0, 11, 19)
    c.consume(b"untraced", 21, 3, 99, 1)
    store.ingest([p.batch(), c.batch()])
    m = store.message_at("orders", 0, 11)
    assert (m["key"], m["offset"], kinds(m)) == (b"b", 11, ["send", "ack", "consume"])
    assert store.message_at("orders", 3, 99)["key"] == b"untraced"
    assert store.message_at("orders", 0, 12) is None
    assert store.message_at("'; DROP TABLE events; --", 0, 11) is None


def test_null_keys(store: Store) -> None:
    p = Client(1)
    for i in range(5):
        p.send(None, i * 10)
    for i in range(5):  # reports in reverse order
        p.ack(None, 100 - i, 4, 50 + 4 - i, 100 - i - (4 - i) * 10)
    c = Client(2, group="billing")
    c.consume(None, 200, 4, 52, 180)
    p.send(b"keyed", 300)
    store.ingest([p.batch(), c.batch()])
    messages = store.lifecycle(None)
    assert [m["offset"] for m in messages] == [50, 51, 52, 53, 54]
    m = store.message_at("orders", 4, 52)
    assert (m["key"], m["events"][0]["ts"], kinds(m)) == (None, at(20), ["send", "ack", "consume"])
    assert [k["key"] for k in store.recent_keys()] == [b"keyed"]
    assert store.trace_json(None)["key"] is None


def test_binary_and_one_mebibyte_keys(store: Store) -> None:
    binary = b"\xff\x00\xfe\x80"
    huge = bytes(range(256)) * 4096  # 1 MiB, not UTF-8
    p = Client(1)
    p.send(binary, 0)
    p.ack(binary, 2, 0, 1, 2)
    p.send(huge, 3)
    p.ack(huge, 5, 1, 1, 2)
    p.send(huge[:-1], 6)  # shares all but the last byte
    store.ingest([p.batch()])
    assert one_message(store, binary)["offset"] == 1
    assert one_message(store, huge)["partition"] == 1
    assert one_message(store, huge[:-1])["status"] == "pending"
    doc = store.trace_json(binary)
    assert (doc["key"], doc["key_hex"]) == ("hex:ff00fe80", "ff00fe80")
    assert [m["key"] for m in store.lifecycle(huge[:1000], prefix=True)] == [huge[:-1], huge]
    assert [m["key"] for m in store.lifecycle(b"\xff", prefix=True)] == [binary]


def test_prefix_search_groups_by_key(store: Store) -> None:
    p = Client(1)
    for i, key in enumerate([b"order-1", b"order-10", b"order-2", b"order-1", b"orders", b"other-1"]):
        p.send(key, i)
    store.ingest([p.batch()])
    messages = store.lifecycle(b"order-1", prefix=True)
    assert [m["key"] for m in messages] == [b"order-1", b"order-1", b"order-10"]
    doc = store.trace_json(b"order-1", prefix=True)
    assert doc["prefix"] is True
    assert [(m["key"], m["key_hex"]) for m in doc["messages"]][-1] == ("order-10", b"order-10".hex())
    assert len(store.lifecycle(b"order-", prefix=True, limit=2)) == 2
    assert store.lifecycle(b"order_", prefix=True) == []  # no LIKE wildcards
    assert len(store.lifecycle(b"", prefix=True)) == 6


def test_sql_looking_keys_are_just_keys(store: Store) -> None:
    evil = [b"'; DROP TABLE events; --", b'" OR 1=1 --', b"%", b"_", b"$key", b"?"]
    p = Client(1)
    for i, key in enumerate(evil):
        p.send(key, i)
        p.ack(key, i + 0.5, 0, i, 0.5)
    store.ingest([p.batch()])
    for i, key in enumerate(evil):
        assert one_message(store, key)["offset"] == i
        assert [m["key"] for m in store.lifecycle(key, prefix=True)] == [key]
    assert store.counts() == {"send": 6, "ack": 6}
    out = store.path.parent / "evil.parquet"
    assert store.export(out, key=evil[0]) == 2


def test_trace_json_shape(store: Store) -> None:
    p = Client(0x1F)
    p.send(b"order-17", 0.123)
    p.ack(b"order-17", 3.3, 2, 1841, 3.2)
    c = Client(2, group="billing")
    c.consume(b"order-17", 15.8, 2, 1841, 12.5)
    p.send(b"order-17", 100)
    p.error(b"order-17", 1600, 1500)
    store.ingest([p.batch(), c.batch()])
    doc = json.loads(json.dumps(store.trace_json(b"order-17")))
    assert doc == {
        "key": "order-17",
        "key_hex": "6f726465722d3137",
        "messages": [
            {
                "trace_id": "000000000000001f0000000000000001",
                "topic": "orders",
                "partition": 2,
                "offset": 1841,
                "status": "consumed",
                "events": [
                    {"kind": "send", "ts": "2026-11-26T10:00:00.000123Z", "attempt": 1},
                    {
                        "kind": "ack",
                        "ts": "2026-11-26T10:00:00.003300Z",
                        "partition": 2,
                        "offset": 1841,
                        "latency_ms": 3.2,
                    },
                    {
                        "kind": "consume",
                        "ts": "2026-11-26T10:00:00.015800Z",
                        "group": "billing",
                        "partition": 2,
                        "offset": 1841,
                        "e2e_latency_ms": 12.5,
                    },
                ],
            },
            {
                "trace_id": "000000000000001f0000000000000003",
                "topic": "orders",
                "partition": None,
                "offset": None,
                "status": "failed",
                "events": [
                    {"kind": "send", "ts": "2026-11-26T10:00:00.100000Z", "attempt": 1},
                    {
                        "kind": "error",
                        "ts": "2026-11-26T10:00:01.600000Z",
                        "error": "_MSG_TIMED_OUT",
                        "message": "Local: Message timed out",
                        "latency_ms": 1500.0,
                    },
                ],
            },
        ],
    }
    assert store.trace_json(b"nothing") == {"key": "nothing", "key_hex": b"nothing".hex(), "messages": []}


# -- layout: sorted runs, merging, pruning -------------------------------------------------------


def test_key_lookup_reads_few_row_groups(store: Store) -> None:
    p = Client(1)
    n = 200_000
    p.rows = [
        dict(
            {f.name: None for f in EVENTS},
            src=1,
            seq=i + 1,
            ts=at(i),
            kind="send",
            topic="orders",
            key=f"key-{i % 20_000}".encode(),
        )
        for i in range(n)
    ]
    store.ingest([p.batch()])
    store.cursor().execute("CHECKPOINT")
    plan = store.cursor().execute("EXPLAIN ANALYZE " + store_mod._KEY_ROWS, {"key": b"key-7"}).fetchall()[0][1]
    read, total = map(int, re.search(r"Row Groups Scanned: (\d+) / (\d+)", plan).groups())
    assert total >= n // store_mod.ROW_GROUP_SIZE
    assert read <= 2, plan
    assert len(store.lifecycle(b"key-7")) == 10


def test_small_runs_are_merged_and_lookups_stay_complete(store: Store) -> None:
    p = Client(1)
    calls = 3 * store_mod.FANIN
    for i in range(calls):
        p.send(f"k{i % 4}".encode(), i)
        p.ack(f"k{i % 4}".encode(), i + 0.5, 0, i, 0.5)
        store.ingest([p.batch()])
    runs = store.runs()
    assert len(runs) < store_mod.FANIN
    assert sum(n for _, n in runs) == 2 * calls
    assert [m["offset"] for m in store.lifecycle(b"k1")] == list(range(1, calls, 4))
    assert [k["key"] for k in store.recent_keys(limit=4)] == [b"k3", b"k2", b"k1", b"k0"]
    assert store.compact(full=True) == 1
    assert len(store.runs()) == 1
    assert [m["offset"] for m in store.lifecycle(b"k1")] == list(range(1, calls, 4))
    assert len(store.lifecycle(b"k", prefix=True)) == calls


def test_compact_merges_one_size_tier_at_a_time(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "AUTO_MERGE_MAX_ROWS", 1)  # ingest merges nothing by itself
    p = Client(1)
    for i in range(store_mod.FANIN + 1):
        p.send(b"k", i)
        p.send(b"other", i + 0.5)
        store.ingest([p.batch()])
    assert len(store.runs()) == store_mod.FANIN + 1
    assert store.compact(max_rows=2 * store_mod.FANIN - 1) == 0  # too large for the budget
    assert store.compact() == 1
    assert [n for _, n in store.runs()] == [2, 2 * store_mod.FANIN]
    assert len(store.lifecycle(b"k")) == store_mod.FANIN + 1


def sends(src: int, first_seq: int, n: int, keys: int, ms: float = 0) -> pa.RecordBatch:
    """n sends of keys key-0 .. key-(keys-1), one batch."""
    rows = [
        dict(
            {f.name: None for f in EVENTS},
            src=src,
            seq=first_seq + i,
            ts=at(ms + i),
            kind="send",
            topic="orders",
            key=f"key-{i % keys}".encode(),
        )
        for i in range(n)
    ]
    return pa.RecordBatch.from_pylist(rows, schema=EVENTS)


def test_a_run_reaches_the_file_clustered_in_row_groups(store: Store) -> None:
    """Ingest hands DuckDB one batch per row group and its threads keep the clustered order."""
    n = 5 * store_mod.ROW_GROUP_SIZE + 123
    store.ingest([sends(1, 1, n // 2, 5_000), sends(1, 1 + n // 2, n - n // 2, 5_000)])
    store.cursor().execute("CHECKPOINT")
    cur = store.cursor()
    unordered = cur.execute(
        "SELECT count(*) FROM (SELECT key_hash >> 48 AS b, lag(key_hash >> 48) OVER (ORDER BY rowid) AS prev "
        "FROM events) WHERE b < prev"
    ).fetchone()[0]
    assert unordered == 0
    spans: dict[int, tuple[int, int]] = {}
    for group, stats in cur.execute(
        "SELECT row_group_id, stats FROM pragma_storage_info('events') "
        "WHERE column_name = 'key_hash' AND segment_type = 'UBIGINT'"
    ).fetchall():
        lo, hi = int(stats["min"]), int(stats["max"])
        old = spans.get(group, (lo, hi))
        spans[group] = (min(lo, old[0]), max(hi, old[1]))
    groups = [(g, *spans[g]) for g in sorted(spans)]
    assert len(groups) >= 5
    # Each row group holds a slice of buckets (the top 16 bits of the hash); neighbours share at most one.
    assert all(a[2] >> 48 <= b[1] >> 48 for a, b in zip(groups, groups[1:], strict=False)), groups
    per_batch = [n // 2, n - n // 2]
    assert len(store.lifecycle(b"key-7")) == sum(m // 5_000 + (7 < m % 5_000) for m in per_batch)


def test_runs_of_one_tier_merge_across_a_larger_run(store: Store) -> None:
    large = store_mod.FANIN * store_mod.ROW_GROUP_SIZE + 1  # a tier above the small runs
    seq = 1
    for i in range(store_mod.FANIN + 1):
        n = large if i == store_mod.FANIN // 2 else 2
        store.ingest([sends(1, seq, n, 4, ms=seq)])
        seq += n
    # The small runs merged although the large run sits between them.
    assert sorted(n for _, n in store.runs()) == [2 * store_mod.FANIN, large]
    assert len(store.lifecycle(b"key-1", limit=100_000)) == large // 4 + store_mod.FANIN  # once in each 2-row run


def test_merge_policy_keeps_runs_bounded_and_dedupe_holds(store: Store) -> None:
    """Small inserts of very different sizes, as an in-process sink makes: runs stay few, nothing lost or doubled."""
    sizes = [1, 7, 300, 2, 40, 9, 1, 1200, 5, 60, 3, 700, 8, 2, 90, 1, 33, 4, 2500, 6] * 4
    batches, seq = [], 1
    for i, n in enumerate(sizes):
        batches.append(sends(1 + i % 3, seq, n, 50, ms=seq))
        seq += n
        store.ingest([batches[-1]])
        # Runs below a row group are one size tier: at most FANIN - 1 of them stay unmerged.
        assert len(store.runs()) < store_mod.FANIN
    total = sum(sizes)
    assert sum(n for _, n in store.runs()) == total
    assert store.cursor().execute("SELECT count(*), count(DISTINCT (src, seq)) FROM events").fetchone() == (
        total,
        total,
    )
    runs = store.runs()
    assert store.ingest(batches) == 0  # every batch is known, merged or not
    assert store.runs() == runs
    expected = store.cursor().execute("SELECT count(*) FROM events WHERE key = 'key-7'::BLOB").fetchone()[0]
    assert len(store.lifecycle(b"key-7", limit=10_000)) == expected
    assert len(store.lifecycle(b"key-", prefix=True, limit=100_000)) == total


def test_auto_merges_stop_at_their_row_bound(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "AUTO_MERGE_MAX_ROWS", 4 * store_mod.FANIN - 1)
    for i in range(2 * store_mod.FANIN):
        store.ingest([sends(1, 1 + 4 * i, 4, 2)])
    # Each merge of FANIN runs of 4 rows would write 4 * FANIN rows: over the bound, so none happened.
    assert len(store.runs()) == 2 * store_mod.FANIN
    assert store.compact(max_rows=4 * store_mod.FANIN, max_merges=1) == 1
    assert sorted(n for _, n in store.runs()) == [4] * store_mod.FANIN + [4 * store_mod.FANIN]
    assert len(store.lifecycle(b"key-1", limit=100)) == 2 * store_mod.FANIN * 2


def test_larger_runs_wait_until_there_are_more_than_max_runs(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs beyond the eager bound (a busy collector's polls) merge only once they are too many."""
    monkeypatch.setattr(store_mod, "EAGER_MERGE_MAX_ROWS", 4 * store_mod.FANIN - 1)  # runs of 4 rows count as large
    monkeypatch.setattr(store_mod, "MAX_RUNS", store_mod.FANIN + 1)
    for i in range(store_mod.FANIN + 1):
        store.ingest([sends(1, 1 + 4 * i, 4, 2)])
    assert [n for _, n in store.runs()] == [4] * (store_mod.FANIN + 1)  # at the limit: nothing merged yet
    store.ingest([sends(1, 1 + 4 * (store_mod.FANIN + 1), 4, 2)])
    # One run too many: the FANIN oldest of the tier became one.
    assert sorted(n for _, n in store.runs()) == [4, 4, 4 * store_mod.FANIN]
    assert len(store.lifecycle(b"key-1", limit=100)) == (store_mod.FANIN + 2) * 2


def test_collector_merges_when_a_poll_comes_back_empty(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from collector.collect import Collector

    monkeypatch.setattr(store_mod, "AUTO_MERGE_MAX_ROWS", 1)  # leave every merge to the collector
    for i in range(2 * store_mod.FANIN):
        store.ingest([sends(1, 1 + 4 * i, 4, 2)])
    collector = Collector(store, "127.0.0.1:9")
    collector.consumer.close()

    class Idle:
        def consume(self, n: int, timeout: float) -> list[Any]:
            return []

    collector.consumer = Idle()
    assert collector.step() == 0
    assert len(store.runs()) == store_mod.FANIN + 1  # one merge per empty poll
    assert collector.step() == 0
    assert sorted(n for _, n in store.runs()) == [4 * store_mod.FANIN] * 2
    assert collector.stats.merges == 2
    assert collector.step() == 0  # nothing left within the bound
    assert collector.stats.merges == 2
    assert len(store.lifecycle(b"key-0", limit=100)) == 2 * store_mod.FANIN * 2


def test_readers_on_other_threads(store: Store) -> None:
    """Pages read on their own threads while the collector writes; each sees committed, growing data."""
    p = Client(1)
    errors: list[BaseException] = []
    seen: dict[int, list[int]] = {}
    cursors: set[int] = set()

    def read(n: int) -> None:
        seen[n] = []
        try:
            for _ in range(20):
                seen[n].append(len(store.lifecycle(b"k")))
                cursors.add(id(store.cursor()))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(n,)) for n in range(3)]
    for t in readers:
        t.start()
    for i in range(20):
        p.send(b"k", i)
        store.ingest([p.batch()])
    for t in readers:
        t.join(30)
    assert not errors
    assert len(cursors) == 3, "one cursor per thread"
    for counts in seen.values():
        assert counts == sorted(counts) and all(0 <= c <= 20 for c in counts)
    assert len(store.lifecycle(b"k")) == 20


# -- read-only -------------------------------------------------------------------------------


def test_read_only_open_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "trace.duckdb"
    p = Client(1)
    p.send(b"k", 0)
    p.ack(b"k", 1, 0, 3, 1)
    with Store(path) as s:
        s.ingest([p.batch()])
    with Store(path, read_only=True) as ro:
        assert one_message(ro, b"k")["offset"] == 3
        assert ro.counts() == {"send": 1, "ack": 1}
        p.send(b"k", 5)
        with pytest.raises(ReadOnlyStoreError):
            ro.ingest([p.batch()])
        with pytest.raises(ReadOnlyStoreError):
            ro.dead_letter("x", "y", b"z")
        with pytest.raises(duckdb.Error):
            ro.cursor().execute("DELETE FROM events")
    with Store(path, read_only=True) as ro:
        assert ro.counts() == {"send": 1, "ack": 1}


def test_read_only_refuses_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    duckdb.connect(str(path)).close()
    with pytest.raises(RuntimeError, match="not a keytrace store"):
        Store(path, read_only=True)


# -- aggregates -------------------------------------------------------------------------------


@pytest.fixture
def traffic(store: Store) -> Store:
    """Two seconds of traffic with one of each anomaly."""
    p = Client(1)
    billing = Client(2, client_id="billing-svc", group="billing")
    # second 0: three acked and consumed messages, one twice
    for i, key in enumerate([b"a", b"b", b"c"]):
        p.send(key, i)
        p.ack(key, i + 2 + i, 0, i, 2 + i)
        billing.consume(key, 100 + i, 0, i, 10 * (i + 1))
    billing.consume(b"c", 150, 0, 2, 60)
    # second 1: d fails, e fails then succeeds on resend, f is never reported, g is skipped by billing
    p.send(b"d", 1000)
    p.error(b"d", 1500, 500)
    e = p.send(b"e", 1001)
    p.error(b"e", 1501, 500)
    p.resend(b"e", 1600, trace=e, attempt=2)
    p.ack(b"e", 1603, 0, 6, 3)
    p.send(b"f", 1002)
    p.send(b"g", 1003)
    p.ack(b"g", 1006, 0, 4, 3)
    billing.consume(b"e", 1700, 0, 6, 100)
    p.send(b"h", 1010)
    p.ack(b"h", 1015, 0, 5, 5)
    billing.consume(b"h", 1800, 0, 5, 10)
    # out of order: i sent before j but stored after it; k moves partition
    p.send(b"i", 1100)
    p.send(b"j", 1101)
    p.ack(b"j", 1110, 1, 0, 9)
    p.ack(b"i", 1120, 1, 1, 20)
    p.send(b"k", 1200)
    p.ack(b"k", 1201, 1, 2, 1)
    p.send(b"k", 1300)
    p.ack(b"k", 1301, 2, 0, 1)
    stats = stats_batch(
        1,
        [
            {"ts": at(0), "msg_cnt": 10, "msg_max": 100, "txmsgs": 100, "txerrs": 0},
            {"ts": at(1000), "msg_cnt": 50, "msg_max": 100, "txmsgs": 160, "txerrs": 2},
        ],
    )
    store.ingest([p.batch(), billing.batch(), stats])
    return store


def test_throughput_and_latency(traffic: Store) -> None:
    df = traffic.throughput(bucket_s=1)
    by_t = {row.t.second: row for row in df[df.client_id == "orders-svc"].itertuples()}
    assert (by_t[0].sent, by_t[0].acked, by_t[0].failed) == (3, 3, 0)
    assert (by_t[1].sent, by_t[1].resent, by_t[1].acked, by_t[1].failed) == (10, 1, 7, 2)
    lat = traffic.ack_latency(bucket_s=1)
    first = lat[lat.t == T0].iloc[0]
    assert (first.acks, first.p50_ms, first.max_ms) == (3, 3.0, 4.0)
    e2e = traffic.consumer_e2e(bucket_s=1)
    row = e2e[(e2e.t == T0) & (e2e.group_id == "billing")].iloc[0]
    assert (row.consumed, row.per_s, row.p50_ms) == (4, 4.0, 25.0)
    window = traffic.throughput(since=at(1000), until=at(2000), bucket_s=1)
    assert window.sent.sum() == 10


def test_errors_and_stats_series(traffic: Store) -> None:
    errors = traffic.errors_by_name()
    assert errors[["kind", "error_name", "count"]].values.tolist() == [["error", "_MSG_TIMED_OUT", 2]]
    s = traffic.stats_series(client_id="orders-svc")
    assert s.queue_fill.tolist() == [0.1, 0.5]
    assert s.txmsgs_delta.isna().tolist() == [True, False]
    assert (s.txmsgs_delta.iloc[1], s.txerrs_delta.iloc[1]) == (60, 2)
    assert traffic.stats_series(client_id="nobody").empty


def test_anomalies(traffic: Store) -> None:
    failed = traffic.failed_messages()
    assert failed.key.tolist() == [b"d"]
    assert failed.status.tolist() == ["failed"] and failed.error_name.tolist() == ["_MSG_TIMED_OUT"]
    pending = traffic.never_acked(older_than_s=30, as_of=at(60_000))
    assert pending.key.tolist() == [b"f"]
    assert traffic.never_acked(older_than_s=30, as_of=at(2_000)).empty
    skipped = traffic.not_consumed(as_of=at(60_000))
    assert skipped[["key", "group_id", "reason"]].values.tolist() == [[b"g", "billing", "skipped"]]
    twice = traffic.consumed_twice()
    assert twice[["key", "times"]].values.tolist() == [[b"c", 2]]
    ooo = traffic.out_of_order()
    assert sorted(zip(ooo.scope, ooo.key, ooo.reason, strict=True)) == [
        ("key", b"k", "key moved to another partition"),
        ("partition", b"j", "sent later, stored before an earlier send"),
    ]


# -- export ------------------------------------------------------------------------------------


def test_export_formats(traffic: Store, tmp_path: Path) -> None:
    assert (
        traffic.export(tmp_path / "all.parquet")
        == traffic.cursor().execute("SELECT count(*) FROM events").fetchone()[0]
    )
    assert traffic.export(tmp_path / "e.parquet", key=b"e") == 5
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.schema.names == EVENTS.names
    assert set(table.column("key").to_pylist()) == {b"e"}
    assert traffic.export(tmp_path / "window.csv", fmt="csv", since=at(1000), until=at(1001)) == 1
    csv = (tmp_path / "window.csv").read_text().splitlines()
    assert len(csv) == 2 and csv[0].endswith('"key_hex"') and '"d"' in csv[1]
    assert traffic.export(tmp_path / "empty.csv", fmt="csv", key=b"none") == 0
    assert traffic.export(tmp_path / "k.duckdb", fmt="duckdb", key=b"k", prefix=True) == 4
    with Store(tmp_path / "k.duckdb", read_only=True) as review:
        assert [m["partition"] for m in review.lifecycle(b"k")] == [1, 2]
        assert review.cursor().execute("SELECT count(*) FROM stats").fetchone()[0] == 2
    with pytest.raises(ValueError):
        traffic.export(tmp_path / "x.json", fmt="json")
