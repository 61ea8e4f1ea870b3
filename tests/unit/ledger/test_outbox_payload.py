"""The outbox payload written on the checkpoint path and the hot debit path (``writer.transaction_event_json``)
is exactly what the TransactionPosted model dumps: readers (the analytics sink, any consumer of
ledger.transactions.v1) parse it with that model, so one byte of drift would be a contract change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.contracts import TransactionKind, TransactionPosted
from ledger.postings import Allocation, Posting
from ledger.rows import AllocationRow
from ledger.writer import Draft, transaction_event, transaction_event_json, transaction_row

_text = st.text(max_size=12)
_maybe_text = st.none() | _text
_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                      timezones=st.sampled_from([UTC, timezone(timedelta(0)), timezone(timedelta(hours=2))]))
_amounts = st.integers(min_value=-(10**15), max_value=10**15)


@st.composite
def _posted(draw: st.DrawFn) -> tuple[Draft, int, datetime, dict[tuple[str, int], str]]:
    before = draw(_amounts)
    parts = draw(st.lists(st.tuples(st.none() | st.integers(1, 50), _amounts), max_size=4))
    amount = sum(a for _, a in parts)
    posting = Posting(amount, before, before + amount, tuple(Allocation(b, a) for b, a in parts),
                      debt_settled_minor=draw(st.integers(0, 10**12)))
    wallet = draw(_text)
    draft = Draft(wallet_id=wallet, project_id=draw(_text), kind=draw(st.sampled_from(list(TransactionKind))),
                  posting=posting, idempotency_key=draw(_text), source_ref=draw(_maybe_text),
                  related_transaction_id=draw(st.none() | st.integers(1, 2**62)), meter_id=draw(_maybe_text),
                  period_start=draw(st.none() | _times), price_version_id=draw(_maybe_text),
                  reason=draw(_maybe_text), metadata=draw(st.none() | st.dictionaries(_text, _text, max_size=2)))
    sources = {(wallet, b): draw(st.sampled_from(["top_up", "promo", "refund", ""]))
               for b, _ in parts if b is not None}
    return draft, draw(st.integers(1, 2**62)), draw(_times), sources


@settings(max_examples=300, deadline=None)
@given(_posted())
def test_the_payload_is_the_models_json_byte_for_byte(posted: tuple[Draft, int, datetime, dict[tuple[str, int], str]]) -> None:
    draft, tx_id, now, sources = posted
    row = transaction_row(draft, tx_id, now, {}, sources)
    payload = transaction_event_json(row, draft)
    assert payload == transaction_event(row, draft).model_dump_json()
    assert TransactionPosted.model_validate_json(payload) == transaction_event(row, draft)


def test_the_first_credited_bucket_names_the_source() -> None:
    posting = Posting(30, -10, 20, (Allocation(None, 10), Allocation(7, 20)), debt_settled_minor=10)
    draft = Draft(wallet_id="w", project_id="p", kind=TransactionKind.REFUND, posting=posting, idempotency_key="k")
    row = transaction_row(draft, 5, datetime(2026, 12, 6, tzinfo=UTC), {}, {("w", 7): "refund"})
    assert row.allocations == (AllocationRow(None, 10, None), AllocationRow(7, 20, "refund"))
    event = TransactionPosted.model_validate_json(transaction_event_json(row, draft))
    assert (event.bucket_source, event.debt_settled_minor, event.created_at) == (
        "refund", 10, datetime(2026, 12, 6, tzinfo=UTC))
