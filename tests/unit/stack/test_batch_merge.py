"""Merging stored Kafka record batches keeps every record as a reader sees it (meterline/batch_merge.py)."""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.batch_merge import BatchHead, MergeMismatch, Record, merge_batches, records_of

NONE, GZIP, SNAPPY, LZ4, ZSTD = 0, 1, 2, 3, 4


def batch(records: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]], *, codec: int = NONE,
          transactional: bool = False, producer_id: int = 4711) -> bytes:
    """A batch as Tansu stores it: v2 wire format, base offset 0 (the object's key holds the real one)."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=int(transactional),
                                        producer_id=producer_id, producer_epoch=0, base_sequence=0,
                                        batch_size=2**31 - 1)
    for delta, (timestamp, key, value, headers) in enumerate(records):
        builder.append(delta, timestamp=timestamp, key=key, value=value, headers=headers)
    return bytes(builder.build())


def test_a_merged_batch_reads_back_record_by_record_at_the_same_offsets() -> None:
    first = batch([(1_000, b"k1", b"v1", [("trace", b"a")]), (900, None, b"v2", [])], codec=LZ4)
    second = batch([(1_200, b"k3", None, [("h", None), ("h", b"x")])], codec=LZ4)
    third = batch([(800, b"k4", b"v4", [])], codec=LZ4)
    sources = [(40, first), (42, second), (43, third)]

    merged = merge_batches(sources)

    assert records_of(merged, 40) == [
        (40, 1_000, b"k1", b"v1", (("trace", b"a"),)),
        (41, 900, None, b"v2", ()),  # a timestamp below the batch's first: a negative delta, kept as it was
        (42, 1_200, b"k3", None, (("h", None), ("h", b"x"))),
        (43, 800, b"k4", b"v4", ()),
    ]
    head = BatchHead.of(merged)
    assert head is not None and head.record_count == 4 and head.offset_span == 4
    assert head.codec == LZ4 and head.mergeable  # the sources' codec when they share one


def test_sources_with_different_codecs_merge_uncompressed() -> None:
    sources = [(0, batch([(1, b"a", b"1", [])], codec=GZIP)), (1, batch([(2, b"b", b"2", [])], codec=SNAPPY)),
               (2, batch([(3, b"c", b"3", [])], codec=ZSTD))]
    merged = merge_batches(sources)
    assert BatchHead.of(merged) == BatchHead(record_count=3, offset_span=3, codec=NONE, mergeable=True)
    assert [r[3] for r in records_of(merged, 0)] == [b"1", b"2", b"3"]


@pytest.mark.parametrize("why, sources", [
    ("one batch", [(0, batch([(1, b"a", b"1", [])]))]),
    ("a gap", [(0, batch([(1, b"a", b"1", [])])), (2, batch([(1, b"b", b"2", [])]))]),
    ("transactional", [(0, batch([(1, b"a", b"1", [])])), (1, batch([(1, b"b", b"2", [])], transactional=True))]),
    ("not a batch", [(0, batch([(1, b"a", b"1", [])])), (1, b"\x00" * 70)]),
])
def test_what_a_reader_would_see_differently_is_refused(why: str, sources: list[tuple[int, bytes]]) -> None:
    with pytest.raises(ValueError):
        merge_batches(sources)


def test_the_head_of_a_control_or_log_append_time_batch_is_not_mergeable() -> None:
    data = bytearray(batch([(1, b"a", b"1", [])]))
    for flag in (0x20, 0x08):  # control, LogAppendTime
        flagged = bytearray(data)
        flagged[22] |= flag  # attributes' low byte (the CRC no longer matches: the head check must not need it)
        head = BatchHead.of(bytes(flagged))
        assert head is not None and not head.mergeable
    assert BatchHead.of(bytes(data[:-1])) is None  # truncated: its length field disagrees


def test_a_result_that_does_not_read_back_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import meterline.batch_merge as bm

    real = bm.records_of
    calls = {"n": 0}

    def corrupting(data: bytes, base: int) -> list[Record]:
        calls["n"] += 1
        out = real(data, base)
        return out if calls["n"] <= 2 else out[:-1]  # the sources read fine, the merged batch "loses" a record

    monkeypatch.setattr(bm, "records_of", corrupting)
    with pytest.raises(MergeMismatch):
        bm.merge_batches([(0, batch([(1, b"a", b"1", [])])), (1, batch([(2, b"b", b"2", [])]))])


_header = st.tuples(st.text(max_size=5), st.none() | st.binary(max_size=8))
_record = st.tuples(st.integers(min_value=0, max_value=2**41), st.none() | st.binary(max_size=16),
                    st.none() | st.binary(max_size=64), st.lists(_header, max_size=3))


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.tuples(st.lists(_record, min_size=1, max_size=6), st.sampled_from([NONE, GZIP, LZ4])),
                        min_size=2, max_size=6),
       start=st.integers(min_value=0, max_value=2**40))
def test_any_consecutive_batches_merge_into_exactly_their_records(batches: list[tuple[list, int]], start: int) -> None:
    sources: list[tuple[int, bytes]] = []
    expected: list[Record] = []
    offset = start
    for records, codec in batches:
        sources.append((offset, batch(records, codec=codec)))
        for timestamp, key, value, headers in records:
            expected.append((offset, timestamp, key, value, tuple(headers)))
            offset += 1
    assert records_of(merge_batches(sources), start) == expected
