"""`meterline demo`: Meterline's main job, end to end, on the local stack.

Starts the stack in the background when none is running (and stops it again at the end unless --keep-running),
then, through the public HTTP API only — what a new user would do:

1. sign up and create a project, an API key (ingest + read) and a meter with a graduated price;
2. create the wallet of one customer (a *subject*) and grant it credits;
3. send usage events with the Python SDK, then resend some of them (same ids: the pipeline dedupes them);
4. wait until the ledger has applied every event and check the balance against the price computed here,
   independently, from the events that were sent — exact to the minor unit, or the demo fails — and until
   ClickHouse holds every distinct event (the analytics the dashboard shows);
5. charge a synchronous debit twice with one Idempotency-Key (charged once).

The scenario (events, price, expected charge) is built by the pure ``plan_demo``; the rest is I/O."""

from __future__ import annotations

import functools
import random
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
out = Console()

#: The demo's price: the first 1,000 tokens of a month are free, then 0.05 credits each for the next 100,000
#: tokens and 0.02 beyond (fractions of a credit accumulate; the ledger charges the floor of the total).
DEMO_PRICE_MODEL: dict[str, Any] = {
    "model": "graduated", "free_units": "1000",
    "tiers": [{"up_to": "100000", "unit_price_minor": "0.05"}, {"unit_price_minor": "0.02"}],
}
DEMO_SUBJECT = "acme-app"
DEMO_EVENT_TYPE = "llm.tokens"
DEMO_METER = "tokens"


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo sends and what the ledger must end up with."""

    grant_minor: int
    events: list[dict[str, Any]]
    resent: list[dict[str, Any]]  # a prefix of ``events``, sent again with the same ids
    units: int
    expected_charge_minor: int
    debit_minor: int

    @property
    def expected_balance_minor(self) -> int:
        return self.grant_minor - self.expected_charge_minor - self.debit_minor


def plan_demo(*, events: int, seed: int, grant_minor: int = 50_000, debit_minor: int = 250) -> DemoPlan:
    """The demo scenario: ``events`` token-usage events of one subject, priced by DEMO_PRICE_MODEL."""
    from ledger.contracts import PriceModel
    from ledger.pricing import price_minor
    from meterline.client import usage_event

    rng = random.Random(seed)
    models = ("small", "large")
    sent = [usage_event(type=DEMO_EVENT_TYPE, subject=DEMO_SUBJECT,
                        data={"tokens": rng.randint(1, 400), "model": rng.choice(models)})
            for _ in range(events)]
    units = sum(int(e["data"]["tokens"]) for e in sent)
    charge = price_minor(PriceModel.model_validate(DEMO_PRICE_MODEL), Decimal(units))
    return DemoPlan(grant_minor=grant_minor, events=sent, resent=sent[: max(1, events // 10)], units=units,
                    expected_charge_minor=charge, debit_minor=debit_minor)


class DemoFailed(RuntimeError):
    pass


def _ok(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 300:
        raise DemoFailed(f"{what}: HTTP {response.status_code} {response.text[:500]}")
    body = response.json()
    assert isinstance(body, dict)
    return body


def _set_up_project(http: httpx.Client, plan: DemoPlan) -> dict[str, str]:
    """Sign up, create the project, key, meter, price and the funded subject wallet. Returns their ids."""
    email = f"demo-{uuid.uuid4().hex[:8]}@example.com"
    password = f"demo-{uuid.uuid4().hex}"
    user = _ok(http.post("/api/v1/auth/signup", json={"email": email, "password": password,
                                                      "display_name": "Demo owner"}), "sign up")
    http.headers["Authorization"] = f"Bearer {user['access_token']}"
    project = _ok(http.post("/api/v1/projects", json={"name": "Meterline demo"}), "create project")["id"]
    base = f"/api/v1/projects/{project}"
    key = _ok(http.post(f"{base}/api-keys", json={"name": "demo", "scopes": ["ingest", "read"]}), "create API key")
    _ok(http.post(f"{base}/meters", json={"slug": DEMO_METER, "event_type": DEMO_EVENT_TYPE, "aggregation": "SUM",
                                          "value_property": "$.tokens", "group_by": ["$.model"]}), "create meter")
    _ok(http.post(f"{base}/prices", json={"meter": DEMO_METER, "model": DEMO_PRICE_MODEL}), "create price")
    wallet = _ok(http.post(f"{base}/wallets", json={"owner_kind": "subject", "owner_ref": DEMO_SUBJECT}),
                 "create wallet")["id"]
    _ok(http.post(f"{base}/wallets/{wallet}/grants", json={"amount_minor": plan.grant_minor, "kind": "top_up",
                                                           "reason": "demo top-up"},
                  headers={"Idempotency-Key": f"demo-grant-{wallet}"}), "grant credits")
    return {"email": email, "password": password, "project": project, "wallet": wallet, "api_key": key["token"],
            "base": base}


def _advance(bar: Progress, task: TaskID, sent: int, _result: object) -> None:
    bar.advance(task, sent)


def _send_usage(api_url: str, api_key: str, plan: DemoPlan) -> tuple[int, int]:
    """Send the events and then the resent ones; returns (accepted, rejected)."""
    from meterline.client import MeterlineClient

    accepted = rejected = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with MeterlineClient(api_url, api_key, batch_size=250) as client, Progress(*columns, console=console) as bar:
        for label, events in (("sending usage", plan.events), ("resending 10% (same ids)", plan.resent)):
            task = bar.add_task(label, total=len(events))
            result = client.send(events, on_batch=functools.partial(_advance, bar, task))
            accepted += result.accepted
            rejected += len(result.rejected)
    return accepted, rejected


def _wait_for_balance(http: httpx.Client, wallet_url: str, expected_minor: int, timeout_s: float) -> dict[str, Any]:
    """Poll the wallet until its balance is the expected one (the ledger applied every event) or time runs out.

    A balance BELOW the expected one is a failure at once: money was charged twice."""
    deadline = time.monotonic() + timeout_s
    wallet: dict[str, Any] = {}
    with console.status("waiting for the pipeline to charge the usage…"):
        while time.monotonic() < deadline:
            wallet = _ok(http.get(wallet_url), "read wallet")
            balance = int(wallet["balance"]["balance_minor"])
            if balance == expected_minor:
                return wallet
            if balance < expected_minor:
                raise DemoFailed(f"balance {balance} is below the expected {expected_minor}: overcharged")
            time.sleep(0.25)
    raise DemoFailed(f"balance still {wallet.get('balance')} after {timeout_s:.0f}s, expected {expected_minor}; "
                     "see `meterline status` and the logs under the stack's home")


def _wait_for_analytics(http: httpx.Client, base: str, events: int, timeout_s: float) -> dict[str, Any]:
    """Poll the analytics API until ClickHouse holds every distinct event of the demo (the sink drops the
    resent duplicates), or fail."""
    deadline = time.monotonic() + timeout_s
    row: dict[str, Any] = {}
    with console.status("waiting for the analytics sink…"):
        while time.monotonic() < deadline:
            totals = _ok(http.get(f"{base}/analytics/usage/totals"), "usage totals")
            # usage analytics are by meter (units as the meter counts them): the demo's meter is "tokens"
            row = next((m for m in totals["meters"] if m["meter"] == DEMO_METER), {"events": 0})
            if int(row["events"]) == events:
                return row
            if int(row["events"]) > events:
                raise DemoFailed(f"analytics counts {row['events']} events, {events} were sent: duplicates counted")
            time.sleep(0.5)
    raise DemoFailed(f"analytics holds {row.get('events')} of {events} events after {timeout_s:.0f}s")


def _debit_twice(http: httpx.Client, wallet_url: str, amount_minor: int) -> tuple[dict[str, Any], bool]:
    """One synchronous debit sent twice with the same Idempotency-Key: the replay returns the same answer."""
    headers = {"Idempotency-Key": f"demo-debit-{uuid.uuid4().hex}"}
    body = {"amount_minor": amount_minor, "source_ref": "demo-image-1", "metadata": {"feature": "image"}}
    first = _ok(http.post(f"{wallet_url}/debit", json=body, headers=headers), "debit")
    again = _ok(http.post(f"{wallet_url}/debit", json=body, headers=headers), "debit replay")
    return first, first["transaction"]["id"] == again["transaction"]["id"]


def run_demo(api_url: str, *, events: int, seed: int, timeout_s: float, stays_up: bool) -> None:
    plan = plan_demo(events=events, seed=seed)
    with httpx.Client(base_url=api_url, timeout=30.0) as http:
        ids = _set_up_project(http, plan)
        console.print(f"project [bold]{ids['project']}[/], subject [bold]{DEMO_SUBJECT}[/] → wallet "
                      f"{ids['wallet']} with {plan.grant_minor:,} credits")
        accepted, rejected = _send_usage(api_url, ids["api_key"], plan)
        if rejected:
            raise DemoFailed(f"{rejected} events were rejected")
        wallet_url = f"{ids['base']}/wallets/{ids['wallet']}"
        started = time.monotonic()
        _wait_for_balance(http, wallet_url, plan.grant_minor - plan.expected_charge_minor, timeout_s)
        settled_s = time.monotonic() - started
        analytics = _wait_for_analytics(http, ids["base"], len(plan.events), timeout_s)
        debit, replay_same = _debit_twice(http, wallet_url, plan.debit_minor)
        wallet = _ok(http.get(wallet_url), "read wallet")
        balance = int(wallet["balance"]["balance_minor"])
        if balance != plan.expected_balance_minor or not replay_same:
            raise DemoFailed(f"after the debit the balance is {balance}, expected {plan.expected_balance_minor} "
                             f"(replay identical: {replay_same})")
        transactions = _ok(http.get(f"{wallet_url}/transactions", params={"limit": 200}), "transactions")["items"]

    table = Table(title="Meterline demo: usage in, credits down — exact")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("credits granted", f"{plan.grant_minor:,}")
    table.add_row("usage events sent (+ resent duplicates)", f"{len(plan.events):,} (+{len(plan.resent):,})")
    table.add_row("events accepted by the API", f"{accepted:,}")
    table.add_row("tokens metered (duplicates counted once)", f"{plan.units:,}")
    table.add_row("usage charge, priced here from the events", f"{plan.expected_charge_minor:,}")
    table.add_row("synchronous debit (sent twice, one key)",
                  f"{plan.debit_minor:,} (transaction {debit['transaction']['id']}, charged once)")
    table.add_row("balance now", f"[bold green]{balance:,}[/]")
    table.add_row("ledger transactions on the wallet", f"{len(transactions):,}")
    table.add_row("last event → balance settled in", f"{settled_s:.1f} s")
    table.add_row("events in analytics (ClickHouse, duplicates dropped)", f"{int(analytics['events']):,}")
    out.print(table)
    if stays_up:
        console.print(f"Dashboard: {api_url}/dashboard  (log in as {ids['email']} / {ids['password']})\n"
                      f"API docs:  {api_url}/docs")


def demo(events: Annotated[int, typer.Option(min=1, max=200_000, help="usage events to send")] = 2_000,
         seed: Annotated[int, typer.Option(help="seed of the generated usage")] = 7,
         keep_running: Annotated[bool, typer.Option("--keep-running", help="leave the stack up afterwards")] = False,
         timeout_s: Annotated[float, typer.Option(help="how long to wait for the balance to settle")] = 120.0) -> None:
    """Run Meterline's main job end to end: a project, a meter and price, a funded wallet, usage in, and the
    balance going down by exactly the price of that usage (starts the local stack if it is not running)."""
    from meterline import stack
    from meterline.cli import _up_detached
    from meterline.settings import get_settings

    settings = get_settings()
    started_here = not stack.status(settings)["running"]
    if started_here:
        console.print("starting the local stack (embedded unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS / "
                      "CLICKHOUSE_URL are set)…")
        _up_detached(settings, timeout_s=90.0)
    api_url = str(stack.status(settings).get("api_url") or f"http://{settings.api_host}:{settings.api_port}")
    try:
        run_demo(api_url, events=events, seed=seed, timeout_s=timeout_s,
                 stays_up=keep_running or not started_here)
    except (DemoFailed, httpx.HTTPError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        if started_here and not keep_running:
            stack.down(settings)
            console.print("stack stopped (use --keep-running to explore the dashboard afterwards).")
    if started_here and keep_running:
        console.print("The stack keeps running: `meterline status`, `meterline down`.")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
