"""The collector against bad records and failing storage.

Malformed records are dead-lettered and counted, never allowed to stop collection. A store
that cannot write (full disk, read-only) gets nothing acknowledged: the collector's committed
offsets never cover a record that is not in the store, and a restart stores every event once.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import pyarrow as pa
import pytest
from confluent_kafka import TopicPartition

from collector import TracedProducer
from collector.collect import Collector
from collector.mockcluster import MockCluster
from collector.schema import EVENTS, META_TABLE, META_VERSION, from_ipc, to_ipc
from collector.store import ReadOnlyStoreError, Store

PARTITIONS = 4
GARBAGE = 10_000
# What the collector must say about each kind of malformed record.
REASONS = {
    "random bytes": "not an Arrow IPC stream",
    "wrong version": "schema version '0' of table 'events' is not supported",
    "wrong columns": "columns of a 'events' batch do not match",
    "cut in half": "not an Arrow IPC stream",
    "cut after schema": "no record batch in the Arrow stream",
    "empty value": "null or length 0",
    "null value": "null or length 0",
}
BAD_SRC = 0xBAD


def events_batch(n: int, **columns: Any) -> pa.RecordBatch:
    """An events batch from BAD_SRC; `columns` replace its values (lists, or Arrow arrays as they are)."""
    now = dt.datetime.now(dt.UTC)
    values = {"src": [BAD_SRC] * n, "seq": list(range(n)), "ts": [now] * n, "kind": ["send"] * n, "key": [b"k"] * n}
    values.update(columns)
    arrays = [v if isinstance(v := values.get(f.name, [None] * n), pa.Array) else pa.array(v, f.type) for f in EVENTS]
    return pa.RecordBatch.from_arrays(arrays, schema=EVENTS)


def malformed(rng: random.Random) -> dict[str, bytes | None]:
    """One value of every kind of malformed record."""
    valid = to_ipc(events_batch(20))
    schema_only = pa.BufferOutputStream()
    pa.ipc.new_stream(schema_only, EVENTS).close()
    wrong_version = events_batch(3).replace_schema_metadata({META_TABLE: b"events", META_VERSION: b"0"})
    wrong_columns = pa.RecordBatch.from_pydict(
        {"src": pa.array([BAD_SRC], pa.uint64()), "kind": ["send"]},
        schema=pa.schema(
            [("src", pa.uint64()), ("kind", pa.string())], metadata={META_TABLE: b"events", META_VERSION: b"1"}
        ),
    )
    return {
        "random bytes": rng.randbytes(100),
        "wrong version": to_ipc(wrong_version),
        "wrong columns": to_ipc(wrong_columns),
        "cut in half": valid[: len(valid) // 2],
        "cut after schema": schema_only.getvalue().to_pybytes()[:-8],  # no end-of-stream marker either
        "empty value": b"",
        "null value": None,
    }


@pytest.fixture
def events_topic(mock_cluster: MockCluster) -> str:
    topic = f"_keytrace.events-{uuid.uuid4().hex[:8]}"
    mock_cluster.create_topic(topic, partitions=PARTITIONS, replication_factor=3)
    return topic


@pytest.fixture
def data_topic(mock_cluster: MockCluster, mock_topic: str) -> str:
    return mock_topic


@pytest.fixture
def group() -> str:
    return f"collector-{uuid.uuid4().hex[:8]}"


def traced(servers: str, events_topic: str) -> TracedProducer:
    return TracedProducer(
        {"bootstrap.servers": servers, "client.id": "robust-svc", "linger.ms": 5},
        sink=f"kafka://{servers}/{events_topic}",
        # No statistics: only the send and ack events this test counts.
        trace_options={"stats_interval_ms": 0},
    )


def send_round(producer: TracedProducer, topic: str, keys: list[bytes]) -> None:
    for key in keys:
        producer.produce(topic, b"v" * 40, key)
    assert producer.flush(15) == 0


def committed(servers: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (absent: nothing committed)."""
    c = confluent_kafka.Consumer({"bootstrap.servers": servers, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    finally:
        c.close()
    return {tp.partition: tp.offset for tp in parts if tp.offset >= 0}


def read_topic(servers: str, topic: str) -> dict[tuple[int, int], bytes | None]:
    """Every record of a topic by (partition, offset)."""
    c = confluent_kafka.Consumer({"bootstrap.servers": servers, "group.id": "unused", "enable.auto.commit": False})
    highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
    c.assign([TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in range(PARTITIONS)])
    out: dict[tuple[int, int], bytes | None] = {}
    deadline = time.monotonic() + 30
    while len(out) < sum(highs.values()) and time.monotonic() < deadline:
        for m in c.consume(1000, 0.5):
            if m.error() is None:
                out[(m.partition(), m.offset())] = m.value()
    c.close()
    assert len(out) == sum(highs.values())
    return out


def low_watermarks(servers: str, topic: str) -> list[int]:
    c = confluent_kafka.Consumer({"bootstrap.servers": servers, "group.id": "unused"})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0] for p in range(PARTITIONS)]
    finally:
        c.close()


def batch_id(value: bytes | None) -> tuple[int, int]:
    first = from_ipc(value or b"")[0]
    return first.column(0)[0].as_py(), first.column(1)[0].as_py()


def stored_batches(db: Path) -> set[tuple[int, int]]:
    with Store(db, read_only=True) as store:
        return set(store.cursor().execute("SELECT src, seq_lo FROM ingested_batches").fetchall())


def assert_exactly_once(db: Path, keys: list[bytes]) -> None:
    with Store(db, read_only=True) as store:
        cur = store.cursor()
        total, distinct = cur.execute("SELECT count(*), count(DISTINCT (src, seq)) FROM events").fetchone()
        per_key = dict(
            cur.execute(
                "SELECT key, count(*) FROM events WHERE kind IN ('send', 'ack') GROUP BY key HAVING count(*) > 0"
            ).fetchall()
        )
        counts = store.counts()
    assert total == distinct, "an event was stored twice"
    assert counts.get("send") == len(keys) and counts.get("ack") == len(keys), counts
    assert per_key == dict.fromkeys(keys, 2)


def collect_until(collector: Collector, done: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"collector stalled: {collector.stats}"
        collector.step(0.2)


# -- malformed records ---------------------------------------------------------------------------


def test_ten_thousand_malformed_records_are_dead_lettered(
    mock_cluster: MockCluster, events_topic: str, data_topic: str, group: str, tmp_path: Path
) -> None:
    servers = mock_cluster.bootstrap_servers
    samples = malformed(random.Random(7))
    kinds = list(samples)
    where: dict[str, str] = {}  # dead-letter source -> kind of garbage
    failed: list[str] = []

    def delivered(kind: str) -> Callable[[Any, confluent_kafka.Message], None]:
        def report(err: Any, msg: confluent_kafka.Message) -> None:
            if err is not None:
                failed.append(err.str())
            else:
                where[f"{msg.topic()}/{msg.partition()}@{msg.offset()}"] = kind

        return report

    garbage = confluent_kafka.Producer({"bootstrap.servers": servers, "linger.ms": 50, "batch.num.messages": 10_000})
    callbacks = {kind: delivered(kind) for kind in kinds}
    producer = traced(servers, events_topic)
    keys: list[bytes] = []
    rounds = 5
    for r in range(rounds):
        for i in range(GARBAGE // rounds):
            kind = kinds[i % len(kinds)]
            # Spread evenly: a mock cluster partition keeps only its last 5 MB.
            garbage.produce(events_topic, samples[kind], partition=i % PARTITIONS, on_delivery=callbacks[kind])
        assert garbage.flush(30) == 0
        batch = [f"key-{r}-{i}".encode() for i in range(200)]
        send_round(producer, data_topic, batch)
        keys += batch
    assert not failed
    assert len(where) == GARBAGE
    assert low_watermarks(servers, events_topic) == [0] * PARTITIONS, "the mock cluster dropped records"

    db = tmp_path / "trace.duckdb"
    with Store(db) as store:
        collector = Collector(store, servers, events_topic, group_id=group)
        try:
            started = time.monotonic()
            collect_until(
                collector,
                lambda: collector.stats.dead_letters >= GARBAGE and store.counts().get("ack", 0) >= len(keys),
                seconds=240,
            )
            elapsed = time.monotonic() - started
            # Valid batches sent after all the garbage are stored too: the collector kept running.
            later = [f"later-{i}".encode() for i in range(300)]
            send_round(producer, data_topic, later)
            keys += later
            collect_until(collector, lambda: store.counts().get("ack", 0) >= len(keys))
            collector.step(1.0)  # nothing more arrives
            stats = collector.stats
            letters = store.dead_letters(limit=2 * GARBAGE)
        finally:
            collector.close()
            producer.close()
    print(f"dead-lettered {GARBAGE} records in {elapsed:.1f} s")

    assert stats.dead_letters == GARBAGE
    assert stats.store_errors == 0
    assert len(letters) == GARBAGE
    assert {d["source"] for d in letters} == set(where)
    for d in letters:
        kind = where[d["source"]]
        assert REASONS[kind] in d["reason"], (kind, d["reason"])
        assert d["payload"] == (samples[kind] or b"")
    assert Counter(where[d["source"]] for d in letters) == Counter(where.values())
    assert_exactly_once(db, keys)
    with Store(db, read_only=True) as store:
        assert store.cursor().execute("SELECT count(*) FROM events WHERE src = $s", {"s": BAD_SRC}).fetchone()[0] == 0
    # Reading and parsing 10,000 records takes a few seconds; one INSERT per dead letter makes it minutes.
    assert elapsed < 30, f"dead-lettering {GARBAGE} records took {elapsed:.0f} s"


def test_a_record_the_store_rejects_does_not_stop_the_collector(
    mock_cluster: MockCluster, events_topic: str, data_topic: str, group: str, tmp_path: Path
) -> None:
    """Right schema, wrong content: Arrow does not enforce NOT NULL when it reads a stream.

    Invalid UTF-8 in a string column is caught earlier, when the collector validates what it
    read (schema.from_ipc); a null id only by the store's constraint.
    """
    servers = mock_cluster.bootstrap_servers
    raw = pa.array([b"ok", b"\xff\xfe"], pa.binary())
    poison = {
        "null id": to_ipc(events_batch(2, src=[None, None])),
        "null id in a later row": to_ipc(events_batch(2, src=[BAD_SRC, None])),
        "invalid UTF-8": to_ipc(events_batch(2, topic=pa.Array.from_buffers(pa.string(), 2, raw.buffers()))),
    }
    plain = confluent_kafka.Producer({"bootstrap.servers": servers})
    producer = traced(servers, events_topic)
    keys: list[bytes] = []
    for r, payload in enumerate(poison.values()):
        plain.produce(events_topic, payload)
        assert plain.flush(10) == 0
        batch = [f"key-{r}-{i}".encode() for i in range(50)]
        send_round(producer, data_topic, batch)
        keys += batch
    producer.close()

    db = tmp_path / "trace.duckdb"
    with Store(db) as store:
        collector = Collector(store, servers, events_topic, group_id=group)
        try:
            collect_until(
                collector,
                lambda: collector.stats.dead_letters >= len(poison) and store.counts().get("ack", 0) >= len(keys),
            )
            reasons = sorted(d["reason"] for d in store.dead_letters())
        finally:
            collector.close()
    assert collector.stats.store_errors == 0
    assert len(reasons) == len(poison)
    rejected = [r for r in reasons if r.startswith("the store rejected it")]
    assert len(rejected) == 2 and all("NOT NULL constraint failed" in r for r in rejected), reasons
    invalid = [r for r in reasons if r.startswith("invalid Arrow data")]
    assert len(invalid) == 1 and "Invalid UTF8" in invalid[0], reasons
    assert_exactly_once(db, keys)
    assert committed(servers, group, events_topic), "the records were acknowledged once handled"


# -- a store that cannot write -------------------------------------------------------------------

DISK_BYTES = 3 * 1024 * 1024
# Runs the CLI with a file size limit: writes past it fail with EFBIG instead of killing the process.
LIMITED_CLI = (
    "import resource, runpy, signal, sys;"
    "limit = int(sys.argv.pop(1));"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)) if limit else None;"
    "runpy.run_module('collector.cli', run_name='__main__', alter_sys=True)"
)


class SmallDisk:
    """A directory where writing a few MB fails until grow(): a tmpfs mount, or a file size limit."""

    def __init__(self, base: Path, mode: str) -> None:
        self.mode = mode
        self.dir = base / "disk"
        self.dir.mkdir()
        self.limit = DISK_BYTES
        self.mounted = False
        if mode == "tmpfs":
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "keytrace-test", str(self.dir)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {done.stderr.strip()}")
            self.mounted = True

    def command(self, args: list[str]) -> list[str]:
        if self.mode == "tmpfs":
            return [sys.executable, "-m", "collector.cli", *args]
        return [sys.executable, "-c", LIMITED_CLI, str(self.limit), *args]

    def grow(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=256m", str(self.dir)], check=True)
        self.limit = 0

    def remove(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.dir)], check=False)


@pytest.fixture(params=["tmpfs", "fsize"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path, request.param)
    yield disk
    disk.remove()


@pytest.fixture
def start() -> Iterator[Callable[[list[str], Path, Path], subprocess.Popen]]:
    """Start a process with its output in files; killed at teardown if still running."""
    started: list[subprocess.Popen] = []

    def run(cmd: list[str], out: Path, err: Path) -> subprocess.Popen:
        with out.open("w") as stdout, err.open("w") as stderr:
            started.append(subprocess.Popen(cmd, stdout=stdout, stderr=stderr))
        return started[-1]

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)


def rows_stored(log: Path) -> int:
    found = re.findall(r"\brows=(\d+)", log.read_text())
    return int(found[-1]) if found else 0


def caught_up(proc: subprocess.Popen, log: Path, rows: int) -> bool:
    return proc.poll() is not None or rows_stored(log) >= rows


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_full_disk_acknowledges_nothing_it_did_not_store(
    small_disk: SmallDisk,
    start: Callable[[list[str], Path, Path], subprocess.Popen],
    mock_cluster: MockCluster,
    events_topic: str,
    data_topic: str,
    group: str,
    tmp_path: Path,
) -> None:
    servers = mock_cluster.bootstrap_servers
    db = small_disk.dir / "trace.duckdb"
    args = ["collect", "--bootstrap-servers", servers, "--events-topic", events_topic, "--group", group]
    args += ["--db", str(db), "--progress", "0.1"]
    out, err = tmp_path / "collect.out", tmp_path / "collect.err"
    first = start(small_disk.command([*args, "--exit-on-store-error"]), out, err)

    producer = traced(servers, events_topic)
    keys: list[bytes] = []
    for r in range(100):
        if first.poll() is not None:
            break
        batch = [f"order-{r:03d}-{i:05d}-{'x' * 40}".encode() for i in range(2000)]
        send_round(producer, data_topic, batch)
        keys += batch
        wait_for(functools.partial(caught_up, first, out, 2 * len(keys)), 30)
    assert wait_for(lambda: first.poll() is not None, 30), "the disk never filled up"

    small_disk.grow()
    stored = stored_batches(db)
    offsets = committed(servers, group, events_topic)
    records = read_topic(servers, events_topic)
    acknowledged = [pos for pos in records if pos[1] < offsets.get(pos[0], 0)]
    assert acknowledged, "the collector stored and acknowledged some records before the disk filled up"
    assert {batch_id(records[pos]) for pos in acknowledged} <= stored, "an offset was committed for a lost record"
    assert any(batch_id(v) not in stored for v in records.values()), "the failure lost nothing to redeliver"

    # Sent while no collector runs: the restarted one must pick these up as well.
    batch = [f"after-{i:05d}".encode() for i in range(500)]
    send_round(producer, data_topic, batch)
    keys += batch
    producer.close()
    again, again_err = tmp_path / "again.out", tmp_path / "again.err"
    second = start(small_disk.command([*args, "--idle-exit", "3"]), again, again_err)
    assert second.wait(120) == 0, again.read_text() + again_err.read_text()
    assert_exactly_once(db, keys)

    # What the operator reads: the file and the cause, and the exit code --exit-on-store-error documents.
    message = err.read_text()
    cause = "No space left on device" if small_disk.mode == "tmpfs" else "File too large"
    assert cause in message and str(db) in message, message
    assert first.returncode == 3, message


def test_read_only_store_acknowledges_nothing(
    mock_cluster: MockCluster, events_topic: str, data_topic: str, group: str, tmp_path: Path
) -> None:
    servers = mock_cluster.bootstrap_servers
    db = tmp_path / "trace.duckdb"
    Store(db).close()
    producer = traced(servers, events_topic)
    keys = [f"ro-{i}".encode() for i in range(300)]
    send_round(producer, data_topic, keys)
    producer.close()

    with Store(db, read_only=True) as store:
        collector = Collector(store, servers, events_topic, group_id=group)
        try:
            deadline = time.monotonic() + 60
            with pytest.raises(ReadOnlyStoreError, match="is open read-only"):
                while time.monotonic() < deadline:
                    collector.step(0.2)
            assert collector.stats.store_errors == 1
            assert str(db) in (collector.stats.last_error or "")
            # The failed step rewound its partitions: the same records come again, and fail again.
            with pytest.raises(ReadOnlyStoreError):
                while time.monotonic() < deadline:
                    collector.step(0.2)
        finally:
            collector.close()
    assert collector.stats.rows == 0
    assert committed(servers, group, events_topic) == {}

    with Store(db) as store:
        collector = Collector(store, servers, events_topic, group_id=group)
        try:
            collect_until(collector, lambda: store.counts().get("ack", 0) >= len(keys))
        finally:
            collector.close()
    assert_exactly_once(db, keys)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs holding an existing store: root ignores file modes, not a read-only mount."""
    target = tmp_path / "ro"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "keytrace-ro", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {done.stderr.decode().strip()}")
    try:
        Store(target / "trace.duckdb").close()
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], check=False)


@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("read-only mount", "Read-only file system"),
        ("new file on a read-only mount", "Read-only file system"),
        ("missing directory", "No such file or directory"),
        ("a directory", "Is a directory"),
        ("not a database", "not a valid DuckDB database file"),
    ],
)
def test_collect_refuses_a_store_it_cannot_write(
    request: pytest.FixtureRequest, tmp_path: Path, mock_cluster: MockCluster, where: str, cause: str
) -> None:
    if where == "missing directory":
        db = Path("/nonexistent-dir/x.duckdb")
    elif where == "a directory":
        db = tmp_path
    elif where == "not a database":
        db = tmp_path / "junk.duckdb"
        db.write_bytes(random.Random(1).randbytes(64 * 1024))
    else:
        read_only: Path = request.getfixturevalue("read_only_dir")
        db = read_only / ("trace.duckdb" if where == "read-only mount" else "new.duckdb")
    cmd = [sys.executable, "-m", "collector.cli", "collect", "--bootstrap-servers", mock_cluster.bootstrap_servers]
    done = subprocess.run([*cmd, "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"keytrace: cannot open {db}: ") and cause in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# -- large polls ---------------------------------------------------------------------------------


def test_a_poll_is_stored_in_groups_and_a_failed_group_is_read_again(
    mock_cluster: MockCluster, events_topic: str, group: str, tmp_path: Path
) -> None:
    """A poll of many records is stored a group at a time, never all decoded at once.

    The store fails once, on the second group (a fault made with a wrapper around
    Store.ingest, since a disk that fails on the second of two writes cannot be arranged
    otherwise): nothing is committed, the poll is read again from the first offset of every
    partition in it (those the loop had not reached yet included), and the first group,
    already stored, is not stored twice.
    """
    servers = mock_cluster.bootstrap_servers
    plain = confluent_kafka.Producer({"bootstrap.servers": servers})
    for partition in range(PARTITIONS):  # 3 records of 100 events in each partition
        for r in range(3):
            src = 0x6000 + partition * 16 + r
            payload = to_ipc(events_batch(100, src=[src] * 100, key=[f"k{src}".encode()] * 100))
            plain.produce(events_topic, payload, partition=partition)
    assert plain.flush(10) == 0

    db = tmp_path / "trace.duckdb"
    calls: list[int] = []
    with Store(db) as store:
        ingest = store.ingest

        def flaky_ingest(batches: list[pa.RecordBatch]) -> int:
            calls.append(sum(b.num_rows for b in batches))
            if len(calls) == 2:
                raise OSError("No space left on device (injected on the second group)")
            return ingest(batches)

        store.ingest = flaky_ingest  # type: ignore[method-assign]
        collector = Collector(store, servers, events_topic, group_id=group, group_rows=150)
        failures = 0
        try:
            deadline = time.monotonic() + 120
            while store.counts().get("send", 0) < 1_200:
                assert time.monotonic() < deadline, f"collector stalled: {collector.stats}"
                try:
                    collector.step(0.5)
                except OSError:
                    failures += 1
        finally:
            collector.close()
        total, distinct = store.cursor().execute("SELECT count(*), count(DISTINCT (src, seq)) FROM events").fetchone()
    assert failures == 1 and collector.stats.store_errors == 1
    assert (total, distinct) == (1_200, 1_200)
    # Groups close once they hold 150 events or more: two records of 100 each.
    assert len(calls) >= 6 and max(calls) == 200, calls
    assert committed(servers, group, events_topic) == {p: 3 for p in range(PARTITIONS)}
