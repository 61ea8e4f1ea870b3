"""A stateful property test of the metering core against a reference model (issue 13, stretch; DESIGN §2
invariants 1, 2, 9 and 10).

The system under test: one ``PartitionAggregator`` per source partition (the pure core of streams/metering.py),
the checkpoints it cuts (their JSON, parsed as the ledger's ``ChargeCheckpoint``), and a miniature ledger that
applies them with the ledger's pure rules (applied mark, per-partition cumulatives merged by
``ledger.checkpoints.merge_units``, price versions continued by ``ledger.pricing.continued_prices_minor``).
Hypothesis drives it with random catalog edits (meter edits that change counting, cosmetic ones, new price
versions — back-dated or not — with free allowances and tiers), duplicates, out-of-order event times, lost
checkpoints, crashes (a new owner seeded from the ledger) and redeliveries from any earlier offset.

The reference model knows nothing of counters, checkpoints or dedupe memories: an event counts once, the first
time it is metered in a run whose checkpoint reaches the ledger, under the meter definition and the price version
(by event time) of the catalog at that moment; a wallet's period is priced by walking its units one by one
through the versions in the order they took effect (integer prices, so the walk is exact). At the end, with
everything consumed and applied, every wallet must owe exactly what the reference says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from ledger.checkpoints import merge_units
from ledger.contracts import ChargeCheckpoint, PriceModel, PriceTier
from ledger.pricing import continued_prices_minor
from streams.catalog_model import CatalogSnapshot, Meter, PriceVersion, ProjectPolicy, parse_path
from streams.contracts import partition_for
from streams.metering import PartitionAggregator, SeedCounter

D = Decimal
PARTITIONS = 2
ARRIVAL = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)  # every event time is in November: one period, none late
PERIOD = datetime(2026, 11, 1, tzinfo=UTC)


def _subjects() -> dict[str, int]:
    """Three subjects: two on partition 0, one on partition 1."""
    found: dict[int, list[str]] = {0: [], 1: []}
    i = 0
    while len(found[0]) < 2 or len(found[1]) < 1:
        s = f"s{i}"
        found[partition_for(s, PARTITIONS)].append(s)
        i += 1
    return {found[0][0]: 0, found[0][1]: 0, found[1][0]: 1}


SUBJECTS = _subjects()
# one wallet spans both partitions (a tier position shared across partitions), one wallet has one subject
_S = list(SUBJECTS)
WALLETS = {_S[0]: "W1", _S[2]: "W1", _S[1]: "W2"}


@dataclass(frozen=True)
class Tariff:
    """An integer-priced graduated model: ``rates[i]`` per unit up to ``bounds[i]`` (the last is open)."""

    free: int
    bounds: tuple[int, ...]
    rates: tuple[int, ...]

    def model(self) -> PriceModel:
        tiers = [PriceTier(up_to=D(b), unit_price_minor=D(r)) for b, r in zip(self.bounds, self.rates, strict=False)]
        tiers.append(PriceTier(unit_price_minor=D(self.rates[-1])))
        return PriceModel(model="graduated", tiers=tuple(tiers), free_units=D(self.free))

    def unit_cost(self, position: int) -> int:
        """What the ``position``-th unit of the period (1-based) costs — the reference's own arithmetic."""
        billable = position - self.free
        if billable <= 0:
            return 0
        for bound, rate in zip(self.bounds, self.rates, strict=False):
            if billable <= bound:
                return rate
        return self.rates[-1]


tariffs = st.builds(
    lambda free, bounds, rates: Tariff(free, tuple(sorted(set(bounds))), tuple(rates)),
    st.integers(0, 15), st.lists(st.integers(1, 40), min_size=0, max_size=2), st.lists(st.integers(0, 3), min_size=3,
                                                                                        max_size=3))


@dataclass
class Counted:
    """The reference's record of one counted event."""

    wallet: str
    counting_version: int
    price_index: int
    units: int


@dataclass
class Life:
    """One owner's run on a partition: its aggregator and what it metered that the ledger has not applied."""

    aggregator: PartitionAggregator
    pending: dict[int, tuple[str, Counted]] = field(default_factory=dict)  # offset -> (event id, record)
    pointer: int = 0  # next offset to consume


class MiniLedger:
    """The ledger's checkpoint rules in miniature, with its pure pricing (ledger/checkpoints.py steps 1–5b)."""

    def __init__(self) -> None:
        self.applied: dict[int, int] = {p: -1 for p in range(PARTITIONS)}
        self.counters: dict[tuple[int, tuple[str, ...]], tuple[Decimal, int, str, datetime | None]] = {}
        self.meta: dict[tuple[str, ...], tuple[PriceModel, str, datetime, int]] = {}
        self.dedupe: dict[int, list[tuple[int, datetime]]] = {p: [] for p in range(PARTITIONS)}

    def apply(self, payload: bytes) -> bool:
        cp = ChargeCheckpoint.model_validate_json(payload)
        p = cp.partition
        if cp.as_of_offset <= self.applied[p]:
            return False
        for c in cp.counters:
            k = c.key
            key = (k.wallet_id, k.meter_id, k.price_version_id)
            assert k.period_start == PERIOD
            assert c.price_effective_from is not None
            self.counters[(p, key)] = (c.units, c.events, c.aggregation, c.latest_at)
            self.meta[key] = (c.price, c.aggregation, c.price_effective_from, c.meter_version)
        assert cp.stream_time is not None
        self.dedupe[p].extend((h, cp.stream_time) for h in cp.dedupe_keys)
        self.applied[p] = cp.as_of_offset
        return True

    def seed(self, aggregator: PartitionAggregator, p: int) -> None:
        aggregator.seed(applied_through=self.applied[p],
                        counters=[SeedCounter(key[0], "p1", key[1], PERIOD, key[2], units, events, 0, latest)
                                  for (q, key), (units, events, _, latest) in self.counters.items() if q == p],
                        dedupe_keys=self.dedupe[p])

    def charged_by_wallet(self) -> dict[str, int]:
        """Every key merged over partitions, each group's versions priced as one run (what usage_charges ends at)."""
        merged: dict[tuple[str, ...], Decimal] = {}
        for key in self.meta:
            values = [(u, latest) for (q, k), (u, _, _, latest) in self.counters.items() if k == key]
            merged[key] = merge_units(self.meta[key][1], values)
        groups: dict[tuple[str, str, int], list[tuple[str, ...]]] = {}
        for key, (_, _, _, meter_version) in self.meta.items():
            groups.setdefault((key[0], key[1], meter_version), []).append(key)
        out: dict[str, int] = {}
        for (wallet, _, _), keys in groups.items():
            keys.sort(key=lambda k: (self.meta[k][2], k[2]))
            charges = continued_prices_minor([(self.meta[k][0], self.meta[k][1], merged[k]) for k in keys])
            out[wallet] = out.get(wallet, 0) + sum(charges)
        return out


class MeteringMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
        self.events: dict[int, dict[int, dict[str, object]]] = {p: {} for p in range(PARTITIONS)}  # offset -> event
        self.ledger = MiniLedger()
        self.lives: dict[int, Life] = {}
        self.committed: dict[str, Counted] = {}  # event id -> how it was counted (reference)
        # the catalog: the meter's definition and counting version, the price versions (effective, tariff)
        self.meter_version = 1
        self.counting_version = 1
        self.aggregation = "SUM"
        self.prices: list[tuple[datetime, Tariff]] = []

    @initialize(first=tariffs)
    def start(self, first: Tariff) -> None:
        self.prices.append((datetime(2020, 1, 1, tzinfo=UTC), first))
        for p in range(PARTITIONS):
            self._new_life(p, pointer=0)

    # -- the catalog -------------------------------------------------------------------------------------

    def _catalog(self) -> CatalogSnapshot:
        meter = Meter(id="tokens", project_id="p1", slug="tokens", event_type="llm", aggregation=self.aggregation,
                      value_property="$.tokens", value_steps=parse_path("$.tokens"), version=self.meter_version,
                      counting_version=self.counting_version)
        versions = [PriceVersion(id=f"pv{i}", price_id="price", meter_id="tokens", project_id="p1", version=i + 1,
                                 model=t.model(), period="month", effective_from=at,
                                 model_json=t.model().model_dump(mode="json", exclude_defaults=True))
                    for i, (at, t) in enumerate(self.prices)]
        return CatalogSnapshot.build(meters=[meter], price_versions=versions,
                                     subject_keys={("p1", s): w for s, w in WALLETS.items()}, policies={},
                                     default_policy=ProjectPolicy("auto_provision", 10**9))

    @rule()
    def edit_meter_counting(self) -> None:
        """SUM ↔ COUNT: a new counting version; what was counted before stays as it was."""
        self.meter_version += 1
        self.counting_version = self.meter_version
        self.aggregation = "COUNT" if self.aggregation == "SUM" else "SUM"

    @rule()
    def edit_meter_cosmetic(self) -> None:
        self.meter_version += 1

    @precondition(lambda self: len(self.prices) < 5)
    @rule(day=st.integers(2, 27), tariff=tariffs)
    def add_price_version(self, day: int, tariff: Tariff) -> None:
        """Effective at the start of ``day`` if that is after the latest version (back-dated or not: the event
        times below are anywhere in November, before or after it)."""
        at = datetime(2026, 11, day, tzinfo=UTC)
        if at > self.prices[-1][0]:
            self.prices.append((at, tariff))

    # -- producers ----------------------------------------------------------------------------------------

    @rule(subject=st.sampled_from(sorted(SUBJECTS)), event_id=st.integers(0, 12), tokens=st.integers(1, 9),
          day=st.integers(1, 27), hour=st.integers(0, 23))
    def send(self, subject: str, event_id: int, tokens: int, day: int, hour: int) -> None:
        """A small id pool: duplicates are common (a resend may carry other values: the first one counted wins).
        Ids carry their subject, so a resend goes where the original went (dedupe is per partition, as
        documented). Event times are in any order."""
        eid = f"{subject}:{event_id}"
        at = datetime(2026, 11, day, hour, tzinfo=UTC)
        ev = {"specversion": "1.0", "id": eid, "source": "test", "type": "llm", "subject": subject,
              "project": "p1", "time": at.isoformat(), "data": {"tokens": tokens}}
        p = SUBJECTS[subject]
        self.events[p][len(self.logs[p])] = ev
        self.logs[p].append(orjson.dumps(ev))

    # -- the worker ---------------------------------------------------------------------------------------

    def _new_life(self, p: int, *, pointer: int) -> None:
        aggregator = PartitionAggregator(source_topic="usage", partition=p, partitions=PARTITIONS)
        self.ledger.seed(aggregator, p)
        self.lives[p] = Life(aggregator, pointer=pointer)

    def _reference_count(self, life: Life, offset: int, ev: dict[str, object]) -> None:
        """The reference's verdict on one metered event (independent of the aggregator's state)."""
        eid = str(ev["id"])
        pending_ids = {e for e, _ in life.pending.values()}
        if eid in self.committed or eid in pending_ids:
            return  # a duplicate within the horizon
        at = datetime.fromisoformat(str(ev["time"]))
        index = max([i for i, (start, _) in enumerate(self.prices) if start <= at], default=0)
        units = 1 if self.aggregation == "COUNT" else int(ev["data"]["tokens"])  # type: ignore[index]
        life.pending[offset] = (eid, Counted(WALLETS[str(ev["subject"])], self.counting_version, index, units))

    @rule(p=st.integers(0, PARTITIONS - 1), n=st.integers(1, 6))
    def consume(self, p: int, n: int) -> None:
        life = self.lives[p]
        catalog = self._catalog()
        end = min(life.pointer + n, len(self.logs[p]))
        for offset in range(life.pointer, end):
            skipped = offset <= life.aggregator.processed_through
            rejections = life.aggregator.process(offset=offset, value=self.logs[p][offset],
                                                 arrival=ARRIVAL + timedelta(seconds=offset), catalog=catalog)
            assert rejections == []
            if not skipped:
                self._reference_count(life, offset, self.events[p][offset])
        life.pointer = end

    @rule(p=st.integers(0, PARTITIONS - 1), lost=st.booleans())
    def checkpoint(self, p: int, lost: bool) -> None:
        """Cut and deliver a checkpoint. A lost one means the worker died before the broker had it."""
        life = self.lives[p]
        cp = life.aggregator.checkpoint()
        if cp is None:
            return
        if lost:
            self.crash(p, rewind=0)
            return
        if self.ledger.apply(cp.to_json(emitted_at=ARRIVAL)):
            for offset in sorted(o for o in life.pending if o <= cp.as_of_offset):
                eid, counted = life.pending.pop(offset)
                self.committed[eid] = counted

    @rule(p=st.integers(0, PARTITIONS - 1), rewind=st.integers(0, 20))
    def crash(self, p: int, rewind: int) -> None:
        """The owner dies (kill -9); the next one seeds from the ledger and is redelivered from at most the
        ledger's mark + 1 (faust's committed offset never runs ahead of an applied checkpoint), possibly earlier."""
        self._new_life(p, pointer=max(0, self.ledger.applied[p] + 1 - rewind))

    def teardown(self) -> None:
        if not self.lives:
            return
        for p in range(PARTITIONS):  # everything consumed and applied
            self.consume(p, len(self.logs[p]) + 1)
            self.checkpoint(p, lost=False)
            assert self.ledger.applied[p] == len(self.logs[p]) - 1
            assert self.lives[p].pending == {}
        charged = {w: c for w, c in self.ledger.charged_by_wallet().items() if c}
        assert charged == {w: c for w, c in self._reference().items() if c}

    def _reference(self) -> dict[str, int]:
        """Walk each (wallet, counting version)'s units through the price versions in effective order."""
        units: dict[tuple[str, int], dict[int, int]] = {}
        for counted in self.committed.values():
            per_version = units.setdefault((counted.wallet, counted.counting_version), {})
            per_version[counted.price_index] = per_version.get(counted.price_index, 0) + counted.units
        out: dict[str, int] = {}
        for (wallet, _), per_version in units.items():
            position = 0
            for index in sorted(per_version):  # price versions are numbered in effective order
                tariff = self.prices[index][1]
                for _ in range(per_version[index]):
                    position += 1
                    out[wallet] = out.get(wallet, 0) + tariff.unit_cost(position)
        return out


MeteringMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_metering_against_a_reference_model = MeteringMachine.TestCase

