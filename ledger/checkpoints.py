"""apply_checkpoint: DESIGN §2.2 in one PostgreSQL transaction, set-based.

Steps, and the invariant each protects:

1. Lock (creating if missing) the applied_offsets row of (source_topic, partition). If the checkpoint's
   ``owner_epoch`` is older than the row's, it is ``fenced``: a no-op (ledger/fencing.py).
   → one owner per partition (DESIGN §2 invariant 11): once a new owner took its epoch (and seeded from
   the state of that instant), nothing the previous owner emitted can apply, so the two can never both
   charge the same offsets, whatever changed in the catalog between them.
   If ``as_of_offset <= applied_through`` return ``stale`` and write nothing.
   → a checkpoint is applied at most once, and never after a later one of the same partition (a
   redelivered or reordered checkpoint cannot charge twice or roll counters back).
2. Create missing subject wallets (streams provisions wallets with deterministic ids); a counter whose
   wallet already belongs to ANOTHER project than the counter's is refused: nothing is posted for it and
   it is written to ``refused_counters`` with reason ``wallet_in_other_project`` (the ledger's dead letter).
   → usage is never dropped for want of a wallet; no checkpoint moves money in another project's wallet
     (invariant 7; the composite foreign keys of ledger_0007 are the backstop).
3. Upsert this partition's counters for every key in the checkpoint.
   → the stored counters are what streams seeds from; they move together with applied_through.
4. Lock the keys' usage_charges rows in key order (insert-if-missing), then read every partition's
   counters of those keys and merge them per aggregation (sum/count/unique_count: sum; max: max;
   latest: the value with the latest ``latest_at``).
   → a key spanning partitions is priced as a whole; the row lock serialises two partitions' appliers
     for one key, and the read after the lock sees the other partition's committed counters.
5. Price the merged units (ledger.pricing), delta = price − charged. Store units and charged.
   → the sum of everything posted for a key equals price(total units): no drift, no double charge.
5b. Price versions continue the period (DESIGN §2 invariant 9): keys that carry ``price_effective_from``
   belong to the group (wallet, meter, period, meter_version). Before step 4 the groups' rows of
   ``usage_charge_groups`` are locked (insert-if-missing, key order); after it every member of the group (every
   price version, this checkpoint's or not) is read, its partitions merged, and the versions priced as one run
   in the order they took effect (``pricing.continued_prices_minor``): each version's target charge is
   ``price_v(before + units_v) − price_v(before)``. Every member whose target moved posts its delta — also a
   later version re-priced because a late event grew an earlier one.
   → the free allowance and tier position carry over a price change; the result is a pure function of the
     period's units (arrival order, partitions and merging cannot change it), so it is charged exactly once;
     the group lock serialises two partitions' appliers of one group, and each reads the versions the other
     committed.
   When EVERY key of the application is a group member (streams always sends ``price_effective_from``), the group
   locks already serialise every applier of its keys, so step 4's charge-row locks are skipped: the members are
   read after the group lock (a key not stored yet is a member charged nothing) and each charge row is written
   ONCE after pricing, inserted if new, in key order (``_UPSERT_CHARGES``; the settle pass locks them in that
   order). A lock and an update were two row versions per key: the upsert halves the charge table's writes
   (``bench.ledger_apply``: SQL per key 96–109 → 76 µs at 100,000 wallets). A key stored without
   ``price_effective_from`` or under another meter version is not a member: then the whole application takes the
   step-4 path. Keys without ``price_effective_from`` (older producers) and rows written before ledger_0006
     are priced on their own as before: charged history is never re-priced. A key named without
     ``price_effective_from`` whose stored row is grouped (a replay correction) is priced with its group.
6. Lock the wallets with a non-zero delta (id order), post each delta as a ``usage`` transaction:
   positive delta burns buckets, beyond the balance it is posted as debt (never dropped); a negative
   delta (a volume tier got cheaper, a LATEST gauge fell) is a ``usage`` transaction with a POSITIVE
   amount that repays debt first and puts the rest in a 'refund' bucket. Idempotency key:
   ``usage:{topic}:{partition}:{as_of}:{wallet}:{meter}:{period}:{version}`` (deterministic).
   Outbox rows are written for every transaction.
   With ``settle_later`` (``LEDGER_USAGE_SETTLE_INTERVAL_S`` > 0) the deltas are added to the wallets'
   ``unsettled_minor`` instead (wallets locked in id order) and ledger/settle.py posts them later.
   → what is charged is decided here either way; the unsettled part already counts against the balance.
7. Record the checkpoint's dedupe keys (one array row, with the checkpoint's ``stream_time``: the horizon is
   measured in stream time when the next owner seeds) and set applied_through = as_of_offset.
   → dedupe state, counters, money and the offset mark commit atomically or not at all.

``apply_checkpoints`` applies several consecutive checkpoints of one partition (what the consumer fetched
in one go while the ledger was busy) as ONE merged checkpoint: step 1 is decided checkpoint by checkpoint
against a running mark, exactly as one-by-one application would, and the accepted ones merge (last value
per key, union of dedupe keys, the last offset). Values are cumulative, so every key ends where one-by-one
application would leave it and posts the same total — once instead of once per checkpoint, which is what
lets the ledger catch up: its cost is per key and checkpoint, not per event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import structlog
from sqlalchemy import Connection, text

from ledger.books import load_books, lock_wallets
from ledger.contracts import ChargeCheckpoint, CounterValue, PriceModel, TransactionKind
from ledger.known_wallets import KnownWallets
from ledger.postings import DEFAULT_PRIORITY, NewBucket
from ledger.pricing import continued_prices_minor, price_minor
from ledger.rows import CheckpointOutcome
from ledger.sqlrows import rows_json
from ledger.writer import Draft, write

log = structlog.get_logger("ledger.checkpoints")

__all__ = ["Key", "KeyMetadata", "MergedOutcome", "apply_checkpoint", "apply_checkpoints", "merge_units", "post_deltas",
           "usage_idempotency_key"]


class Key(NamedTuple):
    wallet_id: str
    meter_id: str
    period_start: datetime
    price_version_id: str


#: The key columns every statement reads from the checkpoint's rows (built once per checkpoint).
_KEY_COLUMNS = "wallet_id text, meter_id text, period_start timestamptz, price_version_id text"
_KEY_COLUMNS_SQL = _KEY_COLUMNS

_LOCK_PARTITION = text("""
    INSERT INTO applied_offsets (source_topic, partition) VALUES (:topic, :partition)
    ON CONFLICT (source_topic, partition) DO UPDATE SET source_topic = EXCLUDED.source_topic
    RETURNING applied_through, owner_epoch
""")

# Creates the missing subject wallets and returns the wallets that exist in ANOTHER project than the counter
# names (the SELECT sees the statement's snapshot: a wallet created here has the counter's project anyway), and
# the wallets it created (actual NULL): those exist only if this transaction commits.
_ENSURE_WALLETS = text("""
    WITH w AS (SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS w(id text, project_id text)),
    created AS (
        INSERT INTO wallets (id, project_id, owner_kind, owner_ref)
        SELECT w.id, w.project_id, 'subject', w.id FROM w ORDER BY w.id
        ON CONFLICT DO NOTHING
        RETURNING id
    )
    SELECT w.id, x.project_id AS actual
    FROM w JOIN wallets x ON x.id = w.id
    WHERE x.project_id <> w.project_id
    UNION ALL
    SELECT id, NULL FROM created
""")

_REFUSE_COUNTERS = text(f"""
    INSERT INTO refused_counters (source_topic, partition, as_of_offset, reason, project_id, wallet_id,
                                  wallet_project_id, meter_id, period_start, price_version_id, units, events, counter)
    SELECT :topic, :partition, :as_of, v.reason, v.project_id, v.wallet_id, v.wallet_project_id, v.meter_id,
           v.period_start, v.price_version_id, v.units, v.events, CAST(v.counter AS jsonb)
    FROM json_to_recordset(CAST(:rows AS json)) AS v({_KEY_COLUMNS_SQL}, reason text, project_id text,
                                                     wallet_project_id text, units numeric, events bigint, counter text)
    ON CONFLICT DO NOTHING
""")

_SET_EPOCH = text("""
    UPDATE applied_offsets SET owner_epoch = :epoch, updated_at = now()
    WHERE source_topic = :topic AND partition = :partition AND owner_epoch < :epoch
""")


_UPSERT_COUNTERS = text(f"""
    INSERT INTO usage_counters (wallet_id, meter_id, period_start, price_version_id, project_id, source_topic,
                                partition, units, latest_at, events, late_events, as_of_offset, updated_at)
    SELECT v.wallet_id, v.meter_id, v.period_start, v.price_version_id, v.project_id, v.src_topic, v.src_partition,
           v.units, v.latest_at, v.events, v.late_events, v.src_as_of, now()
    FROM json_to_recordset(CAST(:rows AS json)) AS v({_KEY_COLUMNS}, project_id text, units numeric,
                                                     latest_at timestamptz, events bigint, late_events bigint,
                                                     src_topic text, src_partition integer, src_as_of bigint)
    ON CONFLICT (wallet_id, meter_id, period_start, price_version_id, source_topic, partition) DO UPDATE SET
        units = EXCLUDED.units, latest_at = EXCLUDED.latest_at, events = EXCLUDED.events,
        late_events = EXCLUDED.late_events, as_of_offset = EXCLUDED.as_of_offset, updated_at = now()
""")

# ON CONFLICT DO UPDATE locks each existing row; ORDER BY makes every applier lock keys in one order.
_LOCK_CHARGES = text(f"""
    INSERT INTO usage_charges (wallet_id, meter_id, period_start, price_version_id, project_id, aggregation, price,
                               meter_version, price_effective_from)
    SELECT v.wallet_id, v.meter_id, v.period_start, v.price_version_id, v.project_id, v.aggregation,
           CAST(v.price AS jsonb), v.meter_version, v.price_effective_from
    FROM json_to_recordset(CAST(:rows AS json)) AS v({_KEY_COLUMNS}, project_id text, aggregation text, price text,
                                                     meter_version integer, price_effective_from timestamptz)
    ORDER BY v.wallet_id, v.meter_id, v.period_start, v.price_version_id
    ON CONFLICT (wallet_id, meter_id, period_start, price_version_id) DO UPDATE SET updated_at = now()
    RETURNING wallet_id, meter_id, period_start, price_version_id, meter_version, price_effective_from, charged_minor
""")

# _LOCK_CHARGES returning only what _GROUP_MEMBERS will not: the charge of every locked row that is not a member of
# a locked group (priced alone). A member's charge is read with its group (after the group lock, the same value);
# not returning the rest spares parsing a key and a timestamp per row (~9% of an application's Python).
_LOCK_CHARGES_UNGROUPED = text(f"""
    WITH locked AS ({_LOCK_CHARGES.text})
    SELECT l.wallet_id, l.meter_id, l.period_start, l.price_version_id, l.charged_minor
    FROM locked l
    WHERE l.price_effective_from IS NULL OR NOT EXISTS (
        SELECT 1 FROM json_to_recordset(CAST(:groups AS json)) AS g(wallet_id text, meter_id text,
                                                                     period_start timestamptz, meter_version integer)
        WHERE g.wallet_id = l.wallet_id AND g.meter_id = l.meter_id AND g.period_start = l.period_start
          AND g.meter_version = l.meter_version)
""")

# Price versions continue the period (step 5b): appliers of one (wallet, meter, period, meter_version) group
# serialise on the group's row, locked (insert-if-missing) in ONE statement in key order before any
# usage_charges row — the same pattern as _LOCK_CHARGES, and row locks, so a checkpoint of 4,000 groups takes
# no slots of PostgreSQL's shared lock table (advisory locks would). The members are read after the lock, so a
# version another applier added to the group has committed and is seen. ``WHERE false``: an existing row is locked
# (ON CONFLICT DO UPDATE locks every conflicting row) but not rewritten — no new row version per group and key.
_LOCK_GROUPS = text("""
    INSERT INTO usage_charge_groups (wallet_id, meter_id, period_start, meter_version)
    SELECT g.wallet_id, g.meter_id, g.period_start, g.meter_version
    FROM json_to_recordset(CAST(:groups AS json)) AS g(wallet_id text, meter_id text, period_start timestamptz,
                                                      meter_version integer)
    ORDER BY g.wallet_id, g.meter_id, g.period_start, g.meter_version
    ON CONFLICT (wallet_id, meter_id, period_start, meter_version) DO UPDATE SET meter_version = EXCLUDED.meter_version
    WHERE false
""")

# g.n: the group's position in :groups (1-based) — the key is rebuilt from the group in Python, not parsed per row.
# Every stored row of the group's (wallet, meter, period): the members are those of the group's meter version with
# a price_effective_from; the others (written before ledger_0006, or of another meter version) are priced alone,
# which the caller must know of its own keys.
_GROUP_MEMBERS = text("""
    SELECT g.n, c.price_version_id, c.meter_version, c.price_effective_from, c.aggregation,
           CAST(c.price AS text) AS price_text, c.charged_minor, c.project_id
    FROM ROWS FROM (json_to_recordset(CAST(:groups AS json)) AS (wallet_id text, meter_id text,
                                                                 period_start timestamptz, meter_version integer))
         WITH ORDINALITY AS g(wallet_id, meter_id, period_start, meter_version, n)
    JOIN usage_charges c
      ON c.wallet_id = g.wallet_id AND c.meter_id = g.meter_id AND c.period_start = g.period_start
""")

_STORED_GROUPS = text(f"""
    SELECT c.wallet_id, c.meter_id, c.period_start, c.meter_version
    FROM json_to_recordset(CAST(:rows AS json)) AS k({_KEY_COLUMNS})
    JOIN usage_charges c
      ON c.wallet_id = k.wallet_id AND c.meter_id = k.meter_id AND c.period_start = k.period_start
     AND c.price_version_id = k.price_version_id AND c.price_effective_from IS NOT NULL
""")

# k.n: the key's position in :rows (1-based), so no key is parsed back per row
_ALL_PARTITIONS = text(f"""
    SELECT k.n, c.units, c.latest_at
    FROM ROWS FROM (json_to_recordset(CAST(:rows AS json)) AS ({_KEY_COLUMNS}))
         WITH ORDINALITY AS k(wallet_id, meter_id, period_start, price_version_id, n)
    JOIN usage_counters c
      ON c.wallet_id = k.wallet_id AND c.meter_id = k.meter_id AND c.period_start = k.period_start
     AND c.price_version_id = k.price_version_id
""")

# posted: the delta this application posts (0 when it is left for the settle pass), so charged − posted — what
# is left to settle — moves only by what is accrued
_UPDATE_CHARGES = text(f"""
    UPDATE usage_charges c SET units = v.units, charged_minor = v.charged, posted_minor = c.posted_minor + v.posted,
                               updated_at = now()
    FROM json_to_recordset(CAST(:rows AS json)) AS v({_KEY_COLUMNS}, units numeric, charged bigint, posted bigint)
    WHERE c.wallet_id = v.wallet_id AND c.meter_id = v.meter_id AND c.period_start = v.period_start
      AND c.price_version_id = v.price_version_id
""")

# Steps 4–5 in one statement when every key is a group member (the normal case): the group locks already serialise
# every applier of these keys, so the charge rows need no lock of their own before pricing — each is written once,
# inserted if new, in key order (the order the settle pass locks them in). posted as in _UPDATE_CHARGES.
_UPSERT_CHARGES = text(f"""
    INSERT INTO usage_charges (wallet_id, meter_id, period_start, price_version_id, project_id, aggregation, price,
                               meter_version, price_effective_from, units, charged_minor, posted_minor)
    SELECT v.wallet_id, v.meter_id, v.period_start, v.price_version_id, v.project_id, v.aggregation,
           CAST(v.price AS jsonb), v.meter_version, v.price_effective_from, v.units, v.charged, v.posted
    FROM json_to_recordset(CAST(:rows AS json)) AS v({_KEY_COLUMNS}, project_id text, aggregation text, price text,
                                                     meter_version integer, price_effective_from timestamptz,
                                                     units numeric, charged bigint, posted bigint)
    ORDER BY v.wallet_id, v.meter_id, v.period_start, v.price_version_id
    ON CONFLICT (wallet_id, meter_id, period_start, price_version_id) DO UPDATE SET
        units = EXCLUDED.units, charged_minor = EXCLUDED.charged_minor,
        posted_minor = usage_charges.posted_minor + EXCLUDED.posted_minor, updated_at = now()
""")

# Step 6 when usage settles later: the wallets (locked in id order, as every writer locks them) take the change
# of what is left to settle; ledger/settle.py posts it.
_LOCK_WALLET_IDS = text("SELECT id FROM wallets WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR NO KEY UPDATE")

_ACCRUE = text("""
    UPDATE wallets w SET unsettled_minor = w.unsettled_minor + v.amount, updated_at = now()
    FROM json_to_recordset(CAST(:rows AS json)) AS v(id text, amount bigint)
    WHERE w.id = v.id
""")

# One row per applied checkpoint; the hashes as one bigint[] literal ('{1,-2,3}': PostgreSQL's int8 array
# parser, no JSON). as_of is new for the partition (step 1), so the primary key cannot collide.
_INSERT_DEDUPE = text("""
    INSERT INTO dedupe_key_sets (source_topic, partition, as_of_offset, key_hashes, arrived_at)
    VALUES (:topic, :partition, :as_of, CAST(:hashes AS bigint[]), :arrived_at)
""")

_SET_APPLIED = text("""
    UPDATE applied_offsets SET applied_through = :as_of, updated_at = now()
    WHERE source_topic = :topic AND partition = :partition
""")


def apply_checkpoint(conn: Connection, checkpoint: ChargeCheckpoint) -> CheckpointOutcome:
    """Apply ``checkpoint`` inside the caller's transaction (the caller commits). See the module doc."""
    return apply_checkpoints(conn, [checkpoint]).outcome


class MergedOutcome(NamedTuple):
    """What ``apply_checkpoints`` did: the outcome of the merged application and how many of the given
    checkpoints were applied (merged), stale, or fenced (an older owner epoch than the partition's)."""

    outcome: CheckpointOutcome
    applied: int
    stale: int
    fenced: int = 0
    #: the partition's owner epoch after this application (what a fenced checkpoint lost to)
    owner_epoch: int = 0
    #: counters refused (dead-lettered to refused_counters): their wallet is in another project
    refused: int = 0


#: Extra transaction metadata per key (a backfill records the original period and whether it was closed).
KeyMetadata = Callable[[Key], Mapping[str, Any]]


def apply_checkpoints(conn: Connection, checkpoints: Sequence[ChargeCheckpoint], *,
                      kind: TransactionKind = TransactionKind.USAGE, reason: str | None = None,
                      metadata: KeyMetadata | None = None, settle_later: bool = False) -> MergedOutcome:
    """Apply consecutive checkpoints of ONE source partition, in the given (arrival) order, as one merged
    checkpoint inside the caller's transaction.

    Exactly what applying them one by one would leave behind: walking the list with a running mark that
    starts at ``applied_through`` (and a running owner epoch), a checkpoint of an older epoch is fenced, else
    it is accepted only if its ``as_of_offset`` is beyond the mark (which then moves to it), otherwise it is
    stale — the rule of step 1, checkpoint by checkpoint. The accepted ones merge into one: for every key the
    value of the LAST accepted checkpoint listing it (values are cumulative), the union of their dedupe keys,
    ``as_of`` = the last accepted offset. Each key then posts ``price(final) − charged`` once instead of once
    per checkpoint — the same total, one transaction row instead of several. The merged checkpoint's offset
    is new for the partition, so its idempotency keys are too.

    ``kind``/``reason``: a replay correction (ledger/corrections.py) posts its deltas as ``adjustment`` with a
    reason, keyed ``adjustment:{topic}:…`` instead of ``usage:{topic}:…``; everything else is the same.
    ``metadata``: extra members of each posted transaction's metadata, per key (ledger/backfills.py).
    ``settle_later``: usage is priced and stored as now but not posted — see ``apply_partitions``."""
    if not checkpoints:
        raise ValueError("apply_checkpoints needs at least one checkpoint")
    return apply_partitions(conn, [checkpoints], kind=kind, reason=reason, metadata=metadata,
                            settle_later=settle_later)[0]


class _Source(NamedTuple):
    """What step 1 decided for one source partition of an application."""

    topic: str
    partition: int
    applied: int  # the partition's mark before this application
    accepted: list[ChargeCheckpoint]
    stale: int
    fenced: int
    epoch: int

    @property
    def as_of(self) -> int:
        """The merged checkpoint's offset: the last accepted one (the partition's new mark)."""
        return self.accepted[-1].as_of_offset if self.accepted else self.applied

    @property
    def triple(self) -> tuple[str, int, int]:
        return self.topic, self.partition, self.as_of


def apply_partitions(conn: Connection, partitions: Sequence[Sequence[ChargeCheckpoint]], *,
                     kind: TransactionKind = TransactionKind.USAGE, reason: str | None = None,
                     metadata: KeyMetadata | None = None, settle_later: bool = False,
                     known_wallets: KnownWallets | None = None) -> list[MergedOutcome]:
    """``apply_checkpoints`` for several source partitions at once, in ONE pass of the steps (one statement per
    table for all of them) inside the caller's transaction; one MergedOutcome per partition, in the given order.

    Why: a statement's fixed cost is paid per application, not per key. With many partitions and few keys each
    (1,000 wallets over 8 partitions: ~110 keys per checkpoint) it doubled the cost per posting
    (``bench.ledger_apply --keys 110``: 396 µs vs 227 at 1,000 keys); the consumer applies the small checkpoints it
    has in hand together (ledger/consumer.py).

    Each partition is decided exactly as alone (step 1, partition rows locked in (topic, partition) order) and
    keeps its own counters, dedupe keys and applied mark. A key named by two of the partitions (a wallet whose
    subjects hash to different partitions) is priced once over both partitions' counters — what applying them one
    after the other would post in total — and its posting is named after the first of them (source_ref and
    idempotency key of that partition's merged offset, new for it, so unique).

    ``settle_later`` (usage only; a correction or backfill always posts): steps 1–5 as always, but step 6 adds each
    wallet's deltas to its ``unsettled_minor`` instead of posting them; ``ledger.settle.settle_usage`` posts
    ``charged − posted`` per key later. What is charged is decided here either way, so the total posted per key
    is the same; what changes is when ``balance = Σ transactions`` includes it — until then every balance figure
    counts it as spent (``WalletBalance.unsettled_minor``).

    ``known_wallets`` (the consumer's): step 2 skips the (wallet, project) pairs seen before; the caller must
    ``clear()`` it when the transaction does not commit (ledger/known_wallets.py)."""
    if not partitions or any(not checkpoints for checkpoints in partitions):
        raise ValueError("apply_partitions needs at least one checkpoint per partition")
    for checkpoints in partitions:
        first = checkpoints[0]
        if any(c.source_topic != first.source_topic or c.partition != first.partition for c in checkpoints):
            raise ValueError("apply_checkpoints merges checkpoints of one source partition only")
    order = sorted(range(len(partitions)), key=lambda i: (partitions[i][0].source_topic, partitions[i][0].partition))
    if len({(partitions[i][0].source_topic, partitions[i][0].partition) for i in order}) != len(order):
        raise ValueError("apply_partitions takes each source partition once")
    sources = {i: _decide(conn, partitions[i]) for i in order}  # step 1, in lock order
    live = [i for i in order if sources[i].accepted]
    per_source = {i: _last_value_per_key(c for checkpoint in sources[i].accepted for c in checkpoint.counters)
                  for i in live}
    refused = (_refuse_foreign_wallets(conn, {i: sources[i].triple for i in live}, per_source, known_wallets)
               if live else {})
    owner: dict[Key, int] = {}  # key -> the first partition (lock order) naming it: its posting's name
    for i in live:
        for key in per_source[i]:
            owner.setdefault(key, i)
    values = {key: per_source[i][key] for key, i in sorted(owner.items())}
    moved: dict[Key, int] = {}
    accrued: dict[Key, int] = {}
    names: dict[Key, tuple[str, int, int]] = {}
    if values:
        conn.execute(_UPSERT_COUNTERS, {"rows": _counter_rows([(sources[i].triple, per_source[i]) for i in live])})
        # every key a group member (streams always sends price_effective_from): the charge rows are written once,
        # after pricing (_UPSERT_CHARGES); else each is locked first (_LOCK_CHARGES, which takes charge_rows) and
        # updated after
        grouped = all(v.price_effective_from is not None for v in values.values())
        charge_rows = "" if grouped else _charge_rows(values)
        groups = _groups(conn, values, charge_rows)
        groups_json = rows_json(g._asdict() for g in groups) if groups else ""
        if groups:
            conn.execute(_LOCK_GROUPS, {"groups": groups_json})
        members: dict[Key, Member] = {}
        upsert = bool(groups) and grouped
        if upsert:
            members, stored = _group_members(conn, groups_json, groups, values)
            # a key stored but not a member (before ledger_0006, or of another meter version) is priced alone
            upsert = all(key in members or key not in stored for key in values)
            for key, value in values.items():  # a key seen for the first time is a member charged nothing yet
                if key not in members and value.price_effective_from is not None:
                    members[key] = Member(value.price_effective_from, value.price, value.aggregation, 0,
                                          value.key.project_id, _price_json(value.price), value.meter_version)
        charged: dict[Key, int] = {}
        if not upsert:
            # the other price versions of the groups are rewritten too (step 5b): their rows are locked with the
            # application's, in one ordered statement — the settle pass locks charge rows in key order and waits
            # for them (the expiry job), so a row locked later out of order could deadlock with it
            others: dict[Key, Member] = {}
            if groups:
                known = members or _group_members(conn, groups_json, groups, values)[0]
                others = {k: m for k, m in known.items() if k not in values}
            rows = _charge_rows(values, others) if others else charge_rows or _charge_rows(values)
            charged = _lock_charges(conn, rows, groups_json or "[]")
            members = _group_members(conn, groups_json, groups, values)[0] if groups else {}
        aggregations = {k: v.aggregation for k, v in values.items()} | {k: m.aggregation for k, m in members.items()}
        charged |= {k: m.charged_minor for k, m in members.items()}
        units = _merged(conn, aggregations)
        # a group member's charge is its group's run (step 5b); the rest are priced alone
        targets = {key: price_minor(values[key].price, units[key]) for key in values if key not in members}
        targets |= _continued_targets(members, units)
        priced = sorted(targets)
        deltas = {key: targets[key] - charged[key] for key in priced}
        accrue = settle_later and kind is TransactionKind.USAGE
        if upsert:
            conn.execute(_UPSERT_CHARGES, {"rows": rows_json(
                {**_key_row(k), "project_id": members[k].project_id, "aggregation": members[k].aggregation,
                 "price": members[k].price_json, "meter_version": members[k].meter_version,
                 "price_effective_from": members[k].price_effective_from,
                 "units": units[k], "charged": targets[k], "posted": 0 if accrue else deltas[k]}
                for k in priced)})
        else:
            conn.execute(_UPDATE_CHARGES, {"rows": rows_json(
                {**_key_row(k), "units": units[k], "charged": targets[k], "posted": 0 if accrue else deltas[k]}
                for k in priced)})
        # a member of a group outside this application's keys (another price version) is named after the
        # partition of a key of its (wallet, meter, period)
        by_period: dict[tuple[str, str, datetime], int] = {}
        for key, i in owner.items():
            by_period.setdefault((key.wallet_id, key.meter_id, key.period_start), i)
        names = {k: sources[owner[k] if k in owner else by_period[(k.wallet_id, k.meter_id, k.period_start)]].triple
                 for k in priced}
        if accrue:
            accrued = _accrue(conn, priced, deltas)
        else:
            moved = post_deltas(conn, {k: "{}:{}:{}".format(*names[k]) for k in priced}, priced, units, deltas,
                                 targets, kind=kind, reason=reason, metadata=metadata)
    posted: dict[tuple[str, int, int], list[int]] = {}
    for key, delta in moved.items():
        posted.setdefault(names[key], []).append(delta)
    left: dict[tuple[str, int, int], int] = {}
    for key, delta in accrued.items():
        left[names[key]] = left.get(names[key], 0) + delta
    outcomes: dict[int, MergedOutcome] = {}
    for i in order:
        source = sources[i]
        if not source.accepted:
            outcomes[i] = MergedOutcome(CheckpointOutcome("stale", source.topic, source.partition, source.applied), 0,
                                        source.stale, source.fenced, source.epoch)
            continue
        _finish(conn, source)
        mine = posted.get(source.triple, [])
        outcome = CheckpointOutcome("applied", source.topic, source.partition, source.as_of, len(per_source[i]),
                                    len(mine), sum(mine), left.get(source.triple, 0))
        outcomes[i] = MergedOutcome(outcome, len(source.accepted), source.stale, source.fenced, source.epoch,
                                    refused.get(i, 0))
    return [outcomes[i] for i in range(len(partitions))]


def _decide(conn: Connection, checkpoints: Sequence[ChargeCheckpoint]) -> _Source:
    """Step 1 for one partition: lock its applied_offsets row, walk the checkpoints with a running mark and
    epoch (fenced / stale / accepted, exactly as one by one), follow a newer epoch."""
    topic, partition = checkpoints[0].source_topic, checkpoints[0].partition
    row = conn.execute(_LOCK_PARTITION, {"topic": topic, "partition": partition}).one()
    applied, stored_epoch = int(row.applied_through), int(row.owner_epoch)
    mark, epoch = applied, stored_epoch
    accepted: list[ChargeCheckpoint] = []
    fenced = 0
    for checkpoint in checkpoints:
        if checkpoint.owner_epoch < epoch:
            fenced += 1  # a previous owner's: the current owner re-meters these offsets from its seed
            continue
        # a newer epoch than stored cannot come from a worker (it takes the epoch here first) unless the row
        # was restored from a backup: follow it, epochs only move up
        epoch = checkpoint.owner_epoch
        if checkpoint.as_of_offset > mark:
            accepted.append(checkpoint)
            mark = checkpoint.as_of_offset
    if epoch > stored_epoch:
        conn.execute(_SET_EPOCH, {"topic": topic, "partition": partition, "epoch": epoch})
    return _Source(topic, partition, applied, accepted, len(checkpoints) - len(accepted) - fenced, fenced, epoch)


def _finish(conn: Connection, source: _Source) -> None:
    """Step 7 for one applied partition: its dedupe keys and its new mark."""
    topic, partition, as_of = source.triple
    hashes = [h for checkpoint in source.accepted for h in checkpoint.dedupe_keys]
    if hashes:
        stream_times = [c.stream_time for c in source.accepted if c.stream_time is not None]
        conn.execute(_INSERT_DEDUPE, {"topic": topic, "partition": partition, "as_of": as_of,
                                      "hashes": _bigint_array(hashes),
                                      "arrived_at": max(stream_times) if stream_times else None})
    conn.execute(_SET_APPLIED, {"topic": topic, "partition": partition, "as_of": as_of})


def _refuse_foreign_wallets(conn: Connection, triples: Mapping[int, tuple[str, int, int]],
                            per_source: Mapping[int, dict[Key, CounterValue]],
                            known_wallets: KnownWallets | None = None) -> dict[int, int]:
    """Step 2: create missing wallets; drop (from each partition's values) and dead-letter every counter whose
    wallet belongs to another project than the counter's. Returns how many were refused, per partition.
    ``known_wallets``: pairs seen before are skipped, and the pairs found in their project are added
    (ledger/known_wallets.py says why that is safe)."""
    pairs = sorted({(k.wallet_id, v.key.project_id) for values in per_source.values() for k, v in values.items()})
    if known_wallets is not None:
        pairs = known_wallets.unknown(pairs)
    if not pairs:
        return {}
    foreign: dict[str, str] = {}
    created: set[str] = set()
    for wallet_id, actual in conn.execute(_ENSURE_WALLETS, {"rows": rows_json(
            {"id": w, "project_id": p} for w, p in pairs)}):
        if actual is None:
            created.add(wallet_id)
        else:
            foreign[wallet_id] = actual
    if known_wallets is not None:  # committed before this transaction and in the counter's project
        known_wallets.add(pair for pair in pairs if pair[0] not in foreign and pair[0] not in created)
    if not foreign:
        return {}
    counts: dict[int, int] = {}
    for i, values in per_source.items():
        refused = [k for k, v in values.items()
                   if k.wallet_id in foreign and foreign[k.wallet_id] != v.key.project_id]
        if not refused:
            continue
        topic, partition, as_of = triples[i]
        conn.execute(_REFUSE_COUNTERS, {"topic": topic, "partition": partition, "as_of": as_of, "rows": rows_json(
            {**_key_row(k), "reason": "wallet_in_other_project", "project_id": values[k].key.project_id,
             "wallet_project_id": foreign[k.wallet_id], "units": values[k].units, "events": values[k].events,
             "counter": values[k].model_dump_json()} for k in refused)})
        for k in refused:
            log.error("counter_refused", reason="wallet_in_other_project", source_topic=topic, partition=partition,
                      as_of=as_of, wallet_id=k.wallet_id, project_id=values[k].key.project_id,
                      wallet_project_id=foreign[k.wallet_id], meter_id=k.meter_id,
                      units=format(values[k].units, "f"))
            del values[k]
        counts[i] = len(refused)
    return counts


def usage_idempotency_key(checkpoint: ChargeCheckpoint | tuple[str, int, int] | str, key: Key) -> str:
    """``usage:{topic}:{partition}:{as_of}:{wallet}:{meter}:{period}:{version}`` of a checkpoint (or of a
    (topic, partition, as_of) triple: a merged checkpoint is named by its last offset; or of a source already
    written as text, e.g. ``settle:{n}`` for the n-th settlement of the key, ledger/settle.py)."""
    if isinstance(checkpoint, str):
        source = checkpoint
    else:
        topic, partition, as_of = (checkpoint if isinstance(checkpoint, tuple) else
                                   (checkpoint.source_topic, checkpoint.partition, checkpoint.as_of_offset))
        source = f"{topic}:{partition}:{as_of}"
    return (f"usage:{source}:{key.wallet_id}:"
            f"{key.meter_id}:{key.period_start.astimezone(UTC).isoformat()}:{key.price_version_id}")


def merge_units(aggregation: str, values: Iterable[tuple[Decimal, datetime | None]]) -> Decimal:
    """Merge per-partition (units, latest_at) of one key. unique_count sums: exact when every event of a
    distinct value lands in one partition (the partitioning contract of DESIGN §1)."""
    items = list(values)
    if not items:
        return Decimal(0)
    if aggregation == "max":
        return max(units for units, _ in items)
    if aggregation == "latest":
        floor = datetime.min.replace(tzinfo=UTC)
        return max(items, key=lambda item: (item[1] or floor, item[0]))[0]
    return sum((units for units, _ in items), Decimal(0))


def _bigint_array(values: Iterable[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


# --- steps ------------------------------------------------------------------------------------------------

def _last_value_per_key(counters: Iterable[CounterValue]) -> dict[Key, CounterValue]:
    """Keys in sorted order (the order every statement processes them); a repeated key keeps its last value."""
    by_key = {posting_key(c): c for c in counters}
    return dict(sorted(by_key.items()))


def posting_key(counter: CounterValue) -> Key:
    """What the ledger posts per: one usage posting per (wallet, meter, period, price version)."""
    k = counter.key
    return Key(k.wallet_id, k.meter_id, k.period_start, k.price_version_id)


def _key_row(key: Key) -> dict[str, Any]:
    return {"wallet_id": key.wallet_id, "meter_id": key.meter_id, "period_start": key.period_start,
            "price_version_id": key.price_version_id}


def _counter_rows(sources: Iterable[tuple[tuple[str, int, int], dict[Key, CounterValue]]]) -> str:
    """_UPSERT_COUNTERS's rows: one per (partition, key), with the partition's (topic, partition, merged offset)."""
    return rows_json(
        {**_key_row(k), "project_id": v.key.project_id, "units": v.units, "latest_at": v.latest_at,
         "events": v.events, "late_events": v.late_events, "src_topic": topic, "src_partition": partition,
         "src_as_of": as_of}
        for (topic, partition, as_of), values in sources for k, v in values.items())


def _charge_rows(values: dict[Key, CounterValue], others: Mapping[Key, Member] | None = None) -> str:
    """_LOCK_CHARGES's (and _STORED_GROUPS's) rows: each key once (ON CONFLICT DO UPDATE may not touch a row twice),
    with what a new charge row stores. Only the path that locks charge rows before pricing needs them. ``others``:
    stored rows to lock with them (keys not in ``values``), as stored."""
    rows = [{**_key_row(k), "project_id": v.key.project_id, "aggregation": v.aggregation, "price": _price_json(v.price),
             "meter_version": v.meter_version, "price_effective_from": v.price_effective_from}
            for k, v in values.items()]
    rows.extend({**_key_row(k), "project_id": m.project_id, "aggregation": m.aggregation, "price": m.price_json,
                 "meter_version": m.meter_version, "price_effective_from": m.price_effective_from}
                for k, m in (others or {}).items())
    return rows_json(rows)


_PRICE_JSON: dict[PriceModel, str] = {}


def _price_json(price: PriceModel) -> str:
    """Price versions repeat across keys; serialise each once (bounded cache)."""
    cached = _PRICE_JSON.get(price)
    if cached is None:
        if len(_PRICE_JSON) > 4096:
            _PRICE_JSON.clear()
        cached = _PRICE_JSON[price] = price.model_dump_json()
    return cached


def _lock_charges(conn: Connection, rows: str, groups_json: str) -> dict[Key, int]:
    """Lock (insert-if-missing) every key's charge row; the charges of the rows that are not members of a locked
    group (``groups_json``) — the members' come with the group (``_group_members``)."""
    result = conn.execute(_LOCK_CHARGES_UNGROUPED, {"rows": rows, "groups": groups_json}).all()  # one fetch
    return {Key(w, m, p, v): int(charged) for w, m, p, v, charged in result}


def _merged(conn: Connection, aggregations: dict[Key, str]) -> dict[Key, Decimal]:
    """Every partition's counters of these keys, merged per key (keys only in the JSON: the server parses less)."""
    keys = list(aggregations)
    per_key: list[list[tuple[Decimal, datetime | None]]] = [[] for _ in keys]
    for n, units, latest_at in conn.execute(_ALL_PARTITIONS, {"rows": _keys_json(keys)}).all():
        per_key[n - 1].append((units, latest_at))
    return {key: merge_units(aggregations[key], values) for key, values in zip(keys, per_key, strict=True)}


# --- price versions continue the period (step 5b) ---------------------------------------------------------

class Group(NamedTuple):
    wallet_id: str
    meter_id: str
    period_start: datetime
    meter_version: int


class Member(NamedTuple):
    """A key of a group as usage_charges stores it (the checkpoint's own keys included)."""

    price_effective_from: datetime
    price: PriceModel
    aggregation: str
    charged_minor: int
    project_id: str
    price_json: str  # the price as stored (jsonb's text), written back as is
    meter_version: int


def _groups(conn: Connection, values: dict[Key, CounterValue], rows: str) -> list[Group]:
    """The groups of the checkpoint's keys that take part in continued pricing: keys whose producer sent
    ``price_effective_from`` (streams since ledger_0006), and keys whose stored charge row already belongs to a
    group (a replay correction, ledger/corrections.py, names the key without it — it must still be priced with
    its group, or it would undo the continuation). Stored rows without it are priced on their own, as before."""
    groups = {Group(k.wallet_id, k.meter_id, k.period_start, v.meter_version)
              for k, v in values.items() if v.price_effective_from is not None}
    if any(v.price_effective_from is None for v in values.values()):
        # meter_version / price_effective_from of a stored row never change once written: no lock needed
        groups |= {Group(r.wallet_id, r.meter_id, r.period_start, r.meter_version)
                   for r in conn.execute(_STORED_GROUPS, {"rows": rows}).all()}
    return sorted(groups)


def _group_members(conn: Connection, groups_json: str, groups: Sequence[Group],
                   values: dict[Key, CounterValue]) -> tuple[dict[Key, Member], set[Key]]:
    """Every stored member of the (locked) ``groups`` (``groups_json``: the same list as JSON), and every stored key
    of their (wallet, meter, period): members or not (a row without ``price_effective_from`` was written before
    ledger_0006; a row of another meter version belongs to another group)."""
    members: dict[Key, Member] = {}
    stored: set[Key] = set()
    # .all(): one fetch instead of a fetchone per row; the price comes as text, parsed only when needed
    for n, version, meter_version, effective_from, aggregation, price_text, charged, project_id \
            in conn.execute(_GROUP_MEMBERS, {"groups": groups_json}).all():
        group = groups[n - 1]
        key = Key(group.wallet_id, group.meter_id, group.period_start, version)
        stored.add(key)
        if effective_from is None or meter_version != group.meter_version:
            continue
        # a price version is immutable: the checkpoint's model is the stored one (parse only the others')
        own = values.get(key)
        price = own.price if own is not None else PriceModel.model_validate_json(price_text)
        members[key] = Member(effective_from, price, aggregation, int(charged), project_id, price_text, meter_version)
    return members, stored


def _keys_json(keys: Iterable[Key]) -> str:
    return rows_json(_key_row(k) for k in keys)


def _continued_targets(members: dict[Key, Member], units: dict[Key, Decimal]) -> dict[Key, int]:
    """Each member's cumulative charge: its group's versions in the order they took effect, priced as one run
    (``ledger.pricing.continued_prices_minor``)."""
    by_group: dict[tuple[str, str, datetime, str], list[Key]] = {}
    for key, member in members.items():
        by_group.setdefault((key.wallet_id, key.meter_id, key.period_start, member.aggregation), []).append(key)
    targets: dict[Key, int] = {}
    for keys in by_group.values():
        if len(keys) == 1:  # one price version: the run is its own price (most groups)
            member = members[keys[0]]
            targets[keys[0]] = price_minor(member.price, units[keys[0]])
            continue
        keys.sort(key=lambda k: (members[k].price_effective_from, k.price_version_id))
        charges = continued_prices_minor([(members[k].price, members[k].aggregation, units[k]) for k in keys])
        targets.update(zip(keys, charges, strict=True))
    return targets


def _accrue(conn: Connection, keys: list[Key], deltas: dict[Key, int]) -> dict[Key, int]:
    """Step 6 when usage settles later: add each wallet's deltas to its ``unsettled_minor`` (wallets locked in id
    order). Returns the accrued deltas by key."""
    moving = {key: deltas[key] for key in keys if deltas[key] != 0}
    per_wallet: dict[str, int] = {}
    for key, delta in moving.items():
        per_wallet[key.wallet_id] = per_wallet.get(key.wallet_id, 0) + delta
    if per_wallet:
        ids = sorted(per_wallet)
        conn.execute(_LOCK_WALLET_IDS, {"ids": ids})
        conn.execute(_ACCRUE, {"rows": rows_json({"id": w, "amount": per_wallet[w]} for w in ids)})
    return moving


def post_deltas(conn: Connection, names: Mapping[Key, str], keys: list[Key],
                units: Mapping[Key, Decimal], deltas: Mapping[Key, int], cumulative: Mapping[Key, int], *,
                kind: TransactionKind = TransactionKind.USAGE, reason: str | None = None,
                metadata: KeyMetadata | None = None, settles: bool = False) -> dict[Key, int]:
    """Step 6 (and the settle pass's posting); ``names``: the source each key's posting is named after
    (``{topic}:{partition}:{merged offset}``, or ``settle:{n}``) — its ``source_ref`` and, with the key, its
    idempotency key. ``settles``: the deltas were left unsettled (the settle pass): each wallet's ``unsettled_minor``
    drops by what is posted for it, in the writer's balance update. Returns the posted deltas by key."""
    moving = [key for key in keys if deltas[key] != 0]
    if not moving:
        return {}
    wallets = lock_wallets(conn, {key.wallet_id for key in moving})
    books = load_books(conn, wallets.values(), now=datetime.now(UTC))
    drafts: list[Draft] = []
    credit_source = "refund" if kind is TransactionKind.USAGE else "adjustment"
    for key in moving:  # sorted: a wallet's postings chain in key order
        book, delta = books[key.wallet_id], deltas[key]
        posting = (book.debit(delta) if delta > 0 else
                   book.credit(-delta, NewBucket(credit_source, DEFAULT_PRIORITY[credit_source],
                                               source_ref=f"usage-credit:{key.meter_id}")))
        source = names[key]
        usage_key = usage_idempotency_key(source, key)
        drafts.append(Draft(
            wallet_id=key.wallet_id, project_id=wallets[key.wallet_id].project_id, kind=kind,
            posting=posting, idempotency_key=usage_key if kind is TransactionKind.USAGE else
            f"{kind.value}:{usage_key.removeprefix('usage:')}",
            source_ref=source, reason=reason,
            meter_id=key.meter_id, period_start=key.period_start, price_version_id=key.price_version_id,
            metadata={"units": format(units[key], "f"), "cumulative_charged_minor": cumulative[key],
                      **(metadata(key) if metadata is not None else {})},
        ))
    posted = {key: deltas[key] for key in moving}
    settled: dict[str, int] = {}
    if settles:
        for key, delta in posted.items():
            settled[key.wallet_id] = settled.get(key.wallet_id, 0) + delta
    write(conn, books, drafts, settled=settled)
    return posted
