"""librdkafka's built-in mock Kafka cluster, with its fault-injection API.

The mock cluster ships inside the confluent-kafka wheel and speaks the real Kafka
protocol over real sockets on 127.0.0.1, so any Producer or Consumer can use
``MockCluster().bootstrap_servers``. confluent-kafka does not expose the fault API,
so it is driven here through ctypes, on the same librdkafka shared object that
confluent-kafka itself loads.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import importlib.util
import socket
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from functools import cache
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException

ALL_BROKERS = -1
"""Broker id accepted by the broker-level faults to mean every broker."""

_RD_KAFKA_PRODUCER = 0
_ERRSTR_SIZE = 512
_NUDGE_AFTER_S = 0.05


class ApiKey(IntEnum):
    """Kafka protocol request types, as used by the request-error faults."""

    Produce = 0
    Fetch = 1
    ListOffsets = 2
    Metadata = 3
    OffsetCommit = 8
    OffsetFetch = 9
    FindCoordinator = 10
    JoinGroup = 11
    Heartbeat = 12
    LeaveGroup = 13
    SyncGroup = 14
    DescribeGroups = 15
    ListGroups = 16
    ApiVersions = 18
    InitProducerId = 22
    AddPartitionsToTxn = 24
    AddOffsetsToTxn = 25
    EndTxn = 26
    TxnOffsetCommit = 28
    ConsumerGroupHeartbeat = 68


class MockClusterError(KafkaException):
    """A mock cluster call failed; ``args[0]`` is the ``KafkaError``."""


def _library_candidates() -> list[Path]:
    spec = importlib.util.find_spec("confluent_kafka")
    if spec is None or not spec.submodule_search_locations:
        return []
    pkg = Path(next(iter(spec.submodule_search_locations)))
    # auditwheel (Linux), delocate (macOS) and delvewheel (Windows) each put the bundled library elsewhere.
    patterns = [
        (pkg.parent / "confluent_kafka.libs", "librdkafka*.so*"),
        (pkg / ".dylibs", "librdkafka*.dylib"),
        (pkg.parent / "confluent_kafka.libs", "librdkafka*.dll"),
        (pkg, "librdkafka*"),
    ]
    return [p for folder, pattern in patterns if folder.is_dir() for p in sorted(folder.glob(pattern))]


@cache
def _lib() -> ctypes.CDLL:
    # Importing cimpl first makes the dynamic loader hand back the very copy confluent-kafka uses.
    import confluent_kafka.cimpl  # noqa: F401

    paths: list[str] = [str(p) for p in _library_candidates()]
    found = ctypes.util.find_library("rdkafka")
    if found:
        paths.append(found)
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "rd_kafka_mock_cluster_new"):
            return _declare(lib)
    raise RuntimeError(f"no librdkafka with the mock cluster API found (tried: {paths or 'nothing'})")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    vp, cp, i16, i32, i64, err = (
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int16,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.c_int,
    )
    signatures: dict[str, tuple[type | None, list[type]]] = {
        "rd_kafka_conf_new": (vp, []),
        "rd_kafka_conf_destroy": (None, [vp]),
        "rd_kafka_conf_set": (err, [vp, cp, cp, cp, ctypes.c_size_t]),
        "rd_kafka_new": (vp, [ctypes.c_int, vp, cp, ctypes.c_size_t]),
        "rd_kafka_destroy": (None, [vp]),
        "rd_kafka_mock_cluster_new": (vp, [vp, ctypes.c_int]),
        "rd_kafka_mock_cluster_destroy": (None, [vp]),
        "rd_kafka_mock_cluster_bootstraps": (cp, [vp]),
        "rd_kafka_mock_broker_set_down": (err, [vp, i32]),
        "rd_kafka_mock_broker_set_up": (err, [vp, i32]),
        "rd_kafka_mock_broker_set_rtt": (err, [vp, i32, ctypes.c_int]),
        "rd_kafka_mock_broker_set_rack": (err, [vp, i32, cp]),
        "rd_kafka_mock_broker_error_stack_cnt": (err, [vp, i32, i16, ctypes.POINTER(ctypes.c_size_t)]),
        "rd_kafka_mock_push_request_errors_array": (None, [vp, i16, ctypes.c_size_t, ctypes.POINTER(err)]),
        "rd_kafka_mock_clear_request_errors": (None, [vp, i16]),
        "rd_kafka_mock_topic_create": (err, [vp, cp, ctypes.c_int, ctypes.c_int]),
        "rd_kafka_mock_topic_set_error": (None, [vp, cp, err]),
        "rd_kafka_mock_partition_set_leader": (err, [vp, cp, i32, i32]),
        "rd_kafka_mock_partition_set_follower": (err, [vp, cp, i32, i32]),
        "rd_kafka_mock_partition_set_follower_wmarks": (err, [vp, cp, i32, i64, i64]),
        "rd_kafka_mock_coordinator_set": (err, [vp, cp, cp, i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    # Variadic: argtypes stay unset so each call passes explicitly typed (int32, int) pairs.
    lib.rd_kafka_mock_broker_push_request_error_rtts.restype = err
    return lib


def librdkafka_path() -> str:
    """Path of the librdkafka shared object that drives the mock cluster."""
    return str(_lib()._name)


def _check(err: int, what: str) -> None:
    if err:
        raise MockClusterError(KafkaError(err, f"{what}: {KafkaError(err).str()}"))


_open_clusters: weakref.WeakSet[MockCluster] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for cluster in list(_open_clusters):
        cluster.close()


class MockCluster:
    """A running mock Kafka cluster with brokers 1..``num_brokers`` on 127.0.0.1.

    Every fault method may be called from any thread while clients are producing
    and consuming. Faults are applied by the cluster's own thread, in call order.
    """

    def __init__(self, num_brokers: int = 3) -> None:
        if num_brokers < 1:
            raise ValueError("num_brokers must be at least 1")
        lib = _lib()
        self._lib = lib
        self._lock = threading.RLock()
        self._timers: set[threading.Timer] = set()
        self.num_brokers = num_brokers

        errstr = ctypes.create_string_buffer(_ERRSTR_SIZE)
        conf = lib.rd_kafka_conf_new()
        # The handle only keeps the cluster's books; it never connects, so its warnings are noise.
        if lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, _ERRSTR_SIZE) != 0:
            lib.rd_kafka_conf_destroy(conf)
            raise RuntimeError(errstr.value.decode())
        rk = lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, _ERRSTR_SIZE)
        if not rk:
            lib.rd_kafka_conf_destroy(conf)
            raise RuntimeError(f"rd_kafka_new failed: {errstr.value.decode()}")
        mcluster = lib.rd_kafka_mock_cluster_new(rk, num_brokers)
        if not mcluster:
            lib.rd_kafka_destroy(rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self._rk: int | None = rk
        self._mcluster: int | None = mcluster
        self.bootstrap_servers: str = lib.rd_kafka_mock_cluster_bootstraps(mcluster).decode()
        _open_clusters.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.bootstrap_servers
        return f"MockCluster(num_brokers={self.num_brokers}, {state})"

    @property
    def closed(self) -> bool:
        return self._mcluster is None

    @property
    def broker_ids(self) -> list[int]:
        return list(range(1, self.num_brokers + 1))

    def _handle(self) -> int:
        if self._mcluster is None:
            raise MockClusterError(KafkaError(KafkaError._DESTROY, "mock cluster is closed"))
        return self._mcluster

    @contextmanager
    def _command(self) -> Iterator[int]:
        """Run one command against the cluster's thread, waking it if the command stalls.

        librdkafka's mock thread drains its wakeup pipe after serving its queue, so a command
        sent right after another can sleep for up to a second. Any socket event makes it serve
        the queue, so a slow command gets a throwaway connection to each broker.
        """
        with self._lock:
            handle = self._handle()
            timer = threading.Timer(_NUDGE_AFTER_S, self._nudge)
            timer.daemon = True
            try:
                timer.start()
            except RuntimeError:
                pass  # interpreter shutdown: no new threads, the command just may be slow
            try:
                yield handle
            finally:
                timer.cancel()

    def _nudge(self) -> None:
        for address in self.bootstrap_servers.split(","):
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
            except OSError:
                pass

    def _call(self, name: str, *args: object) -> None:
        with self._command() as handle:
            _check(getattr(self._lib, name)(handle, *args), name)

    # Brokers

    def broker_down(self, broker_id: int, seconds: float | None = None) -> None:
        """Disconnect a broker and refuse its connections; leadership does not move.

        The mock also leaves a downed broker out of Metadata, so clients forget it and find it
        again only at their next metadata refresh after ``broker_up`` (about 1 s by default,
        sooner with a low ``topic.metadata.refresh.interval.ms``).

        With ``seconds``, the broker comes back by itself after that long, without blocking the caller.
        """
        self._call("rd_kafka_mock_broker_set_down", broker_id)
        if seconds is not None:
            self._schedule(seconds, self.broker_up, broker_id)

    def broker_up(self, broker_id: int) -> None:
        """Let a broker accept connections again."""
        self._call("rd_kafka_mock_broker_set_up", broker_id)

    def set_rtt(self, broker_id: int, rtt_ms: int) -> None:
        """Delay every response of a broker by ``rtt_ms`` (0 restores it)."""
        self._call("rd_kafka_mock_broker_set_rtt", broker_id, rtt_ms)

    def set_rack(self, broker_id: int, rack: str) -> None:
        self._call("rd_kafka_mock_broker_set_rack", broker_id, rack.encode())

    @contextmanager
    def broker_outage(self, broker_id: int, seconds: float | None = None) -> Iterator[None]:
        """Keep a broker down inside the block, or for ``seconds`` if that ends first."""
        self.broker_down(broker_id)
        timer = self._schedule(seconds, self.broker_up, broker_id) if seconds is not None else None
        try:
            yield
        finally:
            if timer is not None:
                self._cancel(timer)
            if not self.closed:
                self.broker_up(broker_id)

    # Request errors

    def push_request_errors(self, api_key: int, errors: Sequence[int]) -> None:
        """Fail the next ``len(errors)`` requests of ``api_key``, on any broker, with these codes in order."""
        arr = (ctypes.c_int * len(errors))(*errors)
        with self._command() as handle:
            self._lib.rd_kafka_mock_push_request_errors_array(handle, api_key, len(errors), arr)

    def push_broker_request_error_rtts(
        self, broker_id: int, api_key: int, errors_rtts: Sequence[tuple[int, int]]
    ) -> None:
        """Answer the next requests of ``api_key`` on one broker with ``(error code, delay in ms)`` each."""
        args: list[object] = []
        for err, rtt_ms in errors_rtts:
            args += [ctypes.c_int(err), ctypes.c_int(rtt_ms)]
        with self._command() as handle:
            fn = self._lib.rd_kafka_mock_broker_push_request_error_rtts
            rc = fn(
                ctypes.c_void_p(handle),
                ctypes.c_int32(broker_id),
                ctypes.c_int16(api_key),
                ctypes.c_size_t(len(errors_rtts)),
                *args,
            )
            _check(rc, "rd_kafka_mock_broker_push_request_error_rtts")

    def broker_error_stack_count(self, broker_id: int, api_key: int) -> int:
        """How many pushed broker-level errors for ``api_key`` are still waiting."""
        cnt = ctypes.c_size_t()
        with self._command() as handle:
            rc = self._lib.rd_kafka_mock_broker_error_stack_cnt(handle, broker_id, api_key, ctypes.byref(cnt))
            _check(rc, "rd_kafka_mock_broker_error_stack_cnt")
        return cnt.value

    def clear_request_errors(self, api_key: int) -> None:
        with self._command() as handle:
            self._lib.rd_kafka_mock_clear_request_errors(handle, api_key)

    # Topics and partitions

    def create_topic(self, topic: str, partitions: int, replication_factor: int = 1) -> None:
        """Create a topic; the mock cluster has no CreateTopics API."""
        self._call("rd_kafka_mock_topic_create", topic.encode(), partitions, replication_factor)

    def topic_set_error(self, topic: str, err: int) -> None:
        """Return ``err`` for the topic in Metadata and AddPartitionsToTxn responses (0 clears it)."""
        with self._command() as handle:
            self._lib.rd_kafka_mock_topic_set_error(handle, topic.encode(), err)

    def partition_set_leader(self, topic: str, partition: int, broker_id: int) -> None:
        """Move a partition's leader; -1 leaves it leaderless. Clients see it on their next metadata refresh."""
        self._call("rd_kafka_mock_partition_set_leader", topic.encode(), partition, broker_id)

    def partition_set_follower(self, topic: str, partition: int, broker_id: int) -> None:
        """Set the preferred replica that consumers with a ``client.rack`` are sent to fetch from."""
        self._call("rd_kafka_mock_partition_set_follower", topic.encode(), partition, broker_id)

    def partition_set_follower_wmarks(self, topic: str, partition: int, low: int, high: int) -> None:
        self._call("rd_kafka_mock_partition_set_follower_wmarks", topic.encode(), partition, low, high)

    def coordinator_set(self, key_type: str, key: str, broker_id: int) -> None:
        """Pin the coordinator of a group (``key_type="group"``) or transactional id (``"transaction"``)."""
        self._call("rd_kafka_mock_coordinator_set", key_type.encode(), key.encode(), broker_id)

    # Lifecycle

    def _schedule(self, seconds: float, fn: Callable[[int], None], arg: int) -> threading.Timer:
        def run() -> None:
            with self._lock:
                self._timers.discard(timer)
                if not self.closed:
                    fn(arg)

        timer = threading.Timer(seconds, run)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()
        return timer

    def _cancel(self, timer: threading.Timer) -> None:
        timer.cancel()
        with self._lock:
            self._timers.discard(timer)

    def close(self) -> None:
        """Stop the brokers. Clients still pointing at them see connection errors, nothing worse."""
        with self._lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            if self._mcluster is None:
                return
            with self._command() as mcluster:
                self._lib.rd_kafka_mock_cluster_destroy(mcluster)
            self._lib.rd_kafka_destroy(self._rk)
            self._mcluster = self._rk = None
        _open_clusters.discard(self)

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_mcluster", None) is not None:
            self.close()
