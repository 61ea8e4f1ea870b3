"""The Meterline Python SDK (``meterline.client``).

- usage: ``MeterlineClient`` (HTTP, batched, retried) and ``KafkaUsageProducer`` (straight to Kafka), events
  built with ``usage_event`` — meterline/client/usage.py;
- money: ``MeterlineApi`` (sync) and ``AsyncMeterlineApi`` (asyncio) — balances, debit, reserve / commit /
  void, refund, grants, access checks, transactions — meterline/client/money.py, typed results in
  ``meterline.client.models``, problem+json errors as ``meterline.client.errors`` exceptions.
"""

from meterline.client import errors, models
from meterline.client.errors import (
    ApiProblem,
    Conflict,
    Forbidden,
    HoldNotActive,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    ValidationFailed,
    WalletBlocked,
    WalletClosed,
)
from meterline.client.money import AsyncMeterlineApi, MeterlineApi
from meterline.client.usage import (
    BATCH_MEDIA_TYPE,
    DEFAULT_SOURCE,
    DeliveryFailed,
    KafkaUsageProducer,
    MeterlineClient,
    MeterlineError,
    RequestRejected,
    RetryPolicy,
    SendResult,
    read_events,
    usage_event,
    uuid7,
)

__all__ = [
    "BATCH_MEDIA_TYPE",
    "DEFAULT_SOURCE",
    "ApiProblem",
    "AsyncMeterlineApi",
    "Conflict",
    "DeliveryFailed",
    "Forbidden",
    "HoldNotActive",
    "IdempotencyConflict",
    "InsufficientCredits",
    "KafkaUsageProducer",
    "MeterlineApi",
    "MeterlineClient",
    "MeterlineError",
    "NotFound",
    "RateLimited",
    "RequestRejected",
    "RetryPolicy",
    "SendResult",
    "ServerError",
    "Unauthorized",
    "ValidationFailed",
    "WalletBlocked",
    "WalletClosed",
    "errors",
    "models",
    "read_events",
    "usage_event",
    "uuid7",
]
