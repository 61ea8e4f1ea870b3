"""Pure posting arithmetic: how a debit burns buckets, how a credit settles debt, what balances result.

``WalletBook`` is an in-memory view of ONE wallet whose row the caller has locked. It plans postings in
order (each starts from the previous one's balance) and records which buckets changed, so the service
can write everything with a few set-based statements. No I/O here.

The invariant every plan keeps (and asserts):

    sum(remaining_minor of the wallet's buckets) == max(balance_minor, 0)

i.e. a positive balance is exactly the credit left in buckets, and a negative balance (debt) means every
bucket is empty. It holds because debits burn buckets before going into debt and credits repay debt
before filling a bucket.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "DEFAULT_PRIORITY",
    "Allocation",
    "Bucket",
    "NewBucket",
    "Posting",
    "WalletBalance",
    "WalletBook",
    "burn_order",
]

#: Priorities used where the caller does not choose one (LOWER burns first): free credit that tends to
#: expire goes first, paid top-ups last.
DEFAULT_PRIORITY: dict[str, int] = {
    "promo": 10,
    "bonus": 20,
    "refund": 30,
    "subscription": 40,
    "adjustment": 50,
    "top_up": 100,
}


@dataclass(frozen=True, slots=True)
class Bucket:
    id: int  # negative = created by this plan, not yet inserted
    priority: int
    expires_at: datetime | None
    created_at: datetime
    remaining_minor: int
    source: str = "top_up"


def burn_order(bucket: Bucket) -> tuple[int, bool, datetime, datetime, int]:
    """priority ASC, expires_at ASC NULLS LAST, created_at ASC, id ASC (the documented order)."""
    expires = bucket.expires_at or bucket.created_at  # value irrelevant when the flag says NULL
    return (bucket.priority, bucket.expires_at is None, expires, bucket.created_at, bucket.id)


@dataclass(frozen=True, slots=True)
class Allocation:
    bucket_id: int | None  # None = the wallet's debt
    amount_minor: int  # negative = burned from the bucket / went into debt; positive = credited


@dataclass(frozen=True, slots=True)
class NewBucket:
    """A bucket a credit fills (source/priority/expiry of the grant)."""

    source: str
    priority: int
    expires_at: datetime | None = None
    source_ref: str | None = None


@dataclass(frozen=True, slots=True)
class Posting:
    amount_minor: int
    balance_before_minor: int
    balance_after_minor: int
    allocations: tuple[Allocation, ...]
    debt_settled_minor: int = 0
    new_bucket_id: int | None = None  # the temporary id of the bucket this credit created

    def __post_init__(self) -> None:
        assert self.balance_after_minor == self.balance_before_minor + self.amount_minor
        assert sum(a.amount_minor for a in self.allocations) == self.amount_minor


@dataclass(frozen=True, slots=True)
class WalletBalance:
    """The derived figures of a wallet (schema note): available never negative, debt blocks access.

    ``unsettled_minor`` is usage priced but not posted yet (ledger/settle.py): it already counts as spent, so
    every figure reads as if it were posted — available and debt are what they will be once it is."""

    balance_minor: int
    held_minor: int
    floor_minor: int
    unsettled_minor: int = 0

    @property
    def settled_balance_minor(self) -> int:
        """The balance once the unsettled usage is posted."""
        return self.balance_minor - self.unsettled_minor

    @property
    def available_minor(self) -> int:
        return max(self.settled_balance_minor - self.held_minor - self.floor_minor, 0)

    @property
    def debt_minor(self) -> int:
        return max(-self.settled_balance_minor, 0)

    @property
    def blocked(self) -> bool:
        return self.debt_minor > 0

    def can_debit(self, amount_minor: int) -> bool:
        """A synchronous debit may never take balance - unsettled usage - held below the floor."""
        return self.settled_balance_minor - self.held_minor - amount_minor >= self.floor_minor


@dataclass
class WalletBook:
    """Plans postings for one locked wallet. Mutates only itself; the service persists the result."""

    balance_minor: int
    buckets: list[Bucket]
    now: datetime
    project_id: str | None = None  # needed when the plan creates buckets
    #: bucket id -> remaining after the plan (only buckets the plan touched)
    changed: dict[int, int] = field(default_factory=dict)
    #: temporary id -> (NewBucket, granted_minor) for buckets the plan created
    created: dict[int, tuple[NewBucket, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.buckets = sorted((b for b in self.buckets if b.remaining_minor > 0), key=burn_order)
        self._check()

    def remaining(self, bucket_id: int) -> int:
        return next(b.remaining_minor for b in self.buckets if b.id == bucket_id)

    def debit(self, amount_minor: int, *, first: Collection[int] = ()) -> Posting:
        """Burn ``amount_minor`` in burn order; whatever the buckets cannot cover becomes debt.

        ``first``: ids of buckets that burn before every other (among themselves in burn order), e.g. the
        bucket of a refunded payment's grant; named buckets that are empty or not this wallet's are skipped.

        Whether a debit is ALLOWED (floor, blocked wallet) is the caller's decision; usage that already
        happened is always posted (DESIGN §2.4)."""
        assert amount_minor >= 0
        allocations: list[Allocation] = []
        left = amount_minor
        order: Iterable[int] = range(len(self.buckets))
        if first:  # a stable sort keeps the burn order inside "named first" and inside "the rest"
            order = sorted(order, key=lambda i: self.buckets[i].id not in first)
        for index in order:
            bucket = self.buckets[index]
            if left == 0:
                break
            take = min(left, bucket.remaining_minor)
            if take == 0:
                continue
            left -= take
            self._set_remaining(index, bucket.remaining_minor - take)
            allocations.append(Allocation(bucket.id, -take))
        if left:
            allocations.append(Allocation(None, -left))
        return self._post(-amount_minor, allocations)

    def credit(self, amount_minor: int, bucket: NewBucket) -> Posting:
        """Repay debt first, then put the rest into a new bucket (none when nothing is left)."""
        assert amount_minor >= 0
        settled = min(amount_minor, max(-self.balance_minor, 0))
        allocations: list[Allocation] = [Allocation(None, settled)] if settled else []
        rest = amount_minor - settled
        new_id: int | None = None
        if rest:
            new_id = -(len(self.created) + 1)
            self.created[new_id] = (bucket, rest)
            self.buckets.append(Bucket(new_id, bucket.priority, bucket.expires_at, self.now, rest, bucket.source))
            self.buckets.sort(key=burn_order)
            allocations.append(Allocation(new_id, rest))
        return self._post(amount_minor, allocations, debt_settled_minor=settled, new_bucket_id=new_id)

    def expire(self, bucket_id: int) -> Posting | None:
        """Post a bucket's remainder as expiry (breakage); None when nothing is left in it."""
        for index, bucket in enumerate(self.buckets):
            if bucket.id == bucket_id and bucket.remaining_minor > 0:
                self._set_remaining(index, 0)
                return self._post(-bucket.remaining_minor, [Allocation(bucket_id, -bucket.remaining_minor)])
        return None

    def _set_remaining(self, index: int, remaining_minor: int) -> None:
        bucket = self.buckets[index]
        self.buckets[index] = Bucket(bucket.id, bucket.priority, bucket.expires_at, bucket.created_at,
                                     remaining_minor, bucket.source)
        self.changed[bucket.id] = remaining_minor

    def _post(self, amount_minor: int, allocations: list[Allocation], *, debt_settled_minor: int = 0,
              new_bucket_id: int | None = None) -> Posting:
        before = self.balance_minor
        self.balance_minor = before + amount_minor
        self._check()
        return Posting(amount_minor, before, self.balance_minor, tuple(allocations), debt_settled_minor,
                       new_bucket_id)

    def _check(self) -> None:
        in_buckets = sum(b.remaining_minor for b in self.buckets)
        assert in_buckets == max(self.balance_minor, 0), (
            f"ledger invariant broken: buckets hold {in_buckets}, balance is {self.balance_minor}")
