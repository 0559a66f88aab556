"""Every dashboard page, run headless with AppTest on an empty and on a populated trace store.

The populated store is written the way users write it: TracedProducer and TracedConsumer
with a duckdb:// sink against the mock cluster, closed so the file is released, then
opened read-only by the dashboard through KEYTRACE_DB.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import dashboard
from collector import TracedConsumer, TracedProducer
from collector.collect import CollectorStats
from collector.mockcluster import MockCluster
from collector.store import Store
from dashboard import runtime

APP = Path(dashboard.__file__).parent / "app.py"
PAGES = [
    "pages/search.py",
    "pages/overview.py",
    "pages/producers.py",
    "pages/consumers.py",
    "pages/anomalies.py",
    "pages/config_review.py",
    "pages/export.py",
]
INJECTION = "' OR 1=1 --"
BINARY_KEY = bytes([0, 1, 2, 255])


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory, mock_cluster: MockCluster) -> dict[str, Any]:
    """A store with acked, failed and rejected sends, a binary key, two consumer groups and stats."""
    base = tmp_path_factory.mktemp("dash")
    db = base / "trace.duckdb"
    sink = f"duckdb://{db}"
    options = {"spool_dir": str(base / "spool"), "stats_interval_ms": 100}
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    mock_cluster.create_topic(topic, partitions=3, replication_factor=1)
    servers = mock_cluster.bootstrap_servers

    acked: dict[bytes, tuple[int, int]] = {}

    def delivered(err: object, msg: confluent_kafka.Message) -> None:
        if err is None:
            acked[msg.key()] = (msg.partition(), msg.offset())

    producer = TracedProducer(
        {"bootstrap.servers": servers, "client.id": "orders-svc", "linger.ms": 2, "acks": "all"},
        sink=sink,
        trace_options=options,
        on_delivery=delivered,
    )
    # An explicit partition the topic does not have: a delivery error with a key. It goes
    # first, while the producer has no metadata for the topic yet; once it has, librdkafka
    # refuses such a message in produce() itself instead.
    producer.produce(topic, b"lost", b"doomed-1", partition=7)
    for i in range(40):
        producer.produce(topic, b"v" * 50, f"order-{i}".encode())
    producer.produce(topic, b"bin", BINARY_KEY)
    assert producer.flush(10) == 0
    producer.poll(0.3)  # a statistics window or two
    producer.close()

    tiny = TracedProducer(
        {"bootstrap.servers": servers, "client.id": "tiny-queue", "queue.buffering.max.messages": 1},
        sink=sink,
        trace_options=options,
    )
    tiny.produce(topic, b"a", b"sku-1")
    with pytest.raises(BufferError):
        tiny.produce(topic, b"b", b"sku-2")
    tiny.flush(10)
    tiny.close()

    stored = len(acked) + 1  # and tiny-queue's sku-1

    def read_all(group: str) -> None:
        consumer = TracedConsumer(
            {"bootstrap.servers": servers, "group.id": group, "auto.offset.reset": "earliest"},
            sink=sink,
            trace_options=options,
        )
        consumer.subscribe([topic])
        seen = 0
        for _ in range(40):
            seen += sum(1 for m in consumer.consume(100, 0.5) if m.error() is None)
            if seen >= stored:
                break
        consumer.close()

    # Both groups join at once: each join waits out the group's initial rebalance delay.
    readers = [threading.Thread(target=read_all, args=(group,)) for group in ("billing", "audit")]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
    # Written after the traced consumers stopped: a message keytrace never saw, for the topic read.
    plain = confluent_kafka.Producer({"bootstrap.servers": servers, "partitioner": "murmur2_random"})
    untraced: dict[str, int] = {}
    plain.produce(topic, b"raw", b"untraced-1", on_delivery=lambda e, m: untraced.update(p=m.partition(), o=m.offset()))
    assert plain.flush(10) == 0

    with Store(db, read_only=True) as store:
        counts = store.counts()
    assert counts["consume"] == 2 * stored and counts["error"] == 1 and counts["reject"] == 1
    return {"db": db, "topic": topic, "acked": acked, "servers": servers, "untraced": untraced}


@pytest.fixture
def empty_db(tmp_path: Path) -> Path:
    db = tmp_path / "empty.duckdb"
    Store(db).close()
    return db


def texts(at: AppTest) -> str:
    """Everything a reader sees as text on the page, in one string."""
    parts: list[str] = []
    for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success", "code"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [str(e.label) + " " + str(e.value) for e in at.metric]
    return "\n".join(parts)


def frames(at: AppTest) -> str:
    return "\n".join(df.value.to_string() for df in at.dataframe)


def charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


@pytest.mark.parametrize("page", PAGES)
def test_every_page_explains_an_empty_store(open_app: Callable[..., AppTest], empty_db: Path, page: str) -> None:
    at = open_app(empty_db, page)
    assert not at.exception
    assert at.title, "every page has a title"
    shown = texts(at)
    assert "No events yet" in shown or "No consumer events yet" in shown or "No producer config snapshots" in shown
    assert charts(at) == 0


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_a_populated_store(
    open_app: Callable[..., AppTest], populated: dict[str, Any], page: str
) -> None:
    at = open_app(populated["db"], page)
    assert not at.exception
    shown, tables = texts(at), frames(at)
    if page == "pages/search.py":
        labels = [link.proto.label for link in at.get("page_link")]
        assert any(label.startswith("order-") for label in labels)
    elif page == "pages/overview.py":
        assert "orders-svc" in tables and "tiny-queue" in tables
        assert "billing" in tables and "audit" in tables
        assert "degraded" in tables  # the failed delivery and the full queue
    elif page == "pages/producers.py":
        assert charts(at) == 10
        assert "sent (msg/s)" in shown
    elif page == "pages/consumers.py":
        assert charts(at) == 4
        assert at.selectbox[0].options == ["audit", "billing"]
    elif page == "pages/anomalies.py":
        assert "Failed · 2" in shown
        assert "doomed-1" in tables and "sku-2" in tables
    elif page == "pages/config_review.py":
        assert "orders-svc" in shown and "tiny-queue" in shown
        assert any("buffer memory" in t.value.to_string() and "fail" in t.value.to_string() for t in at.table)
    elif page == "pages/export.py":
        assert "events** match" in shown


def test_sidebar_says_what_is_being_looked_at(open_app: Callable[..., AppTest], populated: dict[str, Any]) -> None:
    at = open_app(populated["db"], "pages/anomalies.py")
    sidebar = "\n".join(str(e.value) for e in [*at.sidebar.markdown, *at.sidebar.caption])
    assert "read-only review" in sidebar
    assert str(populated["db"]) in sidebar


def test_key_deep_link_opens_the_lifecycle(open_app: Callable[..., AppTest], populated: dict[str, Any]) -> None:
    partition, offset = populated["acked"][b"order-3"]
    at = open_app(populated["db"], key="order-3")
    assert not at.exception
    shown = texts(at)
    assert f"partition {partition} · offset {offset}** — consumed" in shown
    assert at.code[0].value.endswith("/?key=order-3")
    assert charts(at) == 1
    events = at.dataframe[0].value
    assert list(events["kind"][:2]) == ["send", "ack"]
    assert list(events["kind"]).count("consume") == 2
    assert set(events["lane"]) >= {"producer", "broker", "group billing", "group audit"}


def test_position_deep_link_finds_the_key(open_app: Callable[..., AppTest], populated: dict[str, Any]) -> None:
    partition, offset = populated["acked"][b"order-5"]
    at = open_app(populated["db"], topic=populated["topic"], partition=str(partition), offset=str(offset))
    assert not at.exception
    assert "has key `order-5`" in texts(at)
    assert at.code[0].value.endswith(f"?topic={populated['topic']}&partition={partition}&offset={offset}")


def test_hex_and_prefix_searches(open_app: Callable[..., AppTest], populated: dict[str, Any]) -> None:
    at = open_app(populated["db"], key=BINARY_KEY.hex(), mode="hex")
    assert not at.exception
    partition, offset = populated["acked"][BINARY_KEY]
    assert f"partition {partition} · offset {offset}" in texts(at)

    at = open_app(populated["db"], key="order-1", mode="prefix")
    assert not at.exception
    # order-1 and order-10 … order-19
    assert "**11 message(s)** under keys starting with `order-1`" in texts(at)


def test_sql_injection_through_search_finds_nothing(
    open_app: Callable[..., AppTest], populated: dict[str, Any]
) -> None:
    for mode in ("exact", "prefix"):
        at = open_app(populated["db"], key=INJECTION, mode=mode)
        assert not at.exception
        assert "Not found" in texts(at)
        assert charts(at) == 0
    at = open_app(populated["db"])
    at.text_input(key="key").set_value(INJECTION).run()
    assert not at.exception
    assert "keytrace never saw the key" in texts(at)


def test_sql_injection_through_export_matches_nothing(
    open_app: Callable[..., AppTest], populated: dict[str, Any]
) -> None:
    at = open_app(populated["db"], "pages/export.py")
    at.radio[0].set_value("one key").run()
    at.text_input(key="export-key").set_value(INJECTION).run()
    assert not at.exception
    assert "**0 events** match" in texts(at)
    assert not at.button or all(b.label != "Prepare the file" for b in at.button)


def test_export_offers_the_file(open_app: Callable[..., AppTest], populated: dict[str, Any]) -> None:
    at = open_app(populated["db"], "pages/export.py")
    at.radio[0].set_value("one key").run()
    at.text_input(key="export-key").set_value("order-3").run()
    assert "events** match" in texts(at)
    at.button[0].click().run()
    assert not at.exception
    [download] = at.get("download_button")
    assert download.proto.label.startswith("Download Parquet (")


def test_unknown_key_reads_the_topic_instead(open_app: Callable[..., AppTest], populated: dict[str, Any]) -> None:
    at = open_app(populated["db"], key="untraced-1")
    assert "keytrace never saw the key `untraced-1`" in texts(at)
    at.selectbox[0].set_value(populated["topic"])
    at.text_input[1].set_value(populated["servers"])
    at.run()
    at.button[0].click().run()
    assert not at.exception
    shown = texts(at)
    assert "This is a topic read, not a trace" in shown
    assert f"partition **{populated['untraced']['p']}** of 3 (murmur2_random)" in shown
    assert at.dataframe[-1].value["offset"].tolist() == [populated["untraced"]["o"]]


class FaultStub:
    """The demo controller's interface, without a workload behind it."""

    def __init__(self) -> None:
        self.injected: list[str] = []

    def faults(self) -> list[tuple[str, str]]:
        return [("broker_down", "Take a broker down"), ("rtt", "Slow a broker down")]

    def inject(self, name: str) -> str:
        self.injected.append(name)
        return f"{name} injected"


class CollectorStub:
    def __init__(self) -> None:
        self.stats = CollectorStats(records=1_250, rows=104_482, dead_letters=2, last_error="events topic: timed out")


def test_demo_mode_offers_fault_buttons_and_live_pages(populated: dict[str, Any]) -> None:
    store = Store(populated["db"], read_only=True)
    demo = FaultStub()
    runtime.reset()
    runtime.configure(
        mode="demo", store=store, demo=demo, collector=CollectorStub(), bootstrap_servers=populated["servers"]
    )
    st.cache_data.clear()
    try:
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert "mock cluster with faults" in "\n".join(m.value for m in at.sidebar.markdown)
        assert {m.label: m.value for m in at.sidebar.metric} == {
            "records": "1.2k",
            "rows stored": "104.5k",
            "dead letters": "2",
            "store errors": "0",
        }
        assert "events topic: timed out" in at.sidebar.error[0].value
        [button] = [b for b in at.sidebar.button if b.label == "rtt"]
        button.click().run()
        assert demo.injected == ["rtt"]
        at.switch_page("pages/producers.py").run()
        assert not at.exception
        assert at.toggle[0].value is True  # live refresh is on while collecting
        assert charts(at) == 10
    finally:
        runtime.reset()
        store.close()
