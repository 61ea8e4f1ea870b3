"""The chaos run's load, its faults and its reference model — shared by `python -m bench.chaos` (a whole
`meterline up` stack) and the short fault test (tests/integration/pipeline/test_pipeline_chaos.py, harness
processes). No process handling here: killing is a callback the caller passes in.

The reference model (``Reference``) is the spec of what the money must be, computed only from what was sent and
the catalog versions in force, independent of the pipeline's code (only ``ledger.pricing.price_minor``, the pure
price of a period's units, is shared):

- an event counts once per identity (project, source, id): a resend is a no-op, whichever copy is counted
  (resends carry the same content);
- ``tokens`` (SUM of ``$.tokens``): per (wallet, month) the units of each price version — the version in force at
  the event time, ``effective_from`` ordering them — priced as one run: version i charges
  ``price_i(before + units_i) − price_i(before)`` (DESIGN §2.9: a new price version continues the period);
- an event more than the allowed lateness (1 h) after its month ended is charged in its arrival's month at the
  version in force at its arrival (the Kafka timestamp, which this load sets explicitly);
- ``images`` (``$.n``, SUM or MAX, 1 minor unit per unit): a meter edit that changes the aggregation is a new
  counting version whose counters start at the change; an event is counted by the version current when it is
  metered. That is processing time, so the edit is made behind a barrier: images traffic pauses, every offset
  sent so far is applied by the ledger (a re-metering after a kill can then never see an old images event), the
  edit commits, and images traffic resumes — tokens traffic flows throughout, so the edit is under load;
- hostile events (values ≥ 2^63, 1e300, negative, wrong types, unknown meters, bytes that are not JSON, times in
  the future) are never charged; events of another tenant naming our subjects are charged to that tenant's
  wallets only.

Price versions are added with ``effective_from`` 10 s ahead (checked to be after the commit): a worker probes the
catalog before every batch, so an event whose time is at or after the change is produced — and metered — after the
change committed, and the version each event gets is a function of the event alone."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, Producer

from ledger.contracts import PriceModel
from ledger.db import libpq_url, make_engine
from ledger.pricing import price_minor
from ledger.source_logs import current_identity
from streams import catalog
from streams.catalog_model import auto_wallet_id
from streams.contracts import partition_for
from streams.errors import StreamsError
from streams.metering import period_bounds

OTHER_PROJECT = "prj_chaos_other"  # another tenant whose events name our subjects
TOKENS, IMAGES = "llm.tokens", "img.generated"
ALLOWED_LATENESS_S = 3_600  # the workers' default (streams.settings.allowed_lateness_s)
PRICE_LEAD_S = 10  # a new price version starts this long after its transaction began
TOKEN_PRICES = ("0.4", "0.5", "0.3", "0.7", "0.25", "0.45")  # a fractional price floors: rounding is in play
OTHER_PRICE = "1"

#: hostile event kinds and the dead-letter reason each must get
HOSTILE_REASONS = {
    "value_2p63": "value_out_of_range", "value_1e300": "value_out_of_range", "value_negative": "bad_value",
    "value_not_a_number": "bad_value", "subject_not_a_string": "wrong_type", "data_not_an_object": "wrong_type",
    "unknown_meter": "unknown_meter", "not_json": "bad_json", "time_in_future": "time_in_future",
    "bad_time": "bad_time",
}


@dataclass
class CatalogIds:
    project: str
    tokens_meter: str
    tokens_price: str
    images_meter: str
    other_meter: str


def set_up_catalog(database_url: str, project: str) -> tuple[CatalogIds, list[tuple[datetime, str]]]:
    """Our project's two meters and prices, and another tenant pricing the same event type. Returns the ids
    and the tokens price versions as (effective_from, unit price)."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            tokens = catalog.create_meter(conn, project_id=project, slug="tokens", event_type=TOKENS,
                                          aggregation="SUM", value_property="$.tokens")
            price = catalog.create_price(conn, project_id=project, meter="tokens",
                                         model={"model": "per_unit", "unit_price_minor": TOKEN_PRICES[0]},
                                         effective_from=datetime(2020, 1, 1, tzinfo=UTC))
            images = catalog.create_meter(conn, project_id=project, slug="images", event_type=IMAGES,
                                          aggregation="SUM", value_property="$.n")
            catalog.create_price(conn, project_id=project, meter="images",
                                 model={"model": "per_unit", "unit_price_minor": "1"},
                                 effective_from=datetime(2020, 1, 1, tzinfo=UTC))
            other = catalog.create_meter(conn, project_id=OTHER_PROJECT, slug="tokens", event_type=TOKENS,
                                         aggregation="SUM", value_property="$.tokens")
            catalog.create_price(conn, project_id=OTHER_PROJECT, meter="tokens",
                                 model={"model": "per_unit", "unit_price_minor": OTHER_PRICE},
                                 effective_from=datetime(2020, 1, 1, tzinfo=UTC))
    finally:
        engine.dispose()
    return (CatalogIds(project, tokens.id, price.id, images.id, other.id),
            [(price.versions[0].effective_from, TOKEN_PRICES[0])])


# -- the reference model -------------------------------------------------------------------------------------


def _month(at: datetime) -> datetime:
    return period_bounds(at, "month")[0]


@dataclass
class Reference:
    """What every wallet must be charged: see the module's docstring for the rules."""

    project: str
    #: tokens price versions as (effective_from, unit price), ascending
    token_prices: list[tuple[datetime, str]]
    images_version: tuple[int, str] = (1, "SUM")  # (counting version, aggregation) current for new images events
    seen: set[tuple[str, str, str]] = field(default_factory=set)
    #: tokens events counted, as (project, wallet, month, the time that picks the price version, units): the version
    #: is looked up at the end, so a version recorded a moment after an event was acknowledged still applies
    token_events: list[tuple[str, str, datetime, datetime, Decimal]] = field(default_factory=list)
    #: (wallet, month, counting version) -> (aggregation, units)
    images: dict[tuple[str, datetime, int], tuple[str, Decimal]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _version_at(self, at: datetime) -> int:
        index = 0
        for i, (starts, _price) in enumerate(self.token_prices):
            if starts <= at:
                index = i
        return index

    def add_price_version(self, effective_from: datetime, unit_price: str) -> None:
        with self.lock:
            self.token_prices.append((effective_from, unit_price))

    def accept(self, event: dict[str, Any], arrival: datetime, *, images_version: tuple[int, str] | None = None
               ) -> None:
        """A valid event was acknowledged by the broker (or the API); ``arrival`` is its Kafka timestamp (for an
        API event: about now — API events are never late)."""
        with self.lock:
            identity = (event["project"], event["source"], event["id"])
            if identity in self.seen:
                return
            self.seen.add(identity)
            at = datetime.fromisoformat(event["time"])
            late = arrival > period_bounds(at, "month")[1] + timedelta(seconds=ALLOWED_LATENESS_S)
            pivot = arrival if late else at
            wallet = auto_wallet_id(event["project"], event["subject"])
            if event["type"] == TOKENS:
                self.token_events.append((event["project"], wallet, _month(pivot), pivot,
                                          Decimal(event["data"]["tokens"])))
            else:
                counting, aggregation = images_version or self.images_version
                key = (wallet, _month(pivot), counting)
                _agg, units = self.images.get(key, (aggregation, Decimal(0)))
                value = Decimal(event["data"]["n"])
                self.images[key] = (aggregation, units + value if aggregation == "SUM" else max(units, value))

    def tokens(self) -> dict[tuple[str, str, datetime, int], Decimal]:
        """(project, wallet, month, price version index) -> units (the other tenant has one version: 0)."""
        out: dict[tuple[str, str, datetime, int], Decimal] = defaultdict(Decimal)
        for project, wallet, month, pivot, units in self.token_events:
            version = self._version_at(pivot) if project == self.project else 0
            out[(project, wallet, month, version)] += units
        return out

    def expected_balances(self) -> dict[tuple[str, str], int]:
        """(project, wallet) -> balance (minor units; negative: nothing was granted)."""
        with self.lock:
            out: dict[tuple[str, str], int] = defaultdict(int)
            runs: dict[tuple[str, str, datetime], dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
            for (project, wallet, month, version), units in self.tokens().items():
                runs[(project, wallet, month)][version] += units
            for (project, wallet, _month_start), by_version in runs.items():
                if project != self.project:
                    model = PriceModel(model="per_unit", unit_price_minor=Decimal(OTHER_PRICE))
                    out[(project, wallet)] -= price_minor(model, sum(by_version.values(), Decimal(0)))
                    continue
                before = Decimal(0)
                for version in sorted(by_version):  # versions are indexed in effective_from order
                    model = PriceModel(model="per_unit", unit_price_minor=Decimal(self.token_prices[version][1]))
                    units = by_version[version]
                    out[(project, wallet)] -= price_minor(model, before + units) - price_minor(model, before)
                    before += units
            for (wallet, _m, _v), (_agg, units) in self.images.items():
                out[(self.project, wallet)] -= int(units)  # 1 minor unit per unit, whole units only
            return dict(out)

    @property
    def events(self) -> int:
        return len(self.seen)


# -- producing -----------------------------------------------------------------------------------------------


@dataclass
class Produced:
    """What the load sent, kept apart from the system under test."""

    events: int = 0  # every event or garbage message sent (good, resent, hostile)
    messages: int = 0
    last_offset: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class ChaosProducer:
    """Packed messages to the usage topic with an explicit CreateTime (the workers' arrival), acks=all."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, reference: Reference) -> None:
        self.topic, self.partitions, self.reference = topic, partitions, reference
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                                  "linger.ms": 5, "compression.type": "lz4", "queue.buffering.max.kbytes": 262_144})
        self.produced = Produced()

    def send(self, partition: int, value: bytes, *, count: int, arrival: datetime,
             accepted: list[dict[str, Any]] | None = None, images_version: tuple[int, str] | None = None) -> None:
        """``accepted``: the valid events inside, given to the reference once the broker acknowledged them."""

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self.produced.errors.append(str(err))
                return
            p = msg.partition()
            self.produced.last_offset[p] = max(self.produced.last_offset.get(p, -1), msg.offset())
            for event in accepted or ():
                self.reference.accept(event, arrival, images_version=images_version)

        timestamp_ms = int(arrival.timestamp() * 1000)
        arrival = datetime.fromtimestamp(timestamp_ms / 1000, UTC)  # what the worker reads back: milliseconds
        while True:
            try:
                self.producer.produce(self.topic, value=value, partition=partition, timestamp=timestamp_ms,
                                      on_delivery=delivered)
                break
            except BufferError:
                self.producer.poll(0.01)
        self.producer.poll(0)
        self.produced.events += count
        self.produced.messages += 1

    def close(self) -> None:
        """Drop the client (its librdkafka threads would log connection failures once the stack stops)."""
        self.producer.flush(10)
        del self.producer

    def flush(self, timeout_s: float = 120) -> None:
        assert self.producer.flush(timeout_s) == 0, "the producer could not deliver"
        assert not self.produced.errors, self.produced.errors[:3]


# -- the load and its faults ---------------------------------------------------------------------------------


@dataclass
class Faults:
    """Faults injected, by kind (kill:<process>, duplicate, late, out_of_order, hostile:<kind>, cross_tenant,
    catalog:<edit>, refused:<what>)."""

    injected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # planned but not possible then (e.g. barrier timeout)
    hostile_ids: dict[str, str] = field(default_factory=dict)  # event id -> expected dead-letter reason
    garbage_messages: int = 0

    @property
    def total(self) -> int:
        return sum(self.injected.values())


@dataclass
class Shape:
    """The load: open loop at ``rate`` events/s for ``seconds``, ``pack`` events per message."""

    rate: float
    seconds: float
    pack: int = 100
    subjects: int = 500
    images_share: float = 0.1


@dataclass
class FaultPlan:
    """How many faults of each family, spread over the first ``active_share`` of the run (the rest is quiet
    load, so what is measured at the end is the pipeline recovering, not a kill in the last second)."""

    kills: int
    catalog_edits: int
    event_faults: int
    kill_targets: tuple[str, ...]
    active_share: float = 0.75

    @classmethod
    def of(cls, faults: int, *, kill_targets: tuple[str, ...], seconds: float) -> FaultPlan:
        if faults <= 0:
            return cls(0, 0, 0, kill_targets)
        # a kill every ~2.5 s at most (each costs a restart), a catalog edit every ~8 s; the rest are events
        kills = min(max(len(kill_targets), faults // 40), max(int(seconds * 0.75 / 2.5), len(kill_targets)))
        edits = max(2, min(12, int(seconds * 0.75 / 8)))
        return cls(kills, edits, max(0, faults - kills - edits), kill_targets)


class Applied:
    """The ledger's applied marks of the usage topic's current life."""

    def __init__(self, database_url: str, topic: str) -> None:
        self.url, self.topic = libpq_url(database_url), topic
        engine = make_engine(database_url, pool_size=1)
        try:
            with engine.connect() as conn:
                self.source = current_identity(conn, topic)
        finally:
            engine.dispose()

    def marks(self) -> dict[int, int]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute("SELECT partition, applied_through FROM applied_offsets WHERE source_topic = %s",
                                (self.source,)).fetchall()
        return {int(p): int(a) for p, a in rows}

    def reached(self, targets: dict[int, int]) -> bool:
        marks = self.marks()
        return all(marks.get(p, -1) >= o for p, o in targets.items())

    def wait(self, targets: dict[int, int], *, timeout_s: float, poll_s: float = 0.1) -> float | None:
        """Seconds until every mark reached ``targets`` (None: not within ``timeout_s``)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.reached(targets):
                return time.monotonic() - started
            time.sleep(poll_s)
        return None


class ChaosLoad:
    """One phase: the load of ``shape`` with the faults of ``plan`` (none for the no-fault run).

    ``kill(target)`` kills one process kind with SIGKILL (the caller restarts it, or its supervisor does) and
    returns False when the target was not running. ``api_send`` (optional) sends a list of events through the
    ingest API until it is accepted, returning the count of attempts."""

    def __init__(self, *, producer: ChaosProducer, reference: Reference, ids: CatalogIds, database_url: str,
                 applied: Applied, seed: int, kill: Callable[[str], bool] | None = None,
                 api_send: Callable[[list[dict[str, Any]]], int] | None = None, log: Callable[[str], None] = print
                 ) -> None:
        self.producer, self.reference, self.ids = producer, reference, ids
        self.database_url, self.applied = database_url, applied
        self.rng = random.Random(seed)
        self.kill, self.api_send, self.log = kill, api_send, log
        self.faults = Faults()
        self.next_id = 0
        self.by_partition: dict[int, list[str]] = defaultdict(list)
        self.recent: list[tuple[int, dict[str, Any]]] = []  # (partition, event) — candidates for resending
        self.images_paused = threading.Event()
        self.images_quiet = threading.Event()  # the loop flushed after pausing images: offsets are final
        self.api_events = 0
        self.api_attempts = 0
        self.regular_events = 0  # events of the shape sent in this run (the open loop's count)
        self.evil_subjects: list[str] = []  # another tenant's subjects whose key onto our wallet was refused
        self.shape = Shape(rate=0, seconds=0)

    def _subjects(self, count: int) -> None:
        if self.by_partition:
            return
        for i in range(count):
            subject = f"user-{i}"
            self.by_partition[partition_for(subject, self.producer.partitions)].append(subject)

    def _event(self, subject: str, etype: str, at: datetime, *, project: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        data = {"tokens": self.rng.randint(1, 100)} if etype == TOKENS else {"n": self.rng.randint(1, 20)}
        return {"specversion": "1.0", "id": f"c{self.rng.getrandbits(32):08x}-{self.next_id}", "source": "chaos",
                "type": etype, "subject": subject, "project": project or self.ids.project,
                "time": at.isoformat(), "data": data}

    # -- event faults: each returns (events for the message, valid ones among them) ---------------------------

    def _hostile(self, subject: str, now: datetime) -> dict[str, Any] | bytes:
        kind = self.rng.choice(sorted(HOSTILE_REASONS))
        self.faults.injected[f"hostile:{kind}"] += 1
        if kind == "not_json":
            self.faults.garbage_messages += 1
            return b"\x00\xff{not json" + bytes(self.rng.getrandbits(8) for _ in range(16))
        event = self._event(subject, TOKENS, now)
        if kind == "value_2p63":
            event["data"]["tokens"] = 2**63 + self.rng.randrange(1_000)
        elif kind == "value_1e300":
            event["data"]["tokens"] = 1e300
        elif kind == "value_negative":
            event["data"]["tokens"] = -self.rng.randint(1, 100)
        elif kind == "value_not_a_number":
            event["data"]["tokens"] = [1, 2]
        elif kind == "subject_not_a_string":
            event["subject"] = 12345
        elif kind == "data_not_an_object":
            event["data"] = "lots"
        elif kind == "unknown_meter":
            event["type"] = "chaos.unknown"
        elif kind == "time_in_future":
            event["time"] = (now + timedelta(days=3)).isoformat()
        elif kind == "bad_time":
            event["time"] = "yesterday-ish"
        self.faults.hostile_ids[event["id"]] = HOSTILE_REASONS[kind]
        return event

    def _message(self, partition: int, now: datetime, *, faults_here: int) -> None:
        subjects = self.by_partition[partition]
        pack = self.shape.pack
        images_ok = not self.images_paused.is_set()
        events: list[dict[str, Any]] = []
        valid: list[dict[str, Any]] = []
        for _ in range(pack):
            subject = subjects[self.rng.randrange(len(subjects))]
            etype = IMAGES if images_ok and self.rng.random() < self.shape.images_share else TOKENS
            event = self._event(subject, etype, now)
            events.append(event)
            valid.append(event)
        self.regular_events += pack
        for _ in range(faults_here):
            kind = self.rng.choice(("duplicate", "late", "out_of_order", "hostile", "hostile", "cross_tenant"))
            subject = subjects[self.rng.randrange(len(subjects))]
            if kind == "duplicate":
                candidates = [e for p, e in self.recent[-2_000:] if p == partition
                              and (images_ok or e["type"] != IMAGES)]
                if not candidates:
                    kind = "out_of_order"
                else:
                    self.faults.injected["duplicate"] += 1
                    events.append(self.rng.choice(candidates))  # the same bytes again, later (a producer retry)
                    continue
            if kind == "late":  # days old: its month is over, so it is charged in the arrival's month
                self.faults.injected["late"] += 1
                event = self._event(subject, TOKENS, now - timedelta(days=self.rng.uniform(2, 6)))
            elif kind == "out_of_order":  # earlier than events already sent, within the month
                self.faults.injected["out_of_order"] += 1
                back = min(self.rng.uniform(1, 1_800), (now - _month(now)).total_seconds() / 2)
                event = self._event(subject, TOKENS, now - timedelta(seconds=back))
            elif kind == "cross_tenant":  # another tenant's event naming our subject: charged to that tenant only
                self.faults.injected["cross_tenant"] += 1
                if self.evil_subjects and self.rng.random() < 0.3:
                    subject = self.rng.choice(self.evil_subjects)  # the subject of a refused cross-tenant key
                event = self._event(subject, TOKENS, now, project=OTHER_PROJECT)
            else:
                hostile = self._hostile(subject, now)
                if isinstance(hostile, bytes):
                    self.producer.send(partition, hostile, count=1, arrival=now)
                else:
                    events.insert(self.rng.randrange(len(events) + 1), hostile)
                continue
            events.insert(self.rng.randrange(len(events) + 1), event)
            valid.append(event)
        self.rng.shuffle(events)
        self.producer.send(partition, orjson.dumps(events), count=len(events), arrival=now, accepted=valid,
                           images_version=self.reference.images_version)
        self.recent.extend((partition, e) for e in valid[:10])
        if len(self.recent) > 4_000:
            del self.recent[:2_000]

    # -- catalog edits (a thread: the images barrier waits for the ledger while the load goes on) -------------

    def _catalog_edit(self, index: int) -> None:
        if index % 2 == 0:  # a new tokens price version, seconds ahead (see the module's docstring)
            price = TOKEN_PRICES[(len(self.reference.token_prices)) % len(TOKEN_PRICES)]
            engine = make_engine(self.database_url, pool_size=1)
            try:
                with engine.begin() as conn:
                    # ahead of the COMMIT, not of the call: a version whose start passed before it committed
                    # would price the events in between by whichever catalog metered them (old, or new when
                    # re-metered after a kill) — then the reference could not know (a run under load 10 made
                    # connect + commit take longer than a 3-s lead)
                    effective = datetime.now(UTC) + timedelta(seconds=PRICE_LEAD_S)
                    row = catalog.add_price_version(conn, project_id=self.ids.project, price_id=self.ids.tokens_price,
                                                    model={"model": "per_unit", "unit_price_minor": price},
                                                    effective_from=effective)
                committed = datetime.now(UTC)
                self.reference.add_price_version(row.versions[-1].effective_from, price)
                self.faults.injected["catalog:price_version"] += 1
                if committed >= effective:
                    self.faults.skipped["price version committed after its start: reference unsure"] += 1
                # a hostile catalog edit: another tenant maps a subject onto one of our wallets (whether it exists
                # yet or not) — must be refused; that tenant's events then name the subject, so a key let through
                # would charge our wallet and the money check would say so
                wallet = auto_wallet_id(self.ids.project, self.by_partition[0][0])
                try:
                    with engine.begin() as conn:
                        catalog.set_subject_key(conn, project_id=OTHER_PROJECT, subject=f"evil-{index}",
                                                wallet_id=wallet)
                    self.faults.injected["cross_tenant_subject_key_ACCEPTED"] += 1
                except StreamsError:
                    self.faults.injected["refused:cross_tenant_subject_key"] += 1
                self.evil_subjects.append(f"evil-{index}")
            finally:
                engine.dispose()
            return
        # a meter aggregation edit behind the images barrier
        self.images_quiet.clear()
        self.images_paused.set()
        try:
            if not self.images_quiet.wait(30):
                self.faults.skipped["catalog:meter_version"] += 1
                return
            targets = dict(self.producer.produced.last_offset)
            if self.applied.wait(targets, timeout_s=90) is None:
                self.faults.skipped["catalog:meter_version"] += 1
                return
            counting, aggregation = self.reference.images_version
            new_aggregation = "MAX" if aggregation == "SUM" else "SUM"
            engine = make_engine(self.database_url, pool_size=1)
            try:
                with engine.begin() as conn:
                    row = catalog.update_meter(conn, project_id=self.ids.project, meter="images",
                                               aggregation=new_aggregation)
            finally:
                engine.dispose()
            assert row.counting_version > counting, row
            self.reference.images_version = (row.counting_version, new_aggregation)
            self.faults.injected["catalog:meter_version"] += 1
        finally:
            self.images_paused.clear()

    # -- the phase -----------------------------------------------------------------------------------------------

    def run(self, shape: Shape, plan: FaultPlan | None) -> dict[str, Any]:
        """Produce for ``shape.seconds``; returns when the last message is acknowledged."""
        self.shape = shape
        self._subjects(shape.subjects)
        plan = plan or FaultPlan(0, 0, 0, ())
        active_s = shape.seconds * plan.active_share
        kill_order: list[str] = []
        kill_times = sorted(self.rng.uniform(1.0, active_s) for _ in range(plan.kills))
        edit_times = [active_s * (i + 0.5) / max(plan.catalog_edits, 1) for i in range(plan.catalog_edits)]
        ticks = max(1, int(active_s / 0.05))
        fault_ticks = Counter(self.rng.randrange(ticks) for _ in range(plan.event_faults))
        edit_threads: list[threading.Thread] = []
        api_thread = None
        stop_api = threading.Event()
        if self.api_send is not None:
            api_thread = threading.Thread(target=self._api_loop, args=(stop_api,), daemon=True, name="api-load")
            api_thread.start()
        started = time.monotonic()
        first_sent = time.time()
        sent_goal = 0.0
        self.regular_events = 0
        tick = 0
        partition = 0
        try:
            while True:
                elapsed = time.monotonic() - started
                if elapsed >= shape.seconds:
                    break
                while kill_times and kill_times[0] <= elapsed and self.kill is not None:
                    kill_times.pop(0)
                    if not kill_order:  # every kind in turn (shuffled), so each one is killed
                        kill_order = list(plan.kill_targets)
                        self.rng.shuffle(kill_order)
                    target = kill_order.pop()
                    if self.kill(target):
                        self.faults.injected[f"kill:{target}"] += 1
                    else:
                        self.faults.skipped[f"kill:{target}"] += 1
                while edit_times and edit_times[0] <= elapsed:
                    edit_times.pop(0)
                    thread = threading.Thread(target=self._catalog_edit, args=(len(edit_threads),), daemon=True)
                    thread.start()
                    edit_threads.append(thread)
                if self.images_paused.is_set() and not self.images_quiet.is_set():
                    self.producer.flush()  # every images event sent so far has its offset
                    self.images_quiet.set()
                sent_goal = shape.rate * elapsed
                if self.regular_events >= sent_goal:  # the shape's events; faults come on top of them
                    time.sleep(0.005)
                    self.producer.producer.poll(0)
                    continue
                now = datetime.now(UTC)
                tick = int(elapsed / 0.05)
                self._message(partition, now, faults_here=fault_ticks.pop(tick, 0))
                partition = (partition + 1) % self.producer.partitions
            # faults planned for ticks the loop never reached (a slow machine): inject them now, in one message
            leftover = sum(fault_ticks.values())
            if leftover:
                self._message(0, datetime.now(UTC), faults_here=leftover)
            self.producer.flush()
        finally:
            for thread in edit_threads:
                thread.join(timeout=180)
            stop_api.set()
            if api_thread is not None:
                api_thread.join(timeout=180)
        return {"first_sent": first_sent, "produced_s": time.monotonic() - started}

    def _api_loop(self, stop: threading.Event) -> None:
        """A trickle of tokens events through the ingest API (the API process is a kill target): each batch is
        resent with the same ids until accepted, so an answer lost to a kill never loses or doubles usage."""
        assert self.api_send is not None
        rng = random.Random(self.rng.random())
        subjects = [s for ss in self.by_partition.values() for s in ss]
        n = 0
        while not stop.wait(0.1):
            now = datetime.now(UTC)
            batch = []
            for _ in range(10):
                n += 1
                batch.append({"specversion": "1.0", "id": f"api-{rng.getrandbits(32):08x}-{n}", "source": "chaos-api",
                              "type": TOKENS, "subject": rng.choice(subjects), "time": now.isoformat(),
                              "data": {"tokens": rng.randint(1, 100)}})
            self.api_attempts += self.api_send(batch)
            for event in batch:
                self.reference.accept({**event, "project": self.ids.project}, now)
            self.api_events += len(batch)


# -- checks ------------------------------------------------------------------------------------------------------


def balances(database_url: str, projects: tuple[str, ...]) -> dict[tuple[str, str], int]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        rows = conn.execute("SELECT project_id, id, balance_minor FROM wallets WHERE project_id = ANY(%s)",
                            (list(projects),)).fetchall()
    return {(p, w): int(b) for p, w, b in rows}


def money_diff(expected: dict[tuple[str, str], int], actual: dict[tuple[str, str], int]) -> list[str]:
    """Every wallet whose balance is not the reference's (a wallet absent on one side counts as 0)."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key, 0) != actual.get(key, 0):
            out.append(f"{key[0]}/{key[1]}: ledger {actual.get(key, 0)}, expected {expected.get(key, 0)}")
    return out


def explain_wallet(database_url: str, reference: Reference, project: str, wallet: str) -> list[str]:
    """For a wrong wallet: the ledger's charge rows and the reference's units, side by side."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        rows = conn.execute("SELECT meter_id, period_start, price_version_id, units, charged_minor FROM usage_charges "
                            "WHERE wallet_id = %s ORDER BY 1, 2, 3", (wallet,)).fetchall()
    out = [f"    ledger {m} {p:%Y-%m} {v}: units {u}, charged {c}" for m, p, v, u, c in rows]
    with reference.lock:
        out += [f"    reference tokens {month:%Y-%m} version {v} ({reference.token_prices[v][1]}/unit "
                f"from {reference.token_prices[v][0]:%H:%M:%S.%f}): units {u}"
                for (pr, w, month, v), u in sorted(reference.tokens().items(), key=lambda kv: (kv[0][2], kv[0][3]))
                if pr == project and w == wallet]
        out += [f"    reference images {month:%Y-%m} counting version {cv}: {agg} {u}"
                for (w, month, cv), (agg, u) in sorted(reference.images.items(), key=lambda kv: kv[0][1:])
                if w == wallet and project == reference.project]
    return out


def duplicate_postings(database_url: str) -> int:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM (SELECT idempotency_key FROM transactions GROUP BY 1 "
                           "HAVING count(*) > 1) d").fetchone()
    return int(row[0]) if row else 0


def dead_letters(bootstrap: str, topic: str, *, min_messages: int, timeout_s: float = 60.0
                 ) -> tuple[dict[str, str], Counter[str]]:
    """The dead-letter topic read from the start: event id -> reason, and the count of each reason (letters
    re-emitted after a crash are de-duplicated on their source location, as readers must)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"chaos-dlq-{random.getrandbits(32):08x}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    by_id: dict[str, str] = {}
    reasons: Counter[str] = Counter()
    where: set[tuple[int, int, int | None]] = set()
    deadline = time.monotonic() + timeout_s
    idle_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                if len(where) >= min_messages and time.monotonic() - idle_since > 3:
                    break
                continue
            idle_since = time.monotonic()
            letter = orjson.loads(msg.value())
            spot = (letter["source_partition"], letter["source_offset"], letter.get("index"))
            if spot in where:
                continue
            where.add(spot)
            reasons[letter["reason"]] += 1
            event = letter.get("event")
            if isinstance(event, dict) and isinstance(event.get("id"), str):
                by_id[event["id"]] = letter["reason"]
    finally:
        consumer.close()
    return by_id, reasons


def hostile_accounted(faults: Faults, by_id: dict[str, str], reasons: Counter[str]) -> tuple[int, list[str]]:
    """Hostile events found in the dead-letter topic with their expected reason, and what is missing."""
    missing = [f"{i} ({want}; got {by_id.get(i)})" for i, want in faults.hostile_ids.items() if by_id.get(i) != want]
    found = len(faults.hostile_ids) - len(missing)
    garbage_found = min(reasons.get("bad_json", 0), faults.garbage_messages)
    if garbage_found < faults.garbage_messages:
        missing.append(f"{faults.garbage_messages - garbage_found} non-JSON messages without a bad_json letter")
    return found + garbage_found, missing
