"""A traced application for the fault tests, run as its own process so that its memory is its own.

    python workload.py '{"bootstrap_servers": "127.0.0.1:9092", "topic": "t",
                         "sink": "duckdb:///tmp/t.duckdb", "spool_dir": "/tmp/t-spool"}'

The JSON config is argv[1] (or the first line of stdin). The process then produces with a
``TracedProducer`` at ``rate`` messages/s, each with a unique key, and reads commands, one JSON
object per line, from stdin:

    {"phase": "outage"}     label what follows (figures are kept per phase)
    {"rate": 0}             change the rate (0: only poll, the connection goes idle)
    {"burst": 20000}        produce that many as fast as produce() takes them, poll until all are reported
    {"stop": true}          flush, wait until the trace sink took everything, close, print the result

It prints JSON lines on stdout: ``ready``, ``status`` every ``status_interval_s``, ``burst`` and,
last, ``result``. Every figure about blocking is a wall-clock time around one call; in the paced
loop each is also given without the time the thread waited for a CPU (the machine's load).
"""

from __future__ import annotations

import gc
import json
import queue
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from collector import TracedProducer

SLOW_CALL_MS = 10.0


def vm_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


# Upper edges (ms) of the call-duration histogram.
EDGES_MS = (0.1, 1, 5, 10, 25, 50, 100, 250, 1000, float("inf"))


class RunQueueClock:
    """Nanoseconds this thread spent ready to run while the kernel ran something else (schedstat run_delay).

    A call's wall time minus this is the time it ran or waited on a lock (the GIL included); the rest is
    the machine's load, not the call's. Reads 0 where /proc/thread-self/schedstat does not exist.
    """

    def __init__(self) -> None:
        try:
            # Kept open: a seek and a read cost about 6 us; opening it each time costs more.
            self._file: Any = open("/proc/thread-self/schedstat", "rb")
        except OSError:
            self._file = None

    def ns(self) -> int:
        if self._file is None:
            return 0
        self._file.seek(0)
        return int(self._file.read().split()[1])


@dataclass
class Calls:
    """Durations (ms) of the application's produce() and poll() calls: wall clock, and wall clock
    minus the time the thread waited for a CPU (measured in the paced loop only)."""

    produce_calls: int = 0
    poll_calls: int = 0
    max_produce_ms: float = 0.0
    max_poll_ms: float = 0.0
    max_produce_ms_excl_runqueue: float = 0.0
    max_poll_ms_excl_runqueue: float = 0.0
    produce_hist: list[int] = field(default_factory=lambda: [0] * len(EDGES_MS))
    poll_hist: list[int] = field(default_factory=lambda: [0] * len(EDGES_MS))

    def add(self, what: str, ms: float, own_ms: float) -> None:
        bucket = next(i for i, edge in enumerate(EDGES_MS) if ms <= edge)
        if what == "produce":
            self.produce_calls += 1
            self.max_produce_ms = max(self.max_produce_ms, ms)
            self.max_produce_ms_excl_runqueue = max(self.max_produce_ms_excl_runqueue, own_ms)
            self.produce_hist[bucket] += 1
        else:
            self.poll_calls += 1
            self.max_poll_ms = max(self.max_poll_ms, ms)
            self.max_poll_ms_excl_runqueue = max(self.max_poll_ms_excl_runqueue, own_ms)
            self.poll_hist[bucket] += 1

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 3)
        out["hist_edges_ms"] = [str(e) for e in EDGES_MS]
        return out


@dataclass
class Phase:
    name: str
    rate: float
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    produced: int = 0
    buffer_errors: int = 0
    max_iteration_ms: float = 0.0
    max_iteration_ms_excl_runqueue: float = 0.0
    calls: Calls = field(default_factory=Calls)

    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rate": self.rate,
            "seconds": round(self.seconds(), 3),
            "produced": self.produced,
            "produced_per_s": round(self.produced / max(self.seconds(), 1e-9), 1),
            "buffer_errors": self.buffer_errors,
            "max_iteration_ms": round(self.max_iteration_ms, 3),
            "max_iteration_ms_excl_runqueue": round(self.max_iteration_ms_excl_runqueue, 3),
            **self.calls.summary(),
        }


class Workload:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.topic: str = config["topic"]
        self.value = b"v" * int(config.get("value_bytes", 200))
        self.prefix: str = config.get("key_prefix", "k")
        self.rate = float(config.get("rate", 200))
        self.acked = 0
        self.failed: Counter[str] = Counter()
        self.client_errors: Counter[str] = Counter()
        self.max_ack_latency_s = 0.0
        self.next_key = 0
        self.phases = [Phase(config.get("phase", "start"), self.rate)]
        self.calls = self.phases[0].calls  # where call durations go: the phase, or a burst
        self.runqueue = RunQueueClock()
        self.exact = True  # read the run-queue clock around each call (not in bursts: it costs 12 us a call)
        # A full garbage collection holds the GIL whichever thread runs it: record the long ones.
        self.gc_pauses: list[dict[str, Any]] = []
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)
        self.slowest: list[dict[str, Any]] = []
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        conf = {
            "bootstrap.servers": config["bootstrap_servers"],
            "client.id": config.get("client_id", "fault-workload"),
            "linger.ms": 5,
            **config.get("producer", {}),
            "on_delivery": self._on_delivery,
            "error_cb": self._on_error,
        }
        trace = {
            "spool_dir": config["spool_dir"],
            "spool_max_bytes": int(config.get("spool_max_bytes", 64 * 1024 * 1024)),
            "flush_interval_s": float(config.get("flush_interval_s", 0.2)),
            "stats_interval_ms": int(config.get("stats_interval_ms", 1000)),
        }
        resend = {k: config[k] for k in ("resend_attempts", "resend_backoff_ms") if k in config}
        self.producer = TracedProducer(conf, sink=config["sink"], trace_options=trace, **resend)

    # Callbacks run inside poll()/flush(), on this thread.
    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.acked += 1
            latency = msg.latency() or 0.0
            self.max_ack_latency_s = max(self.max_ack_latency_s, latency)
        else:
            self.failed[err.name()] += 1

    def _on_error(self, err: Any) -> None:
        self.client_errors[err.name()] += 1

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_started) * 1000
        if ms >= SLOW_CALL_MS and len(self.gc_pauses) < 200:
            thread = threading.current_thread().name
            self.gc_pauses.append(
                {"generation": info["generation"], "ms": round(ms, 3), "thread": thread, "t": time.time()}
            )

    @property
    def phase(self) -> Phase:
        return self.phases[-1]

    def _timed(self, what: str, fn: Any, *args: Any) -> Any:
        q0 = self.runqueue.ns() if self.exact else 0
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            queued_ms = (self.runqueue.ns() - q0) / 1e6 if self.exact else 0.0
            self.calls.add(what, ms, ms - queued_ms)
            if ms >= SLOW_CALL_MS and len(self.slowest) < 200:
                self.slowest.append(
                    {"call": what, "ms": round(ms, 3), "runqueue_ms": round(queued_ms, 3) if self.exact else None,
                     "phase": self.phase.name, "t": time.time()}
                )  # fmt: skip

    def produce_one(self, paced: bool = True) -> bool:
        """One produce() call; a full queue is recorded and left to the next poll."""
        key = f"{self.prefix}-{self.next_key}".encode()
        try:
            self._timed("produce", self.producer.produce, self.topic, self.value, key)
        except BufferError:
            self.phase.buffer_errors += 1
            return False
        self.next_key += 1
        if paced:
            self.phase.produced += 1
        return True

    def status(self) -> dict[str, Any]:
        return {
            "event": "status",
            "t": time.time(),
            "phase": self.phase.name,
            "produced": self.next_key,
            "acked": self.acked,
            "failed": dict(self.failed),
            "client_errors": dict(self.client_errors),
            "queue": len(self.producer),
            "trace": self.producer.trace_status(),
            "vm_rss_kib": vm_kib("VmRSS"),
        }

    def burst(self, n: int) -> dict[str, Any]:
        """n messages as fast as produce() takes them, then poll until each is reported."""
        self.calls = calls = Calls()
        self.exact = False
        target = self.next_key + n
        started = time.perf_counter()
        while self.next_key < target:
            if not self.produce_one(paced=False):
                self._timed("poll", self.producer.poll, 0.005)
            elif self.next_key % 1000 == 0:
                self._timed("poll", self.producer.poll, 0)
        produced = time.perf_counter()
        deadline = produced + 60
        while self.acked + sum(self.failed.values()) < self.next_key and time.perf_counter() < deadline:
            self._timed("poll", self.producer.poll, 0.01)
        done = time.perf_counter()
        self.calls = self.phase.calls
        self.exact = True
        return {
            "event": "burst",
            "phase": self.phase.name,
            "messages": n,
            "produce_s": round(produced - started, 4),
            "per_s": round(n / (produced - started), 1),
            "all_reported_s": round(done - started, 4),
            "reported_per_s": round(n / (done - started), 1),
            **calls.summary(),
        }

    def run(self) -> None:
        emit({"event": "ready", "vm_rss_kib": vm_kib("VmRSS"), "trace": self.producer.trace_status()})
        interval = float(self.config.get("status_interval_s", 0.5))
        next_status = time.monotonic() + interval
        rate_origin, rate_sent = time.monotonic(), 0
        while True:
            t0, q0 = time.perf_counter(), self.runqueue.ns()
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if cmd.get("stop"):
                    break
                if "rate" in cmd:
                    self.rate = float(cmd["rate"])
                if "phase" in cmd:
                    self.phase.ended = time.monotonic()
                    self.phases.append(Phase(cmd["phase"], self.rate))
                    self.calls = self.phase.calls
                if "phase" in cmd or "rate" in cmd:
                    rate_origin, rate_sent = time.monotonic(), 0
                if "burst" in cmd:
                    emit(self.burst(int(cmd["burst"])))
                    rate_origin, rate_sent = time.monotonic(), 0
                continue
            due = int((time.monotonic() - rate_origin) * self.rate) - rate_sent
            for _ in range(min(due, 1000)):
                if not self.produce_one():
                    break
                rate_sent += 1
            self._timed("poll", self.producer.poll, 0)
            took_ms = (time.perf_counter() - t0) * 1000
            own_ms = took_ms - (self.runqueue.ns() - q0) / 1e6
            self.phase.max_iteration_ms = max(self.phase.max_iteration_ms, took_ms)
            self.phase.max_iteration_ms_excl_runqueue = max(self.phase.max_iteration_ms_excl_runqueue, own_ms)
            if own_ms >= SLOW_CALL_MS and len(self.slowest) < 200:
                self.slowest.append({"call": "iteration", "ms": round(took_ms, 3), "runqueue_ms": round(took_ms - own_ms, 3),
                                     "phase": self.phase.name, "t": time.time()})  # fmt: skip
            if time.monotonic() >= next_status:
                emit(self.status())
                next_status += interval
            time.sleep(0.002)
        self.phase.ended = time.monotonic()
        emit(self.finish())

    def finish(self) -> dict[str, Any]:
        flush_started = time.monotonic()
        remaining = self.producer.flush(float(self.config.get("flush_timeout_s", 60)))
        # The app is done; now wait (bounded) until the trace sink took every spooled batch.
        deadline = time.monotonic() + float(self.config.get("drain_timeout_s", 60))
        while time.monotonic() < deadline:
            st = self.producer.trace_status()
            if st["sink_healthy"] and st["spool_bytes"] == 0:
                break
            self.producer.poll(0.2)
        before_close = self.producer.trace_status()
        self.producer.close()
        spool = Path(self.config["spool_dir"])
        return {
            "event": "result",
            "produced": self.next_key,
            "acked": self.acked,
            "failed": dict(self.failed),
            "client_errors": dict(self.client_errors),
            "undelivered_after_flush": remaining,
            "max_ack_latency_ms": round(self.max_ack_latency_s * 1000, 1),
            "drain_s": round(time.monotonic() - flush_started, 2),
            "trace_before_close": before_close,
            "trace": self.producer.trace_status(),
            "spool_files_left": len(list(spool.glob("*.arrow"))) if spool.is_dir() else 0,
            "phases": [p.summary() for p in self.phases],
            "slowest_calls": sorted(self.slowest, key=lambda s: -s["ms"])[:20],
            "gc_pauses": sorted(self.gc_pauses, key=lambda g: -g["ms"])[:20],
            "vm_hwm_kib": vm_kib("VmHWM"),
            "vm_rss_kib": vm_kib("VmRSS"),
        }


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def read_commands(into: queue.Queue[dict[str, Any]]) -> None:
    for line in sys.stdin:
        if line.strip():
            into.put(json.loads(line))
    into.put({"stop": True})  # stdin closed: the test is gone


def main() -> int:
    raw = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.readline()
    workload = Workload(json.loads(raw))
    threading.Thread(target=read_commands, args=(workload.commands,), name="commands", daemon=True).start()
    workload.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
