"""TracedProducer: confluent_kafka.Producer that records every message's send and delivery."""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import time
from time import time_ns
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError

from collector import native, schema
from collector.options import TraceOptions, redact, resolve_sink, use_native
from collector.tracer import Tracer, size_of, wrap_callback

_produce = confluent_kafka.Producer.produce
_flush = confluent_kafka.Producer.flush
_close = getattr(confluent_kafka.Producer, "close", None)

_OWN_KWARGS = ("sink", "resend_attempts", "resend_backoff_ms", "trace_options")
# Order of produce()'s optional positional parameters after (topic, value, key), as
# confluent-kafka's C implementation accepts them (its docstring omits `callback`).
_POSITIONAL = ("partition", "callback", "on_delivery", "timestamp", "headers")
# Failures that a later attempt can plausibly fix; others (too large, bad topic) would fail again.
_RESENDABLE = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
}


def split_conf(args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The client config (dict argument merged with config kwargs) and keytrace's own kwargs."""
    own = {k: kwargs.pop(k) for k in _OWN_KWARGS if k in kwargs}
    if len(args) > 1:
        raise TypeError("expected one configuration dict")
    conf = dict(args[0]) if args else {}
    conf.update(kwargs)
    return conf, own


def build_options(conf: dict[str, Any], own: dict[str, Any]) -> tuple[TraceOptions, str]:
    base = own.get("trace_options")
    opts = base.model_copy() if isinstance(base, TraceOptions) else TraceOptions(**(base or {}))
    updates = {k: own[k] for k in ("sink", "resend_attempts", "resend_backoff_ms") if k in own}
    if updates:
        opts = TraceOptions(**{**opts.model_dump(), **updates})
    return opts, resolve_sink(opts.sink, conf)


def install_common_callbacks(tracer: Tracer, conf: dict[str, Any], options: TraceOptions) -> None:
    """stats_cb and error_cb: record, then call the user's own (which may raise, as before)."""
    stats = tracer.stats_docs.append

    def record_stats(doc: str) -> None:
        stats((time_ns(), doc))

    def record_error(err: Any) -> None:
        tracer.event(
            schema.CLIENT_ERROR,
            error_code=err.code(),
            error_name=err.name(),
            error_retriable=err.retriable(),
            error_message=err.str(),
            detail='{"fatal": true}' if err.fatal() else None,
        )

    if "statistics.interval.ms" not in conf and options.stats_interval_ms:
        conf["statistics.interval.ms"] = options.stats_interval_ms
    conf["stats_cb"] = wrap_callback(tracer, record_stats, conf.get("stats_cb"))
    conf["error_cb"] = wrap_callback(tracer, record_error, conf.get("error_cb"))


class TracedProducer(confluent_kafka.Producer):
    """A drop-in `confluent_kafka.Producer`: same config, same methods, every message traced.

    Extra keyword arguments: `sink` (trace sink URI), `resend_attempts` and
    `resend_backoff_ms` (the optional resend policy, off by default), `trace_options`.
    """

    # keytrace's state lives in slots, as a plain Producer has no instance dict either:
    # `p.produce` and `p.poll` then find their method without first probing an instance
    # dict (about 15 ns a message), and the C produce() reads `_kt_native` at a fixed offset.
    __slots__ = (
        "_kt_native",
        "_kt_tracer",
        "_kt_record_report",
        "_kt_user_dr",
        "_kt_resend",
        "_kt_backoff_s",
        "_kt_traces",
        "_kt_due",
        "_kt_due_lock",
        "_kt_outstanding",
        "__weakref__",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        conf, own = split_conf(args, kwargs)
        options, sink_uri = build_options(conf, own)
        user_conf = dict(conf)
        resend = options.resend_attempts if options.resend_attempts > 1 else 0
        # The resend policy needs a Python callback per message; everything else can be
        # recorded inside librdkafka by the native recorder when it is available.
        native_mode = not resend and use_native(options)
        tracer = Tracer("producer", str(conf.get("client.id", "rdkafka")), None, options, sink_uri, native=native_mode)
        ack = tracer.acks.append
        fail = tracer.failures.append

        def record_report(err: Any, msg: Any) -> None:
            if err is None:
                ack(
                    (
                        time_ns(),
                        msg.topic(),
                        msg.partition(),
                        msg.offset(),
                        msg.latency(),
                        msg.key(),
                        msg.timestamp()[1],
                    )
                )
            else:
                fail(
                    (
                        time_ns(),
                        err,
                        msg.topic(),
                        msg.partition(),
                        msg.offset(),
                        msg.latency(),
                        msg.key(),
                        msg.timestamp()[1],
                    )
                )

        user_dr = conf.get("on_delivery") or conf.get("delivery.report.cb")
        conf.pop("delivery.report.cb", None)

        def dr(err: Any, msg: Any) -> Any:
            try:
                record_report(err, msg)
            except Exception as exc:
                tracer.internal_error(exc)
            if user_dr is not None:
                return user_dr(err, msg)
            return None

        if native_mode:
            if user_dr is not None:
                conf["on_delivery"] = user_dr
            conf = native.configure(conf, tracer.src)
        else:
            conf["on_delivery"] = dr
        install_common_callbacks(tracer, conf, options)
        super().__init__(conf)
        self._kt_native = native_mode
        self._kt_tracer = tracer
        self._kt_record_report = record_report
        self._kt_user_dr = user_dr
        self._kt_resend = resend
        self._kt_backoff_s = options.resend_backoff_ms / 1000.0
        self._kt_traces = itertools.count(1)
        self._kt_due: list[tuple[float, int, list]] = []
        self._kt_due_lock = threading.Lock()
        self._kt_outstanding = 0
        tracer.config(redact(user_conf))
        if self._kt_resend:
            tracer.shipper.add_hook(self._kt_run_due)
        if native_mode:
            _install_fast_produce()

    # -- the hot path -------------------------------------------------------------------

    def produce(self, topic: str, value: Any = None, key: Any = None, *args: Any, **kwargs: Any) -> None:
        # With the native recorder this method is replaced by a C method descriptor
        # (collector/native/kt_produce.c) that does the first branch below without a
        # Python frame, and calls this function (as _kt_produce_py) for the Python recorder.
        if self._kt_native:
            try:
                if args or kwargs:
                    return _produce(self, topic, value, key, *args, **kwargs)
                return _produce(self, topic, value, key)
            except BufferError:
                self._kt_reject(time_ns(), topic, value, key, kwargs.get("partition", args[0] if args else None))
                raise
        if args or kwargs or self._kt_resend:
            return self._kt_produce_full(topic, value, key, args, kwargs)
        t = time_ns()
        try:
            _produce(self, topic, value, key)
        except BufferError:
            self._kt_reject(t, topic, value, key, None)
            raise
        self._kt_tracer.sends.append((t, topic, key, None if value is None else len(value), None, None))

    def _kt_produce_full(self, topic: str, value: Any, key: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        for name, v in zip(_POSITIONAL, args, strict=False):
            if name in kwargs:
                raise TypeError(f"produce() got multiple values for argument '{name}'")
            kwargs[name] = v
        if len(args) > len(_POSITIONAL):
            raise TypeError(f"produce() takes at most {3 + len(_POSITIONAL)} positional arguments")
        user_cb = kwargs.pop("on_delivery", None) or kwargs.pop("callback", None)
        kwargs.pop("callback", None)
        partition = kwargs.get("partition")
        if self._kt_resend:
            ctx = [next(self._kt_traces), 1, user_cb, topic, value, key, kwargs]
            kwargs["on_delivery"] = functools.partial(self._kt_resend_report, ctx)
            trace = ctx[0]
        else:
            trace = None
            if user_cb is not None:
                kwargs["on_delivery"] = self._kt_per_message(user_cb)
        t = time_ns()
        try:
            _produce(self, topic, value, key, **kwargs)
        except BufferError:
            self._kt_reject(t, topic, value, key, partition, trace=trace)
            raise
        if trace is not None:
            self._kt_outstanding += 1
        self._kt_tracer.sends.append(
            (t, topic, key, None if value is None else len(value), partition if partition is not None else None, trace)
        )

    def produce_batch(self, topic: str, messages: Any, *args: Any, **kwargs: Any) -> int:
        names = ("partition", "on_delivery")
        for name, v in zip(names, args, strict=False):
            kwargs[name] = v
        batch_cb = kwargs.pop("on_delivery", None) or kwargs.pop("callback", None)
        if batch_cb is not None:
            kwargs["on_delivery"] = batch_cb if self._kt_native else self._kt_per_message(batch_cb)
        if isinstance(messages, list) and not self._kt_native:
            for m in messages:
                if isinstance(m, dict) and m.get("callback") is not None:
                    m["callback"] = self._kt_per_message(m["callback"])
        t = time_ns()
        queued = confluent_kafka.Producer.produce_batch(self, topic, messages, **kwargs)
        default_partition = kwargs.get("partition")
        sends = self._kt_tracer.sends.append
        for m in messages:
            try:
                part = m.get("partition", default_partition)
                if "_error" in m:
                    self._kt_reject(t, topic, m.get("value"), m.get("key"), part, str(m["_error"]))
                elif not self._kt_native:
                    sends((t, topic, m.get("key"), size_of(m.get("value")), part, None))
            except Exception as exc:
                self._kt_tracer.internal_error(exc)
        return queued

    def _kt_per_message(self, user_cb: Any) -> Any:
        record, tracer = self._kt_record_report, self._kt_tracer

        def on_delivery(err: Any, msg: Any) -> Any:
            try:
                record(err, msg)
            except Exception as exc:
                tracer.internal_error(exc)
            return user_cb(err, msg)

        return on_delivery

    def _kt_reject_call(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Called by the C produce() when the original raised BufferError, with that call's arguments."""
        bound = dict(zip(("topic", "value", "key", *_POSITIONAL), args, strict=False))
        bound.update(kwargs)
        self._kt_reject(time_ns(), bound.get("topic"), bound.get("value"), bound.get("key"), bound.get("partition"))

    def _kt_reject(
        self,
        t: int,
        topic: str,
        value: Any,
        key: Any,
        partition: Any,
        reason: str | None = None,
        trace: int | None = None,
    ) -> None:
        try:
            self._kt_tracer.event(
                schema.REJECT,
                ts_ns=t,
                topic=topic,
                key=key,
                value_size=size_of(value),
                partition=partition if partition is not None and partition >= 0 else None,
                trace_seq=trace,
                error_name="_QUEUE_FULL" if reason is None else "_PRODUCE_FAILED",
                error_message=reason or "BufferError: local producer queue is full",
                detail=f'{{"queue_len": {len(self)}}}',
            )
        except Exception as exc:
            self._kt_tracer.internal_error(exc)

    # -- the resend policy --------------------------------------------------------------

    def _kt_resend_report(self, ctx: list, err: Any, msg: Any) -> Any:
        try:
            self._kt_record_report(err, msg)
        except Exception as exc:
            self._kt_tracer.internal_error(exc)
        trace, attempt, user_cb = ctx[0], ctx[1], ctx[2]
        if err is not None and attempt < self._kt_resend and (err.code() in _RESENDABLE or err.retriable()):
            with self._kt_due_lock:
                heapq.heappush(self._kt_due, (time.monotonic() + self._kt_backoff_s, trace, ctx))
            return None
        self._kt_outstanding -= 1
        cb = user_cb or self._kt_user_dr
        return cb(err, msg) if cb is not None else None

    def _kt_run_due(self) -> None:
        """Re-produce messages whose backoff has passed (called from the shipper thread)."""
        now = time.monotonic()
        while True:
            with self._kt_due_lock:
                if not self._kt_due or self._kt_due[0][0] > now:
                    return
                _, _, ctx = heapq.heappop(self._kt_due)
            ctx[1] += 1
            trace, attempt, _, topic, value, key, kwargs = ctx
            kwargs = dict(kwargs, on_delivery=functools.partial(self._kt_resend_report, ctx))
            t = time_ns()
            try:
                _produce(self, topic, value, key, **kwargs)
            except BufferError:
                self._kt_reject(t, topic, value, key, kwargs.get("partition"), trace=trace)
                with self._kt_due_lock:
                    heapq.heappush(self._kt_due, (now + self._kt_backoff_s, trace, ctx))
                continue
            except Exception as exc:
                self._kt_tracer.internal_error(exc)
                self._kt_outstanding -= 1
                continue
            self._kt_tracer.event(
                schema.RESEND,
                ts_ns=t,
                topic=topic,
                key=key,
                value_size=None if value is None else len(value),
                partition=kwargs.get("partition"),
                trace_seq=trace,
                attempt=attempt,
            )

    # -- lifecycle ----------------------------------------------------------------------

    def flush(self, *args: Any, **kwargs: Any) -> int:
        timeout = args[0] if args else kwargs.get("timeout", -1)
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        remaining = self._kt_flush_messages(deadline, *args, **kwargs)
        # Bounded: a slow or failing trace sink must not hold up the application's flush.
        self._kt_tracer.flush(2.0 if deadline is None else min(2.0, max(0.1, deadline - time.monotonic())))
        return remaining

    def _kt_flush_messages(self, deadline: float | None, *args: Any, **kwargs: Any) -> int:
        """The application's own messages (and pending resends): what Producer.flush waits for."""
        remaining = _flush(self, *args, **kwargs)
        # With the resend policy on, a flush also waits for pending resends to finish.
        while self._kt_resend and self._kt_outstanding > 0:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._kt_run_due()
            remaining = _flush(self, min(0.1, left) if left is not None else 0.1)
        return remaining + (self._kt_outstanding if self._kt_resend else 0)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        self._kt_flush_messages(None)
        result = _close(self, *args, **kwargs) if _close is not None else True
        # One bounded wait for the trace sink (Tracer.close ships the last events and
        # spools whatever the sink has not confirmed by then).
        self._kt_tracer.close()
        return result

    def __exit__(self, *exc: Any) -> Any:
        result = super().__exit__(*exc)
        self._kt_tracer.close()
        return result

    def trace_status(self) -> dict[str, Any]:
        """keytrace's own counters for this client: recorded, spooled, dropped, errors."""
        return self._kt_tracer.status()


TracedProducer._kt_produce_py = TracedProducer.produce  # type: ignore[attr-defined]
_fast_produce_tried = False


def _install_fast_produce() -> None:
    """Swap TracedProducer.produce for the C descriptor, once, if it can be built here.

    Two threads racing here both install an equivalent descriptor, which is harmless.
    """
    global _fast_produce_tried
    if _fast_produce_tried:
        return
    produce_type = native.produce_descriptor()
    if produce_type is not None:
        flag = TracedProducer.__dict__["_kt_native"]  # the slot's member descriptor
        TracedProducer.produce = produce_type(_produce, flag, "_kt_produce_py", "_kt_reject_call")
    _fast_produce_tried = True
