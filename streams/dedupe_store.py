"""The dedupe keys of one source partition for the WHOLE horizon, exact, in bounded RAM: the newest keys in RAM
(``DedupeMemory``), older ones spilled to sorted runs on local disk, a generational Bloom filter in front of them.

Why: every key in RAM costs ~78 B (``dedupe_memory.py``); 20,000 events/s for a 24 h horizon is 1.7 billion keys,
~67 GB per worker. Here a key costs ~78 B only while it is among the newest ``ram_keys`` of its partition, then
12 B of disk (8 B key, 4 B time slot)
and about ``filter_bytes / keys in the horizon`` of RAM (the filter is a fixed array: 256 MiB per partition ≈
1.24 B/key at 216 M keys per partition — 20k/s over 8 partitions for 24 h).

Layout (per partition, every file anonymous — ``O_TMPFILE``, gone when the process ends):
- RAM tier: ``DedupeMemory`` holding at most ``ram_keys`` keys. When full it is SPILLED whole into a run.
- run: the spilled keys sorted (int64) followed by their time slots (int32); in RAM only a fence (every 512th
  key) and the run's newest slot. A lookup reads one 4 KB block with ``pread`` (page cache, not our RSS).
- filter: ``m`` 64-bit words. Bit g of a word belongs to generation g (``gen_s`` ≈ horizon / 56 of stream time,
  by the run's newest slot), so 64 interleaved Bloom filters share one array: a generation whose runs all left
  the horizon is cleared with one vectorised pass, instead of rebuilding a filter. k = 5 probes per key
  (Kirsch–Mitzenmacher from the key's own bits: the keys are already uniform 64-bit hashes). The price of 56
  planes: a new key's expected run reads = live generations x one plane's false-positive rate (~0.9 at the design
  load with 256 MiB, ~0.06 with 512 MiB; fewer at lower load) — a bigger filter buys speed, never a verdict.
- merge: when a generation closes (a run of a newer one appears), its runs are merged into one (at most
  ``merge_keys_max`` keys at a time: the transient RAM of a merge), so a lookup reads ~one block per generation
  whose filter bit answers "maybe".

Exactness (the argument, also in streams/README "Dedupe store"):
- ``key in store`` is True only when the key itself is found — in the RAM dict, or in a run's sorted array with a
  live slot. The filter only decides which runs NOT to read, and a Bloom filter has no false negatives: a run's
  generation bit is set for every key of the run when it is written and cleared only when no live run uses the
  bit any more. So: never a false "duplicate" (the filter's false positives cost a read, not a verdict), never a
  false "new" within the horizon.
- a key is forgotten exactly as ``DedupeMemory`` forgets it: when its time slot ended at or before the cutoff
  (``forget_before``), kept at least the horizon and at most one slot longer. A run stores each key's slot, so a
  run's age never changes a verdict; a run is deleted once its NEWEST slot is forgotten.
- spilling moves every key with its slot before the RAM tier is cleared; a merge keeps the newest slot of a key.
- the store is a cache: its files die with the process and every (re-)seed rebuilds it from the ledger's
  ``dedupe_key_sets`` (committed atomically with the charges), streamed in chunks (``seed_chunk``).
"""

from __future__ import annotations

import os
import tempfile
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import numpy.typing as npt

from streams.dedupe_memory import DedupeMemory

__all__ = ["DedupeStore", "ram_bytes_bound"]

_FENCE = 512  # keys per block: a lookup reads 4 KB of keys
_PROBES = 5  # at ~9 bits per key per generation (the default filter at the design load): ~1.6% per generation
_GENERATIONS = 64  # bits of a filter word
_GENERATIONS_PER_HORIZON = 56  # < 64: the live generations (horizon + the open one) always fit in a word
_LOW32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
#: measured with tracemalloc (tests/unit/streams/test_dedupe_memory.py): ~78 B per key in the RAM tier
RAM_TIER_BYTES_PER_KEY = 80

Int64s = npt.NDArray[np.int64]


def ram_bytes_bound(*, ram_keys: int, filter_bytes: int, merge_keys_max: int, keys_on_disk: int) -> int:
    """Upper bound of one partition's dedupe RAM: the RAM tier, the filter, the fences (8 B per 512 keys on disk)
    and the largest transient (a merge or a spill: keys + slots, their sort order and the sorted copies, the file
    image ≈ 56 B per key of it)."""
    transient = 56 * max(merge_keys_max, ram_keys)
    return ram_keys * RAM_TIER_BYTES_PER_KEY + filter_bytes + 8 * (keys_on_disk // _FENCE + 1) + transient


@dataclass(slots=True)
class _Run:
    file: IO[bytes]
    count: int
    fence: array[int]  # every _FENCE-th key, ascending
    newest_slot: int
    generation: int
    slot_base: int  # slots are stored relative to it: 4 bytes each, 8 when a run spans more (bogus CreateTimes)
    slot_bytes: int

    @property
    def bit(self) -> int:
        return self.generation % _GENERATIONS

    def slot_of(self, key: int) -> int | None:
        """The key's time slot, or None when the run does not hold it (one or two ``pread`` of this run)."""
        block = bisect_right(self.fence, key) - 1
        if block < 0:
            return None
        start = block * _FENCE
        n = min(_FENCE, self.count - start)
        keys = memoryview(os.pread(self.file.fileno(), 8 * n, 8 * start)).cast("q")
        i = bisect_left(keys, key)
        if i == n or keys[i] != key:
            return None
        raw = os.pread(self.file.fileno(), self.slot_bytes, 8 * self.count + self.slot_bytes * (start + i))
        return self.slot_base + int.from_bytes(raw, "little", signed=True)

    def read(self) -> tuple[Int64s, npt.NDArray[np.int64]]:
        fd = self.file.fileno()
        keys = np.frombuffer(os.pread(fd, 8 * self.count, 0), dtype=np.int64)
        stored = os.pread(fd, self.slot_bytes * self.count, 8 * self.count)
        slots = np.frombuffer(stored, dtype=np.int32 if self.slot_bytes == 4 else np.int64).astype(np.int64)
        return keys, slots + self.slot_base

    def close(self) -> None:
        self.file.close()


class DedupeStore:
    """Same contract as ``DedupeMemory`` (``in``, ``remember``, ``forget_before``, ``clear``) without its memory
    bound dropping keys: the horizon stays exact whatever the rate. Not thread-safe (one partition's worker)."""

    def __init__(self, *, slot_s: int, horizon_s: int, ram_keys: int, filter_bytes: int,
                 merge_keys_max: int = 4_000_000, directory: str | None = None) -> None:
        self.slot_s = slot_s
        self.ram_keys = ram_keys
        self.merge_keys_max = merge_keys_max
        self.directory = directory
        self.gen_s = max(slot_s, -(-max(horizon_s, 1) // _GENERATIONS_PER_HORIZON))
        self._ram = DedupeMemory(slot_s=slot_s, keys_max=2**62)  # bounded here, by spilling
        self._ram_keys = self._ram._keys  # the same dict for ever (``clear`` empties it in place): the fast path
        self._m = max(1024, filter_bytes // 8)
        self._new_filter()
        self._bit_runs = [0] * _GENERATIONS  # live runs per filter bit
        self._runs: list[_Run] = []  # oldest newest_slot first
        self._forgotten_cutoff_s = float("-inf")
        self._seeding: list[tuple[Int64s, int]] = []  # (keys, slot) chunks of a seed, not yet spilled
        self._seeding_count = 0
        self.stats = {"spills": 0, "merges": 0, "filter_maybe": 0, "run_reads": 0}

    # -- the per-event path ------------------------------------------------------------------------------

    def __contains__(self, key: int) -> bool:
        if key in self._ram_keys:
            return True
        if not self._runs:
            return False
        a, b, m, f = key & _LOW32, (key >> 32 & _LOW32) | 1, self._m, self._filter
        maybe = f[a % m] & f[(a + b) % m] & f[(a + 2 * b) % m] & f[(a + 3 * b) % m] & f[(a + 4 * b) % m]
        if not maybe:
            return False
        return self._in_runs(key, maybe)

    def _in_runs(self, key: int, maybe: int) -> bool:
        self.stats["filter_maybe"] += 1
        cutoff_s, slot_s = self._forgotten_cutoff_s, self.slot_s
        for run in reversed(self._runs):  # newest first: a recent resend is the likeliest duplicate
            if maybe >> run.bit & 1:
                self.stats["run_reads"] += 1
                slot = run.slot_of(key)
                if slot is not None and (slot + 1) * slot_s > cutoff_s:
                    return True
        return False

    def remember(self, key: int, arrival_s: float) -> None:
        if len(self._ram_keys) >= self.ram_keys:
            self._spill_ram()
        self._ram.remember(key, arrival_s)

    def forget_before(self, cutoff_s: float) -> int:
        """Forget every key whose time slot ended at or before ``cutoff_s`` (as ``DedupeMemory`` does); runs whose
        newest slot is forgotten are deleted, and their generation's filter bit cleared once no run uses it.
        Returns how many keys were forgotten from RAM and deleted runs (keys of live runs are forgotten
        lazily: their slot is compared with the cutoff at lookup)."""
        if cutoff_s > self._forgotten_cutoff_s:
            self._forgotten_cutoff_s = cutoff_s
        forgotten = self._ram.forget_before(cutoff_s)
        while self._runs and (self._runs[0].newest_slot + 1) * self.slot_s <= cutoff_s:
            run = self._runs.pop(0)
            forgotten += run.count
            self._drop(run)
        return forgotten

    # -- seeding: streamed from the ledger, oldest first, never the whole horizon in RAM ------------------

    def seed_chunk(self, keys: Int64s, arrival_s: float) -> None:
        """Add keys that arrived at ``arrival_s`` (chunks in ascending time). Buffered as arrays and written as
        runs every ``ram_keys`` keys; ``seed_done`` moves the newest (< ``ram_keys``) into the RAM tier."""
        if not len(keys):
            return
        slot = int(arrival_s // self.slot_s)
        if (self._seeding and self._seeding_count >= self.ram_keys // 4
                and self._generation(slot) != self._generation(self._seeding[-1][1])):
            self._spill_seeding()  # mostly one generation per run: it merges whole once closed
        self._seeding.append((np.asarray(keys, dtype=np.int64), slot))
        self._seeding_count += len(keys)
        if self._seeding_count >= self.ram_keys:
            self._spill_seeding()

    def seed_done(self) -> None:
        chunks, self._seeding, self._seeding_count = self._seeding, [], 0
        for keys, slot in chunks:
            arrival_s = float(slot * self.slot_s)
            for key in keys.tolist():
                self._ram.remember(key, arrival_s)
        self._merge_closed()

    # -- the rest of the DedupeMemory contract -----------------------------------------------------------

    def __len__(self) -> int:
        """Keys held: exact in RAM, an upper bound on disk (a run's forgotten keys count until it is deleted)."""
        return len(self._ram) + sum(run.count for run in self._runs) + self._seeding_count

    def __iter__(self) -> Iterator[int]:
        """Every live key (reads the runs: for tests and tools, not the per-event path)."""
        yield from self._ram
        for run in self._runs:
            keys, slots = run.read()
            live = (slots + 1) * self.slot_s > self._forgotten_cutoff_s
            yield from keys[live].tolist()

    def clear(self) -> None:
        self._ram.clear()
        for run in self._runs:
            run.close()
        self._runs.clear()
        self._seeding, self._seeding_count = [], 0
        self._bit_runs = [0] * _GENERATIONS
        if self._filter_used:
            self._new_filter()
        self._forgotten_cutoff_s = float("-inf")

    def close(self) -> None:
        self.clear()

    @property
    def ram_keys_now(self) -> int:
        return len(self._ram)

    @property
    def runs(self) -> int:
        return len(self._runs)

    @property
    def disk_bytes(self) -> int:
        return sum(12 * run.count for run in self._runs)

    # -- internals ---------------------------------------------------------------------------------------

    def _new_filter(self) -> None:
        # calloc'd: pages are backed only once a spill sets bits in them (a partition that never spills never pays)
        self._filter_np: npt.NDArray[np.uint64] = np.zeros(self._m, dtype=np.uint64)
        # scalar reads as Python ints, no numpy scalar overhead
        self._filter = memoryview(self._filter_np)  # type: ignore[arg-type]
        self._filter_used = False

    def _generation(self, slot: int) -> int:
        return (slot * self.slot_s) // self.gen_s

    def _spill_ram(self) -> None:
        table = self._ram._keys  # key -> slot: the RAM tier's own truth, read once, then cleared
        count = len(table)
        self._write_run(np.fromiter(table.keys(), dtype=np.int64, count=count),
                        np.fromiter(table.values(), dtype=np.int64, count=count))
        self._ram.clear()
        self._merge_closed()

    def _spill_seeding(self) -> None:
        chunks, self._seeding, self._seeding_count = self._seeding, [], 0
        if chunks:
            self._write_run(np.concatenate([k for k, _ in chunks]),
                            np.concatenate([np.full(len(k), s, dtype=np.int64) for k, s in chunks]))

    def _write_run(self, keys: Int64s, slots: npt.NDArray[np.int64], *, in_filter: bool = False) -> None:
        if not len(keys):
            return
        order = np.argsort(keys)
        keys, slots = keys[order], slots[order]
        del order
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        if len(starts) < len(keys):  # a key twice (a seed overlap, a merge): keep its newest slot
            slots = np.maximum.reduceat(slots, starts)
            keys = keys[starts]
        newest, base = int(slots.max()), int(slots.min())
        relative = slots - base
        slot_bytes = 4 if newest - base < 2**31 else 8  # never wraps: a wrapped slot would forget a key early
        # closed by _Run.close when the run is dropped (anonymous: nothing is left behind by a crash either)
        file = tempfile.TemporaryFile(dir=self.directory, prefix="meterline-dedupe-")  # noqa: SIM115
        file.write(keys.tobytes())
        file.write(relative.astype(np.int32 if slot_bytes == 4 else np.int64).tobytes())
        file.flush()
        del relative
        run = _Run(file, len(keys), array("q", keys[::_FENCE].tolist()), newest, self._generation(newest), base,
                   slot_bytes)
        if not in_filter:
            self._add_to_filter(keys, run.bit)
        self._bit_runs[run.bit] += 1
        at = len(self._runs)
        while at > 0 and self._runs[at - 1].newest_slot > newest:
            at -= 1
        self._runs.insert(at, run)
        self.stats["spills"] += 1

    def _add_to_filter(self, keys: Int64s, bit: int) -> None:
        self._filter_used = True
        u = keys.view(np.uint64)
        a, b = u & np.uint64(_LOW32), (u >> np.uint64(32)) | np.uint64(1)
        mask = np.uint64(1 << bit)
        m = np.uint64(self._m)
        for i in range(_PROBES):
            pos = (a + np.uint64(i) * b) % m
            self._filter_np[pos] |= mask  # equal positions all get old | mask: duplicates are harmless

    @staticmethod
    def _concatenated(runs: list[_Run]) -> tuple[Int64s, npt.NDArray[np.int64]]:
        parts = [r.read() for r in runs]
        return np.concatenate([k for k, _ in parts]), np.concatenate([s for _, s in parts])

    def _drop(self, run: _Run) -> None:
        run.close()
        self._bit_runs[run.bit] -= 1
        if self._bit_runs[run.bit] == 0:  # no live run uses the bit: clear that generation's filter
            self._filter_np &= np.uint64(~(1 << run.bit) & _U64)

    def _merge_closed(self) -> None:
        """Merge the runs of every generation older than the newest run's into one run per generation (bounded
        by ``merge_keys_max`` keys per merge), so a filter "maybe" reads ~one block per generation."""
        if len(self._runs) < 2:
            return
        newest_generation = max(run.generation for run in self._runs)
        by_generation: dict[int, list[_Run]] = {}
        for run in self._runs:
            if run.generation < newest_generation:
                by_generation.setdefault(run.generation, []).append(run)
        for runs in by_generation.values():
            runs.sort(key=lambda r: r.count)
            while len(runs) >= 2:
                group = [runs.pop(0), runs.pop(0)]
                while runs and sum(r.count for r in group) + runs[0].count <= self.merge_keys_max:
                    group.append(runs.pop(0))
                if sum(r.count for r in group) > self.merge_keys_max:
                    break  # too large to merge within the RAM bound: stays split (correct, a read more per maybe)
                # one generation, so the newest slot's too: the same filter bit, already set for these keys.
                # The arrays are passed without a local reference, so _write_run frees each one it replaces.
                self._write_run(*self._concatenated(group), in_filter=True)
                for r in group:
                    self._runs.remove(r)
                    self._drop(r)
                self.stats["merges"] += 1
