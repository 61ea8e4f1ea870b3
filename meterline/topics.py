"""Topic creation with explicit partition counts (DESIGN §3).

The partition count of ``usage.events.v1`` is fixed at creation: the checkpoint protocol assumes a
subject's events always land in the same partition. Finding it with a different count is a loud error;
growing it is a migration (see docs/architecture.md), never a side effect of start-up."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # the admin module re-imports it without exporting it

from ledger.contracts import TOPIC_LEDGER_CHARGES, TOPIC_LEDGER_TRANSACTIONS
from ledger.kafka import existing_topics, topic_name
from streams.contracts import TOPIC_USAGE_DLQ, TOPIC_USAGE_EVENTS


class TopicLayoutError(RuntimeError):
    code = "kafka.topic_layout"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
    fixed_partitions: bool = False


def topic_specs(*, prefix: str, usage_partitions: int, charges_partitions: int,
                transactions_partitions: int, decisions_partitions: int | None = None) -> list[TopicSpec]:
    """Every topic Meterline uses. Access decisions (relayed from the API's decision record through the ledger's
    outbox, keyed by wallet) get ``transactions_partitions`` unless told otherwise."""
    from api.access.access_decisions import TOPIC_ACCESS_DECISIONS

    return [
        TopicSpec(topic_name(TOPIC_USAGE_EVENTS, prefix), usage_partitions, {}, fixed_partitions=True),
        TopicSpec(topic_name(TOPIC_USAGE_DLQ, prefix), 1, {}),
        TopicSpec(topic_name(TOPIC_LEDGER_CHARGES, prefix), charges_partitions, {}),
        TopicSpec(topic_name(TOPIC_LEDGER_TRANSACTIONS, prefix), transactions_partitions, {}),
        TopicSpec(topic_name(TOPIC_ACCESS_DECISIONS, prefix), decisions_partitions or transactions_partitions, {}),
    ]


def ensure_topics(bootstrap: str, specs: list[TopicSpec]) -> list[str]:
    """Create missing topics; return the names created. Refuses a fixed topic with another partition count."""
    present = existing_topics(bootstrap)
    for spec in specs:
        if spec.fixed_partitions and spec.name in present and present[spec.name] != spec.partitions:
            raise TopicLayoutError(
                f"{spec.name} has {present[spec.name]} partitions but {spec.partitions} are configured. "
                "Its partition count is fixed (a subject's events must stay in one partition); "
                "set METERLINE_USAGE_PARTITIONS to the existing count, or follow the repartition migration "
                "in docs/architecture.md."
            )
    wanted = [s for s in specs if s.name not in present]
    if not wanted:
        return []
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, config=s.config) for s in wanted]
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(15)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # another process won the race: fine
                raise
    return created
