"""The `keytrace` command. Each subcommand parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from collector.options import DEFAULT_EVENTS_TOPIC

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2


def _open_store(path: str, read_only: bool) -> Any:
    from collector.store import Store

    if read_only and not Path(path).exists():
        raise SystemExit(f"keytrace: no trace store at {path}")
    try:
        return Store(path, read_only=read_only)
    except Exception as exc:
        msg = str(exc)
        if "lock" in msg.lower():
            raise SystemExit(
                f"keytrace: {path} is open in another process (a running `keytrace serve` or `collect`).\n"
                "DuckDB lets one process hold a file; query it through that process's dashboard, "
                "or stop it first."
            ) from exc
        raise SystemExit(f"keytrace: cannot open {path}: {msg}") from exc


def parse_key(text: str, as_hex: bool) -> bytes:
    if as_hex:
        cleaned = text.removeprefix("hex:").removeprefix("0x").replace(" ", "")
        try:
            return bytes.fromhex(cleaned)
        except ValueError as exc:
            print(f"keytrace: {text!r} is not valid hex ({exc})", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from exc
    return text.encode("utf-8", "surrogateescape")


def cmd_trace(args: argparse.Namespace) -> int:
    from collector.lifecycle_text import render_text
    from collector.tracer import normalize_key

    key = normalize_key(parse_key(args.key, args.hex))
    with _open_store(args.db, read_only=True) as store:
        doc = store.trace_json(key, prefix=args.prefix)
    if not doc.get("messages"):
        shown = ("hex:" + key.hex()) if args.hex else args.key
        print(f"keytrace: no trace for key {shown!r} in {args.db}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        print(json.dumps(doc, indent=None if args.compact else 2))
    else:
        print(render_text(doc))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from collector.collect import Collector

    store = _open_store(args.db, read_only=False)
    collector = Collector(store, args.bootstrap_servers, args.events_topic, group_id=args.group)
    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"keytrace collect: {args.events_topic} on {args.bootstrap_servers} -> {args.db}", flush=True)
    last = time.monotonic()
    try:
        while not stop.is_set():
            try:
                collector.step()
            except Exception as exc:
                print(f"keytrace collect: {collector.stats.last_error or exc}", file=sys.stderr, flush=True)
                if args.exit_on_store_error:
                    return 3
                stop.wait(2.0)
            if args.progress and time.monotonic() - last >= args.progress:
                last = time.monotonic()
                s = collector.stats
                print(
                    f"records={s.records} batches={s.batches} rows={s.rows} dead_letters={s.dead_letters}",
                    flush=True,
                )
            if args.idle_exit and collector.stats.last_ingest_at is not None:
                if time.time() - collector.stats.last_ingest_at > args.idle_exit:
                    break
    finally:
        collector.close()
        try:
            store.close()
        except Exception as exc:  # a store invalidated by a failed write cannot checkpoint
            print(f"keytrace collect: closing {args.db}: {exc}", file=sys.stderr, flush=True)
    s = collector.stats
    print(f"keytrace collect: stopped; records={s.records} rows={s.rows} dead_letters={s.dead_letters}", flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    key = parse_key(args.key, args.hex) if args.key is not None else None
    with _open_store(args.db, read_only=True) as store:
        n = store.export(args.out, fmt=args.format, key=key)
    print(f"keytrace: wrote {n} events to {args.out}")
    return 0


def _add_db(p: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    p.add_argument("--db", required=required, default=default, help="DuckDB trace store file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keytrace",
        description="Trace every Kafka message by key: send, ack, failures and consumption.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("trace", help="print the lifecycle of every message under a key")
    p.add_argument("key", help="the message key (text, or hex with --hex)")
    _add_db(p)
    p.add_argument("--json", action="store_true", help="print JSON (stable shape for scripts)")
    p.add_argument("--compact", action="store_true", help="with --json: one line")
    p.add_argument("--hex", action="store_true", help="KEY is hex, for binary keys")
    p.add_argument("--prefix", action="store_true", help="match every key that starts with KEY")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("collect", help="consume the events topic into a trace store")
    p.add_argument("--bootstrap-servers", required=True, help="cluster that holds the events topic")
    p.add_argument("--events-topic", default=DEFAULT_EVENTS_TOPIC, help="events topic name")
    p.add_argument("--group", default="keytrace-collector", help="consumer group of the collectors")
    _add_db(p)
    p.add_argument("--progress", type=float, default=0, metavar="SECONDS", help="print counters every SECONDS")
    p.add_argument("--idle-exit", type=float, default=0, metavar="SECONDS", help="exit after SECONDS with no data")
    p.add_argument(
        "--exit-on-store-error", action="store_true", help="exit (code 3) instead of retrying when the store fails"
    )
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("export", help="write trace events to Parquet, CSV or a DuckDB file for review")
    _add_db(p)
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", choices=["parquet", "csv", "duckdb"], default="parquet", help="output format")
    p.add_argument("--key", default=None, help="only this key's messages")
    p.add_argument("--hex", action="store_true", help="--key is hex")
    p.set_defaults(func=cmd_export)

    _add_dashboard_commands(sub)
    return parser


def _add_dashboard_commands(sub: Any) -> None:
    from collector import app_commands

    app_commands.add_parsers(sub, _add_db)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
