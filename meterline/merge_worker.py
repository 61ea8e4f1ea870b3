"""The disk store's merges, in a worker process.

A merge decodes and re-encodes every record of a run (meterline/batch_merge.py; ``python -m bench.batch_merge``):
~0.01-0.3 s for the first compaction tier, up to seconds for the second. In the store's own event loop that would
stop every request of the broker meanwhile, and a thread would not help: the codecs hold the GIL. So merges run
in one spawned process (one: compaction is background work and must leave the other core to the pipeline); the
store plans and swaps in its loop (meterline/diskstore.py). This module imports nothing of the store, so the
worker stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from meterline.batch_merge import MergeMismatch, merge_batches


def merge_or_none(sources: list[tuple[int, bytes]]) -> bytes | None:
    """The merged batch, or None (logged) when the stretch may not be merged or did not read back."""
    try:
        return merge_batches(sources)
    except (ValueError, MergeMismatch) as exc:
        print(f"diskstore: not merging {len(sources)} batches at offset {sources[0][0]}: {exc}", flush=True)
        return None


class MergeWorker:
    """One worker process for merges. A worker that died is replaced; the merge it ran is skipped and that
    stretch stays as it was (the store's second tier takes it later, or its next start re-walks every folder)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Spawn the process now (it is otherwise spawned by the first merge)."""
        self._ensure().submit(_ready)

    async def merge(self, sources: list[tuple[int, bytes]]) -> bytes | None:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._ensure(), merge_or_none, sources)
        except BrokenProcessPool:
            print("diskstore: the merge worker died; starting another", flush=True)
            self._pool = None
            return None

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawn: a fork would copy the store's event loop, caches and threads
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_die_with_parent)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _ready() -> None:
    """A no-op run once so that ``start`` spawns the process and imports the codecs."""


def _die_with_parent() -> None:
    """In the worker: a ``kill -9`` of the store must not leave it behind (it would wait for work forever).
    Linux's parent-death signal; elsewhere the worker outlives a killed store until its next use fails."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the store died before the signal was set up
        os._exit(0)
