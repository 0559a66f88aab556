"""A TCP proxy on 127.0.0.1 that cuts connections left idle, like a load balancer's idle timeout.

Two ways to cut, as seen in front of Kafka:

- ``reset``: once a connection carried no byte either way for ``idle_s`` seconds, both sides
  get a TCP RST (``SO_LINGER`` 0), so the client sees "Connection reset by peer" at once.
- ``silent``: the proxy forgets the flow instead: it resets the upstream side, leaves the
  client's socket open, and answers the client's next bytes with a RST, so the client learns
  of the cut only when it sends a request on the dead connection.

Run ``python idle_proxy.py UPSTREAM_PORT [--idle 30] [--mode reset]`` to use it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MODES = ("reset", "silent")
Upstream = tuple[str, int] | Callable[[], tuple[str, int]]


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with a RST instead of a FIN: SO_LINGER on, timeout 0."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class _Conn:
    ident: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    last: float = field(default_factory=time.monotonic)
    state: str = "open"  # open, silent (upstream gone, client not told yet), closed


class IdleProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream`` and cuts connections idle for ``idle_s`` seconds.

    ``upstream`` may be a callable, asked at each new connection (for a broker whose port is
    chosen after the proxy's). ``events`` lists what the proxy did, with wall-clock times.
    """

    def __init__(self, upstream: Upstream, idle_s: float = 30.0, mode: str = "reset", port: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.upstream = upstream
        self.idle_s = idle_s
        self.mode = mode
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._conns: dict[int, _Conn] = {}
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    # -- control, from any thread --------------------------------------------------------

    def start(self) -> IdleProxy:
        self._thread = threading.Thread(target=self._run, name=f"idle-proxy:{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("idle proxy did not start")
        return self

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        with contextlib.suppress(OSError):
            self._listener.close()

    def count(self, event: str) -> int:
        return sum(1 for e in list(self.events) if e["event"] == event)

    def open_ids(self) -> set[int]:
        """Connections still forwarding (neither closed nor cut)."""
        return {c.ident for c in list(self._conns.values()) if c.state == "open"}

    def __enter__(self) -> IdleProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the event loop thread -------------------------------------------------------------

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, sock=self._listener)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for conn in list(self._conns.values()):
                _rst(conn.client)
                _rst(conn.upstream)

    def _note(self, conn: _Conn, event: str, **extra: Any) -> None:
        self.events.append({"t": time.time(), "conn": conn.ident, "event": event, **extra})

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        conn = _Conn(next(self._ids), client_w)
        self._conns[conn.ident] = conn
        self._note(conn, "accept")
        try:
            host, port = self.upstream() if callable(self.upstream) else self.upstream
            up_r, conn.upstream = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, TimeoutError) as exc:
            self._note(conn, "upstream_failed", error=str(exc))
            _rst(client_w)
            self._conns.pop(conn.ident, None)
            return
        tasks = [
            asyncio.create_task(self._pipe(conn, client_r, conn.upstream, from_client=True)),
            asyncio.create_task(self._pipe(conn, up_r, client_w, from_client=False)),
            asyncio.create_task(self._watch(conn)),
        ]
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._conns.pop(conn.ident, None)

    async def _pipe(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        while conn.state != "closed":
            try:
                data = await reader.read(65536)
            except (OSError, asyncio.IncompleteReadError):
                data = b""
            if from_client and conn.state == "silent":
                # The flow was forgotten: whatever the client sends now is answered with a RST.
                self._note(conn, "reset_on_send", bytes=len(data))
                conn.state = "closed"
                _rst(conn.client)
                return
            if not data:
                if not from_client and conn.state == "silent":
                    return  # the upstream side was cut on purpose; the client must not hear of it
                if conn.state == "open":
                    self._note(conn, "closed", by="client" if from_client else "upstream")
                conn.state = "closed"
                for w in (conn.client, conn.upstream):
                    if w is not None and not w.transport.is_closing():
                        w.close()
                return
            conn.last = time.monotonic()
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                conn.state = "closed"
                _rst(conn.client)
                _rst(conn.upstream)
                return

    async def _watch(self, conn: _Conn) -> None:
        while conn.state == "open":
            idle = time.monotonic() - conn.last
            if idle >= self.idle_s:
                if self.mode == "reset":
                    conn.state = "closed"
                    self._note(conn, "idle_reset", idle_s=round(idle, 3))
                    _rst(conn.client)
                else:
                    conn.state = "silent"
                    self._note(conn, "idle_forgotten", idle_s=round(idle, 3))
                _rst(conn.upstream)
                return
            await asyncio.sleep(min(0.5, self.idle_s - idle + 0.01))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds without traffic before a cut")
    parser.add_argument("--mode", choices=MODES, default="reset")
    args = parser.parse_args(argv)
    with IdleProxy(("127.0.0.1", args.upstream_port), args.idle, args.mode, args.port) as proxy:
        print(f"127.0.0.1:{proxy.port} -> 127.0.0.1:{args.upstream_port}, {args.mode} after {args.idle} s idle")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
