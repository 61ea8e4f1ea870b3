"""Helpers for the payments tests: the webhook fixtures (tests/fixtures/webhooks, byte-for-byte copies of the
provider samples) and their secrets, signing as each provider does, a project with provider secrets and
offers, sending a webhook, reading balances/transactions, and a fake of Stripe's HTTP API on 127.0.0.1 (the one
fake DESIGN §4 allows)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from httpx import Response
from tenancy_testkit import UserSession, create_project, money, signup, sql

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "webhooks"
VECTORS: dict[str, Any] = json.loads((FIXTURES / "signature-test-vectors.json").read_text())
STRIPE_SECRET = VECTORS["stripe"]["endpoint_secret"]
LS_SECRET = VECTORS["lemonsqueezy"]["signing_secret"]
RC_AUTHORIZATION = VECTORS["revenuecat"]["authorization_header_value"]
SECRETS = {"stripe": STRIPE_SECRET, "lemonsqueezy": LS_SECRET, "revenuecat": RC_AUTHORIZATION}


def fixture(name: str) -> bytes:
    """The exact bytes of a fixture file, e.g. ``fixture("stripe/invoice.paid.json")``."""
    return (FIXTURES / name).read_bytes()


def stripe_signature(body: bytes, secret: str = STRIPE_SECRET, t: int | None = None) -> str:
    """``Stripe-Signature`` as Stripe computes it: v1 = hex HMAC-SHA256(secret, f"{t}.{body}")."""
    t = int(time.time()) if t is None else t
    v1 = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={v1}"


def ls_signature(body: bytes, secret: str = LS_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def headers_for(provider: str, body: bytes, name: str | None = None) -> dict[str, str]:
    """Valid headers: Stripe re-signed with a FRESH timestamp (the vectors' t is beyond the 300 s tolerance),
    Lemon Squeezy with the vector's X-Signature when the body is the fixture's, RevenueCat's Authorization."""
    if provider == "stripe":
        return {"Stripe-Signature": stripe_signature(body), "Content-Type": "application/json"}
    if provider == "lemonsqueezy":
        vector = VECTORS["lemonsqueezy"]["vectors"].get(name or "")
        signature = vector["X-Signature"] if vector and fixture(name or "") == body else ls_signature(body)
        event = json.loads(body)["meta"]["event_name"]
        return {"X-Signature": signature, "X-Event-Name": event, "Content-Type": "application/json"}
    return {"Authorization": RC_AUTHORIZATION, "Content-Type": "application/json"}


def send(client: TestClient, project_id: str, provider: str, name_or_body: str | bytes,
         headers: dict[str, str] | None = None) -> Response:
    """POST a fixture (by name) or a body to the provider's webhook endpoint of the project."""
    if isinstance(name_or_body, str):
        body, name = fixture(name_or_body), name_or_body
    else:
        body, name = name_or_body, None
    return client.post(f"/api/v1/webhooks/{provider}/{project_id}", content=body,
                       headers=headers if headers is not None else headers_for(provider, body, name))


def handled(r: Response, status: str) -> dict[str, Any]:
    """A webhook answer: 200 with the outcome ``status`` (credited, duplicate, ignored, ...); its body."""
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == status, body
    return body


def rc_body(name: str, **event_overrides: Any) -> bytes:
    """A RevenueCat fixture with some event fields replaced (the upstream samples share event ids)."""
    payload = json.loads(fixture(name))
    payload["event"].update(event_overrides)
    return json.dumps(payload, indent=4).encode()


def stripe_invoice(event_id: str, invoice_id: str, start: int, end: int, *, payment_intent: str | None = None,
                   event_type: str = "invoice.paid") -> bytes:
    """The invoice.paid fixture for another invoice / period; ``payment_intent``: include ``invoice.payments``
    (the includable list of InvoicePayments, as an expanded delivery carries it)."""
    event = json.loads(fixture("stripe/invoice.paid.json"))
    event["id"], event["type"] = event_id, event_type
    invoice = event["data"]["object"]
    invoice["id"] = invoice_id
    for line in invoice["lines"]["data"]:
        line["period"] = {"start": start, "end": end}
        line["invoice"] = invoice_id
    if payment_intent:
        invoice["payments"] = {"object": "list", "has_more": False, "url": f"/v1/invoice_payments?invoice={invoice_id}",
                               "data": [{"id": f"inpay_{invoice_id[3:]}", "object": "invoice_payment",
                                         "amount_paid": invoice["amount_paid"], "amount_requested": invoice["amount_due"],
                                         "currency": "usd", "invoice": invoice_id, "is_default": True,
                                         "livemode": False, "created": start, "status": "paid",
                                         "payment": {"type": "payment_intent", "payment_intent": payment_intent},
                                         "status_transitions": {"canceled_at": None, "paid_at": start}}]}
    return json.dumps(event, indent=2).encode()


@dataclass
class Shop:
    client: TestClient
    owner: UserSession
    project_id: str

    @property
    def base(self) -> str:
        return f"/api/v1/projects/{self.project_id}"

    def offer(self, kind: str, **body: Any) -> dict[str, Any]:
        r = self.client.post(f"{self.base}/{'credit-packs' if kind == 'pack' else 'plans'}", json=body,
                             headers=self.owner.headers)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def wallet_of(self, subject: str) -> str | None:
        r = self.client.get(f"{self.base}/wallets", params={"owner_kind": "subject", "owner_ref": subject},
                            headers=self.owner.headers)
        assert r.status_code == 200, r.text
        rows = r.json()["items"]
        return rows[0]["id"] if rows else None

    def balance(self, wallet_id: str | None) -> int:
        if wallet_id is None:
            return 0
        r = self.client.get(f"{self.base}/wallets/{wallet_id}", headers=self.owner.headers)
        assert r.status_code == 200, r.text
        return int(r.json()["balance"]["balance_minor"])

    def transactions(self, wallet_id: str | None) -> list[dict[str, Any]]:
        if wallet_id is None:
            return []
        r = self.client.get(f"{self.base}/wallets/{wallet_id}/transactions", params={"limit": 200},
                            headers=self.owner.headers)
        assert r.status_code == 200, r.text
        return list(reversed(r.json()["items"]))

    def last_allocations(self, wallet_id: str | None) -> dict[str | None, int]:
        """bucket source -> amount the wallet's newest transaction took from (or gave to) its buckets of that source;
        None = debt. (GET transactions lists allocations in the order they were burned.)"""
        *_, last = self.transactions(wallet_id)
        out: dict[str | None, int] = {}
        for a in last["allocations"]:
            out[a["bucket_source"]] = out.get(a["bucket_source"], 0) + a["amount_minor"]
        return out

    def entitlements(self, wallet_id: str | None = None) -> list[dict[str, Any]]:
        params = {"wallet_id": wallet_id} if wallet_id else {}
        r = self.client.get(f"{self.base}/entitlements", params=params, headers=self.owner.headers)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def events(self, **params: Any) -> list[dict[str, Any]]:
        r = self.client.get(f"{self.base}/webhook-events", params={"limit": 200, **params},
                            headers=self.owner.headers)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def grant(self, wallet_id: str, amount: int, **body: Any) -> None:
        """An admin grant; ``body``: kind, source, priority, expires_at (ISO string), ..."""
        r = money(self.client, f"{self.base}/wallets/{wallet_id}/grants", {"amount_minor": amount, **body},
                  self.owner.headers)
        assert r.status_code == 201, r.text

    def buckets(self, wallet_id: str | None) -> dict[str, int]:
        """source -> remaining of every bucket of the wallet, empty ones too (one bucket per source expected)."""
        if wallet_id is None:
            return {}
        r = self.client.get(f"{self.base}/wallets/{wallet_id}/buckets", params={"include_empty": True},
                            headers=self.owner.headers)
        assert r.status_code == 200, r.text
        found = {b["source"]: int(b["remaining_minor"]) for b in r.json()}
        assert len(found) == len(r.json()), r.json()
        return found

    def debit(self, wallet_id: str, amount: int) -> None:
        r = money(self.client, f"{self.base}/wallets/{wallet_id}/debit", {"amount_minor": amount}, self.owner.headers)
        assert r.status_code in (200, 201), r.text


def shop(client: TestClient, owner: UserSession | None = None, *, secrets: dict[str, str] | None = None) -> Shop:
    """A new project whose provider webhook secrets are the fixtures' (or ``secrets``)."""
    owner = owner or signup(client, "merchant")
    project_id = create_project(client, owner, "Shop")
    for provider, secret in (SECRETS if secrets is None else secrets).items():
        r = client.put(f"/api/v1/projects/{project_id}/payment-providers/{provider}",
                       json={"webhook_secret": secret}, headers=owner.headers)
        assert r.status_code == 200, r.text
        assert secret not in r.text
    return Shop(client, owner, project_id)


def ledger_rows(database_url: str, project_id: str) -> list[tuple[Any, ...]]:
    """Every transaction of the project as (wallet, kind, amount, source_ref), in order — to compare states."""
    return sql(database_url, """SELECT wallet_id, kind, amount_minor, coalesce(source_ref, '') FROM transactions
                               WHERE project_id = %s ORDER BY kind, amount_minor, source_ref""", project_id)


# ------------------------------------------------------------------------------------------- fake Stripe


@dataclass
class FakeStripe:
    """Stripe's HTTP API for POST /v1/checkout/sessions, on 127.0.0.1: records every request (headers and the
    form-decoded body) and, like Stripe, answers a repeated Idempotency-Key with the first response (or 400
    idempotency_error when the parameters differ)."""

    base_url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    _by_key: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any]]:
        form = dict(urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True))
        self.requests.append({"method": method, "path": path, "headers": headers, "form": form})
        if method != "POST" or path != "/v1/checkout/sessions":
            return 404, {"error": {"type": "invalid_request_error", "message": f"no fake for {method} {path}"}}
        key = headers.get("idempotency-key", "")
        if key in self._by_key:
            stored_raw, response = self._by_key[key]
            if stored_raw != raw.decode():
                return 400, {"error": {"type": "idempotency_error",
                                       "message": "Keys for idempotent requests can only be used with the same "
                                                  "parameters they were first used with."}}
            return 200, response
        session_id = f"cs_test_fake{next(self._ids):04d}"
        metadata = {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")}
        response = {"id": session_id, "object": "checkout.session", "mode": form.get("mode"),
                    "url": f"https://checkout.stripe.test/c/pay/{session_id}", "status": "open",
                    "payment_status": "unpaid", "client_reference_id": form.get("client_reference_id"),
                    "metadata": metadata, "livemode": False}
        self._by_key[key] = (raw.decode(), response)
        return 200, response


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler], name: str) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 for a provider fake; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def fake_stripe() -> Iterator[FakeStripe]:
    fake = FakeStripe()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body = fake.handle(self.command, self.path.split("?")[0],
                                       {k.lower(): v for k, v in self.headers.items()}, raw)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Request-Id", f"req_fake_{len(fake.requests)}")
            self.end_headers()
            self.wfile.write(data)

        do_POST = _serve
        do_GET = _serve

        def log_message(self, *args: Any) -> None:
            pass

    with _serving(Handler, "fake-stripe") as fake.base_url:
        yield fake


# ------------------------------------------------------------------ fake RevenueCat and Lemon Squeezy APIs


@dataclass
class Scripted:
    """Answers the next requests get instead of the real one: (status, headers, raw body), in order."""

    queue: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)

    def fail(self, status: int, body: bytes = b'{"message": "boom"}', times: int = 1, **headers: str) -> None:
        self.queue.extend([(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)] * times)


@dataclass
class FakeRevenueCat:
    """RevenueCat REST API v1 ``GET /v1/subscribers/{app_user_id}`` (Customer Info: ``request_date(_ms)``,
    ``subscriber.{subscriptions, non_subscriptions, entitlements, …}``) on 127.0.0.1; Bearer auth checked."""

    api_key: str = "sk_test_revenuecat_fake"
    base_url: str = ""
    subscribers: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    scripted: Scripted = field(default_factory=Scripted)

    def subscriber(self, app_user_id: str) -> dict[str, Any]:
        return self.subscribers.setdefault(app_user_id, {
            "entitlements": {}, "first_seen": "2026-01-01T00:00:00Z", "last_seen": "2026-01-01T00:00:00Z",
            "management_url": None, "non_subscriptions": {}, "original_app_user_id": app_user_id,
            "original_application_version": None, "original_purchase_date": None, "other_purchases": {},
            "subscriptions": {}, "subscriber_attributes": {}})

    def handle(self, path: str, query: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        self.requests.append(path)
        if self.scripted.queue:
            return self.scripted.queue.pop(0)
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {}, b'{"code": 7225, "message": "Invalid API Key."}'
        prefix = "/v1/subscribers/"
        if not path.startswith(prefix):
            return 404, {}, b'{"code": 7259, "message": "not found"}'
        user = urllib.parse.unquote(path[len(prefix):])
        now = time.time()
        body = {"request_date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "request_date_ms": int(now * 1000), "subscriber": self.subscriber(user)}
        return 200, {}, json.dumps(body).encode()


@dataclass
class FakeLemonSqueezy:
    """Lemon Squeezy API (JSON:API) ``GET /v1/orders``, ``/v1/subscriptions``, ``/v1/subscription-invoices`` with
    ``filter[store_id]``, newest first, paged like the real one (``page[number]``; ``meta.page`` with
    currentPage / lastPage, ``links.first/last/next``) — ``page_size`` per page whatever is asked, to page early."""

    api_key: str = "ls_test_api_key_fake"
    base_url: str = ""
    page_size: int = 2
    resources: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"orders": [], "subscriptions": [], "subscription-invoices": []})
    requests: list[str] = field(default_factory=list)
    scripted: Scripted = field(default_factory=Scripted)

    def handle(self, path: str, query: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        self.requests.append(f"{path}?{urllib.parse.urlencode(query)}")
        if self.scripted.queue:
            return self.scripted.queue.pop(0)
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {}, b'{"errors": [{"status": "401", "title": "Unauthenticated"}]}'
        kind = path.removeprefix("/v1/")
        if kind not in self.resources:
            return 404, {}, b'{"errors": [{"status": "404", "title": "Not Found"}]}'
        store = query.get("filter[store_id]")
        rows = [r for r in self.resources[kind] if store is None or str(r["attributes"]["store_id"]) == store]
        rows.sort(key=lambda r: r["attributes"]["created_at"], reverse=True)
        number = int(query.get("page[number]", "1"))
        last = max(1, -(-len(rows) // self.page_size))
        page = rows[(number - 1) * self.page_size: number * self.page_size]

        def link(n: int) -> str:
            return f"{self.base_url}{path}?page%5Bnumber%5D={n}&page%5Bsize%5D={self.page_size}&sort=-createdAt"
        body = {"meta": {"page": {"currentPage": number, "from": (number - 1) * self.page_size + 1,
                                  "lastPage": last, "perPage": self.page_size,
                                  "to": (number - 1) * self.page_size + len(page), "total": len(rows)}},
                "jsonapi": {"version": "1.0"},
                "links": {"first": link(1), "last": link(last), **({"next": link(number + 1)} if number < last else {})},
                "data": page}
        return 200, {}, json.dumps(body).encode()


@contextmanager
def fake_provider_api(fake: FakeRevenueCat | FakeLemonSqueezy) -> Iterator[Any]:
    """Serve ``fake.handle`` over HTTP on 127.0.0.1 (GET only), as the Stripe fake does."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            status, headers, data = fake.handle(url.path, dict(urllib.parse.parse_qsl(url.query)),
                                                {k.lower(): v for k, v in self.headers.items()})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    with _serving(Handler, "fake-provider") as fake.base_url:
        yield fake
