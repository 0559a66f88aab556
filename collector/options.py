"""Tracing options, validated once when a traced client is built (never per message)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

DEFAULT_EVENTS_TOPIC = "_keytrace.events"
SINK_ENV = "KEYTRACE_SINK"
SPOOL_ENV = "KEYTRACE_SPOOL_DIR"

# Config keys whose values must never leave the process.
_SECRET_MARKERS = (
    "password",
    "secret",
    "jaas",
    "token",
    "ssl.key.pem",
    "ssl.keystore",
    "oauthbearer.config",
    "basic.auth",
)


class TraceOptions(BaseModel):
    """Everything keytrace itself needs; the Kafka config dict stays the user's own."""

    sink: str | None = Field(None, description="Sink URI: duckdb:///path or kafka://host:port/topic")
    flush_interval_s: float = Field(0.2, gt=0, le=60, description="How often buffered events are shipped")
    spool_dir: Path | None = Field(None, description="Where batches go while the sink is down")
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Spool bound; beyond it batches are dropped")
    resend_attempts: int = Field(0, ge=0, le=100, description="Total attempts per message; 0 or 1 turns resend off")
    resend_backoff_ms: int = Field(1000, ge=0, le=600_000)
    stats_interval_ms: int = Field(1000, ge=0, description="statistics.interval.ms used when the user set none")
    shipper_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much nicer than its creator the shipper thread runs (Linux): tracing yields to the application",
    )
    native: bool | None = Field(
        None, description="Record per-message events in librdkafka (collector/native); None: when available"
    )

    @field_validator("sink")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("duckdb://", "kafka://", "spool://")):
            raise ValueError(f"sink URI {v!r} must start with duckdb://, kafka:// or spool://")
        return v


def use_native(options: TraceOptions) -> bool:
    """The native recorder, unless turned off ($KEYTRACE_NATIVE=0, native=False) or not buildable here."""
    if options.native is False or os.environ.get("KEYTRACE_NATIVE", "1") == "0":
        return False
    from collector import native

    available = native.available()
    if options.native and not available:
        raise ValueError(f"native recorder requested but unavailable: {native.unavailable_reason()}")
    return available


def resolve_sink(explicit: str | None, conf: dict[str, Any]) -> str:
    """sink= argument, else $KEYTRACE_SINK, else the events topic on the client's own cluster."""
    if explicit:
        return explicit
    env = os.environ.get(SINK_ENV)
    if env:
        return env
    servers = conf.get("bootstrap.servers") or conf.get("metadata.broker.list")
    if not servers:
        raise ValueError("no trace sink: pass sink=..., set KEYTRACE_SINK, or set bootstrap.servers")
    return f"kafka://{servers}/{DEFAULT_EVENTS_TOPIC}"


def default_spool_dir(sink_uri: str) -> Path:
    env = os.environ.get(SPOOL_ENV)
    base = Path(env) if env else Path.home() / ".cache" / "keytrace" / "spool"
    return base / hashlib.sha1(sink_uri.encode()).hexdigest()[:12]


def redact(conf: dict[str, Any]) -> dict[str, Any]:
    """The config as it can be shown: secrets removed, callables named, not called."""
    out: dict[str, Any] = {}
    for k, v in conf.items():
        if any(m in k for m in _SECRET_MARKERS):
            out[k] = "[redacted]"
        elif callable(v):
            out[k] = f"<callable {getattr(v, '__qualname__', type(v).__name__)}>"
        elif isinstance(v, str | int | float | bool) or v is None:
            out[k] = v
        else:
            out[k] = repr(v)
    return out
