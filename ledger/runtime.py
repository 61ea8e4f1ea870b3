"""Process-wide runtime settings shared by every long-running Meterline process."""

from __future__ import annotations

import gc


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
