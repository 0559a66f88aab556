"""Plain-text rendering of a key's lifecycle for the terminal (`keytrace trace`)."""

from __future__ import annotations

from typing import Any


def _event_line(ev: dict[str, Any]) -> str:
    kind = ev.get("kind", "?")
    parts = [f"  {ev.get('ts', ''):<28} {kind:<8}"]
    if kind in ("send", "resend"):
        parts.append(f"attempt {ev.get('attempt', 1)}")
    if kind == "ack":
        parts.append(f"p{ev.get('partition')} @ {ev.get('offset')}  latency {ev.get('latency_ms')} ms")
    if kind == "error":
        parts.append(f"{ev.get('error')}")
        if ev.get("latency_ms") is not None:
            parts.append(f"after {ev.get('latency_ms')} ms")
    if kind == "reject":
        parts.append(f"{ev.get('error', 'queue full')}")
    if kind == "consume":
        parts.append(
            f"group {ev.get('group')}  p{ev.get('partition')} @ {ev.get('offset')}  "
            f"end-to-end {ev.get('e2e_latency_ms')} ms"
        )
    if kind == "commit":
        parts.append(f"group {ev.get('group')}  {ev.get('error') or 'ok'}")
    return "  ".join(parts)


def render_text(doc: dict[str, Any]) -> str:
    lines = [f"key {doc.get('key')!s}: {len(doc.get('messages', []))} message(s)"]
    for m in doc.get("messages", []):
        where = (
            f"{m.get('topic')} p{m.get('partition')} @ {m.get('offset')}"
            if m.get("offset") is not None
            else f"{m.get('topic')} (no offset)"
        )
        lines.append("")
        lines.append(f"{where}  [{m.get('status')}]")
        for ev in m.get("events", []):
            lines.append(_event_line(ev))
    return "\n".join(lines)
