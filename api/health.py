"""Liveness and readiness: the supervisor and `meterline status` read this.

``status`` is ``ok``, or ``degraded`` while the money pipeline needs an operator: a ledger lane is halted (a
checkpoint that cannot be applied or decoded; ledger/halts.py — it resumes by itself once the cause is fixed) or
the last scheduled invariant check found violations (ledger/invariant_check.py). The answer stays 200: the API
itself is up, and the supervisor must not restart it for the ledger's sake."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import EngineDep
from ledger import queries

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Health of the API, its database and the money pipeline")
def healthz(engine: EngineDep) -> dict[str, object]:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        halts = queries.partition_halts(conn)
        check = queries.latest_invariant_check(conn)
    ledger: dict[str, object] = {
        "halted_partitions": [
            {"scope": h.scope, "topic": h.topic, "partition": h.partition, "reason": h.reason, "error": h.error,
             "as_of_offset": h.as_of_offset, "pending_checkpoints": h.pending_checkpoints, "attempts": h.attempts,
             "halted_at": h.halted_at.isoformat(), "last_attempt_at": h.last_attempt_at.isoformat()}
            for h in halts],
        "invariant_check": None if check is None else {
            "checked_at": check.checked_at.isoformat(), "violation_count": check.violation_count,
            "violations": {name: v["count"] for name, v in check.violations.items()}},
    }
    degraded = bool(halts) or (check is not None and not check.ok)
    return {"status": "degraded" if degraded else "ok", "database": "ok", "ledger": ledger}
