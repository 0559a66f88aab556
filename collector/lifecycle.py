"""How a key's events become messages: each send paired with its delivery report.

A send event has no partition or offset; its delivery report (`ack` or `error`) is a
separate event that carries them, plus `latency_us`, librdkafka's `msg.latency()`: the
time from `produce()` to the report. So a report's `ts - latency_us` is the time its
message was produced. Within one (src, topic, key), sort the sends by `ts` and the
reports by that produce time: the n-th send pairs with the n-th report. The order is
exact even when retries make reports arrive out of order, because the sort key is the
produce time, not the arrival time. The same property lets a window of events be
paired on its own: a send and its report fall on the same side of any produce-time
boundary.

A `resend` is a later attempt at the same message (its `trace_seq` names the trace,
`attempt` >= 2): it pairs with its own report like a send, and all attempts of one
trace form one message. A `reject` (queue full) is an attempt that never entered the
queue and has no report. Consumptions join a message through the (topic, partition,
offset) of its ack.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ATTEMPTS = ("send", "resend")
REPORTS = ("ack", "error")
LIFECYCLE_KINDS = ("send", "resend", "reject", "ack", "error", "consume")
# A send counts as unreported (report lost, or still in flight behind a later one) only
# when the report's produce time is closer to the next send by this margin; otherwise
# plain rank order holds, so jitter between a send's `ts` and librdkafka's enqueue time
# never misaligns pairs.
MISSING_REPORT_SLACK_US = 50_000
# How long after a group consumed a message its covering commit is looked for.
COMMIT_WINDOW = dt.timedelta(minutes=2)
COMMIT_WINDOW_US = int(COMMIT_WINDOW / dt.timedelta(microseconds=1))
_ORDER = {"send": 0, "resend": 0, "reject": 0, "ack": 1, "error": 1, "consume": 2, "commit": 3}


def to_datetime(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


def iso(ts: dt.datetime) -> str:
    """ISO-8601 UTC with microseconds and a Z."""
    return ts.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def display_key(key: bytes | None) -> str | None:
    """The key as text when it is UTF-8, else `hex:<hex>`."""
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + key.hex()


def produce_time_us(report: Row) -> int:
    return report["ts_us"] - (report["latency_us"] or 0)


def pair(sends: list[Row], reports: list[Row]) -> tuple[list[tuple[Row, Row | None]], list[Row]]:
    """Pair the sends and resends of one (src, topic, key) with its delivery reports.

    Returns (attempts as (send, report or None), reports that match no recorded send).
    """
    sends = sorted(sends, key=lambda r: (r["ts_us"], r["seq"]))
    reports = sorted(reports, key=lambda r: (produce_time_us(r), r["seq"]))
    attempts: list[tuple[Row, Row | None]] = []
    orphans: list[Row] = []
    i = j = 0
    while i < len(sends) and j < len(reports):
        produced = produce_time_us(reports[j])
        gap = abs(produced - sends[i]["ts_us"])
        if produced < sends[i]["ts_us"] - MISSING_REPORT_SLACK_US:
            orphans.append(reports[j])
            j += 1
        elif i + 1 < len(sends) and abs(produced - sends[i + 1]["ts_us"]) < gap - MISSING_REPORT_SLACK_US:
            attempts.append((sends[i], None))
            i += 1
        else:
            attempts.append((sends[i], reports[j]))
            i += 1
            j += 1
    attempts.extend((s, None) for s in sends[i:])
    orphans.extend(reports[j:])
    return attempts, orphans


@dataclass
class _Message:
    src: int | None
    topic: str | None
    key: bytes | None
    trace: int | None
    attempts: list[tuple[Row | None, Row | None]] = field(default_factory=list)
    consumes: list[Row] = field(default_factory=list)
    commits: list[Row] = field(default_factory=list)

    def ack(self) -> Row | None:
        acks = [r for _, r in self.attempts if r is not None and r["kind"] == "ack"]
        return min(acks, key=lambda r: r["ts_us"]) if acks else None

    def position(self) -> tuple[str | None, int | None, int | None]:
        ack = self.ack()
        if ack is not None:
            return ack["topic"], ack["partition"], ack["offset"]
        if self.consumes:
            c = self.consumes[0]
            return c["topic"], c["partition"], c["offset"]
        return self.topic, None, None

    def status(self) -> str:
        if self.consumes:
            return "consumed"
        if self.ack() is not None:
            return "acked"
        send, report = max(self.attempts, key=_attempt_order)
        if report is not None and report["kind"] == "error":
            return "failed"
        if send is not None and send["kind"] == "reject":
            return "rejected"
        return "pending"

    def sent_us(self) -> int:
        sends = [s["ts_us"] for s, _ in self.attempts if s is not None]
        if sends:
            return min(sends)
        return min(r["ts_us"] for r in self.rows())

    def rows(self) -> list[Row]:
        out = [r for pair_ in self.attempts for r in pair_ if r is not None]
        return out + self.consumes + self.commits


def _attempt_order(attempt: tuple[Row | None, Row | None]) -> tuple[int, int]:
    send, report = attempt
    if send is None:
        return (1, produce_time_us(report)) if report is not None else (1, 0)
    return (send["attempt"] or 1, send["ts_us"])


def _trace_of(row: Row) -> int:
    return row["trace_seq"] if row["trace_seq"] is not None else row["seq"]


def assemble(rows: Sequence[Row], commits: Sequence[Row] = ()) -> list[dict[str, Any]]:
    """Messages (oldest send first) from the events of one or more keys.

    `rows` are event rows with `ts_us` (epoch microseconds) in place of `ts`; `commits`
    are rows of the commits table around their consumptions (see _attach_commits). The result uses Python values:
    `ts` is a UTC datetime and `key` is bytes.
    """
    streams: dict[tuple, tuple[list[Row], list[Row]]] = defaultdict(lambda: ([], []))
    messages: dict[tuple, _Message] = {}
    consumes: list[Row] = []

    def message(src: int, topic: str, key: bytes | None, trace: int, orphan: bool = False) -> _Message:
        # A report without its send is a message of its own, whatever its seq collides with.
        k = (src, topic, key, trace, orphan)
        if k not in messages:
            messages[k] = _Message(src, topic, key, trace)
        return messages[k]

    for r in rows:
        kind = r["kind"]
        if kind in ATTEMPTS:
            streams[(r["src"], r["topic"], r["key"])][0].append(r)
        elif kind in REPORTS:
            streams[(r["src"], r["topic"], r["key"])][1].append(r)
        elif kind == "reject":
            message(r["src"], r["topic"], r["key"], _trace_of(r)).attempts.append((r, None))
        elif kind == "consume":
            consumes.append(r)
    for (src, topic, key), (sends, reports) in streams.items():
        attempts, orphans = pair(sends, reports)
        for send, report in attempts:
            message(src, topic, key, _trace_of(send)).attempts.append((send, report))
        for report in orphans:
            message(src, topic, key, report["seq"], orphan=True).attempts.append((None, report))

    at: dict[tuple, _Message] = {}
    for m in messages.values():
        for _, report in m.attempts:
            if report is not None and report["kind"] == "ack":
                at.setdefault((report["topic"], report["partition"], report["offset"]), m)
    unmatched: dict[tuple, _Message] = {}
    for c in sorted(consumes, key=lambda r: r["ts_us"]):
        pos = (c["topic"], c["partition"], c["offset"])
        m = at.get(pos)
        if m is None:
            m = unmatched.setdefault(pos, _Message(None, c["topic"], c["key"], None))
        m.consumes.append(c)

    result = list(messages.values()) + list(unmatched.values())
    if commits:
        _attach_commits(result, commits)
    result.sort(key=lambda m: (m.sent_us(), m.src or 0, m.trace or 0))
    return [_render(m) for m in result]


def _attach_commits(messages: list[_Message], commits: Sequence[Row]) -> None:
    """Add, for each group that consumed a message, its first commit past the message.

    That is the group's first commit of the message's partition, made after its first
    consumption (and at most COMMIT_WINDOW later), whose committed offset is greater than
    the message's offset. `commits` rows hold one committed partition each: ts_us, seq,
    group_id, topic, partition, committed, error_name.
    """
    by_partition: dict[tuple, list[Row]] = defaultdict(list)
    for c in sorted(commits, key=lambda r: (r["ts_us"], r["seq"])):
        by_partition[(c["group_id"], c["topic"], c["partition"])].append(c)
    times = {k: [c["ts_us"] for c in v] for k, v in by_partition.items()}
    for m in messages:
        topic, partition, offset = m.position()
        if offset is None:
            continue
        first_read: dict[str, int] = {}
        for c in m.consumes:
            first_read.setdefault(c["group_id"], c["ts_us"])
        for group, since in first_read.items():
            k = (group, topic, partition)
            candidates = by_partition.get(k, [])
            for c in candidates[bisect.bisect_left(times.get(k, []), since) :]:
                if c["ts_us"] > since + COMMIT_WINDOW_US:
                    break
                if c["committed"] is not None and c["committed"] > offset:
                    m.commits.append(dict(c, kind="commit", offset=c["committed"]))
                    break


def _ms(us: int | None) -> float | None:
    return None if us is None else round(us / 1000, 3)


def _event(r: Row) -> dict[str, Any]:
    kind = r["kind"]
    ev: dict[str, Any] = {"kind": kind, "ts": to_datetime(r["ts_us"])}
    if kind in ATTEMPTS:
        ev["attempt"] = r["attempt"] or 1
    elif kind == "ack":
        ev.update(partition=r["partition"], offset=r["offset"], latency_ms=_ms(r["latency_us"]))
    elif kind == "error":
        ev.update(error=r["error_name"], message=r["error_message"], latency_ms=_ms(r["latency_us"]))
    elif kind == "reject":
        ev.update(attempt=r["attempt"] or 1, error=r["error_name"], message=r["error_message"])
    elif kind == "consume":
        ev.update(
            group=r["group_id"], partition=r["partition"], offset=r["offset"], e2e_latency_ms=_ms(r["latency_us"])
        )
    elif kind == "commit":
        ev.update(group=r["group_id"], partition=r["partition"], offset=r["offset"], error=r["error_name"])
    return ev


def _render(m: _Message) -> dict[str, Any]:
    topic, partition, offset = m.position()
    rows = sorted(m.rows(), key=lambda r: (r["ts_us"], _ORDER.get(r["kind"], 9), r["seq"]))
    return {
        "key": m.key,
        "trace_id": None if m.src is None else f"{m.src:016x}{m.trace:016x}",
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "status": m.status(),
        "events": [_event(r) for r in rows],
    }


def to_json(key: bytes | None, messages: list[dict[str, Any]], prefix: bool = False) -> dict[str, Any]:
    """The stable JSON document of `keytrace trace --json`; see docs/STORE.md."""
    out_messages = []
    for m in messages:
        doc: dict[str, Any] = {}
        if prefix:
            doc["key"] = display_key(m["key"])
            doc["key_hex"] = None if m["key"] is None else m["key"].hex()
        doc.update(
            trace_id=m["trace_id"],
            topic=m["topic"],
            partition=m["partition"],
            offset=m["offset"],
            status=m["status"],
            events=[dict(e, ts=iso(e["ts"])) for e in m["events"]],
        )
        out_messages.append(doc)
    out: dict[str, Any] = {"key": display_key(key), "key_hex": None if key is None else key.hex()}
    if prefix:
        out["prefix"] = True
    out["messages"] = out_messages
    return out
