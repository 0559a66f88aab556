"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) for tests and demos.

The jars come from Maven Central through ``scripts/kafka/pom.xml`` and are cached under
``~/.cache/keytrace/kafka-<version>/``. Run ``python scripts/kafka_broker.py`` to start a broker by hand,
or ``--fetch-only`` to resolve the jars and exit.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

KAFKA_VERSION = os.environ.get("KEYTRACE_KAFKA_VERSION", "4.4.0")
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
log = logging.getLogger("keytrace.kafka_broker")
# librdkafka logs each refused connection while the broker boots; the broker's own log says more.
_probe_log = logging.getLogger("keytrace.kafka_broker.probe")
_probe_log.addHandler(logging.NullHandler())
_probe_log.propagate = False
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Each override says why it differs from Kafka's default; everything else is stock.
BROKER_OVERRIDES: dict[str, tuple[str, str]] = {
    "process.roles": ("broker,controller", "one JVM is both broker and KRaft controller"),
    "node.id": ("1", "the only node, and the only voter of the metadata quorum"),
    "controller.listener.names": ("CONTROLLER", "KRaft requires the controller listener to be named"),
    "inter.broker.listener.name": ("PLAINTEXT", "the broker talks to itself on its client listener"),
    "listener.security.protocol.map": ("PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT", "tests need no TLS or SASL"),
    "num.partitions": ("4", "auto-created topics match librdkafka's mock cluster"),
    "auto.create.topics.enable": ("true", "the default, pinned: trace events topics appear on first produce"),
    "offsets.topic.replication.factor": ("1", "the default of 3 cannot be met by one broker"),
    "offsets.topic.num.partitions": ("4", "50 partitions slow down the first group join on 2 cores"),
    "transaction.state.log.replication.factor": ("1", "the default of 3 cannot be met by one broker"),
    "transaction.state.log.min.isr": ("1", "the default of 2 cannot be met by one broker"),
    "transaction.state.log.num.partitions": ("4", "50 partitions slow down the first transaction"),
    "share.coordinator.state.topic.replication.factor": ("1", "the default of 3 cannot be met by one broker"),
    "share.coordinator.state.topic.min.isr": ("1", "the default of 2 cannot be met by one broker"),
    "group.initial.rebalance.delay.ms": ("0", "the 3 s wait for more members only slows tests"),
    "broker.session.timeout.ms": ("4000", "after a SIGKILL the restarted node waits this long for its old session"),
    "broker.heartbeat.interval.ms": ("500", "must stay well below broker.session.timeout.ms"),
    "num.network.threads": ("2", "the machine has 2 cores"),
    "num.io.threads": ("2", "the machine has 2 cores"),
}

JVM_OPTIONS = [
    "-Xms64m",
    "-Xmx512m",
    # One GC thread instead of G1's pool: the heap is small and the machine has 2 cores.
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
]

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched, formatted or started."""


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "keytrace" / f"kafka-{version}"


def fetch_jars(version: str = KAFKA_VERSION) -> Path:
    """Resolve the broker's runtime classpath once; later calls return the cached folder."""
    root = cache_dir(version)
    libs, done = root / "libs", root / "libs.complete"
    if done.exists():
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        # Two test sessions may start at once; only one of them runs Maven.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return libs
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=root))
        try:
            _copy_dependencies(version, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        jars = len(list(libs.glob("*.jar")))
        done.write_text(f"{jars} jars in {time.monotonic() - started:.1f} s\n")
    return libs


def _copy_dependencies(version: str, into: Path, attempts: int = 2) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaBrokerError("mvn not found: run .ci/install_kafka.sh (needs Maven and a Java 17 runtime)")
    # -U: retry artifacts whose earlier failure Maven cached in ~/.m2 instead of failing again without asking.
    cmd = [mvn, "-B", "-q", "-U", "-f", str(POM), f"-Dkafka.version={version}", "dependency:copy-dependencies"]
    cmd += ["-DincludeScope=runtime", f"-DoutputDirectory={into}"]
    for attempt in range(1, attempts + 1):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode == 0 and any(into.glob(f"kafka_2.13-{version}.jar")):
            return
        if attempt < attempts:
            time.sleep(5)
    errors = [line for line in _ANSI.sub("", proc.stdout + proc.stderr).splitlines() if "[ERROR]" in line]
    causes = [line for line in errors if "Failed to execute" in line or "Could not" in line]
    summary = "\n".join(causes or errors)
    raise KafkaBrokerError(f"Maven could not resolve org.apache.kafka:kafka_2.13:{version}:\n{summary[-2000:]}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_cluster_id() -> str:
    """A random cluster id, as Kafka's Uuid.randomUuid() makes it: never starting with "-".

    kafka-storage's argument parser takes a value that starts with "-" for an option
    ("argument --cluster-id: expected one argument"), which failed one broker start in 64.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


# Strong references: a broker object dropped without stop() must still not leave its JVM behind.
_live: set[KafkaBroker] = set()


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_live):
        broker.kill()


class KafkaBroker:
    """One KRaft node on free 127.0.0.1 ports, with a JVM that never outlives its owner.

    The JVM runs in its own process group and gets SIGKILL when the thread that started it exits
    (``setpriv --pdeathsig``), so start it from a thread that lives as long as the broker.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        version: str = KAFKA_VERSION,
        config: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
        log_level: str = "INFO",
    ) -> None:
        self.version = version
        self.start_timeout = start_timeout
        self.log_level = log_level
        self._extra = dict(config or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="keytrace-kafka-"))
        self.port = 0
        self.controller_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._classpath = ""
        self._lock = threading.Lock()

    @property
    def bootstrap_servers(self) -> str:
        if not self.port:
            raise KafkaBrokerError("broker not started")
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> KafkaBroker:
        """Fetch, configure, format and launch the broker, and wait until it answers metadata requests."""
        if self.running:
            return self
        self._classpath = str(fetch_jars(self.version) / "*")
        self.port, self.controller_port = free_port(), free_port()
        self._write_config()
        self._format()
        self._launch()
        return self

    def restart(self) -> KafkaBroker:
        """Stop (if running) and start again on the same ports and the same log dir.

        After kill() the new process waits for the old one's session to expire (broker.session.timeout.ms).
        """
        if not self.port:
            return self.start()
        self.stop()
        self._launch()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM for a controlled shutdown, SIGKILL if it takes longer than ``timeout``."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self._signal(signal.SIGTERM)
                # A paused JVM would never see the SIGTERM.
                self._signal(signal.SIGCONT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("kafka broker %s ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
                    self._signal(signal.SIGKILL)
                    proc.wait(10)
            self._forget()

    def kill(self) -> None:
        """SIGKILL, as a crash: no controlled shutdown, no flush."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                self._signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            self._forget()

    def pause(self) -> None:
        """SIGSTOP: sockets stay open but nothing answers, like a long GC pause or a hung host."""
        self._require_running()
        self._signal(signal.SIGSTOP)
        self.paused = True
        self._wait_state(stopped=True)

    def resume(self) -> None:
        self._require_running()
        self._signal(signal.SIGCONT)
        self.paused = False
        self._wait_state(stopped=False)

    def close(self) -> None:
        """Stop and remove the work dir if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> KafkaBroker:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"KafkaBroker({self.version}, port={self.port}, {state}, workdir={str(self.workdir)!r})"

    def _forget(self) -> None:
        self._proc = None
        self.paused = False
        _live.discard(self)

    def _require_running(self) -> None:
        if not self.running:
            raise KafkaBrokerError("broker is not running")

    def _wait_state(self, *, stopped: bool, timeout: float = 5.0) -> None:
        """Signals are asynchronous: wait until the kernel reports the JVM (not) stopped."""
        assert self._proc is not None
        stat = Path(f"/proc/{self._proc.pid}/stat")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return  # no procfs: trust the signal
            if (state in ("T", "t")) == stopped:
                return
            time.sleep(0.01)
        raise KafkaBrokerError(f"kafka broker {self._proc.pid} did not {'stop' if stopped else 'continue'}")

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def _write_config(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        own = {
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "log.dirs": str(data),
        }
        lines = [f"# {why}\n{key}={value}" for key, (value, why) in BROKER_OVERRIDES.items()]
        lines += [f"{key}={value}" for key, value in {**own, **self._extra}.items()]
        (self.workdir / "server.properties").write_text("\n".join(lines) + "\n")
        (self.workdir / "log4j2.properties").write_text(LOG4J2.format(level=self.log_level))
        (self.workdir / "format-log4j2.properties").write_text(LOG4J2.format(level="WARN"))

    def _java(self, log4j: str, main: str, *args: str, short_lived: bool = False) -> list[str]:
        java_home = os.environ.get("JAVA_HOME")
        java = (java_home and shutil.which("java", path=os.path.join(java_home, "bin"))) or shutil.which("java")
        if java is None:
            raise KafkaBrokerError("java not found: run .ci/install_kafka.sh (needs a Java 17 runtime)")
        return [
            java,
            *JVM_OPTIONS,
            # A JVM that exits within seconds gains nothing from the C2 compiler but its CPU time.
            *(["-XX:TieredStopAtLevel=1"] if short_lived else []),
            f"-Dlog4j2.configurationFile={self.workdir / log4j}",
            "-cp",
            self._classpath,
            main,
            *args,
        ]

    def _format(self) -> None:
        # Kafka 4 uses a dynamic quorum: --standalone makes this node its only voter.
        cmd = self._java(
            "format-log4j2.properties",
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            random_cluster_id(),
            "--config",
            str(self.workdir / "server.properties"),
            "--standalone",
            short_lived=True,
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise KafkaBrokerError(f"kafka-storage format failed:\n{(proc.stdout + proc.stderr)[-3000:]}")

    def _launch(self) -> None:
        cmd = self._java("log4j2.properties", "kafka.Kafka", str(self.workdir / "server.properties"))
        setpriv = shutil.which("setpriv")
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        with self._lock, open(self.log_path, "ab") as out:
            out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} launch\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            _live.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        """Wait until the broker answers a metadata request listing itself; fail fast if the JVM dies."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.start_timeout
        admin = None
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc else None
                raise KafkaBrokerError(f"kafka broker exited with {code} while starting:\n{self.log_tail()}")
            if admin is None and _port_open(self.port):
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "logger": _probe_log})
            if admin is not None:
                with contextlib.suppress(Exception):
                    if 1 in admin.list_topics(timeout=2).brokers:
                        return
            time.sleep(0.2)
        raise KafkaBrokerError(f"kafka broker not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch-only", action="store_true", help="resolve the broker jars into the cache and exit")
    parser.add_argument("--version", default=KAFKA_VERSION, help="org.apache.kafka:kafka_2.13 version")
    parser.add_argument("--workdir", type=Path, help="a new or empty dir for config, data and server.log")
    args = parser.parse_args(argv)
    # A shell starts background jobs with SIGINT ignored; SIGTERM must also stop the JVM cleanly.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        if args.fetch_only:
            libs = fetch_jars(args.version)
            jars = len(list(libs.glob("*.jar")))
            print(f"kafka {args.version}: {jars} jars in {libs} ({time.monotonic() - started:.1f} s)")
            return 0
        with KafkaBroker(args.workdir, version=args.version) as broker:
            print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
            ready = time.monotonic() - started
            print(f"ready in {ready:.1f} s; log: {broker.log_path}; Ctrl-C to stop", file=sys.stderr, flush=True)
            while broker.running:
                time.sleep(0.5)
            print(f"kafka broker exited:\n{broker.log_tail()}", file=sys.stderr)
            return 1
    except KafkaBrokerError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
