"""Every Meterline producer is built from ``ledger.kafka.producer_config``. On the embedded broker (``meterline up``
turns idempotence off there) an unbounded number of requests in flight made the broker queue thousands of tiny
produce requests: send→ack p50 1,827 ms at 2,000 one-event messages/s, 14 ms with the bound
(``python -m bench.broker_produce --rate 2000 --client meterline``, docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from ledger.kafka import producer_config


@pytest.mark.parametrize("idempotence", ["true", "false"])
def test_requests_in_flight_are_bounded_with_or_without_idempotence(monkeypatch: pytest.MonkeyPatch,
                                                                     idempotence: str) -> None:
    monkeypatch.setenv("KAFKA_PRODUCER_IDEMPOTENCE", idempotence)
    config = producer_config("127.0.0.1:9092")
    assert config["enable.idempotence"] is (idempotence == "true")
    assert 1 <= config["max.in.flight.requests.per.connection"] <= 5  # idempotence requires <= 5 anyway
    assert config["acks"] == "all"  # accepted means durable (DESIGN §2 invariant 12)


def test_a_caller_may_still_override_it() -> None:
    assert producer_config("127.0.0.1:9092", **{"max.in.flight.requests.per.connection": 1})[
        "max.in.flight.requests.per.connection"] == 1
