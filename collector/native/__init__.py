"""Record send, ack, error and consume events inside librdkafka, and drain them to Arrow in bulk.

A small C plugin (kt_interceptor.c) is loaded by librdkafka through the client
config ``plugin.library.paths``. Its interceptors append one fixed-size record
per event to a bounded buffer of the client instance named by ``keytrace.src``;
no Python code runs per message. ``drain(src)`` swaps that buffer out; C lays
the records out as Arrow buffers (without the GIL) and pyarrow wraps them,
without copying, as one ``collector.schema.EVENTS`` record batch.

    conf = native.configure({"bootstrap.servers": ...}, src)
    producer = confluent_kafka.Producer(conf)
    ...
    batch = native.drain(src, first_seq=1, client_id="app")

Linux only; the plugin is compiled with the system C compiler on first use
(see ``collector/native/build.py``). ``available()`` says whether it can be used.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from collector import schema
from collector.native import build

_ABI = 7
_MIN_LIBRDKAFKA = 0x02000000
SOURCE_PROPERTY = "keytrace.src"
MAX_RECORDS_PROPERTY = "keytrace.max.records"
MAX_KEY_BYTES_PROPERTY = "keytrace.max.key.bytes"

# Order of kt_bind's function table.
_API = (
    "rd_kafka_conf_interceptor_add_on_conf_set",
    "rd_kafka_conf_interceptor_add_on_conf_dup",
    "rd_kafka_conf_interceptor_add_on_conf_destroy",
    "rd_kafka_conf_interceptor_add_on_new",
    "rd_kafka_interceptor_add_on_send",
    "rd_kafka_interceptor_add_on_acknowledgement",
    "rd_kafka_interceptor_add_on_consume",
    "rd_kafka_topic_name",
    "rd_kafka_message_latency",
    "rd_kafka_message_timestamp",
    "rd_kafka_err2name",
    "rd_kafka_err2str",
)
# The EVENTS columns kt_drain_columns builds, in its order; the others are filled here.
_NATIVE_COLUMNS = (
    "seq",
    "ts",
    "kind",
    "topic",
    "partition",
    "offset",
    "key",
    "value_size",
    "attempt",
    "latency_us",
    "msg_ts_ms",
    "error_code",
    "error_name",
    "error_retriable",
    "error_message",
)
_NCOLS = len(_NATIVE_COLUMNS)
_MAX_PATCHES = 1  # KT_MAX_PATCHES


class NativeUnavailable(RuntimeError):
    """The native plugin cannot be used here; the message says why."""


class _Span(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Columns(ctypes.Structure):
    _fields_ = [
        ("block", ctypes.c_void_p),
        ("block_len", ctypes.c_uint64),
        ("n", ctypes.c_uint64),
        ("recorded", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("live", ctypes.c_int64),
        ("null_count", ctypes.c_int64 * _NCOLS),
        ("buf", (_Span * 3) * _NCOLS),
        ("ntopics", ctypes.c_uint64),
        ("topic_offsets", _Span),
        ("base", ctypes.c_int64 * _NCOLS),
        ("width", ctypes.c_int64 * _NCOLS),
        ("key_data_offsets", _Span),
        ("npatch", ctypes.c_int64 * _NCOLS),
        ("patch_row", (ctypes.c_uint64 * _MAX_PATCHES) * _NCOLS),
        ("patch_val", (ctypes.c_int64 * _MAX_PATCHES) * _NCOLS),
    ]


class _Str(ctypes.Structure):
    _fields_ = [("p", ctypes.c_char_p), ("len", ctypes.c_int64)]


_NSLOTS = _NCOLS + 4  # the drained columns, then key_data, client_id, group_id, member_id
_NKINDS = 4
_MAX_META = 4


class _ExportNames(ctypes.Structure):
    _fields_ = [
        ("slot_name", _Str * _NSLOTS),
        ("nullable", ctypes.c_int8 * _NSLOTS),
        ("order", ctypes.c_int8 * _NSLOTS),
        ("kinds", _Str * _NKINDS),
        ("meta", (_Str * 2) * _MAX_META),
        ("nmeta", ctypes.c_int32),
        ("wire_key", _Str),
        ("wire_value", _Str),
        ("src_key", _Str),
        ("seq_key", _Str),
        ("enc_key", _Str),
        ("enc_value", _Str),
        ("base_key", _Str),
        ("patch_key", _Str),
    ]


class _ExportArgs(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint64), ("first_seq", ctypes.c_uint64), ("constant", _Str * 3)]


def _str(b: bytes) -> _Str:
    return _Str(b, len(b))


def _export_names() -> _ExportNames:
    """What kt_export_batch calls the wire form's fields and metadata (collector.schema's names)."""
    slots = [("key_len" if c == "key" else c) for c in _NATIVE_COLUMNS] + [
        "key_data",
        "client_id",
        "group_id",
        "member_id",
    ]
    names = _ExportNames()
    for i, name in enumerate(slots):
        names.slot_name[i] = _str(name.encode())
        names.nullable[i] = name == "key_len" or name not in schema.EVENTS.names or schema.EVENTS.field(name).nullable
    order = [
        slots.index(p)
        for f in schema.EVENTS.names
        for p in (("key_len", "key_data") if f == "key" else (f,))
        if p in slots
    ]
    assert sorted(order) == list(range(_NSLOTS)), order
    names.order[:] = order
    for i, kind in enumerate(_KIND_CODES):
        names.kinds[i] = _str(kind.encode())
    meta = list(schema.EVENTS.metadata.items())
    assert len(meta) <= _MAX_META
    for i, (k, v) in enumerate(meta):
        names.meta[i][0], names.meta[i][1] = _str(k), _str(v)
    names.nmeta = len(meta)
    names.wire_key, names.wire_value = _str(schema.META_WIRE), _str(schema.WIRE_ENCODED)
    names.src_key, names.seq_key = _str(schema.META_SRC), _str(schema.META_SEQ_LO)
    names.enc_key, names.enc_value = _str(schema.META_ENC), _str(schema.ENC_DELTA)
    names.base_key, names.patch_key = _str(schema.META_BASE), _str(schema.META_PATCH)
    return names


# The kind column's codes (the plugin's enum), as strings.
_KIND_CODES = (schema.SEND, schema.ACK, schema.ERROR, schema.CONSUME)
_NAMES = _export_names()
# Room for the root ArrowArray (80 bytes) and ArrowSchema (72 bytes) that pyarrow imports.
_ArrowArray = ctypes.c_uint64 * 10
_ArrowSchema = ctypes.c_uint64 * 9


@dataclass(frozen=True)
class Status:
    """Counters of one client instance, totals since it was created."""

    recorded: int
    dropped: int
    buffered: int
    live_clients: int


@dataclass
class _Plugin:
    lib: ctypes.CDLL
    path: str
    librdkafka: str
    # The same library, called with the GIL held: for calls that take microseconds, where
    # releasing the GIL would only hand it to another thread and wait to get it back.
    held: ctypes.PyDLL


def _loaded_librdkafka() -> str:
    """The librdkafka file confluent-kafka itself loaded, read from this process's memory map."""
    import confluent_kafka.cimpl  # noqa: F401  (maps the bundled librdkafka into the process)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as exc:
        raise NativeUnavailable(f"cannot read /proc/self/maps: {exc}") from exc
    found = sorted(
        {
            line.split(None, 5)[5]
            for line in maps.splitlines()
            if "/librdkafka" in line and len(line.split(None, 5)) == 6
        }
    )
    if len(found) > 1:
        bundled = [p for p in found if "confluent_kafka" in p]
        found = bundled if len(bundled) == 1 else found
    if len(found) != 1:
        raise NativeUnavailable(f"expected one librdkafka in this process, found {found or 'none'}")
    return found[0]


def _plugin_file() -> Path:
    explicit = os.environ.get("KEYTRACE_NATIVE_PLUGIN")
    if explicit:
        return Path(explicit)
    # A wheel or `setup.py build_ext` may ship the plugin prebuilt next to this file.
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        prebuilt = here / f"_kt_interceptor{suffix}"
        if prebuilt.is_file():
            return prebuilt
    try:
        return build.build()
    except build.BuildError as first:
        fallback = Path(os.environ.get("TMPDIR", "/tmp")) / f"keytrace-native-{os.getuid()}"
        if fallback == build.cache_dir():
            raise
        try:
            return build.build(fallback)
        except build.BuildError:
            raise first from None


_load_lock = threading.Lock()
_loaded: _Plugin | NativeUnavailable | None = None


def _plugin() -> _Plugin:
    """The bound plugin; the first call builds and loads it, and a failure is remembered (raised again)."""
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                try:
                    _loaded = _load()
                except NativeUnavailable as exc:
                    _loaded = exc
    if isinstance(_loaded, NativeUnavailable):
        raise NativeUnavailable(str(_loaded))
    return _loaded


def _load() -> _Plugin:
    if os.environ.get("KEYTRACE_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        raise NativeUnavailable("disabled by KEYTRACE_NATIVE")
    rdk_path = _loaded_librdkafka()
    # Same file as confluent-kafka's: the dynamic loader hands back that very instance.
    rdk = ctypes.CDLL(rdk_path)
    rdk.rd_kafka_version.restype = ctypes.c_int
    version = rdk.rd_kafka_version()
    if version < _MIN_LIBRDKAFKA:
        raise NativeUnavailable(f"librdkafka 0x{version:08x} is older than 2.0")
    try:
        path = _plugin_file()
    except build.BuildError as exc:
        raise NativeUnavailable(str(exc)) from exc
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load {path}: {exc}") from exc
    lib.kt_abi.restype = ctypes.c_int
    if lib.kt_abi() != _ABI:
        raise NativeUnavailable(f"{path} does not match this keytrace version")
    lib.kt_bind.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    lib.kt_drain_columns.argtypes = [ctypes.c_uint64, ctypes.POINTER(_Columns)]
    lib.kt_status.argtypes = [ctypes.c_uint64, ctypes.POINTER(_Columns)]
    lib.kt_forget.argtypes = [ctypes.c_uint64]
    lib.kt_free.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.kt_free.restype = None
    lib.kt_stash_bounds.argtypes = [ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)]
    table = (ctypes.c_void_p * len(_API))(*(ctypes.cast(getattr(rdk, name), ctypes.c_void_p).value for name in _API))
    if lib.kt_bind(table, len(_API)) != 0:
        raise NativeUnavailable("kt_bind rejected the librdkafka function table")
    # Sends may skip the lane lock when the GIL already keeps produce() calls apart
    # (kt_interceptor.c, "Single-writer mode"); a free-threaded interpreter keeps it.
    lib.kt_single_writer.argtypes = [ctypes.c_int]
    lib.kt_single_writer(int(getattr(sys, "_is_gil_enabled", lambda: True)()))
    held = ctypes.PyDLL(str(path))
    held.kt_export_batch.argtypes = [
        ctypes.POINTER(_Columns),
        ctypes.POINTER(_ExportNames),
        ctypes.POINTER(_ExportArgs),
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    held.kt_status.argtypes = [ctypes.c_uint64, ctypes.POINTER(_Columns)]
    held.kt_exports_live.restype = ctypes.c_int64
    held.kt_barrier_failures.restype = ctypes.c_int64
    held.kt_test_append_spin.argtypes = [ctypes.c_uint32]
    held.kt_test_append_spin.restype = None
    return _Plugin(lib, str(path), rdk_path, held)


_ext_lock = threading.Lock()
_ext: Any = None


def produce_descriptor() -> Any:
    """The `Produce` type of the `_kt_produce` extension (built on first use), or None.

    None when it cannot be built here (no Python headers, no compiler) or loaded; the
    reason is in ``produce_descriptor_reason()``. TracedProducer then keeps its Python
    ``produce`` method, which does the same work with one Python frame more per call.
    """
    global _ext
    if _ext is None:
        with _ext_lock:
            if _ext is None:
                _ext = _load_extension()
    return None if isinstance(_ext, str) else _ext.Produce


def produce_descriptor_reason() -> str | None:
    produce_descriptor()
    return _ext if isinstance(_ext, str) else None


def _load_extension() -> Any:
    if os.environ.get("KEYTRACE_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return "disabled by KEYTRACE_NATIVE"
    try:
        try:
            path = build.build_extension()
        except build.BuildError:
            path = build.build_extension(Path(os.environ.get("TMPDIR", "/tmp")) / f"keytrace-native-{os.getuid()}")
    except build.BuildError as exc:
        return str(exc)
    try:
        loader = importlib.machinery.ExtensionFileLoader(build.EXT_NAME, str(path))
        spec = importlib.util.spec_from_file_location(build.EXT_NAME, str(path), loader=loader)
        if spec is None:
            return f"cannot load {path}"
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except (ImportError, OSError) as exc:
        return f"cannot load {path}: {exc}"


def available() -> bool:
    """Whether the native plugin can be used in this process (see ``unavailable_reason``)."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    try:
        _plugin()
    except NativeUnavailable as exc:
        return str(exc)
    return None


def plugin_path() -> str:
    """Path of the plugin shared object; raises NativeUnavailable."""
    return _plugin().path


def configure(
    conf: dict[str, Any], src: int, *, max_records: int | None = None, max_key_bytes: int | None = None
) -> dict[str, Any]:
    """A copy of a client config that loads the plugin and records into the buffer of ``src``.

    ``max_records`` (default 1,048,576) and ``max_key_bytes`` (default 32 MiB) bound each of the
    instance's two buffers; events beyond them between two drains are dropped and counted.
    """
    if not 0 <= src < 2**64:
        raise ValueError("src must be an unsigned 64-bit integer")
    path = plugin_path()
    existing = conf.get("plugin.library.paths")
    # librdkafka must load the plugin before it sees keytrace.* properties, so it goes first.
    out: dict[str, Any] = {"plugin.library.paths": f"{existing};{path}" if existing else path}
    out.update((k, v) for k, v in conf.items() if k != "plugin.library.paths")
    out[SOURCE_PROPERTY] = str(src)
    if max_records is not None:
        out[MAX_RECORDS_PROPERTY] = str(int(max_records))
    if max_key_bytes is not None:
        out[MAX_KEY_BYTES_PROPERTY] = str(int(max_key_bytes))
    return out


# Serialises drain, status and forget: a drained buffer is reused by the next drain of its src.
_lock = threading.Lock()


def status(src: int) -> Status | None:
    """Counters of ``src``, or None if no client with that id exists (or it was forgotten)."""
    out = _Columns()
    with _lock:
        if _plugin().held.kt_status(src, ctypes.byref(out)) != 0:
            return None
    return Status(out.recorded, out.dropped, out.n, out.live)


def stashed_bounds() -> tuple[int, int] | None:
    """(max_records, max_key_bytes) of the buffers kept from the last freed client, or None.

    The next client created with the same bounds takes them over (empty, their pages
    already resident) instead of allocating its own.
    """
    records, arena = ctypes.c_uint32(), ctypes.c_uint32()
    with _lock:
        full = _plugin().lib.kt_stash_bounds(ctypes.byref(records), ctypes.byref(arena))
    return (records.value, arena.value) if full else None


def clock() -> str:
    """How the recorder stamps events: "tsc" (read in C, converted at each drain) or "realtime".

    "tsc" where the kernel keeps time with the TSC itself (clocksource "tsc"), unless the
    environment variable KEYTRACE_NATIVE_CLOCK=realtime was set when the plugin was loaded.
    """
    with _lock:
        return "tsc" if _plugin().lib.kt_uses_tsc() else "realtime"


def lock_free_sends() -> bool:
    """Whether sends are recorded without the lane lock (single-writer mode: a GIL and Linux's membarrier)."""
    return bool(_plugin().held.kt_single_writer(0))


def exports_live() -> int:
    """Drained batches whose memory is still held (by pyarrow objects) in this process."""
    return _plugin().held.kt_exports_live()


def forget(src: int) -> None:
    """Release the buffers of ``src`` once its clients are destroyed; drain it first."""
    with _lock:
        _plugin().lib.kt_forget(src)


def drain(
    src: int,
    *,
    first_seq: int = 1,
    client_id: str | None = None,
    group_id: str | None = None,
    member_id: str | None = None,
    wire: bool = False,
) -> pa.RecordBatch | None:
    """Everything recorded for ``src`` since the last drain, as one EVENTS batch (None if nothing).

    Rows get ``seq`` values ``first_seq, first_seq + 1, ...``; the caller advances its own
    counter by ``num_rows``. ``client_id``, ``group_id`` and ``member_id`` fill every row.
    The conversion runs in C without the GIL, and the batch comes to pyarrow through
    Arrow's C data interface in one call; its buffers are the plugin's own (no copy).
    With ``wire=True`` the batch is in the encoded wire form ("compact2", see
    ``collector/schema.py``) that ``schema.to_ipc`` ships as it is; otherwise it is decoded
    into the store's form (``schema.from_wire``).
    """
    plugin = _plugin()
    out = _Columns()
    with _lock:
        rc = plugin.lib.kt_drain_columns(src, ctypes.byref(out))
    if rc != 0 or out.n == 0:
        return None
    args = _ExportArgs(src=src, first_seq=first_seq)
    for i, value in enumerate((client_id, group_id, member_id)):
        if value is not None:
            args.constant[i] = _str(value.encode())
    array, c_schema = _ArrowArray(), _ArrowSchema()
    if plugin.held.kt_export_batch(ctypes.byref(out), ctypes.byref(_NAMES), ctypes.byref(args), c_schema, array):
        plugin.lib.kt_free(out.block, out.block_len)
        raise MemoryError(f"keytrace: no memory to export {out.n} drained events")
    batch = pa.RecordBatch._import_from_c(ctypes.addressof(array), ctypes.addressof(c_schema))
    return batch if wire else schema.from_wire(batch)


__all__ = [
    "NativeUnavailable",
    "Status",
    "available",
    "configure",
    "drain",
    "forget",
    "plugin_path",
    "stashed_bounds",
    "status",
    "unavailable_reason",
]
