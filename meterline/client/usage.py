"""The Meterline Python SDK: send usage events over HTTP (``MeterlineClient``) or straight to Kafka
(``KafkaUsageProducer``), with the same event model.

Event model: a CloudEvents 1.0 dict (``usage_event(...)`` builds one). The event id is generated ONCE, when
the event is built (a UUIDv7: time-ordered, so ids sort by creation), and every retry resends the same id —
the pipeline dedupes by (project, source, id), so a retry after a lost response never double-charges.

``MeterlineClient`` (HTTP):
- batches events (``batch_size`` per request, application/cloudevents-batch+json);
- retries connection errors, 5xx and 429 with jittered exponential backoff ("full jitter"), honouring
  ``Retry-After``; gives up after ``max_attempts`` or ``retry_deadline_s`` (whichever first) and raises
  ``DeliveryFailed`` naming how many events are unconfirmed (they may or may not have arrived: resend them);
- a 400 ``ingest.events_rejected`` is not retried: the valid events of that batch were accepted and the
  rejected ones are reported by their index in the caller's input (``SendResult.rejected``).

``KafkaUsageProducer`` (direct): validates events with the API's own validator, stamps the project, packs
them per partition with ``streams.contracts.partition_for`` into size-bounded messages and produces them
with an idempotent confluent producer (acks=all); ``send`` returns when the broker acknowledged every message.
Use it inside a trusted network: Kafka access is not scoped per project like API keys are.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

DEFAULT_SOURCE = "meterline-sdk"
BATCH_MEDIA_TYPE = "application/cloudevents-batch+json"


def uuid7() -> str:
    """A UUIDv7 string (RFC 9562): 48-bit Unix milliseconds, version 7, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def usage_event(*, type: str, subject: str, data: dict[str, Any] | None = None, source: str = DEFAULT_SOURCE,
                id: str | None = None, time: datetime | str | None = None, **extensions: Any) -> dict[str, Any]:
    """One usage event with its id fixed now (so retries resend the same id)."""
    moment = time if time is not None else datetime.now(UTC)
    when = moment if isinstance(moment, str) else \
        moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"specversion": "1.0", "id": id or uuid7(), "source": source, "type": type, "subject": subject,
            "time": when, "data": data or {}, **extensions}


def _with_ids(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events missing an id get one now, before the first attempt, so every retry carries the same id."""
    out = []
    for event in events:
        if isinstance(event, dict) and not event.get("id"):
            event = {**event, "id": uuid7()}
        out.append(event)
    return out


@dataclass
class SendResult:
    accepted: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"index", "id", "reason"} in the caller's input
    requests: int = 0
    retries: int = 0

    def merge(self, other: SendResult) -> None:
        self.accepted += other.accepted
        self.rejected.extend(other.rejected)
        self.requests += other.requests
        self.retries += other.retries


class MeterlineError(RuntimeError):
    pass


class DeliveryFailed(MeterlineError):
    """Retries were exhausted: ``unconfirmed`` events may or may not have been accepted (resend them)."""

    def __init__(self, message: str, *, unconfirmed: int, result: SendResult, status: int | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.unconfirmed = unconfirmed
        self.result = result
        self.status = status
        self.body = body


class RequestRejected(MeterlineError):
    """A 4xx other than a partial rejection (bad key, wrong project, oversized request...): not retried."""

    def __init__(self, status: int, body: Any) -> None:
        code = body.get("code") if isinstance(body, dict) else None
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status} {code or ''}: {detail}")
        self.status = status
        self.body = body
        self.code = code


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    retry_deadline_s: float = 120.0
    retry_after_max_s: float = 60.0

    def delay_s(self, attempt: int, retry_after: str | None, rng: random.Random) -> float:
        """Full jitter: uniform(0, min(max, base·2^attempt)); a Retry-After is a floor (plus a little jitter)."""
        jitter = rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt)))
        if retry_after:
            try:
                return min(self.retry_after_max_s, float(retry_after)) + rng.uniform(0, self.backoff_base_s)
            except ValueError:
                pass  # an HTTP-date; fall back to the jittered backoff
        return jitter


class MeterlineClient:
    """HTTP client for POST /api/v1/events. Thread-compatible, not thread-safe (one per thread)."""

    def __init__(self, base_url: str, api_key: str, *, batch_size: int = 500, timeout_s: float = 30.0,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport,
                                  headers={"Authorization": f"Bearer {api_key}",
                                           "User-Agent": "meterline-python-sdk"})
        self._buffer: list[dict[str, Any]] = []

    def __enter__(self) -> MeterlineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._buffer:
                self.flush()
        finally:
            self._http.close()

    # ------------------------------------------------------------------ buffered API

    def track(self, *, type: str, subject: str, data: dict[str, Any] | None = None, **kw: Any) -> str:
        """Buffer one event (flushed every ``batch_size`` events and on close); returns its id."""
        event = usage_event(type=type, subject=subject, data=data, **kw)
        self._buffer.append(event)
        if len(self._buffer) >= self.batch_size:
            self.flush()
        return str(event["id"])

    def flush(self) -> SendResult:
        events, self._buffer = self._buffer, []
        return self.send(events) if events else SendResult()

    # ------------------------------------------------------------------ direct API

    def send(self, events: Iterable[dict[str, Any]],
             on_batch: Callable[[int, SendResult], None] | None = None) -> SendResult:
        """Send ``events`` in batches; returns accepted count and rejections (indexes into ``events``).

        Raises ``DeliveryFailed`` when a batch could not be confirmed after retries (earlier batches stay
        accepted; ``exc.result`` says how many) and ``RequestRejected`` for a non-retryable 4xx."""
        items = _with_ids(events)
        total = SendResult()
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            try:
                result = self._send_batch(batch, offset=start)
            except DeliveryFailed as exc:
                total.merge(exc.result)
                exc.result = total
                exc.unconfirmed = len(items) - total.accepted - len(total.rejected)
                raise
            total.merge(result)
            if on_batch is not None:
                on_batch(len(batch), result)
        return total

    def _send_batch(self, batch: Sequence[dict[str, Any]], *, offset: int) -> SendResult:
        body = orjson.dumps(batch)
        result = SendResult()
        deadline = time.monotonic() + self.retry.retry_deadline_s
        last_status: int | None = None
        last_body: Any = None
        for attempt in range(self.retry.max_attempts):
            result.requests += 1
            retry_after: str | None = None
            try:
                response = self._http.post("/api/v1/events", content=body,
                                           headers={"Content-Type": BATCH_MEDIA_TYPE})
            except httpx.TransportError as exc:  # refused, reset, timed out: the batch may or may not have landed
                last_status, last_body = None, repr(exc)
            else:
                status = response.status_code
                if status in (200, 202, 204):
                    result.accepted += len(batch)
                    return result
                parsed = _json_or_text(response)
                if status == 400 and isinstance(parsed, dict) and parsed.get("code") == "ingest.events_rejected":
                    result.accepted += int(parsed.get("accepted", 0))
                    result.rejected.extend({**r, "index": int(r["index"]) + offset} for r in parsed["rejected"])
                    return result
                if status != 429 and status < 500:
                    raise RequestRejected(status, parsed)
                last_status, last_body = status, parsed
                retry_after = response.headers.get("retry-after")
            delay = self.retry.delay_s(attempt, retry_after, self._rng)
            if attempt + 1 >= self.retry.max_attempts or time.monotonic() + delay > deadline:
                break
            result.retries += 1
            self._sleep(delay)
        raise DeliveryFailed(f"{len(batch)} events unconfirmed after {result.requests} attempts "
                             f"(last: {last_status or 'connection error'} {last_body!r:.200})",
                             unconfirmed=len(batch), result=result, status=last_status, body=last_body)


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


# --------------------------------------------------------------------------- direct to Kafka


class KafkaUsageProducer:
    """Produce usage events straight to ``usage.events.v1``, packed per partition, idempotently.

    ``send`` blocks until the broker acknowledged every message (or raises ``DeliveryFailed``). Events the
    validator rejects are returned in ``SendResult.rejected`` and never produced."""

    def __init__(self, bootstrap: str, project: str, *, topic_prefix: str | None = None,
                 partitions: int | None = None, message_bytes_max: int = 900_000, linger_ms: int = 5,
                 ack_timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        from ledger.kafka import producer_config, require_topics, topic_name
        from streams.contracts import TOPIC_USAGE_EVENTS

        prefix = topic_prefix if topic_prefix is not None else os.environ.get("METERLINE_TOPIC_PREFIX", "")
        self.topic = topic_name(TOPIC_USAGE_EVENTS, prefix)
        self.project = project
        self.partitions = partitions or require_topics(bootstrap, [self.topic])[self.topic]
        self.message_bytes_max = message_bytes_max
        self.ack_timeout_s = ack_timeout_s
        self._producer = Producer(producer_config(bootstrap, **{
            "linger.ms": linger_ms, "message.max.bytes": max(message_bytes_max + 64 * 1024, 1_000_000),
            "client.id": "meterline-sdk"}))

    def __enter__(self) -> KafkaUsageProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._producer.flush(self.ack_timeout_s)

    def send(self, events: Iterable[dict[str, Any]]) -> SendResult:
        from api.ingest.packing import pack
        from api.ingest.validate import Limits, check_cloudevents, utc_iso

        items = _with_ids(events)
        accepted, rejected = check_cloudevents(items, project_id=self.project, now_iso=utc_iso(datetime.now(UTC)),
                                               limits=Limits())
        result = SendResult(rejected=[{"index": r.index, "id": r.id, "reason": r.reason} for r in rejected])
        messages = pack(accepted, partitions=self.partitions, message_bytes_max=self.message_bytes_max)
        outstanding = len(messages)
        errors: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            nonlocal outstanding
            outstanding -= 1
            if err is not None:
                errors.append(str(err))

        for message in messages:
            while True:
                try:
                    self._producer.produce(self.topic, message.value, message.key, partition=message.partition,
                                           on_delivery=delivered)
                    break
                except BufferError:  # local queue full: let deliveries drain, then retry this message
                    self._producer.poll(0.05)
            result.requests += 1
        deadline = time.monotonic() + self.ack_timeout_s
        while outstanding > 0 and time.monotonic() < deadline:
            self._producer.poll(0.05)
        if outstanding or errors:
            raise DeliveryFailed(f"{outstanding} messages unacknowledged, {len(errors)} failed "
                                 f"({errors[:1]}); resend the same events (ids are kept)",
                                 unconfirmed=len(accepted), result=result)
        result.accepted = len(accepted)
        return result


def read_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Events from JSON lines, or from one JSON array spread over the lines (what `events send` reads)."""
    buffered = list(lines)
    text = "".join(buffered).strip()
    if text.startswith("["):
        parsed = orjson.loads(text)
        if not isinstance(parsed, list):
            raise ValueError("expected a JSON array of events")
        yield from parsed
        return
    for number, line in enumerate(buffered, 1):
        if line.strip():
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"line {number}: not JSON ({exc})") from None
