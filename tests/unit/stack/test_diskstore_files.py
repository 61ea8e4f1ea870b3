"""The disk store's file writes: atomic, unique ETags although inodes are reused, and no inode churn."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from meterline.diskstore import DiskStore
from meterline.diskstore_files import FRESH_DIR, SPARE_DIR, SPARE_TRIM_BYTES, StoreFiles, read_from_outside
from meterline.diskstore_http import BadRequest, PreconditionFailed


def test_every_version_of_an_overwritten_key_has_its_own_etag_and_a_stale_one_cannot_swap(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    etag = store.put("b", "cluster/meta.json", b"v0", if_match=None, if_none_match="*")
    seen = {etag}
    inodes = set()
    stale = [etag]
    for i in range(1, 500):  # same size every time, as fast as it goes: only the mtime stamp can tell them apart
        etag = store.put("b", "cluster/meta.json", b"v%d" % (i % 10), if_match=etag, if_none_match=None)
        assert etag not in seen
        seen.add(etag)
        stale.append(etag)
        inodes.add(os.stat(tmp_path / "b" / "cluster" / "meta.json").st_ino)
    assert len(inodes) <= 3  # the key's inodes are reused (it and a spare swap places), not one per write
    for old in stale[:-1]:
        with pytest.raises(PreconditionFailed):
            store.put("b", "cluster/meta.json", b"lost update", if_match=old, if_none_match=None)
    assert (tmp_path / "b" / "cluster" / "meta.json").read_bytes() == b"v9"


def test_overwrites_and_new_objects_reuse_removed_files_instead_of_creating_new_ones(tmp_path: Path) -> None:
    files = StoreFiles(tmp_path / "root")
    folder = tmp_path / "root" / "records"
    folder.mkdir()
    for i in range(50):
        files.write(folder / f"{i}.batch", b"x" * 100, exists=False)
    created = files.created
    for i in range(50):  # removing keeps the files as spares ...
        assert files.remove(folder / f"{i}.batch")
    assert not files.remove(folder / "0.batch")  # already gone
    for i in range(50, 100):  # ... which the next new objects are written into
        files.write(folder / f"{i}.batch", b"y" * 100, exists=False)
    assert files.created == created
    for _ in range(200):  # an overwrite needs one spare (none is left); the replaced file is the next one's
        files.write(folder / "99.batch", b"z" * 100, exists=True)
    assert files.created == created + 1
    assert sorted(os.listdir(folder)) == sorted(f"{i}.batch" for i in range(50, 100))
    assert (folder / "99.batch").read_bytes() == b"z" * 100


def test_a_reused_file_holds_exactly_the_new_bytes_and_big_spares_are_trimmed(tmp_path: Path) -> None:
    files = StoreFiles(tmp_path)
    big = tmp_path / "big"
    files.write(big, os.urandom(SPARE_TRIM_BYTES * 4), exists=False)
    assert files.remove(big)
    spares = [tmp_path / SPARE_DIR / n for n in os.listdir(tmp_path / SPARE_DIR)]
    assert max(p.stat().st_size for p in spares) <= SPARE_TRIM_BYTES
    small = tmp_path / "small"
    files.write(small, b"short", exists=False)  # into a spare that held more: no old byte may survive
    assert small.read_bytes() == b"short"
    files.write(small, b"", exists=True)
    assert small.read_bytes() == b""


def test_an_object_overwritten_by_a_put_becomes_a_trimmed_spare(tmp_path: Path) -> None:
    """The overwrite path passes the replaced object's size instead of a stat: a big object replaced by a small one
    must still leave a spare trimmed to at most SPARE_TRIM_BYTES (spares are kept by the thousand)."""
    store = DiskStore(tmp_path)
    store.put("b", "p/watermark.json", os.urandom(SPARE_TRIM_BYTES * 4), if_match=None, if_none_match=None)
    store.put("b", "p/watermark.json", b"small", if_match=None, if_none_match=None)
    assert (tmp_path / "b" / "p" / "watermark.json").read_bytes() == b"small"
    spares = [tmp_path / SPARE_DIR / n for n in os.listdir(tmp_path / SPARE_DIR)]
    assert spares and max(p.stat().st_size for p in spares) <= SPARE_TRIM_BYTES


def test_spares_are_never_objects(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    store.put("b", "k/1.batch", b"one", if_match=None, if_none_match="*")
    store.delete("b", "k/1.batch")
    store.put("b", "k/2.batch", b"two", if_match=None, if_none_match="*")
    keys, prefixes, _ = store.list("b", "", delimiter=None, start_after="", max_keys=1000)
    assert [k for k, _ in keys] == ["k/2.batch"] and prefixes == []
    with pytest.raises(BadRequest):
        store.path(SPARE_DIR, "1")


def test_another_process_reading_an_overwritten_key_gets_one_whole_version(tmp_path: Path) -> None:
    """The drain reads the broker's watermarks from disk while the store rewrites them; spare files are
    rewritten in place, so a plain read could return another version's or another key's bytes."""
    files = StoreFiles(tmp_path)
    target = tmp_path / "watermark.json"
    versions = [bytes([65 + i % 26]) * (1000 + 37 * (i % 5)) for i in range(2000)]
    files.write(target, versions[0], exists=False)
    valid = set(versions)
    bad: list[bytes | None] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            data = read_from_outside(target)
            if data not in valid:
                bad.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for data in versions[1:]:
            files.write(target, data, exists=True)
    finally:
        done.set()
        reader.join()
    assert bad == []
    assert target.read_bytes() == versions[-1]


def test_without_spares_every_write_is_a_new_file_and_removal_unlinks(tmp_path: Path) -> None:
    files = StoreFiles(tmp_path, spare_max=0)
    target = tmp_path / "k"
    files.write(target, b"a", exists=False)
    first = os.stat(target).st_ino
    files.write(target, b"b", exists=True)
    assert target.read_bytes() == b"b" and os.stat(target).st_ino != first
    assert files.remove(target) and not target.exists()
    assert len(os.listdir(tmp_path / SPARE_DIR)) <= 1  # the start-up probe at most


def test_the_fsync_mode_writes_swaps_and_deletes_through_the_same_path(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, fsync=True)
    etag = store.put("b", "c/meta.json", b"one", if_match=None, if_none_match="*")
    etag = store.put("b", "c/meta.json", b"two", if_match=etag, if_none_match=None)
    with pytest.raises(PreconditionFailed):
        store.put("b", "c/meta.json", b"lost", if_match='"stale"', if_none_match=None)
    assert (tmp_path / "b" / "c" / "meta.json").read_bytes() == b"two"
    store.delete("b", "c/meta.json")
    assert not (tmp_path / "b" / "c" / "meta.json").exists()


def _until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the refill thread did not get there in time"
        time.sleep(0.01)


def test_writes_that_find_no_spare_take_files_the_refill_thread_made_and_it_tops_the_pool_up(tmp_path: Path) -> None:
    """A young store has no spares, so every new object used to create its file on the request's path."""
    files = StoreFiles(tmp_path / "root")
    folder = tmp_path / "root" / "records"
    folder.mkdir()
    created = files.created  # the start-up probe's file
    files.start_refill(fresh_max=64)
    try:
        _until(lambda: files.prefilled >= 64)
        for i in range(60):  # new keys, no spare left after the first: each takes a fresh file
            files.write(f"{folder}/{i}.batch", b"%d" % i * 50, exists=False)
        assert files.created == created
        _until(lambda: files.prefilled >= 64 + 60 - 32)  # below half the mark the pool is topped up again
        for i in range(60):
            files.write(f"{folder}/{i}.batch", b"again", exists=True)  # overwrites: the old files become spares
        assert files.created == created
    finally:
        files.stop_refill()
    assert sorted(os.listdir(folder)) == sorted(f"{i}.batch" for i in range(60))
    assert all((folder / f"{i}.batch").read_bytes() == b"again" for i in range(60))
    assert os.listdir(tmp_path / "root" / FRESH_DIR) == []  # every file it made was moved to the spares


def test_files_the_refill_thread_made_are_never_objects_and_leftovers_are_cleared(tmp_path: Path) -> None:
    (tmp_path / FRESH_DIR).mkdir()
    (tmp_path / FRESH_DIR / "7").write_bytes(b"")  # a refill thread died between creating and moving it
    store = DiskStore(tmp_path)
    store.files.start_refill(fresh_max=16)
    try:
        _until(lambda: store.files.prefilled >= 16)
        assert not (tmp_path / FRESH_DIR / "7").exists()
        store.put("b", "k/1.batch", b"one", if_match=None, if_none_match="*")
        keys, prefixes, _ = store.list("b", "", delimiter=None, start_after="", max_keys=1000)
        assert [k for k, _ in keys] == ["k/1.batch"] and prefixes == []
        with pytest.raises(BadRequest):
            store.path(FRESH_DIR, "1")
    finally:
        store.files.stop_refill()


def test_no_refill_thread_where_inodes_are_not_reused(tmp_path: Path) -> None:
    files = StoreFiles(tmp_path, spare_max=0)
    files.start_refill(fresh_max=16)
    assert files.fresh_max == 0 and files.prefilled == 0
    created = files.created
    for i in range(3):  # the start-up probe's file at most, then a new file each
        files.write(tmp_path / f"k{i}", b"a", exists=False)
    assert files.created >= created + 2
