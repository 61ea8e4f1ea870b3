"""The Kafka edge of ingestion: an idempotent confluent producer awaited from asyncio.

Contract with the HTTP layer: ``await edge.send(messages)`` returns only after the broker acknowledged
EVERY message (idempotent producer, acks=all); otherwise it raises, and the request answers 503 with
Retry-After. So an event is never acknowledged to a client before the broker has it ("never
accept-then-lose"). The reverse can happen — a message whose request timed out may still be delivered
later from librdkafka's queue — and is harmless: the client resends the same ids and the pipeline dedupes
by (project, source, id).

How it avoids blocking the event loop: ``produce()`` only enqueues (it raises BufferError when the bounded
queue is full → ``Overloaded``); a dedicated thread calls ``poll()``, which runs the delivery callbacks;
each request counts its outstanding messages and the callback of the last one resolves the request's
future through ``loop.call_soon_threadsafe``.

Fatal producer errors, and a producer that acknowledged nothing during a whole ack timeout (wedged after a
broker lost its producer state, see ``send``), make the edge replace its producer: the old one's queued
messages are purged (their requests fail with 503 and are retried by clients), the next request uses a fresh
producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, Producer

from api.errors import ApiError
from api.ingest.packing import Message
from ledger.kafka import producer_config

log = logging.getLogger("meterline.api.ingest")


class BrokerUnavailable(ApiError):
    """The broker did not acknowledge in time (or failed the delivery): nothing is acknowledged to the client."""

    status = 503
    code = "ingest.broker_unavailable"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail, extra={"retry_after_s": retry_after_s})
        self.headers = {"Retry-After": str(retry_after_s)}


class Overloaded(BrokerUnavailable):
    """The producer's bounded queue is full: shed load instead of buffering without limit."""

    code = "ingest.overloaded"


class _Pending:
    """One request's outstanding messages; resolved (once) by the delivery callback of the last one."""

    __slots__ = ("error", "future", "loop", "outstanding", "runner")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, runner: _ProducerRunner) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.outstanding = count
        self.error: KafkaError | None = None
        self.runner = runner

    def delivered(self, err: KafkaError | None, _msg: Any) -> None:  # runs on the poll thread
        if err is not None:
            if self.error is None:
                self.error = err
        else:
            self.runner.last_ack_at = time.monotonic()
        self.outstanding -= 1
        if self.outstanding == 0:
            with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown: nobody is waiting
                self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class _ProducerRunner:
    """A producer and the thread that polls it."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.fatal: KafkaError | None = None
        self.created_at = time.monotonic()
        self.last_ack_at = 0.0  # monotonic time of the last successful delivery
        self.stale = False
        config = {**config, "error_cb": self._on_error}
        self.producer = Producer(config)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ingest-producer-poll", daemon=True)
        self._thread.start()

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("ingest producer fatal error: %s; it will be replaced", err)
            self.fatal = err
        else:
            log.warning("ingest producer: %s", err)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def close(self, *, flush_timeout_s: float) -> int:
        """Flush what is queued (bounded), purge the rest (their requests fail), stop polling. Returns left-overs."""
        # stop the poll thread first: delivery callbacks must run on one thread at a time
        self._stop.set()
        self._thread.join(5)
        left = self.producer.flush(flush_timeout_s)
        if left:
            with contextlib.suppress(Exception):
                self.producer.purge()
            self.producer.flush(1.0)  # delivers the purge errors to the waiting requests
        with contextlib.suppress(Exception):
            self.producer.close()  # release the broker connections now, not at garbage collection
        return int(left)


class KafkaEdge:
    def __init__(self, *, bootstrap: str, topic: str, partitions: int, ack_timeout_s: float,
                 broker_retry_after_s: int, overload_retry_after_s: int, queue_messages_max: int,
                 linger_ms: int, message_bytes_max: int) -> None:
        self.topic = topic
        self.partitions = partitions
        self.ack_timeout_s = ack_timeout_s
        self.broker_retry_after_s = broker_retry_after_s
        self.overload_retry_after_s = overload_retry_after_s
        self._config = producer_config(
            bootstrap,
            **{"linger.ms": linger_ms, "queue.buffering.max.messages": queue_messages_max,
               "message.max.bytes": max(message_bytes_max + 64 * 1024, 1_000_000),
               # librdkafka keeps retrying a message until this; past it the delivery fails. Kept above the
               # request's ack timeout so a slow broker is answered 503 before librdkafka gives up.
               "message.timeout.ms": int(max(30.0, ack_timeout_s * 3) * 1000),
               "client.id": "meterline-api-ingest"})
        self._runner: _ProducerRunner | None = None
        self._replace_lock = threading.Lock()

    def start(self) -> None:
        self._runner = _ProducerRunner(self._config)

    def close(self, *, flush_timeout_s: float = 10.0) -> None:
        if self._runner is not None:
            left = self._runner.close(flush_timeout_s=flush_timeout_s)
            if left:
                log.warning("ingest producer closed with %d undelivered messages (their requests got 503)", left)
            self._runner = None

    def _current(self) -> _ProducerRunner:
        runner = self._runner
        if runner is None:
            raise BrokerUnavailable("ingestion is not started", retry_after_s=self.broker_retry_after_s)
        if runner.fatal is not None or runner.stale:
            with self._replace_lock:
                if self._runner is runner:
                    self._runner = _ProducerRunner(self._config)
                    threading.Thread(target=runner.close, kwargs={"flush_timeout_s": 0.0}, daemon=True).start()
                runner = self._runner
        assert runner is not None
        return runner

    def broker_answers(self, *, timeout_s: float = 2.0) -> tuple[bool, str]:
        """Readiness (/ready): the broker answers a metadata request for the usage topic through the ingest
        producer's own connections."""
        runner = self._runner
        if runner is None:
            return False, "ingestion is not started"
        try:
            # all topics, not list_topics(self.topic): a producer's metadata request for one topic may auto-create
            # it on a broker that allows that, and a probe must change nothing
            metadata = runner.producer.list_topics(timeout=timeout_s)
        except Exception as error:  # KafkaException: the broker did not answer in time
            return False, f"the broker does not answer: {error}"
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            return False, f"topic {self.topic} unavailable: {topic.error if topic else 'missing'}"
        return True, f"{self.topic}: {len(topic.partitions)} partitions"

    async def send(self, messages: Sequence[Message]) -> None:
        """Return when the broker acknowledged every message; raise BrokerUnavailable/Overloaded otherwise."""
        if not messages:
            return
        started = time.monotonic()
        runner = self._current()
        pending = _Pending(asyncio.get_running_loop(), len(messages), runner)
        produce = runner.producer.produce
        for queued, message in enumerate(messages):
            try:
                produce(self.topic, message.value, message.key, partition=message.partition,
                        on_delivery=pending.delivered)
            except BufferError:
                # the messages already queued may still be delivered; the client's resend is deduped
                raise Overloaded(f"ingestion is overloaded ({queued} of {len(messages)} messages queued); "
                                 "retry after the indicated delay", retry_after_s=self.overload_retry_after_s) from None
        try:
            await asyncio.wait_for(asyncio.shield(pending.future), self.ack_timeout_s)
        except TimeoutError:
            if runner.last_ack_at < started and time.monotonic() - runner.created_at >= self.ack_timeout_s:
                # Nothing at all was acknowledged while we waited. Besides "the broker is down", this is how a
                # wedged idempotent producer looks: after a broker lost its producer state (a restart of the
                # embedded broker) librdkafka bumps the epoch of a producer id the broker no longer knows, in a
                # loop, and never recovers. A fresh producer gets a fresh id. Its queued messages are purged
                # (their requests answer 503 and are resent by clients; resends are deduplicated downstream).
                runner.stale = True
                log.warning("no delivery acknowledged for %.1fs; replacing the ingest producer", self.ack_timeout_s)
            raise BrokerUnavailable(
                f"the broker did not acknowledge the events within {self.ack_timeout_s:g}s; nothing was "
                "acknowledged, resend the same events (resending is harmless)",
                retry_after_s=self.broker_retry_after_s) from None
        if pending.error is not None:
            raise BrokerUnavailable(f"the broker refused the events ({pending.error.name()}: {pending.error.str()}) "
                                    f"after {time.monotonic() - started:.1f}s; resend the same events",
                                    retry_after_s=self.broker_retry_after_s)
