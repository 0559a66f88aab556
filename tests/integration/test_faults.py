"""Faults on a real broker: the trace shows them, loses no event, never blocks the application, stays bounded.

Each test runs the traced application as its own process (workload.py), so that its memory is
its own, samples that process's RSS and spool directory every 100 ms, injects one fault, and
then checks four things: what the trace shows, that every recorded event reached the store,
how long any produce()/poll(0) call took, and peak memory and spool size against their bounds.
The figures of each run are written to artifacts/reliability/<fault>-<recorder>.json (docs/RELIABILITY.md).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest

from collector.collect import Collector
from collector.mockcluster import MockCluster
from collector.store import Store

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "workload.py"
RESULTS = HERE.parents[1] / "artifacts" / "reliability"

RATE = 200  # messages/s of the application between bursts
# Bounds on one call of the paced loop, without the time its thread waited for a CPU (the load of a
# shared 2-core machine, which is not the application's doing): the run queue is read around each call.
MAX_PRODUCE_MS = 50.0
# poll(0) runs the delivery callbacks of everything reported since the last call: after an outage
# that is the whole backlog at once. Both it and a loop iteration also wait for the GIL while the
# shipper thread holds it: Arrow conversion (about 10 ms per 10k sends + 10k acks), a full garbage
# collection (30 to 260 ms measured), or the kernel running something else while it holds the GIL.
MAX_POLL_MS = 500.0
MAX_ITERATION_MS = 500.0
# Any call, wall clock, bursts included: waiting on the trace sink would take seconds (its 10 s
# message.timeout.ms), so this catches blocking even on a machine too loaded for the bounds above.
MAX_WALL_MS = 2000.0
# Measured (docs/RELIABILITY.md): 92 to 141 MiB once one producer runs, 200 to 215 MiB with an
# in-process DuckDB sink (its buffer pool is part of the process), 236 MiB with a Kafka sink after two
# 50k-message bursts. An outage adds the bounded queues: the application's own (a few MiB at RATE over
# a 45 s outage) and the Kafka sink's (64 MiB at most).
RSS_BOUND_MIB = 300
SPOOL_MAX_BYTES = 32 * 1024 * 1024


def vm_kib(pid: int, field_name: str = "VmRSS") -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def dir_usage(path: Path) -> tuple[int, int]:
    """(bytes, .arrow files) of a spool directory."""
    total = files = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0, 0
    for e in entries:
        try:
            total += e.stat().st_size
        except OSError:
            continue
        files += e.name.endswith(".arrow")
    return total, files


class App:
    """workload.py as a subprocess: its JSON lines, and 100 ms samples of its RSS and spool dir."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.spool_dir = Path(config["spool_dir"])
        self.err_path = workdir / f"workload-{uuid.uuid4().hex[:6]}.err"
        env = {k: v for k, v in os.environ.items() if k != "KEYTRACE_SINK"}
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKLOAD), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        self.ready: dict[str, Any] | None = None
        self.status: dict[str, Any] = {}
        self.bursts: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.rss_kib: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = [(time.time(), config.get("phase", "start"))]
        self.spool: list[tuple[float, int, int]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._cond:
                kind = doc.get("event")
                if kind == "ready":
                    self.ready = doc
                elif kind == "status":
                    self.status = doc
                elif kind == "burst":
                    self.bursts.append(doc)
                elif kind == "result":
                    self.result = doc
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            rss = vm_kib(self.proc.pid)
            if rss is not None:
                self.rss_kib.append((time.time(), rss))
            size, files = dir_usage(self.spool_dir)
            self.spool.append((time.time(), size, files))
            time.sleep(0.1)

    def send(self, **command: Any) -> None:
        if "phase" in command:
            self.marks.append((time.time(), command["phase"]))
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self, what: str, predicate: Callable[[App], bool], timeout: float) -> float:
        """Wait until predicate(self) holds; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and self.result is None):
                    state = "exited" if self.proc.poll() is not None else "running"
                    raise AssertionError(
                        f"{what}: not reached in {timeout:.0f} s (workload {state}); "
                        f"last status {json.dumps(self.status)[:1500]}\nstderr:\n{self.stderr_tail()}"
                    )
                self._cond.wait(min(left, 0.1))
        return time.monotonic() - started

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        self.send(stop=True)
        self.wait("workload result", lambda a: a.result is not None, timeout)
        self.proc.wait(30)
        assert self.result is not None
        return self.result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def peak_rss_mib(self) -> float:
        return max((kib for _, kib in self.rss_kib), default=0) / 1024

    def peak_rss_by_phase(self) -> dict[str, float]:
        """Peak sampled RSS (MiB) between one phase command and the next."""
        bounds = self.marks + [(float("inf"), "")]
        out: dict[str, float] = {}
        for (start, name), (end, _) in zip(bounds, bounds[1:], strict=False):
            kib = [k for t, k in self.rss_kib if start <= t < end]
            if kib:
                out[name] = round(max(kib) / 1024, 1)
        return out

    @property
    def peak_spool(self) -> tuple[int, int]:
        return max((b for _, b, _ in self.spool), default=0), max((f for _, _, f in self.spool), default=0)


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def start(**config: Any) -> App:
        config.setdefault("spool_dir", str(tmp_path / "app-spool"))
        config.setdefault("spool_max_bytes", SPOOL_MAX_BYTES)
        config.setdefault("rate", RATE)
        app = App(config, tmp_path)
        apps.append(app)
        app.wait("workload ready", lambda a: a.ready is not None, 60)
        return app

    yield start
    for app in apps:
        app.close()


class CollectorThread:
    """collector.collect.Collector in a thread of the test process, storing into its own DuckDB file."""

    def __init__(self, path: Path, servers: str, topic: str) -> None:
        self.store = Store(path)
        # librdkafka's connection errors go to Python logging (shown only when a test fails), not to stderr.
        conf = {"logger": logging.getLogger("faults.collector")}
        group = f"faults-{uuid.uuid4().hex[:8]}"
        self.collector = Collector(self.store, servers, topic, group_id=group, consumer_conf=conf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.collector.run, args=(self._stop, 0.5), daemon=True)
        self._thread.start()

    def events(self) -> int:
        return self.store.cursor().execute("SELECT count(*) FROM events").fetchone()[0]

    def wait_events(self, expected: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.events() < expected and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.collector.close()
        self.store.close()


def one_row(store: Store, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    cur = store.cursor().execute(sql, params or {})
    return dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))


def by_name(store: Store, kind: str, where: str = "TRUE", params: dict[str, Any] | None = None) -> dict[str, int]:
    """Events of one kind per error name. `where` is a constant of this module, never input."""
    sql = f"SELECT error_name, count(*) FROM events WHERE kind = $kind AND {where} GROUP BY 1"  # noqa: S608
    return dict(store.cursor().execute(sql, {"kind": kind, **(params or {})}).fetchall())


def trace_figures(store: Store) -> dict[str, Any]:
    """Totals of the whole store: what the trace shows, and what (b) compares."""
    sql = "SELECT DISTINCT error_message FROM events WHERE kind = 'client_error'"
    messages = sorted(m for (m,) in store.cursor().execute(sql).fetchall())
    return {
        **one_row(store, "SELECT count(*) AS events, count(DISTINCT (src, seq)) AS distinct_ids FROM events"),
        "by_kind": store.counts(),
        "errors": by_name(store, "error"),
        "client_errors": by_name(store, "client_error"),
        "client_error_messages": messages[:10],
        "ack_latency_ms": one_row(
            store,
            "SELECT max(latency_us) / 1000 AS max, quantile_disc(latency_us, 0.5) / 1000 AS p50, "
            "quantile_disc(latency_us, 0.99) / 1000 AS p99 FROM events WHERE kind = 'ack'",
        ),
        "stats": one_row(
            store,
            "SELECT count(*) AS rows, max(connects) AS max_connects, max(disconnects) AS max_disconnects, "
            "max(req_timeouts) AS max_req_timeouts, min(brokers_up) AS min_brokers_up, "
            "max(kt_spooled) AS max_kt_spooled, max(kt_dropped) AS max_kt_dropped, "
            "max(partition_retries) AS max_partition_retries FROM stats",
        ),
    }


# A report's produce time is its ts minus its latency (collector/lifecycle.py).
_PRODUCED_IN = "(epoch_us(ts) - coalesce(latency_us, 0)) BETWEEN $lo AND $hi"
_HAPPENED_IN = "epoch_us(ts) BETWEEN $lo AND $hi"


def window_figures(store: Store, since: float, until: float) -> dict[str, Any]:
    """What the trace holds about messages produced, and client events, within [since, until] (epoch s)."""
    window = {"lo": int(since * 1e6), "hi": int(until * 1e6)}
    return {
        "seconds": round(until - since, 2),
        **one_row(
            store,
            f"SELECT count(*) AS acks, max(latency_us) / 1000 AS max_ack_latency_ms FROM events "  # noqa: S608
            f"WHERE kind = 'ack' AND {_PRODUCED_IN}",
            window,
        ),
        "errors": by_name(store, "error", _PRODUCED_IN, window),
        "min_error_latency_ms": one_row(
            store,
            f"SELECT min(latency_us) / 1000 AS ms FROM events WHERE kind = 'error' AND {_PRODUCED_IN}",  # noqa: S608
            window,
        )["ms"],
        "client_errors": by_name(store, "client_error", _HAPPENED_IN, window),
        "stats": one_row(
            store,
            "SELECT count(*) AS rows, min(brokers_up) AS min_brokers_up, "  # noqa: S608
            "max(req_timeouts) - min(req_timeouts) AS req_timeouts_added, "
            "max(disconnects) - min(disconnects) AS disconnects_added, "
            f"max(connects) - min(connects) AS connects_added, max(kt_spooled) AS max_kt_spooled "
            f"FROM stats WHERE {_HAPPENED_IN}",
            window,
        ),
    }


def record(name: str, doc: dict[str, Any]) -> Path:
    """Write one run's figures to artifacts/reliability/<fault>-<recorder>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    recorder = doc["app"]["trace_status"].get("recorder", "python")
    doc = {
        "test": name,
        "recorder": recorder,
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        **doc,
    }
    path = RESULTS / f"{name}-{recorder}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def app_figures(app: App, result: dict[str, Any]) -> dict[str, Any]:
    spool_bytes, spool_files = app.peak_spool
    phases = result["phases"]
    return {
        "produced": result["produced"],
        "acked": result["acked"],
        "failed": result["failed"],
        "app_error_cb": result["client_errors"],
        "trace_status": result["trace"],
        "spool_files_left": result["spool_files_left"],
        "max_produce_ms": max(p["max_produce_ms_excl_runqueue"] for p in phases),
        "max_poll_ms": max(p["max_poll_ms_excl_runqueue"] for p in phases),
        "max_iteration_ms": max(p["max_iteration_ms_excl_runqueue"] for p in phases),
        "max_wall_ms": {
            "produce": max(p["max_produce_ms"] for p in phases + app.bursts),
            "poll": max(p["max_poll_ms"] for p in phases + app.bursts),
            "iteration": max(p["max_iteration_ms"] for p in phases),
        },
        "produce_calls": sum(p["produce_calls"] for p in phases + app.bursts),
        "buffer_errors": sum(p["buffer_errors"] for p in phases),
        "phases": phases,
        "bursts": app.bursts,
        "slowest_calls": result["slowest_calls"][:8],
        "gc_pauses_over_10ms": result["gc_pauses"][:8],
        "rss_at_ready_mib": round((app.ready or {}).get("vm_rss_kib", 0) / 1024, 1),
        "peak_rss_mib": round(app.peak_rss_mib, 1),
        "peak_rss_by_phase_mib": app.peak_rss_by_phase(),
        "vm_hwm_mib": round(result["vm_hwm_kib"] / 1024, 1),
        "rss_bound_mib": RSS_BOUND_MIB,
        "rss_samples": len(app.rss_kib),
        "peak_spool_bytes": spool_bytes,
        "peak_spool_files": spool_files,
        "spool_max_bytes": app.config["spool_max_bytes"],
    }


def assert_reliable(figures: dict[str, Any], trace: dict[str, Any], *, resend: bool = False) -> None:
    """(b) nothing lost, (c) nothing blocked, (d) memory and spool within bounds."""
    status = figures["trace_status"]
    kinds = trace["by_kind"]
    assert status["dropped"] == 0 and status["internal_errors"] == 0, status
    assert trace["events"] == status["events_recorded"], (trace["events"], status)
    assert trace["distinct_ids"] == trace["events"], "an event was stored twice"
    assert figures["spool_files_left"] == 0
    assert kinds.get("send", 0) == figures["produced"]
    assert kinds.get("ack", 0) == figures["acked"]
    assert kinds.get("client_error", 0) == sum(figures["app_error_cb"].values())
    if resend:
        assert kinds.get("error", 0) == kinds.get("resend", 0) + sum(figures["failed"].values())
    else:
        assert trace["errors"] == figures["failed"]
    assert figures["max_produce_ms"] < MAX_PRODUCE_MS, figures["slowest_calls"]
    assert figures["max_poll_ms"] < MAX_POLL_MS, figures["slowest_calls"]
    assert figures["max_iteration_ms"] < MAX_ITERATION_MS, figures["phases"]
    assert max(figures["max_wall_ms"].values()) < MAX_WALL_MS, figures["slowest_calls"]
    assert figures["rss_samples"] > 10
    assert figures["peak_rss_mib"] < figures["rss_bound_mib"], figures["peak_rss_mib"]
    assert figures["vm_hwm_mib"] < figures["rss_bound_mib"], figures["vm_hwm_mib"]
    assert figures["peak_spool_bytes"] <= figures["spool_max_bytes"]


def kept_pace(phase: dict[str, Any], rate: float = RATE) -> bool:
    """The loop produced at its target rate (minus scheduling slack) through the phase."""
    return phase["produced"] >= 0.8 * rate * phase["seconds"]


def settled(a: App) -> bool:
    s = a.status
    return bool(s) and s["acked"] + sum(s["failed"].values()) >= s["produced"] - RATE


# -- 1. the broker paused (SIGSTOP) for longer than request.timeout.ms ------------------------------

PAUSE_S = 8.0
REQUEST_TIMEOUT_MS = 2000
MESSAGE_TIMEOUT_MS = 4000


@pytest.mark.timeout(180)
def test_broker_paused_longer_than_request_timeout(kafka, broker, tmp_path: Path, start_app) -> None:
    topic = kafka.create_topic("pause")
    db = tmp_path / "trace.duckdb"
    app = start_app(
        bootstrap_servers=kafka.bootstrap_servers,
        topic=topic,
        sink=f"duckdb://{db}",
        key_prefix="pause",
        producer={
            "acks": "all",
            "request.timeout.ms": REQUEST_TIMEOUT_MS,
            "socket.timeout.ms": REQUEST_TIMEOUT_MS,
            "message.timeout.ms": MESSAGE_TIMEOUT_MS,
            "reconnect.backoff.max.ms": 1000,
        },
    )
    app.wait("acks before the pause", lambda a: a.status.get("acked", 0) >= 2 * RATE, 60)

    app.send(phase="paused")
    paused_at = time.time()
    broker.pause()
    try:
        # Held until the pause is both long enough and visible to the application as failed deliveries.
        app.wait(
            "a delivery failure during the pause",
            lambda a: time.time() - paused_at >= PAUSE_S and a.status["failed"].get("_MSG_TIMED_OUT", 0) > 0,
            60,
        )
    finally:
        broker.resume()
    resumed_at = time.time()
    app.send(phase="resumed")
    produced_at_resume = app.status["produced"]
    app.wait(
        "every message settled after the pause",
        lambda a: settled(a) and a.status["produced"] > produced_at_resume + 6 * RATE,
        90,
    )
    result = app.stop()

    with Store(db, read_only=True) as store:
        trace = trace_figures(store)
        pause = window_figures(store, paused_at, resumed_at)
        after = window_figures(store, resumed_at + 3, time.time())
    figures = app_figures(app, result)
    record(
        "pause",
        {
            "fault": f"broker SIGSTOP for {resumed_at - paused_at:.1f} s; request.timeout.ms = socket.timeout.ms = "
            f"{REQUEST_TIMEOUT_MS}, message.timeout.ms = {MESSAGE_TIMEOUT_MS}",
            "sink": "duckdb (in the application's process)",
            "pause_s": round(resumed_at - paused_at, 2),
            "app": figures,
            "trace": trace,
            "during_pause": pause,
            "from_3s_after_resume": after,
        },
    )

    # (a) the pause is in the trace: timed-out deliveries, client errors, and acks that waited it out.
    assert pause["errors"].get("_MSG_TIMED_OUT", 0) > 0, pause
    assert pause["min_error_latency_ms"] >= MESSAGE_TIMEOUT_MS * 0.9
    assert trace["client_errors"], "no client_error event"
    assert pause["max_ack_latency_ms"] >= REQUEST_TIMEOUT_MS, pause
    assert trace["stats"]["max_req_timeouts"] > 0, trace["stats"]
    # (b), (c), (d)
    assert result["undelivered_after_flush"] == 0
    assert figures["acked"] + sum(figures["failed"].values()) == figures["produced"]
    assert_reliable(figures, trace)
    assert kept_pace(next(p for p in figures["phases"] if p["name"] == "paused"))


# -- 2. the broker killed (SIGKILL) and restarted; the trace sink is a topic on that broker ---------


@pytest.mark.timeout(240)
def test_broker_killed_and_restarted(kafka, broker, tmp_path: Path, start_app) -> None:
    topic = kafka.create_topic("crash")
    events_topic = kafka.create_topic("kt-events")
    collector = CollectorThread(tmp_path / "trace.duckdb", kafka.bootstrap_servers, events_topic)
    try:
        app = start_app(
            bootstrap_servers=kafka.bootstrap_servers,
            topic=topic,
            sink=f"kafka://{kafka.bootstrap_servers}/{events_topic}",
            key_prefix="crash",
            producer={"acks": "all", "message.timeout.ms": 120000, "reconnect.backoff.max.ms": 1000},
        )
        app.wait("acks before the crash", lambda a: a.status.get("acked", 0) >= 2 * RATE, 60)
        collector.wait_events(1, 30)

        app.send(phase="dead")
        killed_at = time.time()
        broker.kill()
        # The sink's own producer gives a batch up after its message.timeout.ms (10 s): then it spools.
        app.wait("trace batches spooled", lambda a: a.status["trace"]["spooled"] > 0, 60)
        spooling_after = time.time() - killed_at
        broker.restart()
        back_at = time.time()
        app.send(phase="restarted")
        produced_at_restart = app.status["produced"]
        app.wait(
            "every message acked and the spool replayed",
            lambda a: (
                settled(a)
                and a.status["produced"] > produced_at_restart + 2 * RATE
                and a.status["trace"]["sink_healthy"]
                and a.status["trace"]["spool_bytes"] == 0
            ),
            120,
        )
        result = app.stop()
        collector.wait_events(result["trace"]["events_recorded"], 60)
        trace = trace_figures(collector.store)
        outage = window_figures(collector.store, killed_at, back_at)
        collector_stats = vars(collector.collector.stats).copy()
    finally:
        collector.close()
    figures = app_figures(app, result)
    record(
        "kill_restart",
        {
            "fault": "broker SIGKILL, restart on the same ports and log dir",
            "sink": "kafka topic on the killed broker, collector thread into DuckDB",
            "outage_s": round(back_at - killed_at, 2),
            "spooling_started_after_s": round(spooling_after, 2),
            "app": figures,
            "trace": trace,
            "during_outage": outage,
            "collector": collector_stats,
        },
    )

    # (a) connection errors while the broker was gone, and acks that waited out the outage.
    assert {"_TRANSPORT", "_ALL_BROKERS_DOWN"} & set(trace["client_errors"]), trace["client_errors"]
    assert outage["max_ack_latency_ms"] >= 0.5 * (back_at - killed_at) * 1000, outage
    assert outage["stats"]["min_brokers_up"] == 0, outage["stats"]
    assert trace["stats"]["max_kt_spooled"] > 0, "the stats rows show no spooling"
    # (b): spooled during the outage, shipped after it, nothing lost or doubled.
    assert result["trace"]["spooled"] > 0 and figures["peak_spool_files"] > 0
    assert figures["failed"] == {} and figures["acked"] == figures["produced"]
    assert_reliable(figures, trace)
    assert kept_pace(next(p for p in figures["phases"] if p["name"] == "dead"))


# -- 3. connections cut by a proxy after 30 s idle ---------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["reset", "silent"])
def test_idle_connections_cut_by_a_proxy(proxied_broker, tmp_path: Path, start_app, mode: str) -> None:
    _, proxy = proxied_broker
    proxy.mode = mode
    db = tmp_path / "trace.duckdb"
    burst = 100
    app = start_app(
        bootstrap_servers=f"127.0.0.1:{proxy.port}",
        topic=f"idle-{uuid.uuid4().hex[:8]}",
        sink=f"duckdb://{db}",
        key_prefix="idle",
        rate=0,
        resend_attempts=3,
        resend_backoff_ms=1000,
        # librdkafka retries a request lost with its connection by itself; with retries off the
        # delivery fails and the application's resend policy is what sends it again.
        producer={"acks": "all", **({"retries": 0} if mode == "silent" else {})},
    )
    first_conn = len(proxy.events)
    app.send(burst=burst)
    app.wait("first burst acked", lambda a: a.status.get("acked", 0) >= burst, 60)
    app.send(phase="idle")
    idle_from = time.time()
    idle_conns = proxy.open_ids()
    cut = "idle_reset" if mode == "reset" else "idle_forgotten"

    def cuts() -> list[dict[str, Any]]:
        return [e for e in proxy.events[first_conn:] if e["event"] == cut and e["conn"] in idle_conns]

    app.wait(
        "the proxy cut every idle connection",
        lambda a: {e["conn"] for e in cuts()} == idle_conns,
        proxy.idle_s + 30,
    )
    cut_at = max(e["t"] for e in cuts())
    if mode == "reset":
        app.wait("the client noticed the reset", lambda a: bool(a.status["client_errors"]), 10)
    app.send(phase="after_idle", burst=burst)
    app.wait("second burst acked", lambda a: a.status["acked"] >= 2 * burst, 60)
    result = app.stop()

    with Store(db, read_only=True) as store:
        trace = trace_figures(store)
        after = window_figures(store, cut_at - 1, time.time())
        lifecycles = [store.trace_json(f"idle-{i}".encode()) for i in range(2 * burst)]
    figures = app_figures(app, result)
    resent = [doc for doc in lifecycles if any(e["kind"] == "resend" for m in doc["messages"] for e in m["events"])]
    proxy_events = [e for e in proxy.events[first_conn:] if e["event"] != "accept"]
    record(
        f"idle_{mode}",
        {
            "fault": f"proxy cuts connections idle >= {proxy.idle_s:.0f} s ({mode})",
            "sink": "duckdb (in the application's process)",
            "idle_s": round(cut_at - idle_from, 2),
            "proxy_events": proxy_events,
            "app": figures,
            "trace": trace,
            "after_cut": after,
            "resent_messages": len(resent),
            "example_lifecycle": resent[0] if resent else lifecycles[burst],
        },
    )

    # (a) the cut is in the trace, and every message sent after it was acked.
    assert idle_conns and all(e["idle_s"] >= proxy.idle_s for e in cuts())
    assert after["client_errors"], after
    assert {"_TRANSPORT", "_ALL_BROKERS_DOWN"} & set(after["client_errors"])
    statuses = [m["status"] for doc in lifecycles for m in doc["messages"]]
    assert statuses == ["acked"] * (2 * burst), "a message has no final ack, or two trace ids"
    for doc in resent:
        # Every attempt of one message sits under one trace id: failed attempt, resend, ack.
        [message] = doc["messages"]
        kinds = [e["kind"] for e in message["events"]]
        attempts = [e["attempt"] for e in message["events"] if e["kind"] in ("send", "resend")]
        assert kinds[0] == "send" and kinds[-1] == "ack", kinds
        assert attempts == list(range(1, len(attempts) + 1)), message["events"]
        assert kinds.count("error") == len(attempts) - 1, kinds
    if mode == "silent":
        assert resent, "no failed attempt after the silent cut"
        assert set(after["errors"]) == {"_TRANSPORT"}, after["errors"]
    assert figures["failed"] == {} and figures["acked"] == figures["produced"] == 2 * burst
    assert_reliable(figures, trace, resend=True)


# -- 4. the trace sink's own cluster down, the application's cluster up --------------------------


BURST = 50_000


@pytest.mark.timeout(180)
def test_trace_sink_cluster_down(kafka, tmp_path: Path, start_app) -> None:
    topic = kafka.create_topic("sinkdown")
    events_topic = "_keytrace.events"
    with MockCluster(num_brokers=3) as sink_cluster:
        sink_cluster.create_topic(events_topic, partitions=4, replication_factor=1)
        collector = CollectorThread(tmp_path / "trace.duckdb", sink_cluster.bootstrap_servers, events_topic)
        try:
            app = start_app(
                bootstrap_servers=kafka.bootstrap_servers,
                topic=topic,
                sink=f"kafka://{sink_cluster.bootstrap_servers}/{events_topic}",
                key_prefix="sink",
                producer={"acks": "all"},
            )
            app.wait("acks with the sink up", lambda a: a.status.get("acked", 0) >= 2 * RATE, 60)
            collector.wait_events(1, 30)
            app.send(phase="sink_up", burst=BURST)
            app.wait("burst with the sink up", lambda a: len(a.bursts) == 1, 60)

            app.send(phase="sink_down")
            down_at = time.time()
            for b in sink_cluster.broker_ids:
                sink_cluster.broker_down(b)
            app.wait(
                "trace batches in the spool",
                lambda a: (
                    a.status["trace"]["spooled"] > 0 and a.peak_spool[1] > 0 and not a.status["trace"]["sink_healthy"]
                ),
                60,
            )
            spooling_after = time.time() - down_at
            app.send(burst=BURST)
            app.wait("burst with the sink down", lambda a: len(a.bursts) == 2, 60)
            burst_done = time.time()
            # No status line is printed during a burst: take the first one after it.
            app.wait("status after the burst", lambda a: a.status["t"] > burst_done, 10)
            spooled_at_up = app.status["trace"]["spooled"]
            for b in sink_cluster.broker_ids:
                sink_cluster.broker_up(b)
            up_at = time.time()
            app.send(phase="sink_back")
            app.wait(
                "spool replayed",
                lambda a: a.status["trace"]["sink_healthy"] and a.status["trace"]["spool_bytes"] == 0 and settled(a),
                90,
            )
            replayed_after = time.time() - up_at
            result = app.stop()
            collector.wait_events(result["trace"]["events_recorded"], 60)
            trace = trace_figures(collector.store)
            collector_stats = vars(collector.collector.stats).copy()
        finally:
            collector.close()
    figures = app_figures(app, result)
    up_burst, down_burst = app.bursts
    record(
        "sink_down",
        {
            "fault": "every broker of the trace sink's cluster (librdkafka mock cluster, 3 brokers) down",
            "sink": "kafka topic on a second cluster, collector thread into DuckDB",
            "sink_down_s": round(up_at - down_at, 2),
            "spooling_started_after_s": round(spooling_after, 2),
            "replayed_after_s": round(replayed_after, 2),
            "spooled_while_down": spooled_at_up,
            "burst_per_s_sink_up": up_burst["per_s"],
            "burst_per_s_sink_down": down_burst["per_s"],
            "app": figures,
            "trace": trace,
            "collector": collector_stats,
        },
    )

    # The application is unaffected: all acked, no client error of its own, the same speed.
    assert figures["failed"] == {} and figures["acked"] == figures["produced"]
    assert figures["app_error_cb"] == {}
    assert down_burst["per_s"] >= 0.5 * up_burst["per_s"], (up_burst, down_burst)
    assert kept_pace(next(p for p in figures["phases"] if p["name"] == "sink_down"))
    # Spooled while down, shipped after, stored once each.
    assert spooled_at_up > 0 and figures["peak_spool_files"] > 0
    assert trace["stats"]["max_kt_spooled"] > 0
    assert_reliable(figures, trace)
