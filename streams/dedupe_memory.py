"""The dedupe keys one partition's worker remembers: 64-bit hashes seen within the horizon, oldest forgotten
first. Pure (no I/O, no clock): callers pass arrival times as epoch seconds.

Why not an ``OrderedDict[hash, arrival]``: that costs ~150 bytes per key (the dict entry, the int, a float per
key and the ordered dict's link node); a worker keeps millions of keys per partition. Here keys are grouped in
time slots of ``slot_s`` seconds: one dict maps a key to its slot number (one shared int object per slot) and
each slot keeps a deque of the keys that entered in it — ~78 bytes per key, measured with tracemalloc.

Invariants:
- a key is forgotten only when its whole slot ended at or before the cutoff, so it is kept at least as long as
  the horizon and at most ``slot_s`` longer: rounding only ever errs towards catching a duplicate;
- slots only move forward: an arrival older than the newest slot (clock skew, seeding) joins the newest slot,
  which again only keeps it longer;
- the memory bound ``keys_max`` holds after every ``remember``: the oldest keys go first — by their LAST arrival:
  a key remembered again within its slot leaves a stale entry earlier in that slot's deque, counted in
  ``_repeats`` so the bound skips it instead of forgetting the key (found by the reference-model test: with the
  slot number alone a stale entry looked live).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

__all__ = ["DedupeMemory", "slot_seconds"]


def slot_seconds(horizon_s: int) -> int:
    """~100+ slots per horizon, at most a minute each: 24 h → 60 s slots, 60 s → 1 s slots."""
    return max(1, min(60, horizon_s // 100))


class DedupeMemory:
    __slots__ = ("_keys", "_newest", "_newest_keys", "_repeats", "_slots", "keys_max", "slot_s")

    def __init__(self, *, slot_s: int, keys_max: int) -> None:
        self.slot_s = slot_s
        self.keys_max = keys_max
        self._keys: dict[int, int] = {}  # key -> slot number it entered in
        self._slots: deque[tuple[int, deque[int]]] = deque()  # (slot number, keys), oldest first
        # the newest slot, kept apart for the per-event path (``remember`` runs once per accepted event)
        self._newest = -1
        self._newest_keys: deque[int] = deque()
        # key -> stale entries of it in the deque of its current slot (remembered again in the same slot); rare:
        # an accepted event's key is new by definition, so this stays empty on the per-event path
        self._repeats: dict[int, int] = {}

    def __contains__(self, key: int) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def clear(self) -> None:
        self._keys.clear()
        self._repeats.clear()
        self._slots.clear()
        self._newest = -1
        self._newest_keys = deque()

    def remember(self, key: int, arrival_s: float) -> None:
        slot = int(arrival_s // self.slot_s)
        if slot > self._newest or not self._slots:
            self._newest, self._newest_keys = slot, deque()
            self._slots.append((slot, self._newest_keys))
        # a key remembered again moves to the newest slot; its old deque entry is skipped when that slot goes (an
        # older slot: by slot number; the same slot: counted in _repeats)
        keys = self._keys
        if key in keys:  # rare: an accepted event's key is new (a containment test is the cheapest check)
            self._remember_again(key)
        else:
            keys[key] = self._newest
        self._newest_keys.append(key)
        if len(keys) > self.keys_max:
            while len(keys) > self.keys_max:
                self._forget_oldest_key()

    def _remember_again(self, key: int) -> None:
        if self._keys[key] == self._newest:  # its earlier entry in this slot's deque is now stale
            self._repeats[key] = self._repeats.get(key, 0) + 1
        else:  # its stale entries are in older slots: the slot number skips them
            self._keys[key] = self._newest
            self._repeats.pop(key, None)

    def forget_before(self, cutoff_s: float) -> int:
        """Forget every slot that ended at or before ``cutoff_s``. Returns how many keys were forgotten."""
        forgotten = 0
        while self._slots and (self._slots[0][0] + 1) * self.slot_s <= cutoff_s:
            number, keys = self._slots.popleft()
            for key in keys:
                if self._keys.get(key) == number:
                    del self._keys[key]
                    if self._repeats:
                        self._repeats.pop(key, None)
                    forgotten += 1
        return forgotten

    def _forget_oldest_key(self) -> None:
        while self._slots:
            number, keys = self._slots[0]
            while keys:
                key = keys.popleft()
                if self._keys.get(key) == number:
                    stale = self._repeats.get(key)
                    if stale:  # a later entry of the key in this slot is the live one
                        if stale == 1:
                            del self._repeats[key]
                        else:
                            self._repeats[key] = stale - 1
                        continue
                    del self._keys[key]
                    if not keys:
                        self._slots.popleft()
                    return
            self._slots.popleft()
