"""Aggregate queries over a keytrace store: health over time and anomalies.

Each function takes a DuckDB cursor and a time range (`since` inclusive, `until`
exclusive, both optional) and returns a pandas DataFrame. Inputs are bound
parameters only. `Store` exposes each as a method of the same name.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import duckdb
import pandas as pd

BEGINNING = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
END_OF_TIME = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)
# Reports and resends of a message sent at the end of a range arrive later than it:
# pairing reads this far past `until` (message.timeout.ms defaults to 5 minutes).
LOOKAHEAD = dt.timedelta(minutes=10)


def _range(since: dt.datetime | None, until: dt.datetime | None) -> dict[str, Any]:
    return {"since": since or BEGINNING, "until": until or END_OF_TIME}


def _df(cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> pd.DataFrame:
    df = cur.execute(sql, params).df()
    if "key" in df.columns:
        # DuckDB hands BLOBs to pandas as bytearray; keys are bytes everywhere else.
        df["key"] = [None if k is None else bytes(k) for k in df["key"]]
    return df


THROUGHPUT = """
    SELECT to_timestamp((epoch_us(ts) // ($bucket_s * 1000000)) * $bucket_s) AS t, client_id, topic,
           count(*) FILTER (WHERE kind IN ('send', 'resend')) AS sent,
           count(*) FILTER (WHERE kind = 'resend') AS resent,
           count(*) FILTER (WHERE kind = 'ack') AS acked,
           count(*) FILTER (WHERE kind = 'error') AS failed,
           count(*) FILTER (WHERE kind = 'reject') AS rejected
    FROM events
    WHERE ts >= $since AND ts < $until AND kind IN ('send', 'resend', 'ack', 'error', 'reject')
    GROUP BY ALL ORDER BY t, client_id, topic
"""


def throughput(cur: duckdb.DuckDBPyConnection, since: Any, until: Any, bucket_s: int = 1) -> pd.DataFrame:
    """Messages per bucket and (client, topic): sent (incl. resends), resent, acked, failed, rejected."""
    return _df(cur, THROUGHPUT, {**_range(since, until), "bucket_s": int(bucket_s)})


ACK_LATENCY = """
    SELECT to_timestamp((epoch_us(ts) // ($bucket_s * 1000000)) * $bucket_s) AS t, client_id, topic, count(*) AS acks,
           quantile_cont(latency_us, 0.5) / 1000 AS p50_ms,
           quantile_cont(latency_us, 0.9) / 1000 AS p90_ms,
           quantile_cont(latency_us, 0.99) / 1000 AS p99_ms,
           max(latency_us) / 1000 AS max_ms
    FROM events
    WHERE ts >= $since AND ts < $until AND kind = 'ack' AND latency_us IS NOT NULL
    GROUP BY ALL ORDER BY t, client_id, topic
"""


def ack_latency(cur: duckdb.DuckDBPyConnection, since: Any, until: Any, bucket_s: int = 10) -> pd.DataFrame:
    """Ack latency (msg.latency()) percentiles per bucket and (client, topic), in milliseconds."""
    return _df(cur, ACK_LATENCY, {**_range(since, until), "bucket_s": int(bucket_s)})


ERRORS = """
    SELECT kind, error_name, count(*) AS count, count(DISTINCT client_id) AS clients,
           min(ts) AS first_ts, max(ts) AS last_ts, any_value(error_message) AS example
    FROM events
    WHERE ts >= $since AND ts < $until AND error_name IS NOT NULL
    GROUP BY kind, error_name ORDER BY count DESC, kind, error_name
"""


def errors_by_name(cur: duckdb.DuckDBPyConnection, since: Any, until: Any) -> pd.DataFrame:
    """Errors of every kind (delivery, reject, client, commit) by name."""
    return _df(cur, ERRORS, _range(since, until))


STATS = """
    SELECT ts, src, client_id, client_type, name, group_id,
           msg_cnt, msg_max, msg_cnt / nullif(msg_max, 0) AS queue_fill,
           msg_size, msg_size_max, msg_size / nullif(msg_size_max, 0) AS bytes_fill,
           rtt_p50_us, rtt_p99_us, int_latency_p50_us, int_latency_p99_us,
           outbuf_latency_p50_us, outbuf_latency_p99_us,
           batchsize_p50, batchsize_p99, batchsize_avg, batchcnt_p50, batchcnt_p99, batchcnt_avg,
           throttle_ms, consumer_lag, brokers_up, brokers_total,
           txmsgs - lag(txmsgs) OVER w AS txmsgs_delta,
           txmsg_bytes - lag(txmsg_bytes) OVER w AS txmsg_bytes_delta,
           rxmsgs - lag(rxmsgs) OVER w AS rxmsgs_delta,
           txerrs - lag(txerrs) OVER w AS txerrs_delta,
           txretries - lag(txretries) OVER w AS txretries_delta,
           req_timeouts - lag(req_timeouts) OVER w AS req_timeouts_delta,
           connects - lag(connects) OVER w AS connects_delta,
           disconnects - lag(disconnects) OVER w AS disconnects_delta,
           partition_retries - lag(partition_retries) OVER w AS partition_retries_delta
    FROM stats
    WHERE ts >= $since AND ts < $until AND ($client IS NULL OR client_id = $client)
    WINDOW w AS (PARTITION BY src ORDER BY ts)
    ORDER BY ts, src
"""


def stats_series(cur: duckdb.DuckDBPyConnection, since: Any, until: Any, client_id: str | None = None) -> pd.DataFrame:
    """Statistics emits per client, with buffer fill ratios and per-emit deltas of the counters."""
    return _df(cur, STATS, {**_range(since, until), "client": client_id})


CONSUMER_E2E = """
    SELECT to_timestamp((epoch_us(ts) // ($bucket_s * 1000000)) * $bucket_s) AS t, group_id, topic, count(*) AS consumed,
           count(*) / $bucket_s AS per_s,
           quantile_cont(latency_us, 0.5) / 1000 AS p50_ms,
           quantile_cont(latency_us, 0.99) / 1000 AS p99_ms
    FROM events
    WHERE ts >= $since AND ts < $until AND kind = 'consume'
    GROUP BY ALL ORDER BY t, group_id, topic
"""


def consumer_e2e(cur: duckdb.DuckDBPyConnection, since: Any, until: Any, bucket_s: int = 10) -> pd.DataFrame:
    """Consumption rate and end-to-end latency (message timestamp to consume) per group."""
    return _df(cur, CONSUMER_E2E, {**_range(since, until), "bucket_s": int(bucket_s)})


# Messages whose first attempt falls in [since, until): sends and reports paired by
# rank of produce time within (src, topic, key), exactly as collector/lifecycle.py does,
# then attempts grouped by trace. Reading from `since` on both sides is exact because a
# send and its report have the same produce time.
MESSAGES = """
    WITH ev AS (
        SELECT src, seq, ts, kind, client_id, topic, "partition", "offset", key, trace_seq, attempt,
               error_name, error_message,
               epoch_us(ts) - CASE WHEN kind IN ('ack', 'error') THEN coalesce(latency_us, 0) ELSE 0 END AS pt
        FROM events
        WHERE kind IN ('send', 'resend', 'reject', 'ack', 'error') AND ts >= $since AND ts < $horizon
    ), sends AS (
        SELECT *, row_number() OVER (PARTITION BY src, topic, key ORDER BY pt, seq) AS n
        FROM ev WHERE kind IN ('send', 'resend')
    ), reports AS (
        SELECT *, row_number() OVER (PARTITION BY src, topic, key ORDER BY pt, seq) AS n
        FROM ev WHERE kind IN ('ack', 'error') AND pt >= epoch_us($since)
    ), attempts AS (
        SELECT s.src, s.client_id, s.topic, s.key, coalesce(s.trace_seq, s.seq) AS trace,
               coalesce(s.attempt, 1) AS attempt, s.ts AS sent_at, r.kind AS outcome, r.ts AS reported_at,
               r."partition", r."offset", r.error_name, r.error_message
        FROM sends s LEFT JOIN reports r
          ON r.src = s.src AND r.topic = s.topic AND r.key IS NOT DISTINCT FROM s.key AND r.n = s.n
        UNION ALL
        SELECT src, client_id, topic, key, coalesce(trace_seq, seq), coalesce(attempt, 1), ts, 'reject', NULL,
               NULL, NULL, error_name, error_message
        FROM ev WHERE kind = 'reject'
    ), messages AS (
        SELECT src, topic, key, trace, any_value(client_id) AS client_id, min(sent_at) AS sent_at,
               max(sent_at) AS last_attempt_at, count(*) AS attempts,
               bool_or(outcome = 'ack') AS acked,
               arg_max_null(outcome, (attempt, sent_at)) AS last_outcome,
               arg_max_null(error_name, (attempt, sent_at)) AS error_name,
               arg_max_null(error_message, (attempt, sent_at)) AS error_message,
               min("partition") FILTER (WHERE outcome = 'ack') AS "partition",
               min("offset") FILTER (WHERE outcome = 'ack') AS "offset"
        FROM attempts GROUP BY src, topic, key, trace
    )
    SELECT *, printf('%016x%016x', src, trace) AS trace_id,
           CASE WHEN acked THEN 'acked' WHEN last_outcome = 'error' THEN 'failed'
                WHEN last_outcome = 'reject' THEN 'rejected' ELSE 'pending' END AS status
    FROM messages WHERE sent_at >= $since AND sent_at < $until
"""

FAILED = f"""
    SELECT sent_at, last_attempt_at, client_id, topic, key, trace_id, attempts, status, error_name, error_message
    FROM ({MESSAGES}) WHERE status IN ('failed', 'rejected')
    ORDER BY sent_at DESC, trace_id LIMIT $limit
"""  # noqa: S608


def failed_messages(cur: duckdb.DuckDBPyConnection, since: Any, until: Any, limit: int = 500) -> pd.DataFrame:
    """Messages whose last attempt failed (delivery error) or was rejected (queue full), none acked."""
    params = {**_range(since, until), "limit": int(limit)}
    params["horizon"] = _horizon(params["until"])
    return _df(cur, FAILED, params)


NEVER_ACKED = f"""
    SELECT sent_at, last_attempt_at, client_id, topic, key, trace_id, attempts, status
    FROM ({MESSAGES}) WHERE status = 'pending' AND last_attempt_at < $cutoff
    ORDER BY sent_at DESC, trace_id LIMIT $limit
"""  # noqa: S608


def never_acked(
    cur: duckdb.DuckDBPyConnection,
    older_than_s: float,
    since: Any,
    until: Any,
    as_of: dt.datetime | None = None,
    limit: int = 500,
) -> pd.DataFrame:
    """Messages with no delivery report whose last attempt is older than `older_than_s` at `as_of` (now)."""
    params = {**_range(since, until), "limit": int(limit)}
    params["horizon"] = _horizon(params["until"])
    params["cutoff"] = (as_of or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=older_than_s)
    return _df(cur, NEVER_ACKED, params)


def _horizon(until: dt.datetime) -> dt.datetime:
    return END_OF_TIME if until >= END_OF_TIME - LOOKAHEAD else until + LOOKAHEAD


NOT_CONSUMED = """
    WITH reads AS (
        SELECT group_id, topic, "partition", min("offset") AS lo, max("offset") AS hi
        FROM events WHERE kind = 'consume' AND group_id IS NOT NULL
        GROUP BY ALL
    ), acks AS (
        SELECT DISTINCT src, client_id, topic, "partition", "offset", key, ts
        FROM events WHERE kind = 'ack' AND ts >= $since AND ts < $until
    ), consumed AS (
        SELECT DISTINCT group_id, topic, "partition", "offset" FROM events WHERE kind = 'consume'
    )
    SELECT a.ts AS acked_at, a.client_id, a.topic, a."partition", a."offset", a.key, r.group_id,
           CASE WHEN a."offset" < r.hi THEN 'skipped' ELSE 'not yet' END AS reason
    FROM acks a
    JOIN reads r ON r.topic = a.topic AND r."partition" = a."partition" AND a."offset" >= r.lo
    ANTI JOIN consumed c
      ON c.group_id = r.group_id AND c.topic = a.topic AND c."partition" = a."partition" AND c."offset" = a."offset"
    WHERE a."offset" < r.hi OR a.ts < $cutoff
    ORDER BY a.ts DESC, a.topic, a."partition", a."offset", r.group_id LIMIT $limit
"""


def not_consumed(
    cur: duckdb.DuckDBPyConnection,
    since: Any,
    until: Any,
    grace_s: float = 60.0,
    as_of: dt.datetime | None = None,
    limit: int = 500,
) -> pd.DataFrame:
    """Acked messages that a group reading their partition did not consume.

    'skipped': the group consumed a later offset of that partition but not this one.
    'not yet': it has not reached the offset, and the ack is older than `grace_s`.
    Offsets below a group's first consumption in that partition are not counted: the
    group started after them.
    """
    params = {**_range(since, until), "limit": int(limit)}
    params["cutoff"] = (as_of or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=grace_s)
    return _df(cur, NOT_CONSUMED, params)


CONSUMED_TWICE = """
    SELECT group_id, topic, "partition", "offset", any_value(key) AS key, count(*) AS times,
           count(DISTINCT member_id) AS members, min(ts) AS first_ts, max(ts) AS last_ts
    FROM events
    WHERE kind = 'consume' AND group_id IS NOT NULL AND ts >= $since AND ts < $until
    GROUP BY group_id, topic, "partition", "offset" HAVING count(*) > 1
    ORDER BY last_ts DESC, group_id, topic, "partition", "offset" LIMIT $limit
"""


def consumed_twice(cur: duckdb.DuckDBPyConnection, since: Any, until: Any, limit: int = 500) -> pd.DataFrame:
    """Offsets one group consumed more than once (redelivery after a rebalance or a crash)."""
    return _df(cur, CONSUMED_TWICE, {**_range(since, until), "limit": int(limit)})


# Acks of one producer ordered by produce time (ts - latency), i.e. by send order.
OUT_OF_ORDER = """
    WITH acks AS (
        SELECT src, seq, client_id, topic, "partition", "offset", key, ts - to_microseconds(latency_us) AS sent_at
        FROM events WHERE kind = 'ack' AND ts >= $since AND ts < $until
    ), by_partition AS (
        SELECT 'partition' AS scope, *, NULL::INTEGER AS prev_partition,
               max("offset") OVER (PARTITION BY src, topic, "partition" ORDER BY sent_at, seq
                                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_offset
        FROM acks
    ), by_key AS (
        SELECT 'key' AS scope, *, lag("partition") OVER k AS prev_partition, lag("offset") OVER k AS prev_offset
        FROM acks WHERE key IS NOT NULL
        WINDOW k AS (PARTITION BY src, topic, key ORDER BY sent_at, seq)
    )
    SELECT scope, sent_at, client_id, topic, "partition", "offset", key, prev_partition, prev_offset,
           'sent later, stored before an earlier send' AS reason
    FROM by_partition WHERE "offset" < prev_offset
    UNION ALL
    SELECT scope, sent_at, client_id, topic, "partition", "offset", key, prev_partition, prev_offset,
           CASE WHEN "partition" != prev_partition THEN 'key moved to another partition'
                ELSE 'sent later, stored before an earlier send of the key' END
    FROM by_key WHERE "partition" != prev_partition OR "offset" < prev_offset
    ORDER BY sent_at DESC, scope, topic, "partition", "offset" LIMIT $limit
"""


def out_of_order(cur: duckdb.DuckDBPyConnection, since: Any, until: Any, limit: int = 500) -> pd.DataFrame:
    """Acks whose offset contradicts send order, within a partition or within a key.

    Order is the produce time of each ack (ts - msg.latency()): a message sent later by
    the same producer but stored at a lower offset of the partition was reordered (a
    retry with several requests in flight and no idempotence). Within a key, a change
    of partition also breaks the key's order for consumers.
    """
    return _df(cur, OUT_OF_ORDER, {**_range(since, until), "limit": int(limit)})
