"""Every read the pages make: the Store's own API where it has one, parameterised SQL otherwise.

User input only ever reaches DuckDB as a bound parameter. Results are cached for a
few seconds per store (`db`, a token naming the open store), so that a page and its
live fragment do not run the same query twice per refresh.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import runtime

LIVE_TTL = 2
SEARCH_TTL = 5
# Live ranges end "now", so every refresh is a new cache key: bound what expired keys can hold.
live = st.cache_data(ttl=LIVE_TTL, max_entries=512, show_spinner=False)
cached = st.cache_data(ttl=SEARCH_TTL, max_entries=512, show_spinner=False)

OUTCOMES = {"send": "sent", "resend": "resent", "ack": "acked", "error": "failed", "reject": "rejected"}
RANGES: dict[str, int | None] = {"last 5 min": 300, "last 15 min": 900, "last 1 h": 3600, "all": None}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# librdkafka 2.x producer defaults, used when a client's config snapshot leaves a setting unset.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "message.timeout.ms": 300_000,
    "retries": 2_147_483_647,
    "enable.idempotence": False,
    "queue.buffering.max.messages": 100_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "batch.num.messages": 10_000,
    "connections.max.idle.ms": 0,
    "max.in.flight.requests.per.connection": 1_000_000,
}
ALIASES = {
    "acks": ("request.required.acks",),
    "message.timeout.ms": ("delivery.timeout.ms",),
    "retries": ("message.send.max.retries",),
    "linger.ms": ("queue.buffering.max.ms",),
    "max.in.flight.requests.per.connection": ("max.in.flight",),
}


def store() -> Any:
    return runtime.store()


def db_token() -> str:
    """A cache key for the open store: a new store (or a test's next file) never sees old results."""
    s = store()
    return "" if s is None else f"{id(s)}:{getattr(s, 'path', '')}"


def _df(sql: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
    return store().cursor().execute(sql, params or {}).df()


def _one(sql: str, params: dict[str, Any] | None = None) -> Any:
    row = store().cursor().execute(sql, params or {}).fetchone()
    return row[0] if row else None


# -- time ---------------------------------------------------------------------------


@live
def latest_ts(db: str) -> dt.datetime | None:
    return _one("SELECT max(ts) FROM (SELECT max(ts) AS ts FROM events UNION ALL SELECT max(ts) FROM stats)")


def anchor(db: str) -> dt.datetime:
    """'Now' for time ranges: the wall clock while collecting, the last record in a read-only review."""
    if runtime.get().mode in ("serve", "demo"):
        return dt.datetime.now(dt.UTC)
    return latest_ts(db) or dt.datetime.now(dt.UTC)


def window(db: str, label: str) -> tuple[dt.datetime, int, float]:
    """(since, bucket seconds, span seconds) of a named range; 'all' starts at the first record."""
    seconds = RANGES.get(label)
    end = anchor(db)
    if seconds is None:
        first = _one("SELECT min(ts) FROM (SELECT min(ts) AS ts FROM events UNION ALL SELECT min(ts) FROM stats)")
        span = max(1.0, (end - first).total_seconds()) if first else 60.0
        return EPOCH, _nice_bucket(span / 120), span
    return end - dt.timedelta(seconds=seconds), _nice_bucket(seconds / 60), float(seconds)


def _nice_bucket(seconds: float) -> int:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400):
        if seconds <= step:
            return step
    return int(math.ceil(seconds / 86400) * 86400)


# -- store overview -------------------------------------------------------------------


@live
def counts(db: str) -> dict[str, int]:
    """Events per kind."""
    return store().counts()


@live
def recent_keys(db: str, limit: int = 20) -> list[dict[str, Any]]:
    """The most recently active keys, each with the status of that activity."""
    return store().recent_keys(limit)


@live
def recent_failures(db: str, limit: int = 50) -> pd.DataFrame:
    return _df(
        """
        SELECT ts, kind, client_id, group_id, topic, key, error_name, error_message
        FROM events WHERE kind IN ('error', 'reject', 'client_error')
           OR (kind = 'commit' AND error_name IS NOT NULL AND error_name != '_NO_OFFSET')
        ORDER BY ts DESC LIMIT $limit
        """,
        {"limit": limit},
    )


# -- key search ----------------------------------------------------------------------


# Not cached: a key lookup takes milliseconds, and a cached "not found" would hide a
# message that was acknowledged a moment ago.
def lifecycle(db: str, key: bytes, prefix: bool, limit: int = 200) -> list[dict[str, Any]]:
    """Messages under a key (or a key prefix): the Store pairs sends, reports and consumptions."""
    return store().lifecycle(key, prefix=prefix, limit=limit)


def message_at(db: str, topic: str, partition: int, offset: int) -> dict[str, Any] | None:
    return store().message_at(topic, partition, offset)


@cached
def topic_partitioners(db: str, topic: str) -> list[str]:
    """The `partitioner` settings of producers that sent to this topic (most recent first)."""
    df = _df(
        """
        SELECT c.config FROM configs c
        WHERE c.client_type = 'producer'
          AND c.src IN (SELECT DISTINCT src FROM events WHERE kind = 'send' AND topic = $topic)
        ORDER BY c.ts DESC
        """,
        {"topic": topic},
    )
    out: list[str] = []
    for text in df["config"]:
        value = parse_config(text).get("partitioner")
        if isinstance(value, str) and value not in out:
            out.append(value)
    return out


@cached
def topics(db: str) -> list[str]:
    return [
        r[0]
        for r in store()
        .cursor()
        .execute("SELECT DISTINCT topic FROM events WHERE topic IS NOT NULL ORDER BY 1")
        .fetchall()
    ]


def _client_names(column: str, client_type: str) -> list[str]:
    """Distinct client ids or group ids (`column`) in the config snapshots and statistics of one client type."""
    rows = (
        store()
        .cursor()
        .execute(
            """
            WITH names AS (
                SELECT client_type, CASE WHEN $column = 'group_id' THEN group_id ELSE client_id END AS name
                FROM configs
                UNION ALL
                SELECT client_type, CASE WHEN $column = 'group_id' THEN group_id ELSE client_id END FROM stats
            )
            SELECT DISTINCT name FROM names WHERE client_type = $type AND name IS NOT NULL ORDER BY 1
            """,
            {"column": column, "type": client_type},
        )
        .fetchall()
    )
    return [r[0] for r in rows]


# -- producers ------------------------------------------------------------------------


@live
def producer_clients(db: str) -> list[str]:
    """Producer client ids, from the small tables: every traced client records its config when it starts."""
    return _client_names("client_id", "producer")


@live
def client_topics(db: str, client: str) -> list[str]:
    rows = (
        store()
        .cursor()
        .execute(
            "SELECT DISTINCT topic FROM events WHERE client_id = $client AND kind = 'send' AND topic IS NOT NULL ORDER BY 1",
            {"client": client},
        )
        .fetchall()
    )
    return [r[0] for r in rows]


@live
def throughput(db: str, client: str, topic: str | None, since: dt.datetime, bucket_s: int) -> pd.DataFrame:
    """t, topic, series (sent/acked/failed/rejected/resent), value in msg/s."""
    df = _df(
        """
        SELECT time_bucket(to_microseconds($bucket_us::BIGINT), ts) AS t, topic, kind, count(*) AS n
        FROM events
        WHERE kind IN ('send', 'resend', 'ack', 'error', 'reject') AND client_id = $client
          AND ($topic IS NULL OR topic = $topic) AND ts >= $since
        GROUP BY ALL ORDER BY t
        """,
        {"bucket_us": bucket_s * 1_000_000, "client": client, "topic": topic, "since": since},
    )
    df["series"] = df["kind"].map(OUTCOMES)
    df["value"] = df["n"] / bucket_s
    return df[["t", "topic", "series", "value"]]


@live
def ack_latency(db: str, client: str, topic: str | None, since: dt.datetime, bucket_s: int) -> pd.DataFrame:
    """t, series (p50/p95/p99), value in ms: msg.latency() of acknowledged messages."""
    df = _df(
        """
        SELECT time_bucket(to_microseconds($bucket_us::BIGINT), ts) AS t,
               quantile_cont(latency_us, 0.5) / 1000 AS p50,
               quantile_cont(latency_us, 0.95) / 1000 AS p95,
               quantile_cont(latency_us, 0.99) / 1000 AS p99
        FROM events
        WHERE kind = 'ack' AND client_id = $client AND ($topic IS NULL OR topic = $topic) AND ts >= $since
          AND latency_us IS NOT NULL
        GROUP BY ALL ORDER BY t
        """,
        {"bucket_us": bucket_s * 1_000_000, "client": client, "topic": topic, "since": since},
    )
    return _long(df, ["p50", "p95", "p99"])


@live
def errors(db: str, client: str | None, topic: str | None, since: dt.datetime) -> pd.DataFrame:
    """error_name, kind (where it surfaced), count."""
    df = _df(
        """
        SELECT coalesce(error_name, '(unnamed)') AS error_name, kind, count(*) AS count
        FROM events
        WHERE kind IN ('error', 'reject', 'client_error') AND ($client IS NULL OR client_id = $client)
          AND ($topic IS NULL OR topic = $topic OR kind = 'client_error') AND ts >= $since
        GROUP BY ALL ORDER BY count DESC
        """,
        {"client": client, "topic": topic, "since": since},
    )
    df["kind"] = df["kind"].map(
        {"error": "delivery report", "reject": "produce() raised", "client_error": "client (error_cb)"}
    )
    return df


_STATS_SQL = """
    WITH s AS (
        SELECT ts, src, msg_cnt, msg_max, msg_size, msg_size_max, batchsize_p50, batchsize_p99,
               batchcnt_p50, batchcnt_p99, rtt_p50_us, rtt_p99_us, consumer_lag, kt_dropped, kt_spooled,
               greatest(0, txretries - lag(txretries) OVER w) AS d_txretries,
               greatest(0, partition_retries - lag(partition_retries) OVER w) AS d_partition_retries,
               greatest(0, connects - lag(connects) OVER w) AS d_connects,
               greatest(0, disconnects - lag(disconnects) OVER w) AS d_disconnects,
               greatest(0, txerrs - lag(txerrs) OVER w) AS d_txerrs,
               greatest(0, req_timeouts - lag(req_timeouts) OVER w) AS d_req_timeouts,
               greatest(0, kt_dropped - lag(kt_dropped) OVER w) AS d_kt_dropped,
               greatest(0, kt_spooled - lag(kt_spooled) OVER w) AS d_kt_spooled
        FROM stats
        WHERE client_type = $client_type AND ($client IS NULL OR client_id = $client)
          AND ($group IS NULL OR group_id = $group) AND ts >= $since
        WINDOW w AS (PARTITION BY src ORDER BY seq)
    ), per_src AS (
        SELECT time_bucket(to_microseconds($bucket_us::BIGINT), ts) AS t, src,
               max(100.0 * msg_cnt / nullif(msg_max, 0)) AS pressure_msgs,
               max(100.0 * msg_size / nullif(msg_size_max, 0)) AS pressure_bytes,
               median(batchsize_p50) AS batch_bytes_p50, max(batchsize_p99) AS batch_bytes_p99,
               median(batchcnt_p50) AS batch_msgs_p50, max(batchcnt_p99) AS batch_msgs_p99,
               median(rtt_p50_us) / 1000 AS rtt_p50, max(rtt_p99_us) / 1000 AS rtt_p99,
               arg_max(consumer_lag, ts) AS lag, max(kt_dropped) AS kt_dropped_total,
               max(kt_spooled) AS kt_spooled_total,
               sum(d_txretries) AS txretries, sum(d_partition_retries) AS partition_retries,
               sum(d_connects) AS connects, sum(d_disconnects) AS disconnects, sum(d_txerrs) AS txerrs,
               sum(d_req_timeouts) AS req_timeouts, sum(d_kt_dropped) AS kt_dropped, sum(d_kt_spooled) AS kt_spooled
        FROM s GROUP BY ALL
    )
    SELECT t, max(pressure_msgs) AS pressure_msgs, max(pressure_bytes) AS pressure_bytes,
           median(batch_bytes_p50) AS batch_bytes_p50, max(batch_bytes_p99) AS batch_bytes_p99,
           median(batch_msgs_p50) AS batch_msgs_p50, max(batch_msgs_p99) AS batch_msgs_p99,
           median(rtt_p50) AS rtt_p50, max(rtt_p99) AS rtt_p99, sum(lag) AS lag,
           sum(kt_dropped_total) AS kt_dropped_total, sum(kt_spooled_total) AS kt_spooled_total,
           sum(txretries) AS txretries, sum(partition_retries) AS partition_retries, sum(connects) AS connects,
           sum(disconnects) AS disconnects, sum(txerrs) AS txerrs, sum(req_timeouts) AS req_timeouts,
           sum(kt_dropped) AS kt_dropped, sum(kt_spooled) AS kt_spooled
    FROM per_src GROUP BY t ORDER BY t
"""


@live
def stats_series(
    db: str, client_type: str, client: str | None, group: str | None, since: dt.datetime, bucket_s: int
) -> pd.DataFrame:
    """One row per time bucket of a client's (or a group's) statistics; counters are per-bucket deltas."""
    return _df(
        _STATS_SQL,
        {
            "client_type": client_type,
            "client": client,
            "group": group,
            "since": since,
            "bucket_us": bucket_s * 1_000_000,
        },
    )


@live
def resends(db: str, client: str, topic: str | None, since: dt.datetime, bucket_s: int) -> pd.DataFrame:
    return _df(
        """
        SELECT time_bucket(to_microseconds($bucket_us::BIGINT), ts) AS t, count(*) AS resends
        FROM events WHERE kind = 'resend' AND client_id = $client AND ($topic IS NULL OR topic = $topic)
          AND ts >= $since
        GROUP BY ALL ORDER BY t
        """,
        {"bucket_us": bucket_s * 1_000_000, "client": client, "topic": topic, "since": since},
    )


def retries_frame(stats: pd.DataFrame, resent: pd.DataFrame) -> pd.DataFrame:
    """Long frame of retries per interval: librdkafka's internal ones and keytrace's resends."""
    parts = [
        long(stats, {"partition_retries": "internal retries (partition)", "txretries": "broker request retries"}),
        long(resent, {"resends": "resends (keytrace policy)"}),
    ]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else _empty_long()


@live
def latest_configs(db: str, client_type: str | None = None) -> pd.DataFrame:
    """The newest config snapshot per client id (and group for consumers)."""
    return _df(
        """
        SELECT client_id, client_type, group_id, ts, config, src FROM configs
        WHERE ($client_type IS NULL OR client_type = $client_type)
        QUALIFY row_number() OVER (PARTITION BY client_id, client_type, group_id ORDER BY ts DESC) = 1
        ORDER BY client_type DESC, client_id
        """,
        {"client_type": client_type},
    )


def client_config(db: str, client: str, client_type: str = "producer") -> dict[str, Any]:
    df = latest_configs(db, client_type)
    rows = df[df["client_id"] == client]
    return parse_config(rows["config"].iloc[0]) if len(rows) else {}


def parse_config(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- consumers ----------------------------------------------------------------------


@live
def consumer_groups(db: str) -> list[str]:
    """Consumer group ids, from the config snapshots and statistics of traced consumers."""
    return _client_names("group_id", "consumer")


@live
def consume_rate(db: str, group: str, since: dt.datetime, bucket_s: int) -> pd.DataFrame:
    df = _df(
        """
        SELECT time_bucket(to_microseconds($bucket_us::BIGINT), ts) AS t, topic AS series, count(*) AS n
        FROM events WHERE kind = 'consume' AND group_id = $group AND ts >= $since
        GROUP BY ALL ORDER BY t
        """,
        {"bucket_us": bucket_s * 1_000_000, "group": group, "since": since},
    )
    df["value"] = df["n"] / bucket_s
    return df[["t", "series", "value"]]


@live
def e2e_latency(db: str, group: str, since: dt.datetime, bucket_s: int) -> pd.DataFrame:
    """Consume time minus the message's own timestamp, in ms (p50/p95/p99)."""
    df = _df(
        """
        SELECT time_bucket(to_microseconds($bucket_us::BIGINT), ts) AS t,
               quantile_cont(latency_us, 0.5) / 1000 AS p50,
               quantile_cont(latency_us, 0.95) / 1000 AS p95,
               quantile_cont(latency_us, 0.99) / 1000 AS p99
        FROM events WHERE kind = 'consume' AND group_id = $group AND ts >= $since AND latency_us IS NOT NULL
        GROUP BY ALL ORDER BY t
        """,
        {"bucket_us": bucket_s * 1_000_000, "group": group, "since": since},
    )
    return _long(df, ["p50", "p95", "p99"])


@live
def rebalances(db: str, group: str, since: dt.datetime, bucket_s: int) -> pd.DataFrame:
    """Rebalance callbacks per interval, by change (assign / revoke / lost)."""
    return _df(
        """
        SELECT time_bucket(to_microseconds($bucket_us::BIGINT), ts) AS t,
               coalesce(json_extract_string(detail, '$.change'), 'rebalance') AS series, count(*) AS value
        FROM events WHERE kind = 'rebalance' AND group_id = $group AND ts >= $since
        GROUP BY ALL ORDER BY t
        """,
        {"bucket_us": bucket_s * 1_000_000, "group": group, "since": since},
    )


# -- overview: health per client and group --------------------------------------------


@live
def producer_health(db: str, since: dt.datetime) -> pd.DataFrame:
    return _df(
        """
        WITH ev AS (
            SELECT client_id,
                   count(*) FILTER (WHERE kind = 'send') AS sent,
                   count(*) FILTER (WHERE kind = 'ack') AS acked,
                   count(*) FILTER (WHERE kind = 'error') AS failed,
                   count(*) FILTER (WHERE kind = 'reject') AS rejected,
                   count(*) FILTER (WHERE kind = 'resend') AS resent,
                   quantile_cont(latency_us, 0.99) FILTER (WHERE kind = 'ack') / 1000 AS ack_p99_ms,
                   mode(error_name) FILTER (WHERE kind IN ('error', 'reject')) AS top_error,
                   max(ts) AS last_event
            FROM events WHERE kind IN ('send', 'resend', 'ack', 'error', 'reject') AND ts >= $since
            GROUP BY client_id
        ), ce AS (
            SELECT client_id, count(*) AS client_errors, mode(error_name) AS top_client_error,
                   bool_or(error_name = '_ALL_BROKERS_DOWN') AS all_down
            FROM events WHERE kind = 'client_error' AND ts >= $since GROUP BY client_id
        ), st_src AS (
            SELECT client_id, src,
                   max(100.0 * greatest(msg_cnt / nullif(msg_max, 0), msg_size / nullif(msg_size_max, 0))) AS pressure,
                   max(kt_dropped) - min(kt_dropped) AS dropped, arg_max(kt_dropped, ts) AS dropped_total,
                   arg_max(brokers_up, ts) AS brokers_up, arg_max(brokers_total, ts) AS brokers_total,
                   max(ts) AS last_stats
            FROM stats WHERE client_type = 'producer' AND ts >= $since GROUP BY client_id, src
        ), st AS (
            SELECT client_id, max(pressure) AS max_pressure_pct, sum(dropped) AS kt_dropped,
                   sum(dropped_total) AS kt_dropped_total, min(brokers_up) AS brokers_up,
                   max(brokers_total) AS brokers_total, max(last_stats) AS last_stats
            FROM st_src GROUP BY client_id
        )
        SELECT * FROM ev FULL OUTER JOIN st USING (client_id) LEFT JOIN ce USING (client_id)
        WHERE client_id IS NOT NULL ORDER BY client_id
        """,
        {"since": since},
    )


@live
def consumer_health(db: str, since: dt.datetime) -> pd.DataFrame:
    return _df(
        """
        WITH ev AS (
            SELECT group_id,
                   count(*) FILTER (WHERE kind = 'consume') AS consumed,
                   quantile_cont(latency_us, 0.99) FILTER (WHERE kind = 'consume') / 1000 AS e2e_p99_ms,
                   count(*) FILTER (WHERE kind = 'commit' AND error_name IS NOT NULL
                                    AND error_name != '_NO_OFFSET') AS commit_errors,
                   count(*) FILTER (WHERE kind = 'rebalance') AS rebalances,
                   max(ts) FILTER (WHERE kind = 'consume') AS last_consume
            FROM events WHERE kind IN ('consume', 'commit', 'rebalance') AND group_id IS NOT NULL AND ts >= $since
            GROUP BY group_id
        ), lag_src AS (
            SELECT group_id, src, arg_min(consumer_lag, ts) AS first_lag, arg_max(consumer_lag, ts) AS last_lag,
                   max(kt_dropped) - min(kt_dropped) AS dropped
            FROM stats WHERE client_type = 'consumer' AND group_id IS NOT NULL AND ts >= $since
            GROUP BY group_id, src
        ), lg AS (
            SELECT group_id, sum(first_lag) AS first_lag, sum(last_lag) AS lag, sum(dropped) AS kt_dropped
            FROM lag_src GROUP BY group_id
        )
        SELECT * FROM ev FULL OUTER JOIN lg USING (group_id) WHERE group_id IS NOT NULL ORDER BY group_id
        """,
        {"since": since},
    )


def _n(row: dict[str, Any], key: str) -> float:
    """A numeric column of a health row; missing and null count as 0."""
    value = row.get(key)
    return 0 if value is None or pd.isna(value) else value


def producer_status(row: dict[str, Any]) -> tuple[str, str]:
    """(ok | degraded | failing | idle, reason) for one producer client's recent window."""
    sent, acked, failed, rejected = (int(_n(row, k)) for k in ("sent", "acked", "failed", "rejected"))
    outcomes = acked + failed
    top = row.get("top_error") or "errors"
    p99, pressure, dropped = _n(row, "ack_p99_ms"), _n(row, "max_pressure_pct"), int(_n(row, "kt_dropped"))
    up, total = int(_n(row, "brokers_up")), int(_n(row, "brokers_total"))
    all_down = row.get("all_down") is True
    if all_down and total and not up:
        return "failing", "all brokers down (error_cb _ALL_BROKERS_DOWN)"
    if failed and (not acked or failed / outcomes >= 0.1):
        return "failing", f"{failed / outcomes:.0%} of deliveries failed ({top})"
    reasons = []
    if failed:
        reasons.append(f"{failed:,} deliveries failed ({top})")
    if rejected:
        reasons.append(f"{rejected:,} produce() calls hit a full queue")
    if dropped:
        reasons.append(f"keytrace dropped {dropped:,} trace events")
    if pressure >= 80:
        reasons.append(f"queue {pressure:.0f}% full")
    if p99 >= 1000:
        reasons.append(f"p99 ack latency {p99:,.0f} ms")
    if total and up < total:
        reasons.append(f"{up}/{total} brokers up")
    if all_down:
        reasons.append("all brokers were down at some point")
    elif _n(row, "client_errors"):
        reasons.append(f"{int(_n(row, 'client_errors')):,} client errors ({row.get('top_client_error')})")
    if reasons:
        return "degraded", "; ".join(reasons)
    if not sent and not outcomes:
        return "idle", "no messages in this window"
    return "ok", f"{acked:,} acked, p99 {p99:,.0f} ms"


def consumer_status(row: dict[str, Any]) -> tuple[str, str]:
    """(ok | degraded | failing | idle, reason) for one consumer group's recent window."""
    consumed, lag_now, lag_then = (int(_n(row, k)) for k in ("consumed", "lag", "first_lag"))
    if lag_now > 0 and not consumed:
        return "failing", f"lag {lag_now:,} and nothing consumed in this window"
    reasons = []
    if lag_now > max(1000, 2 * lag_then):
        reasons.append(f"lag growing: {lag_then:,} → {lag_now:,}")
    if _n(row, "commit_errors"):
        reasons.append(f"{int(_n(row, 'commit_errors')):,} failed commits")
    if _n(row, "rebalances") > 4:
        reasons.append(f"{int(_n(row, 'rebalances'))} rebalance callbacks")
    if _n(row, "e2e_p99_ms") >= 10_000:
        reasons.append(f"p99 end-to-end {_n(row, 'e2e_p99_ms') / 1000:,.1f} s")
    if _n(row, "kt_dropped"):
        reasons.append(f"keytrace dropped {int(_n(row, 'kt_dropped')):,} trace events")
    if reasons:
        return "degraded", "; ".join(reasons)
    if not consumed:
        return "idle", "nothing consumed in this window"
    return "ok", f"{consumed:,} consumed, lag {lag_now:,}"


# -- anomalies ----------------------------------------------------------------------


@cached
def anomalies(db: str, since: dt.datetime, as_of: dt.datetime, grace_s: int) -> dict[str, pd.DataFrame]:
    """The Store's anomaly tables for one range; `as_of` is the anchor that 'older than' counts from."""
    s = store()
    since_or_none = None if since == EPOCH else since
    return {
        "failed": s.failed_messages(since_or_none),
        "never_acked": s.never_acked(grace_s, since_or_none, as_of=as_of),
        "not_consumed": s.not_consumed(since_or_none, grace_s=grace_s, as_of=as_of),
        "consumed_twice": s.consumed_twice(since_or_none),
        "out_of_order": s.out_of_order(since_or_none),
    }


# -- helpers ------------------------------------------------------------------------


def _empty_long() -> pd.DataFrame:
    return pd.DataFrame(
        {"t": pd.Series([], dtype="datetime64[us, UTC]"), "series": pd.Series([], dtype=str), "value": []}
    )


def _long(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Wide time-bucket frame to the long (t, series, value) shape the charts take."""
    if df.empty:
        return _empty_long()
    out = df.melt(id_vars=["t"], value_vars=columns, var_name="series", value_name="value")
    return out.dropna(subset=["value"]).reset_index(drop=True)


def long(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """`_long` with series renamed for display ({column: label})."""
    out = _long(df, list(columns))
    out["series"] = out["series"].map(columns)
    return out


# -- one message's lifecycle, shaped for the timeline ----------------------------------


def _ms(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):,.1f} ms"


def lifecycle_events(message: dict[str, Any]) -> pd.DataFrame:
    """A Store lifecycle message as timeline rows: ts, lane, kind, label, latency_ms, detail."""
    rows = []
    for ev in message.get("events", []):
        kind = ev.get("kind", "?")
        lane, label, detail = "producer", kind, ""
        latency = ev.get("latency_ms")
        if kind in ("send", "resend"):
            label = f"{kind} #{ev.get('attempt') or 1}"
        elif kind == "reject":
            label, detail = "rejected: queue full", str(ev.get("error") or "")
        elif kind == "ack":
            lane = "broker"
            label = f"ack p{ev.get('partition')}@{ev.get('offset')} · {_ms(latency)}"
            detail = f"partition {ev.get('partition')}, offset {ev.get('offset')}"
        elif kind == "error":
            lane = "broker"
            label, detail = f"{ev.get('error')} · {_ms(latency)}", str(ev.get("message") or ev.get("error") or "")
        elif kind == "consume":
            lane, latency = f"group {ev.get('group')}", ev.get("e2e_latency_ms")
            label = f"consumed +{_ms(latency)}" if latency is not None else "consumed"
            detail = f"partition {ev.get('partition')}, offset {ev.get('offset')}"
        elif kind == "commit":
            lane = f"group {ev.get('group')}"
            label = f"commit {ev.get('error')}" if ev.get("error") else "committed"
            detail = f"committed offset {ev.get('offset')}" + (f": {ev['error']}" if ev.get("error") else "")
        rows.append(
            {
                "ts": pd.to_datetime(ev.get("ts"), utc=True),
                "lane": lane,
                "kind": kind,
                "label": label,
                "latency_ms": None if latency is None else float(latency),
                "detail": detail,
            }
        )
    df = pd.DataFrame(rows, columns=["ts", "lane", "kind", "label", "latency_ms", "detail"])
    if df.empty:
        df["ts"] = pd.Series([], dtype="datetime64[us, UTC]")
    return df


# -- config review ----------------------------------------------------------------------

IDLE_TIMEOUT_MS = 30_000


@cached
def producer_observed(db: str, client: str) -> dict[str, Any]:
    """What a producer client's events and statistics showed, for the config review."""
    row = (
        store()
        .cursor()
        .execute(
            """
            SELECT
              (SELECT max(100.0 * greatest(msg_cnt / nullif(msg_max, 0), msg_size / nullif(msg_size_max, 0)))
                 FROM stats WHERE client_type = 'producer' AND client_id = $c) AS pressure_pct,
              (SELECT max(batchsize_p99) FROM stats WHERE client_type = 'producer' AND client_id = $c)
                 AS batch_bytes_p99,
              (SELECT sum(disconnects) FROM (SELECT max(disconnects) AS disconnects FROM stats
                 WHERE client_type = 'producer' AND client_id = $c GROUP BY src)) AS disconnects,
              count(*) FILTER (WHERE kind = 'send') AS sends,
              count(*) FILTER (WHERE kind = 'send' AND key IS NULL) AS null_keys,
              count(*) FILTER (WHERE kind = 'reject') AS rejected,
              count(*) FILTER (WHERE kind = 'resend') AS resends,
              count(*) FILTER (WHERE kind = 'error' AND error_name = '_MSG_TIMED_OUT') AS timed_out,
              count(*) FILTER (WHERE kind = 'client_error' AND (error_message ILIKE '%reset by peer%'
                               OR error_message ILIKE '%connection closed%')) AS resets
            FROM events WHERE client_id = $c
            """,
            {"c": client},
        )
        .fetchone()
    )
    names = ("pressure_pct", "batch_bytes_p99", "disconnects", "sends", "null_keys", "rejected", "resends")
    names += ("timed_out", "resets")
    return {k: (0 if v is None else v) for k, v in zip(names, row or (), strict=False)}


def setting(config: dict[str, Any], name: str) -> Any:
    """A producer setting from a config snapshot (under any of its names), else librdkafka's default."""
    for k in (name, *ALIASES.get(name, ())):
        if k in config:
            return config[k]
    return PRODUCER_DEFAULTS[name]


def configured(config: dict[str, Any], name: str) -> float:
    return _num(setting(config, name))


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def review_producer(config: dict[str, Any], seen: dict[str, Any]) -> list[dict[str, str]]:
    """Check one producer's config snapshot (and what it did) against Kafka producer advice.

    Each check is a row: check, result (pass / warn / fail), setting, reason.
    """
    out: list[dict[str, str]] = []

    def add(check: str, result: str, shown: str, reason: str) -> None:
        out.append({"check": check, "result": result, "setting": shown, "reason": reason})

    acks = str(setting(config, "acks")).lower()
    if acks in ("all", "-1"):
        add("acks", "pass", f"acks={acks}", "Acked only once every in-sync replica has it; survives a broker loss.")
    elif acks == "0":
        add(
            "acks", "fail", "acks=0", "Nothing is acknowledged: lost messages look like successes, offsets are unknown."
        )
    else:
        add("acks", "warn", f"acks={acks}", "Only the leader holds an acked message; a leader crash can still lose it.")

    retries = _num(setting(config, "retries"))
    timeout = _num(setting(config, "message.timeout.ms"))
    shown = f"retries={retries:.0f}, message.timeout.ms={timeout:.0f}"
    if retries == 0:
        add("retries", "fail", shown, "A single failed request loses the message: transient errors are normal.")
    elif seen.get("timed_out") and not seen.get("resends"):
        add(
            "retries",
            "warn",
            shown,
            f"{seen['timed_out']:,} messages timed out and none was resent: resend them a few times, "
            "a second apart (resend_attempts=3), or allow a longer message.timeout.ms.",
        )
    elif timeout < 30_000:
        add("retries", "warn", shown, f"Gives up after {timeout / 1000:.0f} s, shorter than a typical leader failover.")
    else:
        add("retries", "pass", shown, "Transient errors are retried within a timeout longer than a failover.")

    idempotent = _flag(setting(config, "enable.idempotence"))
    if idempotent:
        add("idempotence", "pass", "enable.idempotence=true", "Retries can neither duplicate nor reorder messages.")
    else:
        add(
            "idempotence",
            "warn",
            "enable.idempotence=false",
            "A retry after a lost response writes the message twice; enable it unless acks must stay below all.",
        )

    max_msgs = _num(setting(config, "queue.buffering.max.messages"))
    max_kb = _num(setting(config, "queue.buffering.max.kbytes"))
    shown = f"queue.buffering.max.messages={max_msgs:.0f}, queue.buffering.max.kbytes={max_kb:.0f}"
    peak = _num(seen.get("pressure_pct"))
    if seen.get("rejected") or peak >= 100:
        add(
            "buffer memory",
            "fail",
            shown,
            f"The queue filled up: produce() raised BufferError {seen.get('rejected', 0):,} times. "
            "Raise the limits, or poll()/flush() more often so delivered messages leave the queue.",
        )
    elif peak >= 80:
        add("buffer memory", "warn", shown, f"The queue reached {peak:.0f}% of its limit; a burst will overflow it.")
    else:
        add("buffer memory", "pass", shown, f"Peak queue use {0 if peak != peak else peak:.0f}% of the limit.")

    linger = _num(setting(config, "linger.ms"))
    batch = _num(setting(config, "batch.size"))
    shown = f"linger.ms={linger:g}, batch.size={batch:.0f}"
    p99 = _num(seen.get("batch_bytes_p99"))
    if linger == 0:
        add("batching", "warn", shown, "No wait for a batch to fill: under load this means many small requests.")
    elif p99 >= 0.9 * batch:
        add(
            "batching",
            "warn",
            shown,
            f"Batches reach batch.size (p99 {p99:,.0f} B) before linger.ms: raise batch.size.",
        )
    elif linger > 1000:
        add("batching", "warn", shown, f"Every message may wait up to {linger / 1000:g} s before it is sent.")
    else:
        add("batching", "pass", shown, "Batches are bounded by a short linger and a batch.size they do not hit.")

    idle = _num(setting(config, "connections.max.idle.ms"))
    shown = f"connections.max.idle.ms={idle:.0f}"
    resets = int(seen.get("resets") or 0)
    if 0 < idle < IDLE_TIMEOUT_MS:
        add("idle connections", "pass", shown, "The client closes idle connections before a proxy or LB would.")
    elif resets:
        add(
            "idle connections",
            "warn",
            shown,
            f"{resets:,} 'connection reset/closed' errors: a load balancer or proxy that drops idle connections "
            f"(often after {IDLE_TIMEOUT_MS // 1000} s) would cause this. Set connections.max.idle.ms below its "
            "idle timeout, and resend what failed.",
        )
    else:
        add(
            "idle connections",
            "pass",
            shown,
            "No idle-connection resets seen. Behind a proxy or LB with an idle timeout, set this below it.",
        )

    inflight = _num(setting(config, "max.in.flight.requests.per.connection"))
    shown = f"max.in.flight={inflight:.0f}"
    if idempotent:
        add("ordering", "pass", shown + ", idempotent", "Idempotence keeps per-partition order across retries.")
    elif inflight <= 1 or retries == 0:
        add("ordering", "pass", shown, "One request in flight per connection: a retry cannot overtake a later batch.")
    else:
        add(
            "ordering",
            "warn",
            shown,
            "A retried batch can land after a later one: messages of one key may be stored out of order. "
            "Enable idempotence, or set max.in.flight to 1.",
        )

    sends, nulls = int(seen.get("sends") or 0), int(seen.get("null_keys") or 0)
    if not sends:
        add("message keys", "pass", "no sends recorded", "Nothing to judge yet.")
    elif nulls:
        add(
            "message keys",
            "warn",
            f"{nulls / sends:.0%} null keys",
            f"{nulls:,} of {sends:,} messages have no key: they cannot be looked up by key and have no per-key order.",
        )
    else:
        add("message keys", "pass", "0% null keys", "Every message has a key, so each one can be traced by it.")
    return out


# -- export -------------------------------------------------------------------------

EXPORT_FORMATS = {
    "parquet": ("Parquet", "parquet", "application/vnd.apache.parquet"),
    "csv": ("CSV", "csv", "text/csv"),
    "duckdb": ("DuckDB file", "duckdb", "application/octet-stream"),
}


@cached
def export_count(db: str, key: bytes | None, since: dt.datetime | None, until: dt.datetime | None) -> int:
    return int(
        _one(
            """
            SELECT count(*) FROM events
            WHERE ($key::BLOB IS NULL OR key = $key::BLOB)
              AND ($since::TIMESTAMPTZ IS NULL OR ts >= $since::TIMESTAMPTZ)
              AND ($until::TIMESTAMPTZ IS NULL OR ts < $until::TIMESTAMPTZ)
            """,
            {"key": key, "since": since, "until": until},
        )
        or 0
    )


def export_bytes(
    fmt: str, key: bytes | None, since: dt.datetime | None, until: dt.datetime | None
) -> tuple[bytes, int]:
    """Run Store.export into a temporary file and return its bytes and the number of events written."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="keytrace-export-") as tmp:
        path = Path(tmp) / f"keytrace.{EXPORT_FORMATS[fmt][1]}"
        n = store().export(str(path), fmt, key=key, since=since, until=until)
        return path.read_bytes(), int(n or 0)
