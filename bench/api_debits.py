"""Synchronous money operations over HTTP, one command:

    .venv/bin/python -m bench.api_debits                 # embedded PostgreSQL, uvicorn on 127.0.0.1

Starts an embedded PostgreSQL (or uses --database-url), migrates a fresh database, runs the real API under
uvicorn (``--workers`` processes) on 127.0.0.1, and drives it from a separate load process (asyncio + httpx,
``--concurrency`` requests in flight, each with its own Idempotency-Key and an admin-scoped API key):

1. debit, one wallet                 (every request serializes on that wallet's row lock)
2. debit, 10,000 wallets             (random wallet per request)
3. reserve + commit, one wallet      (two requests per operation; latency per request)
4. reserve + commit, 10,000 wallets

Prints requests/s and p50/p99/max latency per scenario, and checks the money afterwards (the balance of the
single wallet equals its grant minus exactly what the accepted debits and commits charged). Every scenario is
bounded by --duration-s and --requests-max; the whole run by --deadline-s. First bar: >= 1,000 debits/s with
p99 <= 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.machine import describe
from ledger.db import libpq_url, make_engine

GRANT_MINOR = 10**12
BIG_WALLETS_GRANT_MINOR = 10**9


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "debit" | "reserve_commit"
    wallets: list[str]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------------ load process


def _load_process(base_url: str, project: str, token: str, scenario: Scenario, duration_s: float,
                  requests_max: int, concurrency: int, out: Any) -> None:
    out.put(asyncio.run(_load(base_url, project, token, scenario, duration_s, requests_max, concurrency)))


async def _load(base_url: str, project: str, token: str, scenario: Scenario, duration_s: float,
                requests_max: int, concurrency: int) -> dict[str, Any]:
    latencies_ms: list[float] = []
    statuses: dict[int, int] = {}
    charged = {"minor": 0}
    issued = {"n": 0}
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    deadline = time.monotonic() + duration_s
    run = uuid.uuid4().hex[:8]

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        async def post(path: str, body: dict[str, Any] | None) -> httpx.Response:
            issued["n"] += 1
            key = f"{run}-{issued['n']}"
            started = time.perf_counter()
            r = await client.post(path, json=body, headers={**headers, "Idempotency-Key": key})
            latencies_ms.append((time.perf_counter() - started) * 1000)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            return r

        async def worker() -> None:
            while time.monotonic() < deadline and issued["n"] < requests_max:
                wallet = scenario.wallets[rng.randrange(len(scenario.wallets))]
                base = f"/api/v1/projects/{project}/wallets/{wallet}"
                if scenario.kind == "debit":
                    amount = rng.randint(1, 5)
                    r = await post(f"{base}/debit", {"amount_minor": amount})
                    if r.status_code == 201:
                        charged["minor"] += amount
                else:
                    held = rng.randint(5, 10)
                    r = await post(f"{base}/reservations", {"amount_minor": held, "timeout_s": 60})
                    if r.status_code != 201:
                        continue
                    actual = rng.randint(1, held)
                    c = await post(f"{base}/reservations/{r.json()['hold']['id']}/commit", {"amount_minor": actual})
                    if c.status_code == 200:
                        charged["minor"] += actual

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"latencies_ms": latencies_ms, "statuses": statuses, "elapsed_s": elapsed, "charged_minor": charged["minor"]}


# ------------------------------------------------------------------------------------------ setup


def _start_postgres(root: Path) -> str:
    from meterline import services

    return services.start_embedded_postgres(root / "postgres")


def _fresh_database(admin_url: str) -> str:
    from sqlalchemy.engine import make_url

    from ledger.db import sqlalchemy_url
    from meterline.stack import migrate

    name = f"bench_api_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(sqlalchemy_url(admin_url)).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    return url


def _start_api(database_url: str, *, port: int, workers: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": database_url, "METERLINE_ENV": "local", "API_RATE_LIMIT_PER_S": "0",
           "API_JWT_SECRET": "bench-" + uuid.uuid4().hex * 2, "API_DB_POOL_SIZE": "20",
           "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # nothing here produces events
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1", "--port",
         str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_healthy(base_url: str, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the API did not become healthy at {base_url} within {timeout_s} s")


def _setup(base_url: str, database_url: str, *, wallets_many: int) -> tuple[str, str, str, list[str]]:
    with httpx.Client(base_url=base_url, timeout=30) as c:
        owner = c.post("/api/v1/auth/signup", json={"email": f"bench-{uuid.uuid4().hex[:6]}@example.com",
                                                     "password": "bench password 123"}).json()
        auth = {"Authorization": f"Bearer {owner['access_token']}"}
        project = c.post("/api/v1/projects", json={"name": "bench"}, headers=auth).json()["id"]
        key = c.post(f"/api/v1/projects/{project}/api-keys", json={"name": "bench", "scopes": ["admin"]},
                     headers=auth).json()["token"]
        one = c.post(f"/api/v1/projects/{project}/wallets", json={"owner_kind": "project"}, headers=auth).json()["id"]
        c.post(f"/api/v1/projects/{project}/wallets/{one}/grants", json={"amount_minor": GRANT_MINOR},
               headers={**auth, "Idempotency-Key": "bench-grant"}).raise_for_status()
    many = _create_wallets(database_url, project, wallets_many)
    return project, key, one, many


def _create_wallets(database_url: str, project: str, count: int) -> list[str]:
    """The 10,000 wallets are created through the ledger service directly (setup, not what is measured)."""
    from ledger import service

    engine = make_engine(database_url, pool_size=4)
    chunks = [list(range(i, min(i + 500, count))) for i in range(0, count, 500)]

    def create(chunk: list[int]) -> list[str]:
        ids = []
        with engine.begin() as conn:
            for i in chunk:
                w = service.ensure_wallet(conn, project_id=project, owner_kind="subject", owner_ref=f"cust-{i}")
                service.grant_credits(conn, wallet_id=w.id, amount_minor=BIG_WALLETS_GRANT_MINOR,
                                      idempotency_key=f"bench-grant-{w.id}")
                ids.append(w.id)
        return ids

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return [w for ids in pool.map(create, chunks) for w in ids]
    finally:
        engine.dispose()


def _balance_check(database_url: str, wallet: str, charged_minor: int) -> str:
    with psycopg.connect(libpq_url(database_url)) as conn:
        balance, held = conn.execute("SELECT balance_minor, held_minor FROM wallets WHERE id = %s", (wallet,)).fetchone()
        negative = conn.execute("SELECT count(*) FROM transactions WHERE wallet_id = %s AND balance_after_minor < 0",
                                (wallet,)).fetchone()[0]
    ok = balance == GRANT_MINOR - charged_minor and negative == 0
    return (f"money check (single wallet): balance {balance} = grant {GRANT_MINOR} - charged {charged_minor}"
            f" -> {'exact' if ok else 'MISMATCH'}; held {held}; transactions below 0: {negative}")


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", ""))
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--duration-s", type=float, default=10.0, help="per scenario")
    parser.add_argument("--requests-max", type=int, default=30_000, help="per scenario")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--deadline-s", type=float, default=600.0, help="the whole run")
    parser.add_argument("--only", choices=["debit", "reserve_commit"], default=None)
    args = parser.parse_args(argv)
    run_deadline = time.monotonic() + args.deadline_s

    print(describe())
    print(f"api: uvicorn x{args.workers} on 127.0.0.1, load: 1 process, {args.concurrency} in flight, "
          f"{args.duration_s:.0f} s or {args.requests_max} requests per scenario")
    from meterline.services import free_port

    with tempfile.TemporaryDirectory(prefix="meterline-bench-api-") as tmp:
        root = Path(tmp)
        admin_url = args.database_url or _start_postgres(root)
        database_url = _fresh_database(admin_url)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        api = _start_api(database_url, port=port, workers=args.workers, log_path=root / "api.log")
        try:
            _wait_healthy(base_url, timeout_s=60)
            t0 = time.monotonic()
            project, key, one, many = _setup(base_url, database_url, wallets_many=args.wallets)
            print(f"setup: 1 + {len(many)} funded wallets in {time.monotonic() - t0:.1f} s")
            scenarios = [Scenario("debit, 1 wallet", "debit", [one]),
                         Scenario(f"debit, {len(many)} wallets", "debit", many),
                         Scenario("reserve+commit, 1 wallet", "reserve_commit", [one]),
                         Scenario(f"reserve+commit, {len(many)} wallets", "reserve_commit", many)]
            charged_one = 0
            ctx = mp.get_context("spawn")
            print(f"{'scenario':<32} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses")
            for scenario in scenarios:
                if args.only and scenario.kind != args.only:
                    continue
                if time.monotonic() + args.duration_s + 30 > run_deadline:
                    print(f"{scenario.name}: skipped (deadline)")
                    continue
                out = ctx.Queue()
                proc = ctx.Process(target=_load_process, args=(base_url, project, key, scenario, args.duration_s,
                                                               args.requests_max, args.concurrency, out))
                proc.start()
                result = out.get(timeout=args.duration_s + 120)
                proc.join(timeout=30)
                lat = result["latencies_ms"]
                n = len(lat)
                print(f"{scenario.name:<32} {n:>9} {n / result['elapsed_s']:>8.0f} {statistics.median(lat):>8.1f} "
                      f"{_percentile(lat, 0.99):>8.1f} {max(lat):>8.1f}  {dict(sorted(result['statuses'].items()))}")
                if scenario.wallets == [one]:
                    charged_one += result["charged_minor"]
            print(_balance_check(database_url, one, charged_one))
        finally:
            api.terminate()
            try:
                api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                api.kill()
            if not args.database_url:
                from meterline import services

                services.stop_embedded_postgres(root / "postgres")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
