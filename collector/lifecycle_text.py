"""Plain-text rendering of a key's lifecycle for the terminal (`keytrace trace`)."""

from __future__ import annotations

from typing import Any


def printable(value: Any) -> str:
    """Text safe for a terminal: control characters and escape sequences are shown escaped."""
    text = "" if value is None else str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def key_text(doc: dict[str, Any]) -> str:
    """The key as text when it is printable UTF-8, else as hex:…"""
    key = doc.get("key")
    if isinstance(key, str) and key.isprintable() and not key.startswith("hex:"):
        return key
    hex_ = doc.get("key_hex")
    return f"hex:{hex_}" if hex_ is not None else printable(key)


def _event_line(ev: dict[str, Any]) -> str:
    kind = ev.get("kind", "?")
    parts = [f"  {ev.get('ts', ''):<28} {kind:<8}"]
    if kind in ("send", "resend"):
        parts.append(f"attempt {ev.get('attempt', 1)}")
    if kind == "ack":
        parts.append(f"p{ev.get('partition')} @ {ev.get('offset')}  latency {ev.get('latency_ms')} ms")
    if kind == "error":
        parts.append(printable(ev.get("error")))
        if ev.get("latency_ms") is not None:
            parts.append(f"after {ev.get('latency_ms')} ms")
    if kind == "reject":
        parts.append(printable(ev.get("error", "queue full")))
    if kind == "consume":
        parts.append(
            f"group {printable(ev.get('group'))}  p{ev.get('partition')} @ {ev.get('offset')}  "
            f"end-to-end {ev.get('e2e_latency_ms')} ms"
        )
    if kind == "commit":
        parts.append(f"group {printable(ev.get('group'))}  {printable(ev.get('error') or 'ok')}")
    return "  ".join(parts)


def render_text(doc: dict[str, Any]) -> str:
    lines = [f"key {key_text(doc)}: {len(doc.get('messages', []))} message(s)"]
    for m in doc.get("messages", []):
        topic = printable(m.get("topic"))
        where = (
            f"{topic} p{m.get('partition')} @ {m.get('offset')}"
            if m.get("offset") is not None
            else f"{topic} (no offset)"
        )
        lines.append("")
        if "key" in m or "key_hex" in m:
            where = f"{key_text(m)}  {where}"
        lines.append(f"{where}  [{m.get('status')}]")
        for ev in m.get("events", []):
            lines.append(_event_line(ev))
    return "\n".join(lines)
