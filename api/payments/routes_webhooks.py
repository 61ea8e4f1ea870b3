"""Payment provider webhooks: ``POST /api/v1/webhooks/{stripe|revenuecat|lemonsqueezy}/{project_id}``.

No user authentication: each delivery proves itself with the project's secret (api/payments/signatures.py).
Answers: 200 with ``{"status": processed | ignored | unmatched | deferred | duplicate, ...}`` (the provider must
not retry), 400 problem+json (``api.webhook_signature_invalid`` / ``api.webhook_malformed``) for a delivery that
is forged, unsigned, stale or not an event — nothing changes — and 500 for an unexpected failure (rolled back;
the provider's retry is applied normally). The pipeline is in api/payments/webhooks.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from starlette.concurrency import run_in_threadpool

from api.payments.webhooks import receive

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])
PROJECT = Path(min_length=1, max_length=200)


@router.post("/{provider}/{project_id}", summary="Receive a payment provider's webhook",
             responses={400: {"description": "forged, unsigned, stale or malformed: nothing changed"}})
async def webhook(provider: Literal["stripe", "revenuecat", "lemonsqueezy"], project_id: Annotated[str, PROJECT],
                  request: Request) -> dict[str, Any]:
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    outcome = await run_in_threadpool(receive, request.app.state.engine, request.app.state.settings,
                                      project_id=project_id, provider=provider, body=body, headers=headers)
    return outcome.body()
