"""The embedded broker's disk store speaks the S3 calls Tansu's ``s3://`` engine makes, over real HTTP.

Served by aiohttp's test server in a thread-free way: each test drives the app with aiohttp's own client."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from meterline.diskstore import DiskStore, make_app, partition_log_end


def _run(root: Path, scenario: Callable[[ClientSession, str], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server = TestServer(make_app(DiskStore(root)), host="127.0.0.1")
        await server.start_server()
        try:
            async with ClientSession() as http:
                return await scenario(http, str(server.make_url("/b")))
        finally:
            await server.close()

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
