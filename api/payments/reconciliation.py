"""Receipts reconciliation: ask RevenueCat and Lemon Squeezy what was bought, and apply what no webhook brought.

A webhook can be lost for good (an endpoint down longer than the provider retries, a misconfigured secret, an
event type the dashboard did not subscribe). This job reads each configured provider's API for the project
(api/payments/reconcile_revenuecat.py, api/payments/reconcile_lemonsqueezy.py), rebuilds the webhook events that
are missing in the webhook's own shape, and applies them through the SAME path a delivery takes
(``webhooks.apply_reconciled``: the per-(project, provider) advisory lock, a settle-once ``webhook_events`` row
with ``origin = 'reconciliation'`` and an event id ``reconcile:…``, the registered handler, the wake-ups).

Exactly once, whichever comes first: a purchase is credited under the ledger key of its PAYMENT
(``pay:{project}:{provider}:{transaction | order:id | invoice:id}``) and one ``payments`` row — the rebuilt event
and the real webhook name the same payment, so the second of them finds it and posts nothing. Rebuilt event ids
are deterministic, so a second run applies nothing again; state changes move entitlements by provider time
like webhooks (an older event never overwrites a newer state; ``ended`` is final).

Provider failures (5xx, 429, bad JSON, network) are caught per request: reported in the run's report, nothing is
marked done, so the next run reads again — nothing is lost, nothing crashes. A 429 ends the provider's run
(the rest would be refused too). Every run stores a report (``payment_reconciliations``), served by
``GET /api/v1/projects/{id}/payments/reconciliation``; ``meterline payments reconcile`` and the scheduler's
``reconcile_receipts`` job run it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, text

from api.payments import reconcile_lemonsqueezy as lemonsqueezy
from api.payments import reconcile_revenuecat as revenuecat
from api.payments.config import get_config
from api.payments.provider_api import ProviderApi, ProviderApiError
from api.payments.reconcile_common import Rebuilt
from api.payments.reconcile_settings import ReconcileSettings
from api.payments.webhooks import apply_reconciled

log = logging.getLogger("meterline.api.payments.reconciliation")

PROVIDERS = ("revenuecat", "lemonsqueezy")
#: planning passes per customer / store: a purchase first, then the state change that needs its entitlement
PASSES_MAX = 3
#: ``progress(provider, done, total)``; total None when unknown
Progress = Callable[[str, int, int | None], None]


@dataclass
class Report:
    project_id: str
    provider: str
    trigger: str
    started_at: datetime
    checked: int = 0
    fixes: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    configured: bool = True
    id: int | None = None
    finished_at: datetime | None = None

    @property
    def fixed(self) -> int:
        return sum(1 for f in self.fixes if f["status"] == "processed")

    @property
    def status(self) -> str:
        if not self.configured:
            return "not_configured"
        return "errors" if self.errors else "fixed" if self.fixed else "clean"

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "project_id": self.project_id, "provider": self.provider, "trigger": self.trigger,
                "status": self.status, "checked": self.checked, "fixed": self.fixed, "fixes": self.fixes,
                "errors": self.errors, "notes": self.notes, "started_at": self.started_at,
                "finished_at": self.finished_at}


def configured_projects(conn: Connection, project_id: str | None = None) -> list[tuple[str, str]]:
    """(project, provider) pairs with an API key to reconcile with."""
    return [(r.project_id, r.provider) for r in conn.execute(text("""
        SELECT project_id, provider FROM payment_provider_configs
        WHERE provider IN ('revenuecat', 'lemonsqueezy') AND api_key IS NOT NULL
          AND (CAST(:p AS text) IS NULL OR project_id = :p)
        ORDER BY project_id, provider"""), {"p": project_id}).all()]


def _apply(engine: Engine, report: Report, rebuilt: Rebuilt) -> None:
    """One rebuilt event in its own transaction (like one delivery); an error rolls it back and is reported."""
    try:
        with engine.begin() as conn:
            outcome = apply_reconciled(conn, project_id=report.project_id, provider=report.provider,
                                       parsed=rebuilt.parsed, body=rebuilt.body)
    except Exception as exc:  # a handler bug must not stop the run; nothing of this event was kept
        log.exception("reconciled event %s failed", rebuilt.parsed.event_id)
        report.errors.append({"kind": "apply_failed", "event_id": rebuilt.parsed.event_id,
                              "detail": f"{type(exc).__name__}: {exc}"[:500]})
        return
    if outcome is None:
        return  # applied by a concurrent run
    report.fixes.append({"event_id": rebuilt.parsed.event_id, "event_type": rebuilt.parsed.event_type,
                         "what": rebuilt.what, "status": outcome.status, "detail": outcome.detail,
                         "webhook_event_id": outcome.webhook_event_id,
                         "transaction_ids": list(outcome.transaction_ids)})


def _converge(engine: Engine, report: Report, planner: Callable[[Connection], list[Rebuilt]]) -> None:
    seen: set[str] = set()
    for _ in range(PASSES_MAX):
        with engine.begin() as conn:
            todo = [r for r in planner(conn) if r.parsed.event_id not in seen]
        if not todo:
            return
        for rebuilt in todo:
            seen.add(rebuilt.parsed.event_id)
            _apply(engine, report, rebuilt)


def _revenuecat_planner(report: Report, app_user_id: str, info: dict[str, Any], now: datetime,
                        since: datetime) -> Callable[[Connection], list[Rebuilt]]:
    def planner(conn: Connection) -> list[Rebuilt]:
        return revenuecat.plan(conn, project_id=report.project_id, app_user_id=app_user_id, info=info, now=now,
                               since=since, notes=report.notes)
    return planner


def _reconcile_revenuecat(engine: Engine, settings: ReconcileSettings, report: Report, api: ProviderApi,
                          now: datetime, since: datetime, progress: Progress | None) -> None:
    with engine.begin() as conn:
        users, left_out = revenuecat.candidates(conn, project_id=report.project_id, since=since,
                                                limit=settings.payments_reconcile_subscribers_max)
    if left_out:
        report.notes.append(f"{left_out} more customers were not looked up (API_PAYMENTS_RECONCILE_SUBSCRIBERS_MAX)")
    for done, app_user_id in enumerate(users, start=1):
        try:
            info = api.get(f"/v1/subscribers/{_quote(app_user_id)}")
            _converge(engine, report, _revenuecat_planner(report, app_user_id, info, now, since))
            report.checked += 1
        except ProviderApiError as exc:
            report.errors.append({"app_user_id": app_user_id, **exc.report()})
            if exc.kind == "rate_limited":
                report.notes.append(f"rate limited: {len(users) - done} customers left for the next run")
                break
        finally:
            if progress is not None:
                progress(report.provider, done, len(users))


def _reconcile_lemonsqueezy(engine: Engine, settings: ReconcileSettings, report: Report, api: ProviderApi,
                            store_id: str, since: datetime, progress: Progress | None) -> None:
    lists = lemonsqueezy.read_store(api, store_id=store_id, since=since,
                                    pages_max=settings.payments_reconcile_pages_max, notes=report.notes,
                                    errors=report.errors)
    report.checked = sum(len(v) for v in lists.items.values())
    if progress is not None:
        progress(report.provider, 0, report.checked)
    _converge(engine, report, lambda conn: lemonsqueezy.plan(conn, project_id=report.project_id, lists=lists,
                                                             since=since))
    if progress is not None:
        progress(report.provider, report.checked, report.checked)


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def reconcile_provider(engine: Engine, settings: ReconcileSettings, *, project_id: str, provider: str,
                       trigger: str, now: datetime | None = None, progress: Progress | None = None) -> Report:
    """One run for one (project, provider); the report is stored and returned. Never raises for the provider."""
    now = now or datetime.now(UTC)
    since = now - timedelta(seconds=settings.payments_reconcile_lookback_s)
    report = Report(project_id=project_id, provider=provider, trigger=trigger, started_at=now)
    with engine.begin() as conn:
        cfg = get_config(conn, project_id=project_id, provider=provider)
    if cfg is None or not cfg.api_key:
        report.configured = False
        report.notes.append(f"no API key for {provider}: PUT /api/v1/projects/{project_id}/payment-providers/"
                            f"{provider} with api_key" + (" and store_id" if provider == "lemonsqueezy" else ""))
    elif provider == "lemonsqueezy" and not cfg.store_id:
        report.configured = False
        report.notes.append(f"no Lemon Squeezy store_id: PUT /api/v1/projects/{project_id}/payment-providers/"
                            "lemonsqueezy with store_id")
    else:
        if provider == "revenuecat":
            api = ProviderApi(settings.revenuecat_api_base, {"Authorization": f"Bearer {cfg.api_key}",
                                                             "Accept": "application/json"},
                              settings.payments_reconcile_timeout_s, settings.payments_reconcile_retry_after_max_s)
        else:
            api = ProviderApi(settings.lemonsqueezy_api_base, {"Authorization": f"Bearer {cfg.api_key}",
                                                               "Accept": "application/vnd.api+json"},
                              settings.payments_reconcile_timeout_s, settings.payments_reconcile_retry_after_max_s)
        try:
            if provider == "revenuecat":
                _reconcile_revenuecat(engine, settings, report, api, now, since, progress)
            else:
                assert cfg.store_id is not None
                _reconcile_lemonsqueezy(engine, settings, report, api, cfg.store_id, since, progress)
        finally:
            api.close()
        report.notes.append(f"{api.requests} requests to {provider}")
    with engine.begin() as conn:
        report.id, report.finished_at = store_report(conn, report)
    if report.errors:
        log.warning("payments reconciliation %s/%s: %d errors, %d fixed", project_id, provider, len(report.errors),
                    report.fixed)
    return report


def reconcile_all(engine: Engine, settings: ReconcileSettings, *, trigger: str, project_id: str | None = None,
                  providers: tuple[str, ...] = PROVIDERS, progress: Progress | None = None) -> list[Report]:
    """Every configured (project, provider), or one project's (its unconfigured providers reported as such)."""
    with engine.begin() as conn:
        pairs = configured_projects(conn, project_id)
    if project_id is not None:
        pairs = [(project_id, p) for p in providers]
    return [reconcile_provider(engine, settings, project_id=p, provider=v, trigger=trigger, progress=progress)
            for p, v in pairs if v in providers]


def store_report(conn: Connection, report: Report) -> tuple[int, datetime]:
    import json

    row = conn.execute(text("""
        INSERT INTO payment_reconciliations (project_id, provider, trigger, status, checked, fixed, fixes, errors,
                                             notes, started_at)
        VALUES (:p, :v, :t, :s, :c, :f, CAST(:fixes AS jsonb), CAST(:errors AS jsonb), CAST(:notes AS jsonb), :at)
        RETURNING id, finished_at"""), {
        "p": report.project_id, "v": report.provider, "t": report.trigger, "s": report.status, "c": report.checked,
        "f": report.fixed, "fixes": json.dumps(report.fixes, default=str), "errors": json.dumps(report.errors,
                                                                                                default=str),
        "notes": json.dumps(report.notes[:200]), "at": report.started_at}).one()
    return int(row.id), row.finished_at


def reports(conn: Connection, *, project_id: str, provider: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    rows = conn.execute(text("""
        SELECT id, project_id, provider, trigger, status, checked, fixed, fixes, errors, notes, started_at,
               finished_at
        FROM payment_reconciliations WHERE project_id = :p AND (CAST(:v AS text) IS NULL OR provider = :v)
        ORDER BY id DESC LIMIT :n"""), {"p": project_id, "v": provider, "n": limit}).mappings().all()
    return [dict(r) for r in rows]
