"""Keys that are SQL, quotes, control characters, invalid UTF-8 or a megabyte long.

Each is traced the way users trace (TracedProducer, duckdb:// sink, mock cluster), found
exactly, and never changes what a search, an export or the dashboard matches.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
import uuid
from pathlib import Path
from typing import Any

import confluent_kafka
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from collector import TracedProducer
from collector.cli import main as cli_main
from collector.mockcluster import MockCluster
from collector.store import Store
from collector.tracer import MAX_KEY_BYTES, normalize_key

INJECTION = "' OR 1=1 --"
BIG = random.Random(5).randbytes(1 << 20)
HOSTILE = {
    "drop table": b"'; DROP TABLE events; --",
    "or 1=1": INJECTION.encode(),
    "double quote": b'"',
    "backslash": b"\\",
    "nul": b"\x00",
    "nul inside": b"a\x00b",
    "newline": b"line1\nline2",
    "ansi": b"\x1b[31mred\x1b[0m",
    "invalid utf-8": b"\xff\xfe\xfd",
    "markdown and html": b"`<script>alert(1)</script>`**",
    "1 MiB": BIG,
}
WILDCARDS = [b"100%_done", b"100_x", b"100x", b"1000"]
ORDINARY = [f"order-{i}".encode() for i in range(20)]
TABLES = {"meta", "events", "stats", "configs", "ingested_batches", "dead_letters", "runs", "commits"}


def trace_keys(servers: str, topic: str, db: Path, spool: Path, keys: list[bytes]) -> dict[bytes, tuple[int, int]]:
    """Produce one message per key through a traced producer; (partition, offset) by stored key."""
    where: dict[bytes, tuple[int, int]] = {}
    failed: list[str] = []

    def delivered(err: Any, msg: confluent_kafka.Message) -> None:
        if err is not None:
            failed.append(err.str())
        else:
            where[normalize_key(msg.key())] = (msg.partition(), msg.offset())

    producer = TracedProducer(
        # The 1 MiB key needs a message limit above librdkafka's default 1,000,000 bytes.
        {"bootstrap.servers": servers, "client.id": "hostile", "message.max.bytes": 4_000_000},
        sink=f"duckdb://{db}",
        trace_options={"spool_dir": str(spool), "stats_interval_ms": 0},
        on_delivery=delivered,
    )
    for key in keys:
        producer.produce(topic, b"value", key)
    assert producer.flush(15) == 0
    producer.close()
    assert not failed
    return where


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, mock_cluster: MockCluster) -> dict[str, Any]:
    """`hostile`: every hostile, wildcard and ordinary key; `plain`: ordinary keys only."""
    base = tmp_path_factory.mktemp("hostile")
    topic = f"hostile-{uuid.uuid4().hex[:8]}"
    mock_cluster.create_topic(topic, partitions=3, replication_factor=1)
    servers = mock_cluster.bootstrap_servers
    hostile, plain = base / "hostile.duckdb", base / "plain.duckdb"
    where = trace_keys(servers, topic, hostile, base / "spool", [*HOSTILE.values(), *WILDCARDS, *ORDINARY])
    trace_keys(servers, topic, plain, base / "spool", ORDINARY)
    return {"hostile": hostile, "plain": plain, "topic": topic, "where": where}


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- storage and exact lookup ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [*HOSTILE, *(k.decode() for k in WILDCARDS)])
def test_hostile_key_is_stored_and_found_exactly(stores: dict[str, Any], name: str) -> None:
    key = normalize_key(HOSTILE.get(name, name.encode()))
    with Store(stores["hostile"], read_only=True) as store:
        doc = store.trace_json(key)
        [message] = store.lifecycle(key)
    assert doc["key_hex"] == key.hex()
    [found] = doc["messages"]
    assert (found["topic"], found["partition"], found["offset"]) == (stores["topic"], *stores["where"][key])
    assert [e["kind"] for e in found["events"]] == ["send", "ack"]
    assert found["status"] == "acked"
    assert message["key"] == key


def test_a_long_key_is_stored_as_its_head(stores: dict[str, Any]) -> None:
    head = BIG[:MAX_KEY_BYTES]
    assert normalize_key(BIG) == head and MAX_KEY_BYTES == 64 * 1024
    with Store(stores["hostile"], read_only=True) as store:
        lengths = store.cursor().execute("SELECT max(octet_length(key)) FROM events").fetchone()[0]
        rows = store.cursor().execute("SELECT kind FROM events WHERE key = $k ORDER BY kind", {"k": head}).fetchall()
    assert lengths == MAX_KEY_BYTES
    assert rows == [("ack",), ("send",)]


def test_tables_are_intact_after_hostile_keys(stores: dict[str, Any]) -> None:
    expected = len(HOSTILE) + len(WILDCARDS) + len(ORDINARY)
    with Store(stores["hostile"], read_only=True) as store:
        tables = {r[0] for r in store.cursor().execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        distinct = store.cursor().execute("SELECT count(DISTINCT key) FROM events").fetchone()[0]
        counts = store.counts()
    assert tables == TABLES
    assert counts == {"send": expected, "ack": expected}
    assert distinct == expected


# -- keytrace trace ----------------------------------------------------------------------------------


def test_trace_finds_an_sql_key_and_nothing_else(stores: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    for key in (INJECTION, "'; DROP TABLE events; --"):
        code, out, _ = run_cli(capsys, "trace", key, "--db", str(stores["hostile"]), "--json")
        assert code == 0
        doc = json.loads(out)
        assert doc["key"] == key
        assert [(m["partition"], m["offset"]) for m in doc["messages"]] == [stores["where"][key.encode()]]


def test_sql_injection_through_trace_finds_nothing(stores: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    db = str(stores["plain"])
    for args in ([INJECTION], [INJECTION, "--prefix"], ["%", "--prefix"], ["_", "--prefix"], ["order-_", "--prefix"]):
        code, out, err = run_cli(capsys, "trace", *args, "--db", db)
        assert code == 1, args
        assert out == ""
        assert err.startswith("keytrace: no trace for key") and "order-" not in err.replace(args[0], ""), err
    code, out, _ = run_cli(capsys, "trace", "order-", "--prefix", "--db", db, "--json")
    assert code == 0 and len(json.loads(out)["messages"]) == len(ORDINARY)


@pytest.mark.parametrize(
    ("prefix", "keys"),
    [
        ("100%", ["100%_done"]),
        ("100_", ["100_x"]),
        ("100", ["1000", "100%_done", "100_x", "100x"]),
        ("%", []),
        ("_", []),
    ],
)
def test_prefix_wildcards_match_literally(
    stores: dict[str, Any], capsys: pytest.CaptureFixture, prefix: str, keys: list[str]
) -> None:
    code, out, _ = run_cli(capsys, "trace", prefix, "--prefix", "--db", str(stores["hostile"]), "--json")
    if not keys:
        assert (code, out) == (1, "")
        return
    assert code == 0
    assert sorted(m["key"] for m in json.loads(out)["messages"]) == sorted(keys)


def test_hex_mode_finds_binary_and_sql_keys(stores: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    for key in (b"\xff\xfe\xfd", b"a\x00b", INJECTION.encode()):
        code, out, _ = run_cli(capsys, "trace", key.hex(), "--hex", "--db", str(stores["hostile"]), "--json")
        assert code == 0
        doc = json.loads(out)
        assert doc["key_hex"] == key.hex()
        assert [(m["partition"], m["offset"]) for m in doc["messages"]] == [stores["where"][key]]


@pytest.mark.parametrize("text", ["zz", "abc", INJECTION, "hex:0xg1"])
def test_invalid_hex_is_a_clear_error(stores: dict[str, Any], text: str) -> None:
    cmd = [sys.executable, "-m", "collector.cli", "trace", text, "--hex", "--db", str(stores["plain"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"keytrace: {text!r} is not valid hex"), done.stderr
    assert "Traceback" not in done.stderr


# Printing these raw lets a key recolour, move the cursor, clear the screen or forge lines.
def control_characters(text: str) -> list[str]:
    return sorted({c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf")})


@pytest.mark.parametrize(
    "args",
    [
        ["\x1b[31mred\x1b[0m"],
        ["line1\nline2"],
        [b"a\x00b".hex(), "--hex"],
        ["\x1b[31m", "--prefix"],
        ["line1", "--prefix"],
    ],
    ids=["ansi", "newline", "nul", "ansi prefix", "newline prefix"],
)
def test_trace_text_output_prints_no_control_characters(
    stores: dict[str, Any], capsys: pytest.CaptureFixture, args: list[str]
) -> None:
    code, out, err = run_cli(capsys, "trace", *args, "--db", str(stores["hostile"]))
    assert code == 0, err
    assert control_characters(out) == []
    header = out.splitlines()[0]
    assert header.startswith("key ") and header.endswith("1 message(s)"), out


# -- export ------------------------------------------------------------------------------------------


def test_sql_injection_through_export_exports_nothing(
    stores: dict[str, Any], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    code, printed, _ = run_cli(capsys, "export", "--db", str(stores["plain"]), "--out", str(out), "--key", INJECTION)
    assert code == 0
    assert printed == f"keytrace: wrote 0 events to {out}\n"
    assert pq.read_table(out).num_rows == 0
    with Store(stores["plain"], read_only=True) as store:
        assert store.export(tmp_path / "a.parquet", key=INJECTION.encode()) == 0
        assert store.export(tmp_path / "b.csv", fmt="csv", key=INJECTION.encode()) == 0
        assert store.export(tmp_path / "c.parquet", key=b"%", prefix=True) == 0
        assert store.export(tmp_path / "d.parquet", key=b"_", prefix=True) == 0
        assert store.export(tmp_path / "e.duckdb", fmt="duckdb", key=INJECTION.encode()) == 0
        assert store.export(tmp_path / "all.parquet") == 2 * len(ORDINARY)


def test_export_of_an_sql_key_holds_only_that_key(stores: dict[str, Any], tmp_path: Path) -> None:
    with Store(stores["hostile"], read_only=True) as store:
        for i, key in enumerate((INJECTION.encode(), b"\x00", b"100%")):
            path = tmp_path / f"{i}.parquet"
            n = store.export(path, key=key, prefix=key == b"100%")
            keys = pq.read_table(path).column("key").to_pylist()
            assert n == len(keys) == 2 and set(keys) == {key if key != b"100%" else b"100%_done"}


# -- dashboard ---------------------------------------------------------------------------------------


def shown(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "warning", "error", "code") for e in getattr(at, kind))


@pytest.mark.parametrize(("text", "mode"), [(INJECTION, "exact"), (INJECTION, "prefix"), ("%", "prefix")])
def test_sql_injection_through_dashboard_search_finds_nothing(
    stores: dict[str, Any], open_app: Any, text: str, mode: str
) -> None:
    at = open_app(stores["plain"], key=text, mode=mode)
    assert not at.exception
    assert "Not found" in shown(at)
    assert "order-" not in shown(at)


@pytest.mark.parametrize("name", ["ansi", "newline", "markdown and html", "or 1=1"])
def test_dashboard_shows_a_hostile_key(stores: dict[str, Any], open_app: Any, name: str) -> None:
    key = HOSTILE[name]
    at = open_app(stores["hostile"], key=key.decode())
    assert not at.exception
    partition, offset = stores["where"][key]
    assert f"partition {partition} · offset {offset}**" in shown(at)
    assert control_characters(shown(at)) == []
