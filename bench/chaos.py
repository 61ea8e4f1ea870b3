"""Chaos run: ≥ 1,000 faults injected into a real `meterline up` stack under load, then the money is checked.

    .venv/bin/python -m bench.chaos --faults 1000 --seconds 60 --rate 2000 --seed 13

One command, bounded in time (about 2 × --seconds of load plus start, drains and checks):
1. `meterline up --detach` in a private home (2 streams workers, ledger, api, analytics, scheduler under the
   supervisor, which restarts any child that dies; restart backoff capped at 1 s for the run).
2. Warm-up, then the **no-fault run**: an open-loop load of --rate events/s for --seconds (packed messages of
   tokens and images events straight to the usage topic with their CreateTime, plus a trickle of 100 events/s
   through the ingest API), drained: end-to-end throughput = events / (drained − first sent).
3. The **chaos run**, the same load with --faults faults (bench/chaos_load.py): kill -9 of every process kind
   at random moments (each streams worker, the ledger consumer, the API, the scheduler, the analytics sink),
   duplicates, late (days old), out-of-order and hostile events (values ≥ 2^63 and 1e300, negative, not a
   number, subject or data of the wrong type, an unknown meter, bytes that are not JSON, times in the future or
   unparseable), another tenant's events naming our subjects, and catalog edits under load (new tokens price
   versions; images aggregation SUM ↔ MAX = a new meter counting version; a cross-tenant subject key, which
   must be refused). Faults stop after 75% of the run; the last quarter is the same load, recovering.
4. Drain, then check: every wallet's balance equals the reference model's (bench/chaos_load.Reference, computed
   from the events sent and the catalog versions in force), no idempotency key posted twice, every hostile
   event dead-lettered with its reason, every killed process running again, the scheduled invariant check
   (`ledger.invariant_check.check_invariants`) and `meterline ledger verify`.

Prints faults injected and survived, invariant violations (must be 0), both throughputs and their ratio (the
chaos run must stay within 10% of the no-fault run), the machine and its load. Exits 1 when money or an
invariant is wrong."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil

from bench.chaos_load import (
    OTHER_PROJECT,
    Applied,
    ChaosLoad,
    ChaosProducer,
    FaultPlan,
    Reference,
    Shape,
    balances,
    dead_letters,
    duplicate_postings,
    explain_wallet,
    hostile_accounted,
    money_diff,
    set_up_catalog,
)
from bench.machine import describe
from bench.stack_run import Stack, cli, running_stack
from ledger.db import make_engine
from ledger.invariant_check import check_invariants
from meterline.drain import DrainProbe

USAGE_TOPIC, DLQ_TOPIC = "usage.events.v1", "usage.events.dlq.v1"
KILL_TARGETS = ("streams-0", "streams-1", "ledger", "api", "scheduler", "analytics")


def load_line() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return load_line()


def set_up_project(api_url: str) -> tuple[str, str]:
    """Sign up, create a project and an ingest key through the API. Returns (project id, key)."""
    with httpx.Client(base_url=api_url, timeout=30.0) as http:
        email, password = f"chaos-{uuid.uuid4().hex[:8]}@example.com", f"chaos-{uuid.uuid4().hex}"
        user = http.post("/api/v1/auth/signup", json={"email": email, "password": password,
                                                      "display_name": "Chaos"})
        user.raise_for_status()
        http.headers["Authorization"] = f"Bearer {user.json()['access_token']}"
        project = http.post("/api/v1/projects", json={"name": "chaos"})
        project.raise_for_status()
        project_id = project.json()["id"]
        key = http.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "chaos", "scopes": ["ingest"]})
        key.raise_for_status()
    return project_id, key.json()["token"]


class ApiSender:
    """Sends one batch through the ingest API until it is accepted (204). A kill of the API or a broker hiccup
    answers with an error or nothing: the same batch (same ids) is sent again, so it is charged once."""

    def __init__(self, api_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=10.0,
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/cloudevents-batch+json"})
        self.failures: Counter[str] = Counter()

    def __call__(self, batch: list[dict[str, Any]]) -> int:
        import orjson

        body = orjson.dumps(batch)
        deadline = time.monotonic() + 300
        attempts = 0
        while time.monotonic() < deadline:
            attempts += 1
            try:
                response = self.http.post("/api/v1/events", content=body)
                if response.status_code == 204:
                    return attempts
                self.failures[str(response.status_code)] += 1
                if response.status_code < 500 and response.status_code not in (408, 429):
                    raise RuntimeError(f"the API refused a valid batch: {response.status_code} {response.text[:300]}")
            except httpx.HTTPError as exc:
                self.failures[type(exc).__name__] += 1
            time.sleep(0.2)
        raise RuntimeError("the API did not accept a batch within 300 s")

    def close(self) -> None:
        self.http.close()


class Killer:
    """kill -9 of one child of the stack (its whole process group), by the pid the supervisor last recorded."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.killed: Counter[str] = Counter()

    def __call__(self, target: str) -> bool:
        try:
            pid = self.stack.children()[target]["pid"]
        except (OSError, ValueError, KeyError):
            return False
        if not pid or not psutil.pid_exists(pid):
            return False  # dead and not restarted yet: not a new fault
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.killed[target] += 1
        return True


def drained(stack: Stack, applied: Applied, produced_last: dict[int, int], *, timeout_s: float) -> float | None:
    """When every partition's applied mark reached both our producer's last offsets and the broker's log end
    (the API's events included). Returns the time.time() of that moment (None: timeout)."""
    urls = stack.urls
    probe = DrainProbe(database_url=urls["database_url"], bootstrap=urls["kafka_bootstrap_servers"],
                       topic=USAGE_TOPIC, broker_data=stack.home / "broker")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # PostgreSQL or the store busy: ask again
                if applied.reached(produced_last) and probe.progress().events_behind == 0:
                    return time.time()
            time.sleep(0.1)
    finally:
        probe.close()
    return None


def run_phase(name: str, load: ChaosLoad, stack: Stack, applied: Applied, shape: Shape,
              plan: FaultPlan | None) -> dict[str, Any]:
    events_before = load.producer.produced.events
    started = load.run(shape, plan)
    events = load.producer.produced.events - events_before + load.api_events
    done_at = drained(stack, applied, dict(load.producer.produced.last_offset), timeout_s=max(300.0, shape.seconds * 4))
    wall = (done_at - started["first_sent"]) if done_at else float("nan")
    result = {"name": name, "events": events, "api_events": load.api_events, "api_attempts": load.api_attempts,
              "drained": done_at is not None, "wall_s": wall, "events_per_s": events / wall if done_at else 0.0,
              "produced_s": started["produced_s"]}
    print(f"\n[{name}] {events:,} events ({load.api_events:,} through the API) offered at {shape.rate:,.0f}/s for "
          f"{shape.seconds:.0f} s; drained: {result['drained']}; end to end {result['events_per_s']:,.0f} events/s "
          f"(first sent -> all applied {wall:.1f} s); {load_line()}")
    return result


def _running(pid: int | None) -> bool:
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a killed, unreaped child
    except psutil.Error:
        return False


def wait_children_running(stack: Stack, killed: Counter[str], *, timeout_s: float = 120) -> dict[str, dict[str, Any]]:
    """Until the supervisor restarted every killed child as often as it was killed and each one runs."""
    deadline = time.monotonic() + timeout_s
    children: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        children = stack.children()
        if all(_running(c.get("pid")) and int(c.get("restarts") or 0) >= killed[name]
               for name, c in children.items()):
            break
        time.sleep(0.5)
    return children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=1_000, help="faults to inject in the chaos run")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each run's load")
    parser.add_argument("--rate", type=float, default=2_000.0, help="offered events/s (open loop)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--logs", type=Path, default=None, help="copy the stack's logs here at the end")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # run the cleanups
    print(describe())
    print(f"at start: {uptime()} (2 cores shared with other engineers: every figure is skewed by their load)")
    print(f"seed {args.seed}, --faults {args.faults}, --seconds {args.seconds:.0f}, --rate {args.rate:,.0f}, "
          f"streams workers {args.workers}, usage partitions 8, pack 100 events/message")
    shape = Shape(rate=args.rate, seconds=args.seconds)
    targets = tuple(t for t in KILL_TARGETS if not t.startswith("streams-") or int(t[8:]) < args.workers)
    with running_stack(workers=args.workers, prefix="bench-chaos-", up_timeout_s=180, keep_logs=args.logs,
                       METERLINE_RESTART_BACKOFF_S_MAX="1") as stack:
        urls = stack.urls
        database_url = urls["database_url"]
        project, key = set_up_project(stack.api_url)
        ids, prices = set_up_catalog(database_url, project)
        reference = Reference(project, prices)
        applied = Applied(database_url, USAGE_TOPIC)
        producer = ChaosProducer(urls["kafka_bootstrap_servers"], USAGE_TOPIC, 8, reference)
        api = ApiSender(stack.api_url, key)
        killer = Killer(stack)
        try:
            warm = ChaosLoad(producer=producer, reference=reference, ids=ids, database_url=database_url,
                             applied=applied, seed=args.seed, api_send=api)
            run_phase("warm-up (not measured)", warm, stack, applied, Shape(rate=args.rate / 2, seconds=5), None)
            calm = ChaosLoad(producer=producer, reference=reference, ids=ids, database_url=database_url,
                             applied=applied, seed=args.seed + 1, api_send=api)
            calm_result = run_phase("no-fault run", calm, stack, applied, shape, None)
            chaos = ChaosLoad(producer=producer, reference=reference, ids=ids, database_url=database_url,
                              applied=applied, seed=args.seed + 2, kill=killer, api_send=api)
            plan = FaultPlan.of(args.faults, kill_targets=targets, seconds=args.seconds)
            chaos_result = run_phase("chaos run", chaos, stack, applied, shape, plan)
            api.close()
            children = wait_children_running(stack, killer.killed)
            report(stack, chaos, killer, children, reference, calm_result, chaos_result, api)
        finally:
            producer.close()


def report(stack: Stack, chaos: ChaosLoad, killer: Killer, children: dict[str, dict[str, Any]],
           reference: Reference, calm: dict[str, Any], wild: dict[str, Any], api: ApiSender) -> None:
    urls = stack.urls
    database_url = urls["database_url"]
    faults = chaos.faults
    expected = reference.expected_balances()
    actual = balances(database_url, (reference.project, OTHER_PROJECT))
    wrong = money_diff(expected, actual)
    dup = duplicate_postings(database_url)
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            invariant = check_invariants(conn)
    finally:
        engine.dispose()
    verify = cli("ledger", "verify", env=stack.env, timeout_s=600)
    by_id, reasons = dead_letters(urls["kafka_bootstrap_servers"], DLQ_TOPIC,
                                  min_messages=len(faults.hostile_ids) + faults.garbage_messages)
    hostile_found, hostile_missing = hostile_accounted(faults, by_id, reasons)
    money_ok = not wrong and dup == 0 and calm["drained"] and wild["drained"]
    not_back = [name for name, n in killer.killed.items()
                if int(children.get(name, {}).get("restarts", 0)) < n
                or not _running(children.get(name, {}).get("pid"))]
    survived: Counter[str] = Counter()
    for kind, n in faults.injected.items():
        if kind.startswith("kill:"):
            survived[kind] = n if money_ok and kind[5:] not in not_back else 0
        elif kind.startswith("hostile:"):
            continue  # counted from the dead letters below
        elif kind == "refused:cross_tenant_subject_key":
            survived[kind] = n
        elif kind.endswith("_ACCEPTED"):
            survived[kind] = 0
        else:
            survived[kind] = n if money_ok else 0
    survived["hostile (dead-lettered with the right reason)"] = hostile_found if money_ok else 0
    injected_total = faults.total
    survived_total = sum(survived.values())
    violations = invariant.violation_count + (0 if verify.returncode == 0 else 1) + len(wrong) + dup
    ratio = wild["events_per_s"] / calm["events_per_s"] if calm["events_per_s"] else float("nan")

    print("\n== faults injected (chaos run) ==")
    for kind, n in sorted(faults.injected.items()):
        print(f"  {kind:<40} {n:>6,}")
    if faults.skipped:
        print("  skipped (target not running at that moment / barrier timed out): "
              + ", ".join(f"{k} {n}" for k, n in sorted(faults.skipped.items())))
    print(f"  total injected {injected_total:,}; survived {survived_total:,}")
    print(f"  processes: kills {dict(killer.killed)}; supervisor restarts since up "
          f"{ {n: c.get('restarts') for n, c in children.items()} }; not running again: {not_back or 'none'}")
    print(f"  API: {wild['api_events']:,} events in {wild['api_attempts']:,} attempts of batches of 10; "
          f"failed attempts (retried with the same ids) {dict(api.failures)}")
    print(f"  dead letters by reason: {dict(sorted(reasons.items()))}; hostile missing: {len(hostile_missing)}"
          + (f" e.g. {hostile_missing[:3]}" if hostile_missing else ""))
    print("\n== money ==")
    print(f"  wallets: {len(expected):,} expected, {len(actual):,} in the ledger; wrong balances: {len(wrong)}"
          + (f" e.g. {wrong[:3]}" if wrong else ""))
    for line in wrong[:3]:
        project, wallet = line.split(":")[0].split("/")
        print(f"  {line}\n" + "\n".join(explain_wallet(database_url, reference, project, wallet)))
    print(f"  total charged: ledger {-sum(actual.values()):,} minor units, reference {-sum(expected.values()):,}; "
          f"events counted by the reference {reference.events:,}")
    print(f"  idempotency keys posted twice: {dup}")
    print(f"  invariant check: {invariant.violation_count} violations over {invariant.wallets:,} wallets, "
          f"{invariant.transactions:,} transactions ({invariant.duration_ms} ms)")
    print(f"  meterline ledger verify: exit {verify.returncode} ({(verify.stderr or verify.stdout).strip().splitlines()[-1:]})")
    print(f"  INVARIANT VIOLATIONS: {violations}")
    print("\n== throughput (end to end, first sent -> all applied) ==")
    print(f"  no-fault run {calm['events_per_s']:,.0f} events/s; chaos run {wild['events_per_s']:,.0f} events/s; "
          f"ratio {ratio:.3f} ({'within' if ratio >= 0.9 else 'NOT within'} 10%)")
    print(f"\nat end: {uptime()}")
    if violations or not money_ok or injected_total < 1:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
