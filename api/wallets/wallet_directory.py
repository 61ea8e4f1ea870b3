"""Who a wallet is for: the wallet list with its owner (a member's email, a subject) and a free-text search.

A wallet the ledger auto-provisioned from usage knows only its id (``owner_ref = id``): the id is
``uuid5(project, subject)`` (streams.catalog_model.auto_wallet_id), which cannot be reversed. Its subject is
found, in order, from
  1. a subject key mapping a subject to the wallet (PostgreSQL), else
  2. the subjects that sent usage to the project (ClickHouse, when this process can query it): each subject's
     deterministic wallet id is computed and matched. This is bounded (``SUBJECTS_SCANNED_MAX``) and best
     effort — with analytics unavailable the subject stays None and the wallet is still listed.
Search uses the same two sources, so searching "ada" finds the auto-provisioned wallet of subject "ada"."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import Request
from sqlalchemy import Connection, text

from analytics.queries import Analytics, Query
from api.pagination import decode_cursor, encode_cursor
from ledger.rows import WalletRow
from streams.catalog_model import auto_wallet_id

log = structlog.get_logger("api.wallets")

#: At most this many distinct subjects are read from analytics per request (a dashboard page, not a report).
SUBJECTS_SCANNED_MAX = 50_000

#: subjects of a project seen in usage, optionally only those containing ``q`` (case-insensitive)
SubjectSource = Callable[[str, str | None, int], list[str]]


@dataclass(frozen=True, slots=True)
class WalletEntry:
    wallet: WalletRow
    owner_email: str | None
    subject: str | None
    auto_provisioned: bool


def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%"


_COLUMNS = """
    w.*, u.email AS owner_email,
    (SELECT min(sk.subject) FROM subject_keys sk
      WHERE sk.project_id = w.project_id AND sk.wallet_id = w.id) AS keyed_subject"""
_FILTERS = """
      w.project_id = :p
      AND (CAST(:kind AS text) IS NULL OR w.owner_kind = :kind)
      AND (CAST(:ref AS text) IS NULL OR w.owner_ref = :ref)
      AND (CAST(:ac AS timestamptz) IS NULL OR (w.created_at, w.id) > (CAST(:ac AS timestamptz), :ai))"""

_PAGE = text(f"""
    SELECT {_COLUMNS}
    FROM wallets w LEFT JOIN users u ON w.owner_kind = 'user' AND u.id = w.owner_ref
    WHERE {_FILTERS}
    ORDER BY w.created_at, w.id LIMIT :limit
""")

# A search runs in two steps so no plan can multiply wallets by matches: (1) the ids that match, each branch a
# scan of one table (or members joined to their users); (2) the page, looked up by primary key (id = ANY) from
# those ids. One statement with the matches as a subquery, a CTE or a joined unnest() was planned as a nested loop
# (fresh statistics, or psycopg's prepared generic plan): 2-27 s for 10,000 wallets × 5,000 subject keys.
_MATCHES = text("""
    SELECT id FROM wallets WHERE project_id = :p AND (id ILIKE :q OR owner_ref ILIKE :q)
    UNION
    SELECT w.id FROM wallets w JOIN users u ON u.id = w.owner_ref
    WHERE w.project_id = :p AND w.owner_kind = 'user' AND u.email ILIKE :q
    UNION
    SELECT wallet_id FROM subject_keys WHERE project_id = :p AND subject ILIKE :q
    LIMIT :matches_max
""")

_SEARCH_PAGE = text(f"""
    SELECT {_COLUMNS}
    FROM wallets w LEFT JOIN users u ON w.owner_kind = 'user' AND u.id = w.owner_ref
    WHERE w.id = ANY(CAST(:ids AS text[])) AND {_FILTERS}
    ORDER BY w.created_at, w.id LIMIT :limit
""")

#: a search matching more wallets than this pages through the first ones found (say: refine the search)
MATCHES_MAX = 100_000


def list_wallets(conn: Connection, *, project_id: str, owner_kind: str | None = None, owner_ref: str | None = None,
                 q: str | None = None, cursor: str | None = None, limit: int,
                 subjects: SubjectSource | None = None) -> tuple[list[WalletEntry], str | None]:
    """The project's wallets, oldest first (keyset cursor), each with who it is for."""
    position = decode_cursor(cursor) or {}
    params: dict[str, Any] = {"p": project_id, "kind": owner_kind, "ref": owner_ref, "ac": position.get("c"),
                              "ai": position.get("i"), "limit": limit + 1}
    q = (q or "").strip() or None
    if q is None:
        rows = conn.execute(_PAGE, params).mappings().all()
    else:
        ids = set(conn.scalars(_MATCHES, {"p": project_id, "q": _like(q), "matches_max": MATCHES_MAX}))
        if subjects is not None:
            ids.update(auto_wallet_id(project_id, s) for s in subjects(project_id, q, SUBJECTS_SCANNED_MAX))
        rows = conn.execute(_SEARCH_PAGE, {**params, "ids": sorted(ids)}).mappings().all() if ids else []
    page = rows[:limit]
    unresolved = [r["id"] for r in page if _is_auto(r) and r["keyed_subject"] is None]
    found = resolve_subjects(project_id, unresolved, subjects) if unresolved else {}
    entries = [WalletEntry(wallet=WalletRow.from_mapping(r), owner_email=r["owner_email"],
                           subject=_subject_of(r, found), auto_provisioned=_is_auto(r)) for r in page]
    next_cursor = None
    if len(rows) > limit and entries:
        last = entries[-1].wallet
        next_cursor = encode_cursor({"c": last.created_at.isoformat(), "i": last.id})
    return entries, next_cursor


def _is_auto(row: Any) -> bool:
    return bool(row["owner_kind"] == "subject" and row["owner_ref"] == row["id"])


def _subject_of(row: Any, found: dict[str, str]) -> str | None:
    if row["owner_kind"] != "subject":
        return None
    if not _is_auto(row):
        return str(row["owner_ref"])
    return row["keyed_subject"] or found.get(row["id"])


def resolve_subjects(project_id: str, wallet_ids: Iterable[str], subjects: SubjectSource | None) -> dict[str, str]:
    """wallet id -> subject for auto-provisioned wallets, from the subjects analytics has seen."""
    wanted = set(wallet_ids)
    if not wanted or subjects is None:
        return {}
    out: dict[str, str] = {}
    for subject in subjects(project_id, None, SUBJECTS_SCANNED_MAX):
        wallet_id = auto_wallet_id(project_id, subject)
        if wallet_id in wanted:
            out[wallet_id] = subject
            if len(out) == len(wanted):
                break
    return out


def usage_subjects(request: Request) -> SubjectSource | None:
    """The subjects that sent usage to a project (optionally containing ``q``), from this process's analytics
    service (``app.state.analytics``, set up by the dashboard's analytics router), or None without one.

    A failing query answers no subjects: the wallet list must not fail because analytics does."""
    service: Analytics | None = getattr(request.app.state, "analytics", None)
    if service is None:
        return None

    def subjects(project_id: str, q: str | None, limit: int) -> list[str]:
        where = "project_id = {p:String}" + (" AND positionCaseInsensitiveUTF8(subject, {q:String}) > 0" if q else "")
        sql = f"SELECT DISTINCT subject FROM `{service.db}`.usage_events WHERE {where} LIMIT {{n:UInt32}}"
        try:
            return [str(r["subject"]) for r in service.rows(Query(sql, {"p": project_id, "q": q or "", "n": limit}))]
        except Exception as exc:  # best effort, see above
            log.warning("cannot read usage subjects", error=str(exc))
            return []

    return subjects
