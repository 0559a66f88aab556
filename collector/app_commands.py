"""`keytrace serve`, `dashboard` and `demo`: the collector and the Streamlit server in one process.

DuckDB lets one process own a file, so the pages query the collector's own Store
(one cursor per thread) instead of opening the file a second time.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collector.options import DEFAULT_EVENTS_TOPIC


def run_streamlit(host: str, port: int) -> None:
    """Start the Streamlit server in this process (blocks until it stops)."""
    from streamlit.web import bootstrap

    flags: dict[str, Any] = {
        "server.address": host,
        "server.port": port,
        "server.headless": True,
        "server.fileWatcherType": "none",
        "server.runOnSave": False,
        "browser.gatherUsageStats": False,
        "global.developmentMode": False,
        "client.toolbarMode": "minimal",
        "theme.base": "light",
    }
    app = Path(str(importlib.resources.files("dashboard").joinpath("app.py")))
    bootstrap.load_config_options(flag_options=flags)
    bootstrap.run(str(app), False, [], flags)


class CollectorThread:
    """The collector loop on its own thread; `stop()` ends the loop before the store closes."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector
        self.event = threading.Event()
        self.thread = threading.Thread(target=collector.run, args=(self.event,), name="keytrace-collector", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.event.set()
        self.thread.join(timeout)


def start_collector(db: str, bootstrap_servers: str, events_topic: str) -> tuple[Any, Any, CollectorThread]:
    from collector.collect import Collector
    from collector.sinks import adopt_store
    from collector.store import Store

    store = Store(db)
    adopt_store(store, db)
    collector = Collector(store, bootstrap_servers, events_topic)
    return store, collector, CollectorThread(collector)


def cmd_serve(args: argparse.Namespace) -> int:
    from dashboard import runtime

    store, collector, loop = start_collector(args.db, args.bootstrap_servers, args.events_topic)
    runtime.configure(
        mode="serve",
        store=store,
        collector=collector,
        bootstrap_servers=args.bootstrap_servers,
        events_topic=args.events_topic,
        extras={"db": args.db},
    )
    print(f"keytrace serve: collecting {args.events_topic} into {args.db}", flush=True)
    print(f"keytrace serve: dashboard on http://{args.host}:{args.port}", flush=True)
    try:
        run_streamlit(args.host, args.port)
    finally:
        loop.stop()
        collector.close()
        store.close()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from collector.cli import _open_store
    from dashboard import runtime

    store = _open_store(args.db, read_only=True)
    runtime.configure(mode="dashboard", store=store, extras={"db": args.db})
    print(f"keytrace dashboard: {args.db} (read-only) on http://{args.host}:{args.port}", flush=True)
    try:
        run_streamlit(args.host, args.port)
    finally:
        store.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from collector.demo import Demo
    from collector.mockcluster import MockCluster
    from dashboard import runtime

    db = args.db or os.path.join(tempfile.mkdtemp(prefix="keytrace-demo-"), "demo.duckdb")
    cluster = MockCluster(num_brokers=3)
    topic = DEFAULT_EVENTS_TOPIC
    cluster.create_topic(topic, partitions=4, replication_factor=3)
    store, collector, loop = start_collector(db, cluster.bootstrap_servers, topic)
    demo = Demo(cluster, sink=f"kafka://{cluster.bootstrap_servers}/{topic}", scheduled_faults=not args.no_faults)
    demo.start()
    runtime.configure(
        mode="demo",
        store=store,
        collector=collector,
        demo=demo,
        bootstrap_servers=cluster.bootstrap_servers,
        events_topic=topic,
        extras={"db": db},
    )
    print(f"keytrace demo: mock cluster {cluster.bootstrap_servers}, store {db}", flush=True)
    print(f"keytrace demo: dashboard on http://{args.host}:{args.port}", flush=True)
    try:
        run_streamlit(args.host, args.port)
    finally:
        demo.stop()
        loop.stop()
        collector.close()
        store.close()
        cluster.close()
    return 0


def add_parsers(sub: Any, add_db: Callable[..., None]) -> None:
    def web(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")

    p = sub.add_parser("serve", help="run the collector and the dashboard in one process")
    p.add_argument("--bootstrap-servers", required=True, help="cluster that holds the events topic")
    p.add_argument("--events-topic", default=DEFAULT_EVENTS_TOPIC, help="events topic name")
    add_db(p, required=False, default="keytrace.duckdb")
    web(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("dashboard", help="open a trace store read-only in the dashboard (incident review)")
    add_db(p)
    web(p)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("demo", help="run a traced workload with faults on an embedded mock cluster, with the dashboard")
    add_db(p, required=False, default=None)
    p.add_argument("--no-faults", action="store_true", help="do not inject faults on a schedule")
    web(p)
    p.set_defaults(func=cmd_demo)
