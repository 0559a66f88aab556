"""Browser tier: `keytrace serve` in a subprocess, Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, wait_healthy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") or os.environ.get("KEYTRACE_REQUIRE_KAFKA") == "1":
            pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/setup.sh --test does)")
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def serve(mock_cluster: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`keytrace serve` against the mock cluster, on a free port of 127.0.0.1; stopped at the end."""
    port = free_port()
    topic = f"_keytrace.events.{port}"
    mock_cluster.create_topic(topic, partitions=4, replication_factor=3)
    db = tmp_path / "serve.duckdb"
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-m", "collector.cli", "serve", "--bootstrap-servers", mock_cluster.bootstrap_servers]
    cmd += ["--events-topic", topic, "--db", str(db), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield {"url": url, "topic": topic, "db": db, "log": tmp_path / "serve.log", "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
