"""faust's aiokafka transport with a short fetch wait (broker URL scheme ``meterline-kafka://``).

faust hard-codes ``fetch_max_wait_ms=1500`` for its aiokafka consumer. This broker answers a fetch that
found nothing at first only late in that wait, so an event produced into a quiet partition waited for the
fetch to come back — measured on Tansu (one message at a random moment, aiokafka): 1,500 ms → 616 ms
median, 500 → 115 ms, 100 → 16 ms, 25 → 11 ms. That wait is added to the event → balance latency of every
event that arrives while the worker's fetch is parked. ``FETCH_MAX_WAIT_MS`` replaces it; the cost is at
most one empty fetch per interval while a worker is idle."""

from __future__ import annotations

from typing import Any

from faust.transport import drivers
from faust.transport.drivers import aiokafka as driver

__all__ = ["FETCH_MAX_WAIT_MS", "SCHEME", "Transport", "register"]

FETCH_MAX_WAIT_MS = 50
SCHEME = "meterline-kafka"


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by AIOKafkaConsumer.start() for its Fetcher
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer


def register() -> None:
    """Make ``meterline-kafka://host:port`` broker URLs resolve to this transport (idempotent)."""
    drivers.TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
