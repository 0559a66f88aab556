"""Fixtures shared by every tier: a mock cluster, unique topics, a private spool dir."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.mockcluster import MockCluster


@pytest.fixture(autouse=True)
def _private_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test spools into its own directory, never the user's ~/.cache."""
    spool = tmp_path / "spool"
    monkeypatch.setenv("KEYTRACE_SPOOL_DIR", str(spool))
    monkeypatch.delenv("KEYTRACE_SINK", raising=False)
    return spool


@pytest.fixture(scope="session")
def mock_cluster() -> Iterator[MockCluster]:
    """librdkafka's mock cluster with 3 brokers: the real protocol over real sockets."""
    with MockCluster(num_brokers=3) as cluster:
        yield cluster


_counter = itertools.count()


@pytest.fixture
def topic_name() -> str:
    return f"t{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def mock_topic(mock_cluster: MockCluster, topic_name: str) -> str:
    mock_cluster.create_topic(topic_name, partitions=4, replication_factor=3)
    return topic_name


@pytest.fixture
def spool_sink(tmp_path: Path) -> tuple[str, Path]:
    """A spool:// sink: batches land as files that the test reads back."""
    directory = tmp_path / "trace-spool"
    return f"spool://{directory}", directory


@pytest.fixture(params=["native", "python"])
def recorder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each per-message recorder: librdkafka's interceptor plugin, and pure Python."""
    from collector import native

    if request.param == "native" and not native.available():
        pytest.skip(f"native recorder unavailable: {native.unavailable_reason()}")
    monkeypatch.setenv("KEYTRACE_NATIVE", "1" if request.param == "native" else "0")
    return request.param


@pytest.fixture
def open_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Run the dashboard (Streamlit's AppTest) on a store file, optionally on another page and with query parameters."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import dashboard
    from dashboard import runtime

    app = Path(dashboard.__file__).parent / "app.py"

    def run(db: Path, page: str | None = None, **params: str) -> AppTest:
        monkeypatch.setenv(runtime.DB_ENV, str(db))
        runtime.reset()
        st.cache_data.clear()
        at = AppTest.from_file(str(app), default_timeout=60)
        for name, value in params.items():
            at.query_params[name] = value
        at.run()
        if page is not None and page != "pages/search.py":
            at.switch_page(page).run()
        return at

    yield run
    runtime.reset()
