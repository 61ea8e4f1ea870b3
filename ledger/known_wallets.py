"""(wallet, project) pairs a ledger process has seen exist: step 2 of a checkpoint skips them.

Step 2 (ledger/checkpoints.py) creates every missing subject wallet and refuses counters whose wallet belongs to
another project, in one statement over every wallet the application names — ~17 µs per key at 100,000 wallets,
where nearly every key names a different wallet and nearly every wallet exists already.

Why a pair can be trusted once seen: wallets are never deleted and a wallet's project never changes (composite
foreign keys, ledger_0007), so a pair that existed stays true. Only pairs that step 2 found already committed are
added — not the wallets its own transaction created, which exist only if that transaction commits (another apply
thread that skipped step 2 for one of them would fail on the counters' foreign key while it is in flight). A pair of
a wallet in ANOTHER project is never added: that counter must reach step 2 every time to be refused. The consumer
clears the set when an application fails on the database (a restored backup, say), so the retry checks every
wallet again. Bounded: past ``pairs_max`` the set starts over (step 2 runs again for each)."""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["KnownWallets"]

#: ~200 B per pair (two short strings and a tuple): ~40 MB at the bound
PAIRS_MAX = 200_000


class KnownWallets:
    """Thread-safe: the consumer's apply threads share one."""

    def __init__(self, pairs_max: int = PAIRS_MAX) -> None:
        self._pairs: set[tuple[str, str]] = set()
        self._pairs_max = pairs_max
        self._lock = threading.Lock()

    def unknown(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The pairs step 2 must still check, in the given order."""
        known = self._pairs
        return [pair for pair in pairs if pair not in known]

    def add(self, pairs: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            if len(self._pairs) >= self._pairs_max:
                self._pairs = set()
            self._pairs.update(pairs)

    def clear(self) -> None:
        with self._lock:
            self._pairs = set()

    def __len__(self) -> int:
        return len(self._pairs)
