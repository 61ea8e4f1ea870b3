"""Seeding a partition's dedupe store from the ledger without holding the horizon: the ledger's key sets are
streamed oldest first (``ledger.queries.dedupe_key_sets_in_horizon``) and each is decoded straight into an int64
array (``decode_key_set``) for ``DedupeStore.seed_chunk``. Pure apart from the query it is handed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

import numpy as np

from streams.dedupe_store import Int64s

__all__ = ["decode_key_set", "key_set_chunks"]

_HEADER_1D = 20  # ndim, has-nulls flag, element type oid, then one dimension's length and lower bound
_INT8_OID = 20


def decode_key_set(packed: bytes) -> Int64s:
    """A PostgreSQL binary ``bigint[]`` (``array_send``) → int64 array. An empty array has no dimension."""
    ndim, has_nulls, oid = np.frombuffer(packed, dtype=">i4", count=3)
    if ndim == 0:
        return np.empty(0, dtype=np.int64)
    if ndim != 1 or has_nulls or oid != _INT8_OID:
        raise ValueError(f"not a 1-D bigint[] without nulls (ndim {ndim}, nulls {has_nulls}, oid {oid})")
    count = int(np.frombuffer(packed, dtype=">i4", count=1, offset=12)[0])
    cells = np.frombuffer(packed, dtype=np.dtype([("len", ">i4"), ("value", ">i8")]), count=count,
                          offset=_HEADER_1D)
    if count and (cells["len"] != 8).any():
        raise ValueError("a bigint[] element is not 8 bytes")
    return cells["value"].astype(np.int64)


def key_set_chunks(rows: Iterable[tuple[datetime, bytes]]) -> Iterator[tuple[Int64s, datetime]]:
    for at, packed in rows:
        yield decode_key_set(packed), at
