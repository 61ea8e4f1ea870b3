"""Process-wide runtime settings shared by every long-running Meterline process."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_startup_heap() -> None:
    """Put every object allocated so far (imports, app and client set-up) out of the cyclic collector's reach.

    Why: a full (generation 2) collection walks every tracked object. With FastAPI, pydantic, SQLAlchemy, faust and
    their clients loaded that is hundreds of thousands of objects, and one such pass stopped the API's event loop
    for 70-77 ms (measured with gc.callbacks under ``bench.api_debits``) — every request in flight waited, which was
    the whole p99. Objects made at start-up live as long as the process anyway; frozen, they are never walked again,
    and later full collections only look at what was allocated since.

    Call it once, after start-up and before serving; calling it again freezes what was added since, harmlessly.
    """
    gc.collect()
    gc.freeze()


#: Young-generation threshold for processes that work in large batches (the ledger consumer). CPython's default
#: (700 allocations) runs a generation-0 pass every few hundred objects while a batch of checkpoints builds tens of
#: thousands of rows, keys and postings that all live until the batch commits: each pass walks them and promotes
#: them, and the promotions bring on the costlier older passes. Measured on a 4,000-wallet checkpoint
#: (apply_checkpoints with the startup heap frozen): ~124 -> ~114 µs of CPU per posting. Memory: at most this many
#: young cyclic objects wait for a pass (a few MiB).
BATCH_GEN0_THRESHOLD = 50_000


def tune_gc_for_batches() -> None:
    """Fewer, larger young-generation passes; the older generations keep their default ratios."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(BATCH_GEN0_THRESHOLD, gen1, gen2)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """No cyclic collection inside the block: for code that builds many acyclic objects which all outlive it
    (decoding a fetched batch of checkpoints: pydantic models, freed by reference counting when the batch is done).
    Every pass inside would walk and promote them, and the passes grow with the batch: 150 checkpoints of 4,000
    counters decoded in 7.3 s with the collector (48 ms each, 58 ms for the last ten), 4.9 s without (32 ms).
    Reference counting still frees everything; only cycles made inside wait for the next pass after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
