"""Merge consecutive Kafka record batches into one: the pure core of the disk store's compaction.

Tansu's dynostore keeps every produced record batch as its own object (``records/<base offset>.batch``, the batch
in Kafka's v2 wire format with a zero base offset; the key gives the real one) and lists a partition's whole
``records/`` folder on every fetch, so a fetch costs O(objects retained). A plain client producing one event per
message makes thousands of small batches a minute per partition. The store rewrites runs of old small batches as
one batch (meterline/diskstore.py ``DiskStore.compact``); this module only turns bytes into bytes.

What a merged batch keeps, record by record: the offset (base of the run + position), the CreateTime timestamp,
key, value and headers — everything a consumer reads. What it drops: the producer id, epoch and sequence (they
matter to the broker's duplicate check on produce, never to a reader) and the source batches' compression
boundaries. Batches that a reader would see differently once merged are never merged: transactional and control
batches (read_committed hides aborted ones by producer id), LogAppendTime batches (their records carry the
batch's time), magic < 2, and runs with a gap in their offsets. ``merge_batches`` decodes its own output and
compares every record with the sources before returning it, so a bug here fails loudly instead of rewriting
history.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

#: Kafka v2 batch header: baseOffset(8) batchLength(4) partitionLeaderEpoch(4) magic(1) crc(4) attributes(2)
#: lastOffsetDelta(4) baseTimestamp(8) maxTimestamp(8) producerId(8) producerEpoch(2) baseSequence(4) count(4)
HEADER_BYTES = 61
_MAGIC_AT = 16
_ATTRIBUTES_AT = 21
_LAST_OFFSET_DELTA_AT = 23
_COUNT_AT = 57
_CODEC_MASK = 0x07
_TIMESTAMP_TYPE_MASK = 0x08
_TRANSACTIONAL_MASK = 0x10
_CONTROL_MASK = 0x20


class MergeMismatch(RuntimeError):
    """The merged batch does not read back as its sources: nothing may be replaced."""


@dataclass(frozen=True, slots=True)
class BatchHead:
    """What the store needs to know of a batch object without decoding its records."""

    record_count: int
    offset_span: int  # lastOffsetDelta + 1: the offsets the batch occupies
    codec: int
    mergeable: bool

    @classmethod
    def of(cls, data: bytes, *, size: int | None = None) -> BatchHead | None:
        """None for bytes that are not a whole v2 batch (then the object is left alone). ``size``: ``data`` is only
        the head of an object of that many bytes."""
        if len(data) < HEADER_BYTES:
            return None
        length = int.from_bytes(data[8:12], "big", signed=True)
        if length + 12 != (len(data) if size is None else size):
            return None
        magic = data[_MAGIC_AT]
        attributes = int.from_bytes(data[_ATTRIBUTES_AT:_ATTRIBUTES_AT + 2], "big")
        last_delta = int.from_bytes(data[_LAST_OFFSET_DELTA_AT:_LAST_OFFSET_DELTA_AT + 4], "big", signed=True)
        count = int.from_bytes(data[_COUNT_AT:_COUNT_AT + 4], "big", signed=True)
        mergeable = (magic == 2 and count > 0 and last_delta + 1 == count
                     and not attributes & (_TIMESTAMP_TYPE_MASK | _TRANSACTIONAL_MASK | _CONTROL_MASK))
        return cls(record_count=count, offset_span=last_delta + 1, codec=attributes & _CODEC_MASK,
                   mergeable=mergeable)


Record = tuple[int, int, bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...]]


def records_of(data: bytes, base_offset: int) -> list[Record]:
    """(offset, timestamp, key, value, headers) of every record of one stored batch, offsets made absolute."""
    batch = DefaultRecordBatch(bytearray(data))
    out: list[Record] = []
    for r in batch:
        out.append((base_offset + r.offset, r.timestamp, _bytes(r.key), _bytes(r.value),
                    tuple((k, _bytes(v)) for k, v in r.headers)))
    return out


def merge_batches(sources: list[tuple[int, bytes]]) -> bytes:
    """One batch holding every record of ``sources`` ((base offset, batch bytes), consecutive, in offset order),
    to be stored under the first base offset. Compressed with the sources' codec when they share one, else none.
    Raises ValueError for sources that may not be merged and MergeMismatch if the result does not read back."""
    if len(sources) < 2:
        raise ValueError("a merge needs at least two batches")
    heads = [BatchHead.of(data) for _, data in sources]
    expected = sources[0][0]
    for (base, _), head in zip(sources, heads, strict=True):
        if head is None or not head.mergeable:
            raise ValueError(f"the batch at offset {base} may not be merged")
        if base != expected:
            raise ValueError(f"offsets are not consecutive at {base} (expected {expected})")
        expected = base + head.offset_span
    codecs = {h.codec for h in heads if h is not None}
    codec = codecs.pop() if len(codecs) == 1 else 0
    first = sources[0][0]
    records = [r for base, data in sources for r in records_of(data, base)]
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=2**31 - 1)
    for offset, timestamp, key, value, headers in records:
        if builder.append(offset - first, timestamp=timestamp, key=key, value=value, headers=list(headers)) is None:
            raise MergeMismatch("the batch builder refused a record")
    merged = bytes(builder.build())
    if records_of(merged, first) != records:
        raise MergeMismatch(f"the merged batch at offset {first} does not read back as its {len(sources)} sources")
    return merged


def _bytes(value: bytes | bytearray | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)
