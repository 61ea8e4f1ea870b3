"""Chunks cut while a fetched batch is decoded, with superseded counters dropped as they go. Pure (no I/O).

A lane's consecutive checkpoints are applied as merged chunks (``apply_checkpoints``: per key the value of the last
accepted checkpoint listing it). A decoded checkpoint takes ~8x its bytes, so a batch of many large checkpoints held
every one of them until its lane applied. Here, while the batch is decoded, a counter is dropped from an earlier
checkpoint of the same chunk as soon as a later one lists its key again: a chunk's memory is then its distinct keys,
not its checkpoints, and the merged result is the same. Why it is the same, and what must hold:

- Within a chunk every checkpoint has the owner epoch of the first and a larger ``as_of_offset`` than the one before
  (a checkpoint that breaks this starts a new chunk). Step 1 (ledger/checkpoints.py ``_decide``) then accepts a
  suffix of the chunk: all of it is fenced or none is, and once one is beyond the running mark every later one is.
  So whenever the earlier checkpoint of a pair is accepted the later one is too, and the key's merged value is the
  later one's either way.
- A chunk is applied in ONE database transaction (the consumer never splits it), so a dropped counter's later
  listing commits together with the earlier checkpoint's mark: the stored counters always match ``applied_through``
  (step 3: streams seeds from them).
- A chunk that fails is retried checkpoint by checkpoint, and a halted lane queues checkpoints: both use the
  checkpoints as they were fetched (``Pending.raw``, decoded again), never the thinned ones.
- The bounds of ``_merge_chunks`` (distinct keys, dedupe keys) are applied while cutting.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ledger.checkpoints import Key, posting_key
from ledger.halts import Lane, Pending

__all__ = ["ChunkCutter", "chunks_of"]


@dataclass(slots=True)
class _Chunk:
    id: int
    epoch: int
    as_of: int
    dedupe_keys: int
    #: key -> (the counters list of the checkpoint that lists it last so far, its index there)
    holders: dict[Key, tuple[list[Any], int]] = field(default_factory=dict)
    #: the first checkpoint's counters (and keys, when known), indexed into ``holders`` only once a second
    #: checkpoint joins: a lane with one checkpoint per batch — a ledger that keeps up — pays nothing
    first: tuple[list[Any], list[Key] | None] | None = None


class ChunkCutter:
    """Cuts each lane's checkpoints of one batch into chunks, thinning the earlier checkpoints of a chunk."""

    def __init__(self, *, counters_max: int, dedupe_keys_max: int) -> None:
        self.counters_max, self.dedupe_keys_max = counters_max, dedupe_keys_max
        self._open: dict[Lane, _Chunk] = {}
        #: the counter lists that lost a counter, each once (by identity): ``finish`` compacts each list once
        self._thinned: dict[int, list[Any]] = {}
        self._next_id = 0

    def add(self, lane: Lane, pending: Pending) -> Pending:
        """``pending`` (decoded, ``raw`` set) as it joins its lane's current chunk: its checkpoint is a shallow copy
        whose counter list this cutter thins when later checkpoints of the chunk list the same keys."""
        checkpoint = pending.checkpoint
        assert checkpoint is not None and pending.raw is not None, "only decoded checkpoints with their bytes"
        counters: list[Any] = list(checkpoint.counters)
        thin = checkpoint.model_copy(update={"counters": counters})
        chunk = self._open.get(lane)
        keys: list[Key] | None = None
        if chunk is not None:
            self._index_first(chunk)
            keys = [posting_key(c) for c in counters]
            if not self._fits(chunk, checkpoint.owner_epoch, checkpoint.as_of_offset, keys,
                              len(checkpoint.dedupe_keys)):
                chunk = None
        if chunk is None:
            chunk = self._open[lane] = _Chunk(self._next_id, checkpoint.owner_epoch, checkpoint.as_of_offset,
                                              len(checkpoint.dedupe_keys), first=(counters, keys))
            self._next_id += 1
            return replace(pending, checkpoint=thin, chunk=chunk.id)
        assert keys is not None
        chunk.as_of = checkpoint.as_of_offset
        chunk.dedupe_keys += len(checkpoint.dedupe_keys)
        self._hold(chunk, counters, keys)
        return replace(pending, checkpoint=thin, chunk=chunk.id)

    def _index_first(self, chunk: _Chunk) -> None:
        if chunk.first is not None:
            counters, keys = chunk.first
            chunk.first = None
            self._hold(chunk, counters, keys if keys is not None else [posting_key(c) for c in counters])

    def _hold(self, chunk: _Chunk, counters: list[Any], keys: list[Key]) -> None:
        """``counters`` lists ``keys`` last in the chunk now: drop them from the checkpoints that listed them."""
        holders = chunk.holders
        for i, key in enumerate(keys):
            held = holders.get(key)
            if held is not None:
                held[0][held[1]] = None  # superseded within the chunk: the later value is the merged one
                self._thinned[id(held[0])] = held[0]
            holders[key] = (counters, i)

    def _fits(self, chunk: _Chunk, epoch: int, as_of: int, keys: list[Key], dedupe_keys: int) -> bool:
        if epoch != chunk.epoch or as_of <= chunk.as_of:
            return False
        if chunk.dedupe_keys + dedupe_keys > self.dedupe_keys_max:
            return False
        new = len(set(keys).difference(chunk.holders))  # holders: the first is indexed by now
        return len(chunk.holders) + new <= self.counters_max

    def finish(self) -> None:
        """Remove the dropped counters from the lists they were dropped from (in place: the checkpoints hold them)."""
        for counters in self._thinned.values():
            counters[:] = [c for c in counters if c is not None]
        self._thinned.clear()
        self._open.clear()


def chunks_of(pendings: list[Pending]) -> list[list[Pending]] | None:
    """The chunks ``ChunkCutter`` cut (consecutive pendings with one chunk id), or None when a pending was not cut
    (a halted lane's queue: the caller merges those as fetched)."""
    if any(p.chunk is None for p in pendings):
        return None
    chunks: list[list[Pending]] = []
    for p in pendings:
        if chunks and chunks[-1][-1].chunk == p.chunk:
            chunks[-1].append(p)
        else:
            chunks.append([p])
    return chunks
