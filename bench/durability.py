"""Durability benchmark on a real `meterline up` stack (durable embedded broker), bounded in time:

    .venv/bin/python -m bench.durability --queued 1000000

1. broker kill -9 under ingest: one-event requests to the HTTP API every ~20 ms; the broker is killed with
   SIGKILL; reported: time from the kill until the API accepts (2xx) again, requests refused meanwhile, and
   the wallet checked exact against every accepted event.
2. `down` drain: --queued events are produced (packed, acks=all) straight to the usage topic while the streams
   workers are stopped (SIGSTOP: the events are queued, not consumed), the workers continue and `meterline down`
   runs at once and is timed (its "drained in" line, and the whole command); afterwards the ledger is checked
   exact for every event.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.machine import describe
from bench.pipeline import PRICE, PROJECT, LoadProducer, Sent, check_totals
from bench.stack_run import cli, running_stack
from ledger.db import make_engine
from meterline import services
from streams import catalog


def kill_to_accept(env: dict[str, str], home: Path, *, probe_s: float) -> dict[str, Any]:
    from ledger.contracts import PriceModel
    from ledger.pricing import price_minor
    from meterline.cli_demo import DEMO_PRICE_MODEL, _set_up_project, plan_demo

    plan = plan_demo(events=5_000, seed=3)
    api_url = f"http://127.0.0.1:{env['METERLINE_API_PORT']}"
    with httpx.Client(base_url=api_url, timeout=30.0) as http:
        ids = _set_up_project(http, plan)
    headers = {"Authorization": f"Bearer {ids['api_key']}", "Content-Type": "application/cloudevents+json"}
    accepted: list[dict[str, Any]] = []
    refused = 0
    kill_at = first_accept_after = None
    started = time.monotonic()
    with httpx.Client(base_url=api_url, timeout=30.0) as http:
        for event in plan.events:
            now = time.monotonic()
            if now - started > probe_s:
                break
            if kill_at is None and now - started > probe_s / 3:
                state = json.loads((home / "stack.json").read_text())
                os.kill(state["engines"]["broker"]["pid"], signal.SIGKILL)
                kill_at = time.monotonic()
            try:
                response = http.post("/api/v1/events", content=json.dumps(event), headers=headers)
                ok = response.status_code < 300
            except httpx.HTTPError:
                ok = False
            if ok:
                accepted.append(event)
                if kill_at is not None and first_accept_after is None:
                    first_accept_after = time.monotonic() - kill_at
            else:
                refused += 1
                time.sleep(0.05)
            time.sleep(0.02)
    units = sum(int(e["data"]["tokens"]) for e in accepted)
    expected = plan.grant_minor - price_minor(PriceModel.model_validate(DEMO_PRICE_MODEL), Decimal(units))
    deadline = time.monotonic() + 120
    balance = None
    with httpx.Client(base_url=api_url, timeout=30.0) as http:
        token = http.post("/api/v1/auth/login", json={"email": ids["email"], "password": ids["password"]}).json()
        http.headers["Authorization"] = f"Bearer {token['access_token']}"
        while time.monotonic() < deadline:
            balance = int(http.get(f"{ids['base']}/wallets/{ids['wallet']}").json()["balance"]["balance_minor"])
            if balance <= expected:
                break
            time.sleep(0.5)
    return {"accepted": len(accepted), "refused": refused, "kill_to_accept_s": first_accept_after,
            "exact": balance == expected, "balance": balance, "expected": expected}


def drain(env: dict[str, str], home: Path, *, queued: int) -> dict[str, Any]:
    state = json.loads((home / "stack.json").read_text())
    urls = state["urls"]
    engine = make_engine(urls["database_url"], pool_size=1)
    with engine.begin() as conn:
        catalog.create_meter(conn, project_id=PROJECT, slug="tokens", event_type="llm.tokens",
                             aggregation="SUM", value_property="$.tokens")
        catalog.create_price(conn, project_id=PROJECT, meter="tokens",
                             model={"model": "per_unit", "unit_price_minor": str(PRICE)},
                             effective_from=datetime(2020, 1, 1, tzinfo=UTC))
    engine.dispose()
    time.sleep(2)  # the workers' catalog refresh picks the meter up before the first batch
    producer = LoadProducer(urls["kafka_bootstrap_servers"], "usage.events.v1", subjects=1_000, pack=200, seed=5)
    sent = Sent()
    # the streams workers are stopped (SIGSTOP) while the events are produced, so all of them are queued when
    # `down` starts; they continue (SIGCONT) just before it, rejoin their group and work the queue off
    workers = [info["pid"] for name, info in state["children"].items() if name.startswith("streams")]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    produce_started = time.monotonic()
    try:
        produce_exactly(producer, sent, queued)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    produce_s = time.monotonic() - produce_started
    del producer  # its librdkafka threads would log connection failures once the broker stops
    down_started = time.monotonic()
    result = cli("down", "--drain-timeout-s", "600", env=env, timeout_s=700)
    down_s = time.monotonic() - down_started
    drained_line = next((line for line in result.stderr.splitlines() if "drained in" in line or "timed out" in line),
                        result.stderr[-500:])
    pg = services.start_embedded_postgres(home / "postgres")
    try:
        ok, detail = check_totals(pg, [sent])
    finally:
        services.stop_embedded_postgres(home / "postgres")
    return {"queued": sent.events, "produce_s": produce_s, "down_s": down_s, "drain": drained_line.strip(),
            "exact": ok, "detail": detail}


def produce_exactly(producer: LoadProducer, sent: Sent, events: int) -> None:
    """``events`` usage events in packed messages, round-robin over the partitions, all acknowledged."""
    import orjson

    now_iso = datetime.now(UTC).isoformat()
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    partition = 0
    while sent.events < events:
        subjects = producer.subjects[partition]
        batch = []
        for _ in range(min(producer.pack, events - sent.events - len(batch))):
            subject = subjects[producer.rng.randrange(len(subjects))]
            tokens = producer.rng.randint(1, 100)
            producer.next_id += 1
            batch.append({"specversion": "1.0", "id": f"drain-{producer.next_id}", "source": "bench",
                          "type": "llm.tokens", "subject": subject, "project": PROJECT, "time": now_iso,
                          "data": {"tokens": tokens}})
            sent.units[(subject, month)] += tokens
        producer._send(sent, partition, orjson.dumps(batch), len(batch))
        partition = (partition + 1) % len(producer.subjects)
    assert producer.producer.flush(120) == 0, "producer could not deliver"
    assert not sent.errors, sent.errors[:3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queued", type=int, default=1_000_000, help="events queued before `down`")
    parser.add_argument("--probe-s", type=float, default=30.0, help="length of the kill -9 probe")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(describe())
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with running_stack(workers=args.workers, prefix="bench-durability-", up_timeout_s=120) as stack:
        env, home = stack.env, stack.home
        k = kill_to_accept(env, home, probe_s=args.probe_s)
        print(f"\n[broker kill -9 under ingest] {k['accepted']:,} one-event requests accepted, "
              f"{k['refused']:,} refused (503/errors) while the broker was down; kill -> first 2xx: "
              f"{k['kill_to_accept_s']:.2f} s; wallet exact: {k['exact']} "
              f"({k['balance']} vs {k['expected']})")
        print("load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        d = drain(env, home, queued=args.queued)
        print(f"\n[down drain] {d['queued']:,} events queued in {d['produce_s']:.1f} s (packed 200/message, workers "
              "stopped meanwhile), "
              f"then `meterline down`: {d['down_s']:.1f} s in all; {d['drain']}; ledger exact: {d['exact']} "
              f"({d['detail']})")
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
