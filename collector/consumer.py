"""TracedConsumer: confluent_kafka.Consumer that records consumption, commits and rebalances."""

from __future__ import annotations

import json
from time import time_ns
from typing import Any

import confluent_kafka

from collector import native, schema
from collector.options import redact, use_native
from collector.producer import build_options, install_common_callbacks, split_conf
from collector.tracer import Tracer, wrap_callback

_poll = confluent_kafka.Consumer.poll
_consume = confluent_kafka.Consumer.consume
_subscribe = confluent_kafka.Consumer.subscribe
_close = confluent_kafka.Consumer.close
_commit = confluent_kafka.Consumer.commit
_memberid = confluent_kafka.Consumer.memberid


def _partitions_json(partitions: Any) -> str:
    return json.dumps(
        [
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": tp.offset,
                **({"error": tp.error.name()} if tp.error is not None else {}),
            }
            for tp in partitions or []
        ]
    )


class TracedConsumer(confluent_kafka.Consumer):
    """A drop-in `confluent_kafka.Consumer`: same config, same methods, every message traced.

    Extra keyword arguments: `sink` (trace sink URI) and `trace_options`.
    """

    # Slots, as in TracedProducer: no instance dict for `c.poll` to probe first.
    __slots__ = ("_kt_record_commit", "_kt_native", "_kt_tracer", "_kt_consumes", "__weakref__")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        conf, own = split_conf(args, kwargs)
        options, sink_uri = build_options(conf, own)
        user_conf = dict(conf)
        group = conf.get("group.id")
        native_mode = use_native(options)
        tracer = Tracer("consumer", str(conf.get("client.id", "rdkafka")), group, options, sink_uri, native=native_mode)

        def record_commit(err: Any, partitions: Any) -> None:
            failed = err is not None
            tracer.event(
                schema.COMMIT,
                error_code=err.code() if failed else None,
                error_name=err.name() if failed else None,
                error_retriable=err.retriable() if failed else None,
                error_message=err.str() if failed else None,
                detail=_partitions_json(partitions),
            )

        conf["on_commit"] = wrap_callback(tracer, record_commit, conf.get("on_commit"))
        self._kt_record_commit = record_commit
        install_common_callbacks(tracer, conf, options)
        if native_mode:
            conf = native.configure(conf, tracer.src)
        super().__init__(conf)
        self._kt_native = native_mode
        self._kt_tracer = tracer
        self._kt_consumes = tracer.consumes.append
        tracer.config(redact(user_conf))

    def _kt_record(self, msg: Any) -> None:
        try:
            if msg.error() is None:
                self._kt_consumes(
                    (
                        time_ns(),
                        msg.topic(),
                        msg.partition(),
                        msg.offset(),
                        msg.key(),
                        msg.timestamp()[1],
                        self._kt_tracer.member_id,
                    )
                )
        except Exception as exc:
            self._kt_tracer.internal_error(exc)

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        msg = _poll(self, *args, **kwargs)
        if msg is not None and not self._kt_native:
            self._kt_record(msg)
        return msg

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        msgs = _consume(self, *args, **kwargs)
        if not self._kt_native:
            for msg in msgs:
                self._kt_record(msg)
        return msgs

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        # librdkafka reports asynchronous commits through on_commit; synchronous ones
        # only through the return value or the exception, so record those here.
        if kwargs.get("asynchronous", True):
            return _commit(self, *args, **kwargs)
        try:
            result = _commit(self, *args, **kwargs)
        except confluent_kafka.KafkaException as exc:
            self._kt_safe_commit(exc.args[0] if exc.args else None, None)
            raise
        self._kt_safe_commit(None, result)
        return result

    def _kt_safe_commit(self, err: Any, partitions: Any) -> None:
        try:
            self._kt_record_commit(err, partitions)
        except Exception as exc:
            self._kt_tracer.internal_error(exc)

    def subscribe(self, topics: Any, *args: Any, **kwargs: Any) -> Any:
        names = ("on_assign", "on_revoke", "on_lost")
        for name, v in zip(names, args, strict=False):
            kwargs[name] = v
        tracer = self._kt_tracer

        def recorder(what: str) -> Any:
            def record(consumer: Any, partitions: Any) -> None:
                try:
                    tracer.member_id = _memberid(self)
                except Exception:
                    tracer.member_id = None
                tracer.event(
                    schema.REBALANCE,
                    member_id=tracer.member_id,
                    detail=json.dumps({"change": what, "partitions": json.loads(_partitions_json(partitions))}),
                )

            return record

        for name in names:
            kwargs[name] = wrap_callback(tracer, recorder(name[3:]), kwargs.get(name))
        return _subscribe(self, topics, **kwargs)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return _close(self, *args, **kwargs)
        finally:
            self._kt_tracer.close()

    def trace_status(self) -> dict[str, Any]:
        """keytrace's own counters for this client: recorded, spooled, dropped, errors."""
        return self._kt_tracer.status()
