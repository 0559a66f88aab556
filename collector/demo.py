"""`keytrace demo`: a realistic workload with recurring faults on librdkafka's mock cluster.

Everything is real client code over real sockets: traced producers and consumers,
the Kafka trace sink and the collector. Faults come from the mock cluster's own
fault API, on a schedule and on demand from the dashboard's buttons.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from collector.consumer import TracedConsumer
from collector.mockcluster import ApiKey, MockCluster
from collector.producer import TracedProducer

log = logging.getLogger("keytrace.demo")

TOPICS = {"orders": 6, "clicks": 4, "inventory": 3}


class Demo:
    """Producers, consumers and a fault schedule; `stop()` ends all of them."""

    def __init__(self, cluster: MockCluster, sink: str, scheduled_faults: bool = True, speed: float = 1.0) -> None:
        self.cluster = cluster
        self.bootstrap_servers = cluster.bootstrap_servers
        self.sink = sink
        self.scheduled_faults = scheduled_faults
        self.speed = speed
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.log: list[tuple[float, str]] = []
        self._fault_lock = threading.Lock()
        for topic, partitions in TOPICS.items():
            cluster.create_topic(topic, partitions=partitions, replication_factor=3)

    # -- faults ----------------------------------------------------------------------

    def faults(self) -> list[tuple[str, str]]:
        return [
            ("broker_down", "Take broker 2 down for 8 s (longer than the orders producer's message.timeout.ms)"),
            ("rtt", "Add 300 ms round-trip time on broker 1 for 15 s"),
            ("produce_errors", "Fail the next 8 Produce requests with retriable errors"),
            ("leader_move", "Move the leader of orders partition 0 to another broker"),
        ]

    def inject(self, name: str) -> str:
        with self._fault_lock:
            if name == "broker_down":
                self.cluster.broker_down(2, seconds=8)
                msg = "broker 2 is down for 8 s"
            elif name == "rtt":
                self.cluster.set_rtt(1, 300)
                timer = threading.Timer(15, lambda: self._safe(lambda: self.cluster.set_rtt(1, 0)))
                timer.daemon = True
                timer.start()
                msg = "broker 1 answers 300 ms late for 15 s"
            elif name == "produce_errors":
                errors = [KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.REQUEST_TIMED_OUT] * 4
                self.cluster.push_request_errors(ApiKey.Produce, errors)
                msg = "the next 8 Produce requests fail with retriable errors"
            elif name == "leader_move":
                target = random.choice([1, 2, 3])
                self.cluster.partition_set_leader("orders", 0, target)
                msg = f"orders[0] leader moved to broker {target}"
            else:
                raise ValueError(f"unknown fault {name!r}; known: {[f for f, _ in self.faults()]}")
        self.log.append((time.time(), msg))
        log.info("demo fault: %s", msg)
        return msg

    def _safe(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # the cluster may be closing
            log.debug("demo: %s", exc)

    def _fault_schedule(self) -> None:
        plan = [(20, "produce_errors"), (35, "broker_down"), (55, "rtt"), (75, "leader_move")]
        cycle = 90
        start = time.monotonic()
        done: set[tuple[int, str]] = set()
        while not self.stop_event.wait(0.5):
            t = time.monotonic() - start
            n = int(t // cycle)
            for at, name in plan:
                if (n, name) not in done and t - n * cycle >= at:
                    done.add((n, name))
                    self._safe(lambda name=name: self.inject(name))

    # -- workload --------------------------------------------------------------------

    def _spawn(self, name: str, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("demo %s stopped", name)

        t = threading.Thread(target=run, name=f"demo-{name}", daemon=True)
        t.start()
        self.threads.append(t)

    def _paced(self, rate: float, step: Callable[[int], None]) -> None:
        interval = 1.0 / (rate * self.speed)
        i = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            step(i)
            i += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)

    def _orders(self) -> None:
        p = TracedProducer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "client.id": "orders-service",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": 6000,
                "statistics.interval.ms": 1000,
            },
            sink=self.sink,
        )
        states = ["created", "paid", "shipped"]

        def step(i: int) -> None:
            order = i // 3
            # Each order gets three messages under its key: created, paid, shipped.
            p.produce("orders", f'{{"order": {order}, "state": "{states[i % 3]}"}}'.encode(), f"order-{order}")
            p.poll(0)

        try:
            self._paced(60, step)
        finally:
            p.flush(5)
            p.close()

    def _clicks(self) -> None:
        p = TracedProducer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "client.id": "clickstream",
                "acks": 0,
                "linger.ms": 50,
                "compression.type": "lz4",
                "statistics.interval.ms": 1000,
            },
            sink=self.sink,
        )
        rng = random.Random(7)

        def step(i: int) -> None:
            p.produce("clicks", b'{"page": "/checkout"}' + b" " * rng.randint(0, 200), f"user-{rng.randint(1, 500)}")
            p.poll(0)

        try:
            self._paced(150, step)
        finally:
            p.flush(5)
            p.close()

    def _inventory(self) -> None:
        # A deliberately small buffer: bursts overflow it and produce() raises BufferError.
        p = TracedProducer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "client.id": "inventory-sync",
                "queue.buffering.max.messages": 400,
                "queue.buffering.max.kbytes": 512,
                "linger.ms": 200,
                "statistics.interval.ms": 1000,
            },
            sink=self.sink,
        )
        sku = 0
        try:
            while not self.stop_event.wait(4.0 / self.speed):
                for _ in range(600):
                    sku += 1
                    try:
                        p.produce("inventory", b"x" * 400, f"sku-{sku % 2000}")
                    except BufferError:
                        p.poll(0.05)
                p.poll(0)
        finally:
            p.flush(5)
            p.close()

    def _consumer(self, group: str, topic: str, per_message_delay: float) -> None:
        c = TracedConsumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": group,
                "client.id": f"{group}-consumer",
                "auto.offset.reset": "earliest",
                "statistics.interval.ms": 1000,
            },
            sink=self.sink,
        )
        c.subscribe([topic])
        try:
            while not self.stop_event.is_set():
                msgs = c.consume(100, 0.5)
                if per_message_delay and msgs:
                    self.stop_event.wait(per_message_delay * len(msgs))
        finally:
            c.close()

    def start(self) -> Demo:
        self._spawn("orders", self._orders)
        self._spawn("clicks", self._clicks)
        self._spawn("inventory", self._inventory)
        self._spawn("billing", lambda: self._consumer("billing", "orders", 0))
        self._spawn("shipping", lambda: self._consumer("shipping", "orders", 0))
        # analytics reads more slowly than clicks arrive, so its lag grows.
        self._spawn("analytics", lambda: self._consumer("analytics", "clicks", 0.008))
        if self.scheduled_faults:
            self._spawn("faults", self._fault_schedule)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
