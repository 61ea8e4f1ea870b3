"""The embedded broker's disk store speaks the S3 calls Tansu's ``s3://`` engine makes, over real HTTP.

Served by the store's own HTTP server (meterline/diskstore_http.py) on the test's event loop; each test drives it
with aiohttp's client, an independent HTTP implementation."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from meterline.diskstore import DiskStore, make_handler, partition_log_end
from meterline.diskstore_http import serve


def _url(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"


def _run(root: Path, scenario: Callable[[ClientSession, str], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server = await serve(make_handler(DiskStore(root)), "127.0.0.1", 0)
        try:
            async with ClientSession() as http:
                return await scenario(http, f"{_url(server)}/b")
        finally:
            server.close()

    return asyncio.run(main())


def test_conditional_puts_are_compare_and_swap(tmp_path: Path) -> None:
    async def scenario(http: ClientSession, base: str) -> None:
        created = await http.put(f"{base}/meta.json", data=b"v1", headers={"If-None-Match": "*"})
        assert created.status == 200
        etag = created.headers["ETag"]
        again = await http.put(f"{base}/meta.json", data=b"v1'", headers={"If-None-Match": "*"})
        assert again.status == 412  # create refuses an existing key
        stale = await http.put(f"{base}/meta.json", data=b"v2", headers={"If-Match": '"nope"'})
        assert stale.status == 412  # update refuses a stale version
        updated = await http.put(f"{base}/meta.json", data=b"v2", headers={"If-Match": etag})
        assert updated.status == 200 and updated.headers["ETag"] != etag
        unchanged = await http.get(f"{base}/meta.json", headers={"If-None-Match": updated.headers["ETag"]})
        assert unchanged.status == 304
        got = await http.get(f"{base}/meta.json")
        assert await got.read() == b"v2" and got.headers["ETag"] == updated.headers["ETag"]
        missing = await http.get(f"{base}/nothing.json")
        assert missing.status == 404

    _run(tmp_path, scenario)


def test_listing_is_sorted_paginated_and_survives_a_new_store_on_the_same_files(tmp_path: Path) -> None:
    keys = [f"topics/t/partitions/0000000000/records/{offset:0>20}.batch" for offset in range(2_001)]

    async def write(http: ClientSession, base: str) -> None:
        for key in reversed(keys):  # written out of order: S3 lists by key all the same
            assert (await http.put(f"{base}/{key}", data=key.encode())).status == 200
        assert (await http.put(f"{base}/topics/t/partitions/0000000000/watermark.json",
                               data=b'{"low":null,"high":2500,"timestamps":null}')).status == 200

    async def read(http: ClientSession, base: str) -> tuple[list[str], int]:
        listed: list[str] = []
        token = ""
        pages = 0
        while True:
            params = {"list-type": "2", "prefix": "topics/t/partitions/0000000000/records/"}
            if token:
                params["continuation-token"] = token
            body = await (await http.get(base, params=params)).text()
            pages += 1
            listed += [part.split("</Key>")[0] for part in body.split("<Key>")[1:]]
            if "<IsTruncated>true</IsTruncated>" not in body:
                return listed, pages
            token = body.split("<NextContinuationToken>")[1].split("</NextContinuationToken>")[0]

    _run(tmp_path, write)
    listed, pages = _run(tmp_path, read)  # a new server process would see the same: state is the files
    assert listed == sorted(keys) and pages == 3


def test_delimiter_lists_folders_as_common_prefixes(tmp_path: Path) -> None:
    async def scenario(http: ClientSession, base: str) -> str:
        for key in ("groups/consumers/a.json", "groups/consumers/b.json", "groups/other/c.json"):
            await http.put(f"{base}/{key}", data=b"{}")
        return await (await http.get(base, params={"list-type": "2", "prefix": "groups/", "delimiter": "/"})).text()

    body = _run(tmp_path, scenario)
    assert "<Prefix>groups/consumers/</Prefix>" in body and "<Prefix>groups/other/</Prefix>" in body
    assert "<Key>" not in body


def test_listings_cached_before_a_write_show_new_keys_and_new_folders(tmp_path: Path) -> None:
    """The store answers listings from caches; a PUT into a folder it knows and a PUT that creates folders must
    both show in listings taken before them (the first skips the walk up the folders, the second needs it)."""
    async def scenario(http: ClientSession, base: str) -> tuple[str, str, str]:
        await http.put(f"{base}/t/p0/records/1.batch", data=b"1")

        async def listing(prefix: str, delimiter: str | None = None) -> str:
            params = {"list-type": "2", "prefix": prefix, **({"delimiter": delimiter} if delimiter else {})}
            return await (await http.get(base, params=params)).text()

        await listing("t/", "/"), await listing("t/p0/records/"), await listing("")  # cached from here on
        await http.put(f"{base}/t/p0/records/2.batch", data=b"2")  # a folder the store knows
        await http.put(f"{base}/t/p1/deep/er/records/3.batch", data=b"3")  # four new folders
        return await listing("t/", "/"), await listing("t/p0/records/"), await listing("")

    folders, records, everything = _run(tmp_path, scenario)
    assert "<Prefix>t/p0/</Prefix>" in folders and "<Prefix>t/p1/</Prefix>" in folders
    assert "<Key>t/p0/records/1.batch</Key>" in records and "<Key>t/p0/records/2.batch</Key>" in records
    for key in ("t/p0/records/1.batch", "t/p0/records/2.batch", "t/p1/deep/er/records/3.batch"):
        assert f"<Key>{key}</Key>" in everything


def test_keys_that_name_no_object_are_refused(tmp_path: Path) -> None:
    async def scenario(http: ClientSession, base: str) -> list[int]:
        return [(await http.put(f"{base}/{key}", data=b"x")).status
                for key in ("a//b", "a/.tmp-spare/1", ".tmp-x")]  # (the client itself drops "./" and "../")

    assert _run(tmp_path, scenario) == [400, 400, 400]
    assert not list((tmp_path / "b").rglob("*")) or all(p.is_dir() for p in (tmp_path / "b").rglob("*"))


def test_retention_sweep_deletes_old_batches_but_keeps_the_newest_and_other_objects(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    records = "clusters/c/topics/t/partitions/0000000000/records"
    for offset in (0, 10, 20):
        store.put("tansu", f"{records}/{offset:0>20}.batch", b"x", if_match=None, if_none_match="*")
    store.put("tansu", "clusters/c/topics/t/partitions/0000000000/watermark.json", b"{}", if_match=None,
              if_none_match=None)
    old = time.time() - 8 * 24 * 3600
    for offset in (0, 10, 20):
        os.utime(tmp_path / "tansu" / records / f"{offset:0>20}.batch", (old, old))
    removed = store.sweep(retention_ms=7 * 24 * 3600 * 1000)
    assert removed == 2
    left = sorted(p.name for p in (tmp_path / "tansu" / records).iterdir())
    assert left == [f"{20:0>20}.batch"]  # the newest stays: the partition's position stays readable
    assert (tmp_path / "tansu" / "clusters/c/topics/t/partitions/0000000000/watermark.json").exists()


def test_partition_log_end_reads_the_brokers_watermark(tmp_path: Path) -> None:
    path = tmp_path / "tansu" / "clusters" / "tansu_cluster" / "topics" / "u" / "partitions" / "0000000003"
    path.mkdir(parents=True)
    (path / "watermark.json").write_text('{"low":null,"high":4999,"timestamps":null}')
    assert partition_log_end(tmp_path, "u", 3) == 4999
    assert partition_log_end(tmp_path, "u", 2) is None


# ---------------------------------------------------------------------------------------------- compaction

RECORDS = "clusters/c/topics/t/partitions/0000000000/records"


def _batch(values: list[bytes], *, transactional: bool = False) -> bytes:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=3, is_transactional=int(transactional),
                                        producer_id=7, producer_epoch=0, base_sequence=0, batch_size=2**31 - 1)
    for delta, value in enumerate(values):
        builder.append(delta, timestamp=1_700_000_000_000 + delta, key=b"k", value=value, headers=[("h", value)])
    return bytes(builder.build())


def _store_batches(store: DiskStore, root: Path, batches: list[tuple[int, bytes]], *, age_s: float) -> None:
    """Write batch objects as the broker does, oldest first, with mtimes ``age_s`` ago and 1 ms apart."""
    stamp = time.time() - age_s
    for i, (offset, data) in enumerate(batches):
        store.put("tansu", f"{RECORDS}/{offset:0>20}.batch", data, if_match=None, if_none_match="*")
        os.utime(root / "tansu" / RECORDS / f"{offset:0>20}.batch", (stamp + i / 1000, stamp + i / 1000))


def _read_all(root: Path) -> list[tuple[int, bytes | None]]:
    from meterline.batch_merge import records_of

    out = []
    for path in sorted(p for p in (root / "tansu" / RECORDS).glob("*.batch") if not p.name.startswith(".")):
        out += [(r[0], r[3]) for r in records_of(path.read_bytes(), int(path.stem))]
    return out


def _listed(store: DiskStore) -> list[str]:
    keys, _, _ = store.list("tansu", f"{RECORDS}/", delimiter=None, start_after="", max_keys=1000)
    return [key.rsplit("/", 1)[1] for key, _ in keys]


def test_compaction_merges_old_batches_keeps_the_newest_and_every_record(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    batches = [(offset, _batch([b"v%d" % (offset + i) for i in range(2)])) for offset in range(0, 20, 2)]
    _store_batches(store, tmp_path, batches, age_s=60)
    before = _read_all(tmp_path)
    assert len(_listed(store)) == 10

    removed = store.compact(older_than_s=10, objects_min=2)

    assert removed == 8
    assert _listed(store) == [f"{0:0>20}.batch", f"{18:0>20}.batch"]  # the run under its first key; newest as is
    assert _read_all(tmp_path) == before == [(o, b"v%d" % o) for o in range(20)]
    newest = tmp_path / "tansu" / RECORDS / f"{18:0>20}.batch"
    assert newest.read_bytes() == batches[-1][1]
    merged = tmp_path / "tansu" / RECORDS / f"{0:0>20}.batch"
    assert merged.stat().st_mtime_ns < newest.stat().st_mtime_ns  # time lookups still find the newest last
    assert store.compact(older_than_s=10, objects_min=2) == 0  # nothing left to do


def test_compaction_leaves_young_batches_gaps_big_and_transactional_ones(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    old = [(0, _batch([b"a"])), (1, _batch([b"b"])),
           (5, _batch([b"c"])), (6, _batch([b"d"])),  # a gap before 5: two runs
           (7, _batch([b"e"], transactional=True)),  # never merged: read_committed readers filter by producer
           (8, _batch([b"f"])), (9, _batch([os.urandom(3000)])), (10, _batch([b"g"]))]  # 9 too big for 4 KiB runs
    _store_batches(store, tmp_path, old, age_s=60)
    _store_batches(store, tmp_path, [(11, _batch([b"h"])), (12, _batch([b"i"])), (13, _batch([b"j"]))], age_s=1)
    before = _read_all(tmp_path)

    removed = store.compact(older_than_s=10, bytes_max=4096, objects_min=2)

    assert removed == 2
    assert _listed(store) == [f"{o:0>20}.batch" for o in (0, 5, 7, 8, 9, 10, 11, 12, 13)]
    assert _read_all(tmp_path) == before


def test_recovery_finishes_a_merge_that_a_crash_interrupted_and_drops_one_that_never_happened(tmp_path: Path) -> None:
    from meterline.batch_merge import merge_batches
    from meterline.diskstore import MERGE_JOURNAL

    folder = tmp_path / "tansu" / RECORDS
    batches = [(o, _batch([b"v%d" % o])) for o in range(4)]
    _store_batches(DiskStore(tmp_path), tmp_path, batches, age_s=60)
    names = [f"{o:0>20}.batch" for o in range(3)]
    (folder / MERGE_JOURNAL).write_text("\n".join(names))
    (folder / names[0]).write_bytes(merge_batches(batches[:3]))  # renamed into place, then the crash

    (folder / ".tmp-retired-x.batch").write_bytes(b"left by the crashed store")
    store = DiskStore(tmp_path)
    assert store.recover() == 1
    assert _listed(store) == [names[0], f"{3:0>20}.batch"] and not (folder / MERGE_JOURNAL).exists()
    assert not (folder / ".tmp-retired-x.batch").exists()
    assert _read_all(tmp_path) == [(o, b"v%d" % o) for o in range(4)]

    (folder / MERGE_JOURNAL).write_text(f"{0:0>20}.batch\n{3:0>20}.batch")  # a crash before the rename
    assert DiskStore(tmp_path).recover() == 0
    assert _read_all(tmp_path) == [(o, b"v%d" % o) for o in range(4)] and not (folder / MERGE_JOURNAL).exists()


def test_a_reader_that_listed_before_a_merge_still_reads_every_key_it_listed(tmp_path: Path) -> None:
    """The broker lists, then GETs. A key merged away in between is answered from its retired copy for
    RETIRED_GRACE_S (a 404 made this broker skip the batch's records), and is no longer listed."""
    from meterline.batch_merge import records_of

    async def scenario(http: ClientSession, base: str, store: DiskStore) -> None:
        originals = {o: _batch([b"v%d" % o]) for o in range(4)}
        for o, body in originals.items():
            assert (await http.put(f"{base}/{RECORDS}/{o:0>20}.batch", data=body)).status == 200
            path = tmp_path / "tansu" / RECORDS / f"{o:0>20}.batch"
            stamp = time.time() - 60 + o / 1000
            os.utime(path, (stamp, stamp))
            store._meta[str(path)] = path.stat()
        listed = await (await http.get(base, params={"list-type": "2", "prefix": f"{RECORDS}/"})).text()
        assert listed.count("<Key>") == 4
        assert store.compact(older_than_s=10, objects_min=2) == 2

        for o in (1, 2):  # merged away after the listing above: still the batch the reader listed
            got = await http.get(f"{base}/{RECORDS}/{o:0>20}.batch")
            assert got.status == 200 and await got.read() == originals[o]
        first = await (await http.get(f"{base}/{RECORDS}/{0:0>20}.batch")).read()
        assert [r[0] for r in records_of(first, 0)] == [0, 1, 2]
        relisted = await (await http.get(base, params={"list-type": "2", "prefix": f"{RECORDS}/"})).text()
        assert relisted.count("<Key>") == 2  # the next listing sees the merged layout only

        assert store.expire_retired(now=time.monotonic() + 3_600) == 2
        assert (await http.get(f"{base}/{RECORDS}/{1:0>20}.batch")).status == 404
        assert not list((tmp_path / "tansu" / RECORDS).glob(".tmp-*"))

    async def main() -> None:
        store = DiskStore(tmp_path)
        server = await serve(make_handler(store), "127.0.0.1", 0)
        try:
            async with ClientSession() as http:
                await scenario(http, f"{_url(server)}/tansu", store)
        finally:
            server.close()

    asyncio.run(main())


def test_compaction_in_budgeted_slices_ends_where_one_pass_does(tmp_path: Path) -> None:
    """The server compacts in slices of a few ms so requests are served in between; slices resume where the last
    stopped and reach the same objects as one unbounded pass."""
    batches = [(offset, _batch([os.urandom(300)])) for offset in range(40)]
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    for root in (whole, sliced):
        _store_batches(DiskStore(root), root, batches, age_s=60)
    one = DiskStore(whole)
    one.recover()
    assert one.compact(older_than_s=10, bytes_max=4096, objects_min=2) > 0 and not one.cut_short

    many = DiskStore(sliced)
    many.recover()
    calls = 0
    while True:
        many.compact(older_than_s=10, bytes_max=4096, objects_min=2, budget_s=0)
        calls += 1
        if not many.cut_short:
            break
    assert calls > 3  # a zero budget stops after every run
    assert _listed(many) == _listed(one) and _read_all(sliced) == _read_all(whole)
    assert len(_listed(one)) < 15


def test_zero_budget_slices_make_progress_past_objects_that_never_merge(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    big = [(o, _batch([os.urandom(3000)])) for o in range(0, 6)]  # each over half of 4 KiB: never merged
    small = [(o, _batch([b"s%d" % o])) for o in range(6, 12)]
    _store_batches(store, tmp_path, big + small, age_s=60)
    for _ in range(50):
        store.compact(older_than_s=10, bytes_max=4096, objects_min=2, budget_s=0)
        if not store.cut_short:
            break
    assert not store.cut_short
    assert _listed(store) == [f"{o:0>20}.batch" for o in (0, 1, 2, 3, 4, 5, 6, 11)]


def test_a_run_at_the_young_end_waits_until_it_is_worth_a_merge(tmp_path: Path) -> None:
    """Merging a run that will grow would decode the merged records again next pass; it waits for objects_min
    objects (or half of bytes_max) — a run closed by a bigger object or by the size bound is merged at once."""
    store = DiskStore(tmp_path)
    _store_batches(store, tmp_path, [(o, _batch([b"v%d" % o])) for o in range(6)], age_s=60)
    assert store.compact(older_than_s=10, objects_min=6) == 0  # 5 mergeable, the newest stays
    assert len(_listed(store)) == 6
    assert store.compact(older_than_s=10, objects_min=5) == 4
    assert len(_listed(store)) == 2


# ----------------------------------------------------------------------- the second tier and merging elsewhere

def test_the_second_tier_merges_old_merged_objects_and_big_batches_into_bigger_ones(tmp_path: Path) -> None:
    """Objects the first tier leaves alone (64 KiB or more: its own outputs, a producer's big batches) still cost
    every fetch; once older than ``big_after_s`` they are merged again, up to ``big_bytes_max``."""
    store = DiskStore(tmp_path)
    # incompressible (value and header, beyond lz4's 64 KiB window): ~140 KB objects, final for the first tier
    big = [(o, _batch([os.urandom(70_000)])) for o in range(8)]
    young = [(o, _batch([os.urandom(70_000)])) for o in range(8, 11)]
    _store_batches(store, tmp_path, big, age_s=3_600)
    _store_batches(store, tmp_path, young, age_s=60)
    before = _read_all(tmp_path)

    # the first tier finds them all final; the second finds them too young for it, so the folder stays queued
    assert store.compact(older_than_s=10, objects_min=2, big_after_s=7_200, big_bytes_max=600_000) == 0

    removed = store.compact(older_than_s=10, objects_min=2, big_after_s=600, big_bytes_max=600_000)
    assert removed == 8 - 2  # 8 old objects of ~140 KB in runs of ≤ 600 KB: [0-3] [4-7]; the young ones wait
    assert _listed(store) == [f"{o:0>20}.batch" for o in (0, 4, 8, 9, 10)]
    assert _read_all(tmp_path) == before
    assert store.compact(older_than_s=10, objects_min=2, big_after_s=600, big_bytes_max=600_000) == 0


def test_a_stretch_deleted_while_it_was_merged_is_not_brought_back(tmp_path: Path) -> None:
    """The server merges in another process and serves requests meanwhile: the retention sweep (or the broker)
    may delete a source in between. The swap re-checks its sources and drops a stale merge."""
    from meterline.batch_merge import merge_batches
    from meterline.diskstore import merge_tiers

    store = DiskStore(tmp_path)
    _store_batches(store, tmp_path, [(o, _batch([b"v%d" % o])) for o in range(4)], age_s=60)
    pass_ = store.compaction(tiers=merge_tiers(10, objects_min=2, big_after_s=0), now_s=None, budget_s=None)
    job = next(pass_)
    assert [b.base for b in job.stretch] == [0, 1, 2]
    assert store.sweep(retention_ms=30_000) == 3  # all but the newest are past a 30 s retention
    try:
        pass_.send(merge_batches(job.sources()))
        raise AssertionError("the pass had one stretch only")
    except StopIteration as done:
        assert done.value == 0
    assert _listed(store) == [f"{3:0>20}.batch"] and _read_all(tmp_path) == [(3, b"v3")]


def test_merges_in_the_worker_process_read_back_as_inline_ones_and_survive_its_death(tmp_path: Path) -> None:
    from meterline.batch_merge import merge_batches
    from meterline.diskstore import MergeTier
    from meterline.merge_worker import MergeWorker

    sources = [(o, _batch([b"v%d" % o, b"w%d" % o])) for o in range(0, 8, 2)]
    store = DiskStore(tmp_path)
    _store_batches(store, tmp_path, [*sources, (8, _batch([b"newest"]))], age_s=60)
    before = _read_all(tmp_path)

    async def main() -> None:
        worker = MergeWorker()
        try:
            assert await worker.merge(sources) == merge_batches(sources)
            assert await worker.merge(sources[:1]) is None  # refused by the merge (logged), not raised
            assert worker._pool is not None
            for process in list(worker._pool._processes.values()):
                process.kill()
            assert await worker.merge(sources) is None  # the merge it was running is skipped
            # a tier that caps records per merge: 2 sources of 2 records each per merge
            tiers = [MergeTier(after_s=10, bytes_max=1 << 20, final_bytes=1 << 19, objects_min=2, records_max=4)]
            assert await store.compact_async(worker.merge, tiers=tiers) == 2  # a new worker: [0,2] [4,6]
        finally:
            worker.close()

    asyncio.run(main())
    assert _listed(store) == [f"{o:0>20}.batch" for o in (0, 4, 8)]
    assert _read_all(tmp_path) == before


def test_a_killed_store_leaves_no_merge_worker_behind(tmp_path: Path) -> None:
    """``kill -9`` of the store (the chaos and durability suites do it) must take its merge worker with it."""
    import subprocess
    import sys

    script = tmp_path / "store.py"
    script.write_text(
        "import asyncio, os, signal\n"
        "from meterline.merge_worker import MergeWorker\n"
        "async def main():\n"
        "    w = MergeWorker()\n"
        "    await w.merge([(0, b'not a batch')])\n"
        "    print(*w._pool._processes, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == -9
    worker_pid = int(done.stdout.split()[-1])  # after the refused merge's log line
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker_pid, 9)
    raise AssertionError(f"merge worker {worker_pid} outlived its store")
