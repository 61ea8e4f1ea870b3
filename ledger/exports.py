"""Finance exports: transactions, usage and balances over a time range, streamed as CSV or Parquet.

Read-only, constant memory: rows come from a server-side cursor ``batch`` at a time and are encoded chunk by
chunk (CSV lines; one Parquet row group per batch), so `meterline export` and the API download handle any range.
Run it in a REPEATABLE READ transaction and every file describes one instant of a live ledger.

- ``transactions``: every transaction created in [from, to), in id order, with its ``chain_hash`` (hex;
  ledger/chain.py) so an auditor can re-verify the file against published chain heads.
- ``usage``: every charged key (wallet, meter, period, price version) whose period starts in [from, to):
  merged units and what was charged for them (``usage_charges``), events counted over all partitions.
- ``balances``: per wallet, the roll-forward of [from, to): opening balance, credits, debits, closing balance
  and transaction count (closing = opening + credits + debits; all from the transactions themselves).

Money is int64 minor units, units are decimal strings (never floats), times are UTC."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Connection, text

__all__ = ["EXPORTS", "Column", "Export", "count_rows", "encode", "stream_rows"]

Kind = Literal["int", "text", "time", "units"]


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


@dataclass(frozen=True)
class Export:
    name: str
    columns: tuple[Column, ...]
    sql: str  # :since, :until, :project (NULL = every project); ordered
    count_sql: str


def _cols(spec: str) -> tuple[Column, ...]:
    return tuple(Column(*item.split(":")) for item in spec.split())  # type: ignore[arg-type]


_PROJECT = "(CAST(:project AS text) IS NULL OR {alias}project_id = :project)"

EXPORTS: dict[str, Export] = {
    "transactions": Export(
        "transactions",
        _cols("id:int project_id:text wallet_id:text kind:text amount_minor:int balance_before_minor:int "
              "balance_after_minor:int created_at:time idempotency_key:text source_ref:text "
              "related_transaction_id:int hold_id:text meter_id:text period_start:time price_version_id:text "
              "reason:text metadata:text chain_hash:text"),
        f"""SELECT id, project_id, wallet_id, kind, amount_minor, balance_before_minor, balance_after_minor, created_at,
                   idempotency_key, source_ref, related_transaction_id, hold_id, meter_id, period_start,
                   price_version_id, reason, metadata::text, encode(chain_hash, 'hex')
            FROM transactions WHERE created_at >= :since AND created_at < :until AND {_PROJECT.format(alias="")}
            ORDER BY id""",
        f"SELECT count(*) FROM transactions WHERE created_at >= :since AND created_at < :until "
        f"AND {_PROJECT.format(alias='')}"),
    "usage": Export(
        "usage",
        _cols("project_id:text wallet_id:text meter_id:text period_start:time price_version_id:text "
              "aggregation:text units:units events:int charged_minor:int updated_at:time"),
        f"""SELECT ch.project_id, ch.wallet_id, ch.meter_id, ch.period_start, ch.price_version_id, ch.aggregation,
                   ch.units, (SELECT coalesce(sum(c.events), 0) FROM usage_counters c
                              WHERE c.wallet_id = ch.wallet_id AND c.meter_id = ch.meter_id
                                AND c.period_start = ch.period_start AND c.price_version_id = ch.price_version_id),
                   ch.charged_minor, ch.updated_at
            FROM usage_charges ch
            WHERE ch.period_start >= :since AND ch.period_start < :until AND {_PROJECT.format(alias="ch.")}
            ORDER BY ch.project_id, ch.wallet_id, ch.meter_id, ch.period_start, ch.price_version_id""",
        f"SELECT count(*) FROM usage_charges ch WHERE ch.period_start >= :since AND ch.period_start < :until "
        f"AND {_PROJECT.format(alias='ch.')}"),
    "balances": Export(
        "balances",
        _cols("project_id:text wallet_id:text owner_kind:text owner_ref:text opening_minor:int credits_minor:int "
              "debits_minor:int closing_minor:int transactions:int"),
        f"""SELECT w.project_id, w.id, w.owner_kind, w.owner_ref,
                   coalesce(o.balance_after_minor, 0) AS opening,
                   coalesce(r.credits, 0), coalesce(r.debits, 0),
                   coalesce(o.balance_after_minor, 0) + coalesce(r.credits, 0) + coalesce(r.debits, 0),
                   coalesce(r.n, 0)
            FROM wallets w
            LEFT JOIN LATERAL (SELECT t.balance_after_minor FROM transactions t
                               WHERE t.wallet_id = w.id AND t.created_at < :since ORDER BY t.id DESC LIMIT 1) o ON true
            LEFT JOIN LATERAL (SELECT sum(t.amount_minor) FILTER (WHERE t.amount_minor > 0) AS credits,
                                      sum(t.amount_minor) FILTER (WHERE t.amount_minor < 0) AS debits, count(*) AS n
                               FROM transactions t
                               WHERE t.wallet_id = w.id AND t.created_at >= :since AND t.created_at < :until) r ON true
            WHERE w.created_at < :until AND {_PROJECT.format(alias="w.")}
            ORDER BY w.project_id, w.id""",
        f"SELECT count(*) FROM wallets w WHERE w.created_at < :until AND {_PROJECT.format(alias='w.')}"),
}


def _params(since: datetime, until: datetime, project_id: str | None) -> dict[str, Any]:
    return {"since": since, "until": until, "project": project_id}


def count_rows(conn: Connection, export: Export, *, since: datetime, until: datetime,
               project_id: str | None = None) -> int:
    return int(conn.execute(text(export.count_sql), _params(since, until, project_id)).scalar_one())


def stream_rows(conn: Connection, export: Export, *, since: datetime, until: datetime,
                project_id: str | None = None, batch: int = 10_000) -> Iterator[list[tuple[Any, ...]]]:
    """The export's rows, ``batch`` at a time (server-side cursor)."""
    result = conn.execution_options(stream_results=True, yield_per=batch).execute(
        text(export.sql), _params(since, until, project_id))
    for partition in result.partitions(batch):
        yield [tuple(row) for row in partition]


def encode(export: Export, batches: Iterable[list[tuple[Any, ...]]], fmt: Literal["csv", "parquet"],
           on_rows: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The file as byte chunks (one per batch, plus the Parquet footer)."""
    encoder = _csv if fmt == "csv" else _parquet
    for chunk, rows in encoder(export, batches):
        if on_rows is not None and rows:
            on_rows(rows)
        if chunk:
            yield chunk


def _text(value: Any, kind: Kind) -> str:
    if value is None:
        return ""
    if kind == "time":
        return str(value.astimezone(UTC).isoformat())
    if kind == "units":
        return format(Decimal(value), "f")
    return str(value)


def _csv(export: Export, batches: Iterable[list[tuple[Any, ...]]]) -> Iterator[tuple[bytes, int]]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.name for c in export.columns])
    kinds = [c.kind for c in export.columns]
    for rows in batches:
        writer.writerows([_text(v, k) for v, k in zip(row, kinds, strict=True)] for row in rows)
        yield buffer.getvalue().encode(), len(rows)
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue().encode(), 0  # the header of an empty export


class _Sink:
    """A write-only file for pyarrow that hands out what was written so far (streaming a Parquet file)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.position = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def drain(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def _parquet(export: Export, batches: Iterable[list[tuple[Any, ...]]]) -> Iterator[tuple[bytes, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"int": pa.int64(), "text": pa.string(), "time": pa.timestamp("us", tz="UTC"), "units": pa.string()}
    schema = pa.schema([pa.field(c.name, types[c.kind]) for c in export.columns])
    sink = _Sink()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression="zstd")
    for rows in batches:
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in export.columns]
        arrays = [pa.array([_text(v, "units") if v is not None else None for v in values], type=pa.string())
                  if c.kind == "units" else pa.array(values, type=types[c.kind])
                  for c, values in zip(export.columns, columns, strict=True)]
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        yield sink.drain(), len(rows)
    writer.close()
    yield sink.drain(), 0
