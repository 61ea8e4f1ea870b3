"""`meterline entitlements grant|end`: give a wallet a plan without a payment provider, from the shell.

For local testing (try ``requires_entitlement``) on a stack whose database you reach (``DATABASE_URL`` or the
running local stack). Same rules as the admin API route (api/payments/manual.py): a reference grants once, the
plan's credits optionally, audited — here as the ``system`` actor with ``"via": "cli"`` in the entry, since the
shell has no signed-in user."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from meterline.cli_catalog import ProjectOpt, _conn, _emit

console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, help="Plans granted by an admin (no payment provider).")


def _out(entitlement: Any, **extra: Any) -> dict[str, Any]:
    return {"id": entitlement.id, "wallet_id": entitlement.wallet_id, "provider": entitlement.provider,
            "reference": entitlement.external_subscription_id, "status": entitlement.status,
            "current_period_end": entitlement.current_period_end, **extra}


@app.command("grant")
def grant(project: ProjectOpt, wallet: Annotated[str, typer.Argument(help="wallet id")],
          plan: Annotated[str, typer.Option(help="a plan's slug")],
          reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
          reference: Annotated[str | None, typer.Option(help="your reference; the same one grants once")] = None,
          until: Annotated[datetime | None, typer.Option(help="period end, UTC (default: until ended)")] = None,
          credits: Annotated[bool, typer.Option(help="also grant the plan's credits once")] = False) -> None:
    """Grant PLAN to WALLET (audited)."""
    from datetime import UTC

    from api.errors import ApiError
    from api.payments import manual
    from api.tenancy.audit import record_audit
    from ledger import queries

    period_end = until.replace(tzinfo=UTC) if until is not None and until.tzinfo is None else until
    with _conn() as conn:
        found = queries.get_wallet(conn, wallet)
        if found is None or found.project_id != project:
            console.print(f"[bold red]error:[/] no wallet {wallet} in project {project}")
            raise typer.Exit(1)
        try:
            entitlement, created, transaction_id = manual.grant(
                conn, project_id=project, wallet_id=wallet, plan=plan, reference=reference, period_end=period_end,
                grant_credits=credits, reason=reason)
        except ApiError as exc:
            console.print(f"[bold red]error ({exc.code}):[/] {exc.detail}")
            raise typer.Exit(1) from None
        if created:
            record_audit(conn, project_id=project, principal=None, action="entitlement.grant",
                         target_kind="entitlement", target_id=entitlement.id,
                         after={"wallet_id": wallet, "plan": plan, "reference": entitlement.external_subscription_id,
                                "period_end": period_end.isoformat() if period_end else None,
                                "credits_transaction_id": transaction_id, "reason": reason, "via": "cli"})
    _emit(_out(entitlement, created=created, credits_transaction_id=transaction_id))


@app.command("end")
def end(project: ProjectOpt, wallet: Annotated[str, typer.Argument(help="wallet id")],
        entitlement: Annotated[str, typer.Argument(help="entitlement id (ent_...)")],
        reason: Annotated[str, typer.Option(help="why (kept in the audit log)")]) -> None:
    """End a plan granted by an admin (audited)."""
    from api.errors import ApiError
    from api.payments import manual
    from api.tenancy.audit import record_audit

    with _conn() as conn:
        try:
            before, after = manual.end(conn, project_id=project, wallet_id=wallet, entitlement_id=entitlement)
        except ApiError as exc:
            console.print(f"[bold red]error ({exc.code}):[/] {exc.detail}")
            raise typer.Exit(1) from None
        record_audit(conn, project_id=project, principal=None, action="entitlement.end", target_kind="entitlement",
                     target_id=entitlement, before={k: str(v) if v is not None else None for k, v in before.items()},
                     after={"status": after.status, "reason": reason, "via": "cli"})
    _emit(_out(after))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="entitlements")
