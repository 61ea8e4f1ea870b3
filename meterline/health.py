"""What `meterline status` reports beyond the supervisor's process table: engines, probes, lag, dead letters, events
and the invariant check — and whether all of it is healthy (status exits non-zero when not).

Everything is read from the outside, the way an operator's tools would: each engine is contacted directly; each
process's ``/health``, ``/ready`` and ``/metrics`` (ledger/probes.py; the API on its own port) are fetched over
HTTP and the metrics parsed with prometheus-client's own parser. Nothing here needs the processes' internals.

- consumer lag per group: the sum over partitions of ``meterline_consumer_lag_messages`` reported by the
  processes of that group (each reports the partitions it owns; see ledger/metrics.py for what it means);
- dead letters: ``meterline_dead_letters_total`` summed over the stream workers, by reason (since each worker
  started: a restarted worker counts from 0; the durable record is ClickHouse's ``dead_letters`` table);
- invariant check: ``meterline_invariant_check_violations`` from the scheduler's metrics (the job that sets it
  runs in the scheduler); "not run" while no run has been recorded since the scheduler started;
- events: ``meterline_streams_events_total`` by outcome and ``meterline_streams_event_notes_total`` by note, summed
  over the stream workers (since each started), and the notices they call for: what an operator should change
  although nothing is broken (a producer that does not partition by subject, meters without a price). Notices never
  make the stack unhealthy;
- reconciliation: ``meterline_reconciliation_drift_wallets`` per record from the metrics of the process that ran
  it — the scheduler, or the api when it owns an embedded ClickHouse (meterline/reconcile_job.py); any wallet a record disagrees on makes the stack unhealthy, like a violated check.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from meterline import services

#: how long status waits for one probe; a process that does not answer in this time is not healthy
PROBE_TIMEOUT_S = 3.0


def engines(urls: Mapping[str, str], api_ready: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Reachability of PostgreSQL, the broker and ClickHouse, each contacted directly (embedded chDB cannot be
    opened from a second process: its state is the api's ``analytics_sink`` readiness check)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        services.check_database(urls.get("database_url", ""), timeout_s=PROBE_TIMEOUT_S)
        out["postgresql"] = {"reachable": True, "detail": "answers"}
    except Exception as error:
        out["postgresql"] = {"reachable": False, "detail": str(error).splitlines()[0]}
    try:
        services.check_broker(urls.get("kafka_bootstrap_servers", ""), timeout_s=PROBE_TIMEOUT_S)
        out["broker"] = {"reachable": True, "detail": f"answers at {urls.get('kafka_bootstrap_servers')}"}
    except Exception as error:
        out["broker"] = {"reachable": False, "detail": str(error).splitlines()[0]}
    clickhouse = urls.get("clickhouse_url", "")
    if clickhouse.startswith("chdb://"):
        sink = ((api_ready or {}).get("checks") or {}).get("analytics_sink")
        out["clickhouse"] = {"reachable": bool(sink and sink.get("ok")),
                             "detail": "embedded (chDB) in the api process: "
                                       + (sink.get("detail", "") if sink else "the api does not answer")}
    else:
        out["clickhouse"] = _clickhouse_ping(clickhouse)
    return out


def _clickhouse_ping(url: str) -> dict[str, Any]:
    parsed = httpx.URL(url)
    ping = parsed.copy_with(path="/ping", query=None, username=None, password=None)
    try:
        response = httpx.get(ping, timeout=PROBE_TIMEOUT_S)
        ok = response.status_code == 200
        return {"reachable": ok, "detail": f"/ping answered {response.status_code}"}
    except httpx.HTTPError as error:
        return {"reachable": False, "detail": f"{type(error).__name__}: {error}"}


def probe(base_url: str) -> dict[str, Any]:
    """GET /health, /ready and /metrics of one process; parsed metrics as {name: [(labels, value)]}."""
    report: dict[str, Any] = {"url": base_url, "health": False, "ready": False, "checks": {}, "metrics": None,
                              "error": None}
    try:
        with httpx.Client(timeout=PROBE_TIMEOUT_S) as client:
            report["health"] = client.get(f"{base_url}/health").status_code == 200
            ready = client.get(f"{base_url}/ready")
            report["ready"] = ready.status_code == 200
            if ready.headers.get("content-type", "").startswith("application/json"):
                report["checks"] = ready.json().get("checks", {})
            metrics = client.get(f"{base_url}/metrics")
            if metrics.status_code == 200:
                report["metrics"] = parse_metrics(metrics.text)
    except httpx.HTTPError as error:
        report["error"] = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return report


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by sample name (``_total`` and ``_bucket`` names included), via prometheus-client's parser."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def consumer_lag(probes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Lag per consumer group (sum of its partitions) and per partition, from every process's metrics."""
    groups: dict[str, dict[str, Any]] = {}
    for report in probes.values():
        for labels, value in (report.get("metrics") or {}).get("meterline_consumer_lag_messages", []):
            group = groups.setdefault(labels.get("group", "?"), {"messages": 0, "partitions": {}})
            group["messages"] += int(value)
            group["partitions"][f"{labels.get('topic')}[{labels.get('partition')}]"] = int(value)
    return groups


def dead_letters(probes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    by_reason = _summed(probes, "meterline_dead_letters_total", "reason")
    return {"total": sum(by_reason.values()), "by_reason": by_reason,
            "note": "since each stream worker started (durable record: ClickHouse dead_letters)"}


def _summed(probes: Mapping[str, Mapping[str, Any]], sample: str, label: str) -> dict[str, int]:
    by_label: dict[str, int] = {}
    for report in probes.values():
        for labels, value in (report.get("metrics") or {}).get(sample, []):
            key = labels.get(label, "?")
            by_label[key] = by_label.get(key, 0) + int(value)
    return by_label


def events(probes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Metered events by outcome (they add up to the events taken) and by note, with the notices they call for."""
    outcomes = _summed(probes, "meterline_streams_events_total", "outcome")
    notes = _summed(probes, "meterline_streams_event_notes_total", "note")
    return {"outcomes": outcomes, "notes": notes, "notices": event_notices(outcomes, notes),
            "note": "since each stream worker started"}


def event_notices(outcomes: Mapping[str, int], notes: Mapping[str, int]) -> list[str]:
    """What the counts ask an operator to change. Pure, so each wording is tested against its trigger."""
    notices: list[str] = []
    misplaced = notes.get("misplaced", 0)
    if misplaced:
        notices.append(
            f"{misplaced} events arrived in a partition other than their subject's (Kafka's murmur2 over the "
            "subject). They are charged, but a duplicate of one sent to another partition is charged again: key "
            "messages by the subject with a murmur2 partitioner (librdkafka: partitioner=murmur2_random; README "
            "\"Send usage from any Kafka client\").")
    unpriced = notes.get("unpriced", 0)
    if unpriced:
        notices.append(
            f"{unpriced} times an event met a meter without an active price, and that usage was not charged: give "
            "the meter a price (`meterline prices create`, or POST /api/v1/projects/{project}/prices).")
    unmetered = outcomes.get("unmetered", 0)
    if unmetered:
        notices.append(
            f"{unmetered} events were accepted but charged nothing (no meter filter matched, or no meter of theirs "
            "has a price): check the meters' filters and prices if that usage should be billed.")
    return notices


def invariant_check(scheduler: Mapping[str, Any] | None) -> dict[str, Any]:
    metrics = (scheduler or {}).get("metrics")
    if metrics is None:
        return {"state": "unknown", "detail": "the scheduler's metrics do not answer", "violations": {}}
    violations = {labels.get("check", "?"): int(value)
                  for labels, value in metrics.get("meterline_invariant_check_violations", [])}
    last_run = [value for _labels, value in metrics.get("meterline_invariant_check_last_run_timestamp_seconds", [])]
    if not violations and not (last_run and last_run[0] > 0):
        return {"state": "not_run", "detail": "no invariant check has run since the scheduler started",
                "violations": {}}
    state = "violated" if any(violations.values()) else "ok"
    return {"state": state, "violations": violations, "last_run_unix_s": last_run[0] if last_run else None}


def reconciliation(*processes: Mapping[str, Any] | None) -> dict[str, Any]:
    """The latest reconciliation of the four usage records, from the metrics of the process that ran it
    (meterline/reconcile_job.py: the scheduler, or the api when it owns an embedded ClickHouse; the newest
    ``meterline_reconciliation_last_run_timestamp_seconds`` wins): ``drift`` when a record disagrees on any wallet
    (which records, how many wallets), like a violated invariant."""
    answering = [m for m in ((p or {}).get("metrics") for p in processes) if m is not None]
    if not answering:
        return {"state": "unknown", "detail": "the scheduler's and the api's metrics do not answer",
                "disagreeing_wallets": {}}
    ran = [m for m in answering if m.get("meterline_reconciliation_drift_wallets")]
    if not ran:
        return {"state": "not_run", "detail": "no reconciliation has finished since the scheduler and the api "
                "started", "disagreeing_wallets": {}}

    def last_run(metrics: Mapping[str, Any]) -> float:
        return max((value for _labels, value in metrics.get("meterline_reconciliation_last_run_timestamp_seconds",
                                                              [])), default=0.0)

    metrics = max(ran, key=last_run)
    wallets = {labels.get("record", "?"): int(value)
               for labels, value in metrics.get("meterline_reconciliation_drift_wallets", [])}
    compared = [labels.get("record", "?") for labels, value in
                metrics.get("meterline_reconciliation_record_compared", []) if value]
    return {"state": "drift" if any(wallets.values()) else "ok", "disagreeing_wallets": wallets,
            "compared": sorted(compared)}


def collect(*, urls: Mapping[str, str], probe_urls: Mapping[str, str],
            children: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The whole health picture and its verdict (``healthy``; ``problems`` says why not)."""
    with ThreadPoolExecutor(max_workers=max(1, len(probe_urls))) as pool:
        futures = {name: pool.submit(probe, url) for name, url in probe_urls.items()}
        probes = {name: future.result() for name, future in futures.items()}
    engine_report = engines(urls, {"checks": probes.get("api", {}).get("checks", {})} if "api" in probes else None)
    invariants = invariant_check(probes.get("scheduler"))
    reconciled = reconciliation(probes.get("scheduler"), probes.get("api"))
    problems: list[str] = []
    for name, engine in engine_report.items():
        if not engine["reachable"]:
            problems.append(f"engine {name} unreachable: {engine['detail']}")
    for name, child in children.items():
        if not child.get("alive"):
            problems.append(f"process {name} is not running")
            continue
        report = probes.get(name)
        if report is None:
            continue
        if not report["health"]:
            problems.append(f"process {name}: /health does not answer ({report['error'] or 'not 200'})")
        elif not report["ready"]:
            failing = {k: v.get("detail") for k, v in report["checks"].items() if not v.get("ok")}
            problems.append(f"process {name} not ready: {failing or report['error']}")
    if invariants["state"] == "violated":
        problems.append(f"invariant check violated: {invariants['violations']}")
    if reconciled["state"] == "drift":
        problems.append("reconciliation drift: records disagree on wallets "
                        f"{ {r: n for r, n in reconciled['disagreeing_wallets'].items() if n} }")
    processes = {name: {k: v for k, v in report.items() if k != "metrics"} for name, report in probes.items()}
    return {"healthy": not problems, "problems": problems, "engines": engine_report, "probes": processes,
            "consumer_lag": consumer_lag(probes), "dead_letters": dead_letters(probes), "events": events(probes),
            "invariant_check": invariants,
            "reconciliation": reconciled}
