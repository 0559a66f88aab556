"""The key search page's query on a large store: from the query to data ready for the page.

    .venv/bin/python bench/bench_store.py --events 10000000 --dir /tmp/kt-store   # builds the store
    .venv/bin/python bench/bench_search.py --db /tmp/kt-store/store.duckdb --lookups 1000

For random keys of the store, it times what the search page does before drawing:
`dashboard.queries.lifecycle` (the Store's paired lifecycle), then for each message
`queries.lifecycle_events` (the rows of each message's timeline and table). Drawing
the charts is the browser's work and is not included. In the same run, the raw DuckDB baseline: the
same key's events with a plain `WHERE key = ?` on the same table.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

# The page's query helpers are st.cache_data functions; outside a server they warn on every call.
os.environ.setdefault("STREAMLIT_LOGGER_LEVEL", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import pct  # noqa: E402

from collector.store import Store  # noqa: E402
from dashboard import queries, runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="a store built by bench_store.py (or any keytrace store)")
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    store = Store(args.db, read_only=True)
    runtime.configure(store=store, mode="dashboard")
    cur = store.cursor()
    total = cur.execute("SELECT count(*) FROM events").fetchone()[0]
    sample = cur.execute(
        "SELECT key FROM (SELECT DISTINCT key FROM events USING SAMPLE 200000 ROWS) WHERE key IS NOT NULL LIMIT ?",
        [args.lookups],
    ).fetchall()
    keys = [k for (k,) in sample]
    random.Random(args.seed).shuffle(keys)
    db = queries.db_token()
    page, raw, sizes = [], [], []
    for key in keys:
        t0 = time.perf_counter()
        messages = queries.lifecycle(db, key, False, 200)
        for m in messages:
            queries.lifecycle_events(m)
        page.append(time.perf_counter() - t0)
        sizes.append(len(messages))
        t0 = time.perf_counter()
        cur.execute("SELECT * FROM events WHERE key = ?", [key]).fetchall()
        raw.append(time.perf_counter() - t0)
    store.close()
    print(f"store: {total:,} events; {len(keys)} random keys, {sum(sizes) / len(sizes):.1f} messages per key")
    for name, xs in (("search page data (lifecycle + timeline rows)", page), ("raw WHERE key = ?", raw)):
        ms = [x * 1000 for x in xs]
        print(f"{name:<55} p50 {pct(ms, 50):7.2f} ms  p99 {pct(ms, 99):7.2f} ms  max {max(ms):7.2f} ms")


if __name__ == "__main__":
    main()
