"""Build sample_data/keytrace-sample.duckdb: a short traced workload with faults.

    .venv/bin/python sample_data/generate.py [--seconds 45] [--out sample_data/keytrace-sample.duckdb]

It runs the demo workload (orders, clickstream, a producer with a small buffer, three
consumer groups) on librdkafka's mock cluster with a broker outage, retriable produce
errors and added latency, writing traces straight into a DuckDB file. Open the result
with `keytrace dashboard --db sample_data/keytrace-sample.duckdb`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.demo import Demo  # noqa: E402
from collector.mockcluster import MockCluster  # noqa: E402
from collector.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--out", default=str(Path(__file__).with_name("keytrace-sample.duckdb")))
    args = ap.parse_args()
    out = Path(args.out)
    for p in (out, out.with_name(out.name + ".wal")):
        p.unlink(missing_ok=True)
    with MockCluster(num_brokers=3) as cluster:
        demo = Demo(cluster, sink=f"duckdb://{out}", scheduled_faults=False).start()
        start = time.monotonic()
        faults = [(8, "produce_errors"), (14, "broker_down"), (26, "rtt"), (34, "leader_move")]
        for at, name in faults:
            time.sleep(max(0.0, start + at * args.seconds / 45 - time.monotonic()))
            print(demo.inject(name), flush=True)
        time.sleep(max(0.0, start + args.seconds - time.monotonic()))
        demo.stop()
    with Store(out) as store:
        print(store.counts())


if __name__ == "__main__":
    main()
