"""How the disk store writes and removes its files: atomically, and without creating or freeing an inode per write.

Why not the usual "write a temporary, rename it over the key, unlink what it replaced": on an ext4 without a journal
(this project's machines: ``/sys/fs/ext4/<dev>/journal_task`` is empty) every new inode is searched for past the
inodes freed in the last 60–300 s (``find_inode_bit`` → ``recently_deleted``), so a store that creates and frees
~1,000 files a second spends most of its CPU in the kernel creating files: 56% of the store's samples under a
10,000-message/s produce (``perf record``; docs/benchmarks.md). A rename over an existing file also makes ext4
(``auto_da_alloc``) start writing the new file back inside the call. So:

- a write goes into a **spare file** (``<root>/.tmp-spare/<n>``, kept from an earlier write or removal; a new one
  only when none is left), rewritten in place (``pwrite`` + ``ftruncate`` to its length, never truncated to 0: ext4
  flushes a file truncated to 0 when it is closed), then swapped into place: ``renameat2(RENAME_EXCHANGE)`` when
  the key exists — the old object becomes the spare — else a rename;
- a removed object becomes a spare (a rename) while there are fewer than ``spare_max``; spares above
  ``SPARE_TRIM_BYTES`` are cut to one byte, so spares hold at most ``spare_max`` × that of disk;
- when no spare is left (a young store: spares come back only when compaction retires objects, and every produce
  makes one new object), a **refill thread** (``start_refill``) keeps up to ``fresh_max`` empty files created ahead
  of need. Creating a file costs 0.2–0.8 ms of kernel time here (the inode search above), and the broker waits for
  each write of a produce request one after another, so that cost sat on the acknowledgement's path twice per
  partition batch (measured: the watermark overwrite 850–1,000 µs in the store's handler against 90 µs for the
  batch written into the spare it left). The thread pays it on the other core, outside the request; the event loop
  takes a fresh file (a deque: append and popleft are atomic) and creates one itself only when the pool is empty.

Invariants:
- a reader of a key sees the old object or the new one, whole, never a mix and never none (exchange and rename are
  atomic); spares are never objects (``diskstore._key_parts`` refuses ``.tmp-`` names in keys, listings skip them), so what a
  crash leaves in a spare is never read;
- an object's ETag is (inode, mtime, size), and inodes are reused here on purpose, so every write stamps an mtime
  strictly greater than any this process stamped before (``time_ns`` or the last one + 1): two versions of a key
  never share an ETag, so a compare-and-swap with a stale one fails. A write may pass its own older mtime
  (compaction keeps the newest source's); its size then differs from every version it replaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

SPARE_DIR = ".tmp-spare"
#: where the refill thread creates files before moving them into SPARE_DIR
FRESH_DIR = ".tmp-fresh"
#: spares kept for reuse; each is an inode, and at most SPARE_TRIM_BYTES of disk
SPARE_MAX = 4096
SPARE_TRIM_BYTES = 16 * 1024
#: empty files the refill thread keeps ready when no spare is left (each an inode of no data)
FRESH_MAX = 1024

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2() -> Callable[[bytes, bytes, int], int] | None:
    """libc's ``renameat2`` (glibc ≥ 2.28) returning 0 or an errno, or None where there is none."""
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def call(old: bytes, new: bytes, flags: int) -> int:
        return 0 if fn(_AT_FDCWD, old, _AT_FDCWD, new, flags) == 0 else ctypes.get_errno()

    return call


_RENAMEAT2 = _renameat2()


def _number(spare: str) -> int:
    """A spare's number: its file name."""
    return int(spare.rpartition("/")[2])


class StoreFiles:
    """The store's file writes and removals (see the module doc). One thread writes and removes (the store's event
    loop); the refill thread only creates empty files under names of its own and hands them over in ``_fresh``."""

    def __init__(self, root: Path, *, fsync: bool = False, spare_max: int = SPARE_MAX) -> None:
        self.fsync = fsync
        self.spare_dir = root / SPARE_DIR
        self.spare_dir.mkdir(parents=True, exist_ok=True)
        self._spare_prefix = f"{self.spare_dir}/"  # spare paths are strings: pathlib costs per object, per write
        self._spares = sorted(int(n) for n in os.listdir(self.spare_dir) if n.isdigit())
        # names for new files, drawn by both threads (next() of itertools.count is atomic under the GIL)
        self._names = itertools.count((self._spares[-1] + 1) if self._spares else 1)
        self._last_mtime_ns = 0
        #: files created on the write path because no spare was left (observability and tests)
        self.created = 0
        #: empty files made by the refill thread, oldest first; taken only when ``_spares`` is empty
        self._fresh: deque[int] = deque()
        self.fresh_max = 0
        #: files the refill thread created (observability and tests)
        self.prefilled = 0
        self._wanted = threading.Event()
        self._refill_stop = threading.Event()
        self._refill: threading.Thread | None = None
        self._fresh_prefix = ""
        # reusing inodes needs mtimes in nanoseconds (see the module doc): where the filesystem keeps less, keep
        # no spares and every write is a new file again
        self.spare_max = spare_max if self._keeps_nanoseconds() else 0

    def _keeps_nanoseconds(self) -> bool:
        probe = self._spare()
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            wanted = time.time_ns() // 1_000_000_000 * 1_000_000_000 + 123_456_789
            os.utime(fd, ns=(wanted, wanted))
            kept = os.fstat(fd).st_mtime_ns == wanted
        finally:
            os.close(fd)
        self._spares.append(_number(probe))
        return kept

    def _spare(self) -> str:
        if self._spares:
            return f"{self._spare_prefix}{self._spares.pop()}"
        if self.fresh_max:
            if len(self._fresh) < self.fresh_max // 2:
                self._wanted.set()
            with contextlib.suppress(IndexError):
                return f"{self._spare_prefix}{self._fresh.popleft()}"
        self.created += 1
        return self._new_name()

    def _new_name(self) -> str:
        return f"{self._spare_prefix}{next(self._names)}"

    # ------------------------------------------------------------------ the refill thread
    def start_refill(self, fresh_max: int = FRESH_MAX) -> None:
        """Keep up to ``fresh_max`` empty files ready for writes that find no spare (module doc). Not where
        inodes are not reused (``spare_max`` 0: a filesystem without ns mtimes keeps the plain path)."""
        if fresh_max <= 0 or self.spare_max <= 0 or self._refill is not None:
            return
        self.fresh_max = fresh_max
        self._fresh_prefix = f"{self.spare_dir.parent / FRESH_DIR}/"
        os.makedirs(self._fresh_prefix, exist_ok=True)
        for name in os.listdir(self._fresh_prefix):  # made by a refill thread that died before moving them
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._fresh_prefix}{name}")
        self._wanted.set()
        self._refill = threading.Thread(target=self._refill_forever, name="store-refill", daemon=True)
        self._refill.start()

    def stop_refill(self) -> None:
        if self._refill is None:
            return
        self._refill_stop.set()
        self._wanted.set()
        self._refill.join()
        self._refill = None

    def _refill_forever(self) -> None:
        while not self._refill_stop.is_set():
            self._wanted.wait()
            self._wanted.clear()
            # top up to the mark; the spares taken meanwhile wake us again
            while len(self._fresh) < self.fresh_max and not self._refill_stop.is_set():
                number = next(self._names)
                made = f"{self._fresh_prefix}{number}"
                try:
                    # created in a folder of its own, then moved: a create holds its folder's lock for the whole
                    # inode search, and the write path renames out of the spare folder (measured: renames from a
                    # folder another thread creates in, p99 152 µs and max 8 ms, against 49 µs from another one)
                    os.close(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    os.rename(made, f"{self._spare_prefix}{number}")
                except OSError:  # a full disk or the like: the write path creates its own files and says why
                    self._refill_stop.wait(1.0)
                    break
                self._fresh.append(number)
                self.prefilled += 1

    def _keep(self, spare: str, size: int | None = None) -> None:
        """``spare`` (in the spare folder) holds nothing anyone reads any more: keep it for the next write.
        ``size``: its length when the caller knows it (one ``stat`` fewer on the overwrite path)."""
        if len(self._spares) >= self.spare_max:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spare)
            return
        with contextlib.suppress(FileNotFoundError):
            if (os.stat(spare).st_size if size is None else size) > SPARE_TRIM_BYTES:
                os.truncate(spare, 1)
            self._spares.append(_number(spare))

    def _stamp(self, mtime_ns: int | None) -> int:
        if mtime_ns is not None:
            return mtime_ns
        self._last_mtime_ns = max(time.time_ns(), self._last_mtime_ns + 1)
        return self._last_mtime_ns

    def write(self, target: Path | str, data: bytes, *, exists: bool, mtime_ns: int | None = None,
              replaced_size: int | None = None) -> os.stat_result:
        """Make ``data`` the file at ``target`` atomically; returns its stat. ``exists``: whether ``target`` is
        there now (the caller has just looked; ``replaced_size``: its length then, if known). ``mtime_ns``: the
        file's mtime, else a fresh unique one."""
        spare = self._spare()
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], written)
            os.ftruncate(fd, len(data))
            if self.fsync:
                os.fsync(fd)
            stamp = self._stamp(mtime_ns)
            os.utime(fd, ns=(stamp, stamp))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if exists and _RENAMEAT2 is not None:
            failed = _RENAMEAT2(os.fsencode(spare), os.fsencode(target), _RENAME_EXCHANGE)
            if failed == 0:
                self._keep(spare, replaced_size)  # it holds the replaced object now
                return st
            if failed not in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(failed, os.strerror(failed), str(target))
        os.replace(spare, target)
        return st

    def remove(self, path: Path) -> bool:
        """Take the file at ``path`` away (it is a spare from now on, or unlinked); False if it was not there."""
        if len(self._spares) < self.spare_max:
            spare = self._new_name()
            try:
                os.rename(path, spare)
            except FileNotFoundError:
                return False
            self._keep(spare)
            return True
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True


def read_from_outside(path: Path, *, attempts: int = 100) -> bytes | None:
    """The whole object at ``path`` as one version, for a process other than the store (the store itself reads
    between two event-loop steps, when no write is under way); None when there is no such file.

    The store rewrites spare files in place, so a file another process opened may be rewritten while it reads it.
    A read counts only if the file it read is still the one at ``path`` afterwards and its mtime, ctime and size did
    not change meanwhile: every rewrite stamps a new mtime and every swap a new ctime, so a read that overlapped one
    is retried (seqlock-style)."""
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            before = os.fstat(fd)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            continue
        version = (before.st_ino, before.st_mtime_ns, before.st_ctime_ns, before.st_size)
        if version == (after.st_ino, after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (
                now.st_ino, now.st_mtime_ns, now.st_ctime_ns, now.st_size):
            return b"".join(chunks)
    raise OSError(f"{path} changed under every one of {attempts} reads")
