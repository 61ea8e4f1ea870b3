"""The usage-event contract streams owns (CloudEvents 1.0 + project) and its topic names.

Dependency-light: pydantic + stdlib only."""

from __future__ import annotations

from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = ["TOPIC_USAGE_DLQ", "TOPIC_USAGE_EVENTS", "UsageEvent"]

TOPIC_USAGE_EVENTS = "usage.events.v1"
TOPIC_USAGE_DLQ = "usage.events.dlq.v1"


class UsageEvent(BaseModel):
    """One usage event as producers send it: CloudEvents 1.0 attributes plus the owning project.

    Identity for deduplication is (project, source, id)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: str = "1.0"
    id: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=256)
    subject: str = Field(min_length=1, max_length=256)
    time: AwareDatetime | None = None
    project: str = Field(min_length=1, max_length=64)
    data: dict[str, Any] | None = None
