"""What a person sees: a key's partition and offset in the browser within 5 s of the ack,
and every page rendering its charts. Screenshots land in artifacts/screenshots/."""

from __future__ import annotations

import time
from typing import Any

from browser_support import ARTIFACTS

from collector import TracedConsumer, TracedProducer

PAGES = {
    "": "Key search",
    "status": "Overview",
    "producer-health": "Producer health",
    "consumer-groups": "Consumers",
    "anomaly-report": "Anomalies",
    "config-review": "Config review",
    "export-traces": "Export",
}


def produce(mock_cluster: Any, topic: str, sink: str, keys: list[str]) -> dict[str, tuple[int, int, float]]:
    acked: dict[str, tuple[int, int, float]] = {}

    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None
        acked[msg.key().decode()] = (msg.partition(), msg.offset(), time.monotonic())

    p = TracedProducer(
        {"bootstrap.servers": mock_cluster.bootstrap_servers, "client.id": "browser-test", "linger.ms": 2},
        sink=sink,
        on_delivery=on_delivery,
    )
    for k in keys:
        p.produce(topic, b'{"total": 42}', k)
    p.flush(10)
    p.close()
    return acked


def test_key_visible_within_five_seconds_of_ack(
    browser: Any, serve: dict[str, Any], mock_topic: str, mock_cluster: Any
) -> None:
    sink = f"kafka://{mock_cluster.bootstrap_servers}/{serve['topic']}"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(serve["url"] + "/")  # warm the server's first script run
    page.get_by_text("Key search").first.wait_for(timeout=30_000)

    acked = produce(mock_cluster, mock_topic, sink, [f"order-{i}" for i in range(50)])
    key = "order-17"
    partition, offset, acked_at = acked[key]
    wanted = f"partition {partition} · offset {offset}"
    seen_after = None
    while time.monotonic() - acked_at < 5.0:
        page.goto(f"{serve['url']}/?key={key}")
        try:
            page.get_by_text(wanted).first.wait_for(timeout=1500)
            seen_after = time.monotonic() - acked_at
            break
        except Exception:
            continue
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if seen_after is not None:
        page.locator("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg").first.wait_for(
            timeout=10_000
        )
        time.sleep(1.0)  # let Vega finish drawing before the screenshot
    page.screenshot(path=str(ARTIFACTS / "key-lifecycle.png"), full_page=True)
    assert seen_after is not None, f"{wanted!r} not shown within 5 s of the ack; see {serve['log']}"
    assert seen_after <= 5.0
    # The deep link by position opens the same lifecycle.
    page.goto(f"{serve['url']}/?topic={mock_topic}&partition={partition}&offset={offset}")
    page.get_by_text(wanted).first.wait_for(timeout=10_000)
    page.close()


def test_every_page_renders(browser: Any, serve: dict[str, Any], mock_topic: str, mock_cluster: Any) -> None:
    sink = f"kafka://{mock_cluster.bootstrap_servers}/{serve['topic']}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # A couple of seconds of traffic so that statistics (1 s interval) have several windows.
    p = TracedProducer(
        {"bootstrap.servers": mock_cluster.bootstrap_servers, "client.id": "checkout", "statistics.interval.ms": 500},
        sink=sink,
    )
    c = TracedConsumer(
        {
            "bootstrap.servers": mock_cluster.bootstrap_servers,
            "group.id": "billing",
            "auto.offset.reset": "earliest",
            "statistics.interval.ms": 500,
        },
        sink=sink,
    )
    c.subscribe([mock_topic])
    end = time.monotonic() + 4
    i = 0
    while time.monotonic() < end:
        p.produce(mock_topic, b"x" * 200, f"cart-{i % 40}")
        p.poll(0)
        c.poll(0.01)
        i += 1
    p.flush(10)
    p.close()
    c.close()

    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    for path, title in PAGES.items():
        page.goto(f"{serve['url']}/{path}")
        page.get_by_role("heading", name=title).first.wait_for(timeout=30_000)
        page.wait_for_load_state("networkidle")
        if path == "producer-health":
            charts = page.locator("[data-testid='stVegaLiteChart']")
            charts.first.wait_for(timeout=20_000)
            page.locator("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg").first.wait_for(
                timeout=20_000
            )
            assert charts.count() >= 4, f"producer health shows {charts.count()} charts"
        assert page.locator("[data-testid='stException']").count() == 0, f"{path} shows an exception"
        time.sleep(1.0)  # let Vega finish drawing before the screenshot
        page.screenshot(path=str(ARTIFACTS / f"{path or 'key-search'}.png"), full_page=True)
    page.close()
