"""`keytrace demo` from a cold start: live data on the pages within 30 seconds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from browser_support import ARTIFACTS, free_port, wait_healthy


def test_demo_shows_live_data_within_30_seconds(browser: Any, tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "demo.log", "w")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "demo", "--port", str(port), "--db", str(tmp_path / "demo.duckdb")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=30)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        shown_at = None
        # Load the page once: the sidebar's collector status refreshes itself every 5 s.
        page.goto(f"{url}/status")
        rows = page.locator("[data-testid='stMetric']", has_text="rows stored").locator("[data-testid='stMetricValue']")
        while time.monotonic() - started < 30:
            try:
                if rows.first.inner_text(timeout=1000).strip() not in ("", "0"):
                    shown_at = time.monotonic() - started
                    break
            except Exception:
                pass
            time.sleep(0.5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        time.sleep(1.0)
        page.screenshot(path=str(ARTIFACTS / "demo-overview.png"), full_page=True)
        assert shown_at is not None, f"no live producer data within 30 s; see {tmp_path / 'demo.log'}"
        # The search page's recent keys link into real lifecycles.
        page.goto(f"{url}/?key=order-3")
        page.get_by_text("message(s) under key").first.wait_for(timeout=10_000)
        time.sleep(1.5)
        page.screenshot(path=str(ARTIFACTS / "demo-key-search.png"), full_page=True)
        page.goto(f"{url}/producer-health")
        page.locator("[data-testid='stVegaLiteChart']").first.wait_for(timeout=20_000)
        # The client picker offers the demo's producers by client.id.
        picked = page.locator("[data-testid='stSelectbox'] input[role='combobox']").first.input_value()
        assert any(c in picked for c in ("orders-service", "clickstream", "inventory-sync")), picked
        time.sleep(1.5)
        page.screenshot(path=str(ARTIFACTS / "demo-producer-health.png"), full_page=True)
        page.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
