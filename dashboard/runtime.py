"""What the dashboard pages share in one process: the store, the collector, the demo.

`keytrace serve` and `keytrace demo` configure this module before starting the
Streamlit server in the same process, so pages query the collector's own DuckDB
connection (one cursor per thread). `keytrace dashboard --db FILE` and tests set
KEYTRACE_DB instead, and the store is opened read-only on first use.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

DB_ENV = "KEYTRACE_DB"
READ_ONLY_ENV = "KEYTRACE_DB_READ_ONLY"


@dataclass
class Runtime:
    store: Any = None
    collector: Any = None
    demo: Any = None
    mode: str = "dashboard"  # "serve", "demo" or "dashboard"
    bootstrap_servers: str | None = None
    events_topic: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


_runtime = Runtime()
_lock = threading.Lock()


def configure(**values: Any) -> Runtime:
    with _lock:
        for k, v in values.items():
            setattr(_runtime, k, v)
        return _runtime


def get() -> Runtime:
    return _runtime


def store() -> Any:
    """The process's Store; opened from $KEYTRACE_DB (read-only by default) when none is set."""
    with _lock:
        if _runtime.store is None:
            path = os.environ.get(DB_ENV)
            if not path:
                return None
            from collector.store import Store

            read_only = os.environ.get(READ_ONLY_ENV, "1") != "0"
            _runtime.store = Store(path, read_only=read_only)
        return _runtime.store


def reset() -> None:
    """Forget everything (tests)."""
    global _runtime
    with _lock:
        if _runtime.store is not None and _runtime.mode == "dashboard":
            try:
                _runtime.store.close()
            except Exception:
                pass
        _runtime = Runtime()
