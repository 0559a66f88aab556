"""Turn one librdkafka statistics JSON document into the typed columns of the stats table.

Histograms (rtt, int_latency, outbuf_latency, batchsize, batchcnt) are windows that
librdkafka resets at each emit, so each row holds that window only. Across brokers
and topics a row keeps the worst percentile, which is what a health view alarms on;
the raw document is kept beside it for anything finer.
"""

from __future__ import annotations

import json
from typing import Any

STAT_COLUMNS = (
    "name",
    "client_type",
    "group_id",
    "msg_cnt",
    "msg_max",
    "msg_size",
    "msg_size_max",
    "tx",
    "txmsgs",
    "txmsg_bytes",
    "rxmsgs",
    "txerrs",
    "txretries",
    "req_timeouts",
    "connects",
    "disconnects",
    "partition_retries",
    "rtt_p50_us",
    "rtt_p99_us",
    "int_latency_p50_us",
    "int_latency_p99_us",
    "outbuf_latency_p50_us",
    "outbuf_latency_p99_us",
    "batchsize_p50",
    "batchsize_p99",
    "batchsize_avg",
    "batchcnt_p50",
    "batchcnt_p99",
    "batchcnt_avg",
    "throttle_ms",
    "consumer_lag",
    "brokers_up",
    "brokers_total",
)


def _worst(windows: list[dict[str, Any]], field: str) -> int | None:
    vals = [w.get(field) for w in windows if w and w.get("cnt", 0) > 0]
    vals = [v for v in vals if isinstance(v, int | float)]
    return int(max(vals)) if vals else None


def _weighted_avg(windows: list[dict[str, Any]]) -> float | None:
    total = sum(w.get("cnt", 0) for w in windows if w)
    if not total:
        return None
    return sum(w.get("avg", 0) * w.get("cnt", 0) for w in windows if w) / total


def parse_stats(doc: str) -> dict[str, Any]:
    """Typed columns of one stats emit; raises ValueError on a document that is not JSON."""
    s = json.loads(doc)
    if not isinstance(s, dict):
        raise ValueError("statistics document is not a JSON object")
    brokers = [b for b in (s.get("brokers") or {}).values() if isinstance(b, dict)]
    # Bootstrap placeholders (nodeid -1) never carry traffic after metadata arrives.
    real = [b for b in brokers if b.get("nodeid", -1) != -1] or brokers
    topics = [t for t in (s.get("topics") or {}).values() if isinstance(t, dict)]
    partitions = [
        p
        for t in topics
        for p in (t.get("partitions") or {}).values()
        if isinstance(p, dict) and p.get("partition", -1) != -1
    ]
    rtt = [b.get("rtt") for b in real]
    int_lat = [b.get("int_latency") for b in real]
    outbuf = [b.get("outbuf_latency") for b in real]
    throttle = [b.get("throttle") for b in real]
    bsize = [t.get("batchsize") for t in topics]
    bcnt = [t.get("batchcnt") for t in topics]
    lags = [p.get("consumer_lag", -1) for p in partitions]
    lags = [x for x in lags if isinstance(x, int) and x >= 0]
    cgrp = s.get("cgrp") or {}
    return {
        "name": s.get("name"),
        "client_type": s.get("type"),
        "group_id": cgrp.get("group_id") if isinstance(cgrp, dict) else None,
        "msg_cnt": s.get("msg_cnt"),
        "msg_max": s.get("msg_max"),
        "msg_size": s.get("msg_size"),
        "msg_size_max": s.get("msg_size_max"),
        "tx": s.get("tx"),
        "txmsgs": s.get("txmsgs"),
        "txmsg_bytes": s.get("txmsg_bytes"),
        "rxmsgs": s.get("rxmsgs"),
        "txerrs": sum(b.get("txerrs", 0) for b in brokers),
        "txretries": sum(b.get("txretries", 0) for b in brokers),
        "req_timeouts": sum(b.get("req_timeouts", 0) for b in brokers),
        "connects": sum(b.get("connects", 0) for b in brokers),
        "disconnects": sum(b.get("disconnects", 0) for b in brokers),
        "partition_retries": sum(max(0, p.get("txmsgs", 0) - p.get("msgs", 0)) for p in partitions),
        "rtt_p50_us": _worst(rtt, "p50"),
        "rtt_p99_us": _worst(rtt, "p99"),
        "int_latency_p50_us": _worst(int_lat, "p50"),
        "int_latency_p99_us": _worst(int_lat, "p99"),
        "outbuf_latency_p50_us": _worst(outbuf, "p50"),
        "outbuf_latency_p99_us": _worst(outbuf, "p99"),
        "batchsize_p50": _worst(bsize, "p50"),
        "batchsize_p99": _worst(bsize, "p99"),
        "batchsize_avg": _weighted_avg(bsize),
        "batchcnt_p50": _worst(bcnt, "p50"),
        "batchcnt_p99": _worst(bcnt, "p99"),
        "batchcnt_avg": _weighted_avg(bcnt),
        "throttle_ms": _worst(throttle, "max"),
        "consumer_lag": sum(lags) if lags else None,
        "brokers_up": sum(1 for b in real if b.get("state") == "UP"),
        "brokers_total": len(real),
    }
