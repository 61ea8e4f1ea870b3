"""meterline/health.py's verdict from probe reports (pure: the probes are given, no engines or processes)."""

from __future__ import annotations

from typing import Any

import pytest

from meterline import health

METRICS = """# HELP meterline_consumer_lag_messages lag
# TYPE meterline_consumer_lag_messages gauge
meterline_consumer_lag_messages{group="g",topic="t",partition="0"} 5.0
meterline_consumer_lag_messages{group="g",topic="t",partition="1"} 2.0
# HELP meterline_dead_letters_total dead letters
# TYPE meterline_dead_letters_total counter
meterline_dead_letters_total{reason="bad_json"} 3.0
"""


def _probe(metrics: str = "", *, ready: bool = True, health_ok: bool = True) -> dict[str, Any]:
    return {"url": "http://x", "health": health_ok, "ready": ready,
            "checks": {"db": {"ok": ready, "detail": "answers" if ready else "refused"}},
            "metrics": health.parse_metrics(metrics), "error": None}


def test_lag_is_summed_per_group_and_dead_letters_per_reason() -> None:
    probes = {"streams-0": _probe(METRICS), "streams-1": _probe(METRICS.replace('"0"', '"2"').replace('"1"', '"3"'))}
    lag = health.consumer_lag(probes)
    assert lag["g"]["messages"] == 14 and lag["g"]["partitions"] == {"t[0]": 5, "t[1]": 2, "t[2]": 5, "t[3]": 2}
    assert health.dead_letters(probes)["by_reason"] == {"bad_json": 6}


@pytest.mark.parametrize(("metrics", "state"), [
    ("", "not_run"),
    ("# TYPE meterline_invariant_check_last_run_timestamp_seconds gauge\n"
     "meterline_invariant_check_last_run_timestamp_seconds 0.0\n", "not_run"),
    ("# TYPE meterline_invariant_check_violations gauge\nmeterline_invariant_check_violations{check=\"chain\"} 0.0\n"
     "# TYPE meterline_invariant_check_last_run_timestamp_seconds gauge\n"
     "meterline_invariant_check_last_run_timestamp_seconds 1.7e9\n", "ok"),
    ("# TYPE meterline_invariant_check_violations gauge\nmeterline_invariant_check_violations{check=\"chain\"} 2.0\n",
     "violated"),
])
def test_invariant_check_state(metrics: str, state: str) -> None:
    assert health.invariant_check(_probe(metrics))["state"] == state


def _verdict(monkeypatch: pytest.MonkeyPatch, probes: dict[str, dict[str, Any]],
             children: dict[str, dict[str, Any]]) -> dict[str, Any]:
    monkeypatch.setattr(health, "probe", lambda url: probes[url])
    monkeypatch.setattr(health, "engines", lambda urls, api: {"postgresql": {"reachable": True, "detail": "ok"}})
    return health.collect(urls={}, probe_urls={name: name for name in probes}, children=children)


def test_healthy_only_when_every_process_is_up_ready_and_no_invariant_is_violated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    alive = {"ledger": {"alive": True}, "scheduler": {"alive": True}}
    assert _verdict(monkeypatch, {"ledger": _probe(), "scheduler": _probe()}, alive)["healthy"] is True

    down = _verdict(monkeypatch, {"ledger": _probe(health_ok=False), "scheduler": _probe()},
                    {"ledger": {"alive": False}, "scheduler": {"alive": True}})
    assert down["healthy"] is False and down["problems"] == ["process ledger is not running"]

    not_ready = _verdict(monkeypatch, {"ledger": _probe(ready=False), "scheduler": _probe()}, alive)
    assert not_ready["problems"] == ["process ledger not ready: {'db': 'refused'}"]

    violated = _verdict(monkeypatch, {"ledger": _probe(), "scheduler": _probe(
        "# TYPE meterline_invariant_check_violations gauge\n"
        "meterline_invariant_check_violations{check=\"balance\"} 1.0\n")}, alive)
    assert violated["healthy"] is False and "invariant check violated" in violated["problems"][0]


@pytest.mark.parametrize(("metrics", "state"), [
    ("", "not_run"),
    ("# TYPE meterline_reconciliation_drift_wallets gauge\n"
     "meterline_reconciliation_drift_wallets{record=\"ledger\"} 0.0\n"
     "meterline_reconciliation_drift_wallets{record=\"clickhouse_usage\"} 0.0\n", "ok"),
    ("# TYPE meterline_reconciliation_drift_wallets gauge\n"
     "meterline_reconciliation_drift_wallets{record=\"ledger\"} 0.0\n"
     "meterline_reconciliation_drift_wallets{record=\"clickhouse_usage\"} 3.0\n", "drift"),
])
def test_reconciliation_state_and_a_drift_makes_the_stack_unhealthy(metrics: str, state: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert health.reconciliation(_probe(metrics))["state"] == state
    verdict = _verdict(monkeypatch, {"scheduler": _probe(metrics)}, {"scheduler": {"alive": True}})
    assert verdict["healthy"] is (state != "drift")
    if state == "drift":
        assert "clickhouse_usage" in verdict["problems"][0] and verdict["reconciliation"]["disagreeing_wallets"] == {
            "ledger": 0, "clickhouse_usage": 3}


def _reconciled(drift: int, at: float) -> str:
    return ("# TYPE meterline_reconciliation_drift_wallets gauge\n"
            f"meterline_reconciliation_drift_wallets{{record=\"clickhouse_usage\"}} {drift}.0\n"
            "# TYPE meterline_reconciliation_last_run_timestamp_seconds gauge\n"
            f"meterline_reconciliation_last_run_timestamp_seconds {at}\n")


def test_the_reconciliation_is_read_from_whichever_process_ran_it_last(monkeypatch: pytest.MonkeyPatch) -> None:
    # embedded ClickHouse: the api runs it (meterline/reconcile_embedded.py) and the scheduler exports nothing
    verdict = _verdict(monkeypatch, {"scheduler": _probe(), "api": _probe(_reconciled(2, 1.7e9))},
                       {"scheduler": {"alive": True}, "api": {"alive": True}})
    assert verdict["reconciliation"]["state"] == "drift" and "clickhouse_usage" in verdict["problems"][0]
    # both exported one (ClickHouse moved from embedded to a server): the newer report counts
    assert health.reconciliation(_probe(_reconciled(0, 1.8e9)), _probe(_reconciled(2, 1.7e9)))["state"] == "ok"
    assert health.reconciliation(None, None)["state"] == "unknown"


def _events_metrics(accepted: int, duplicate: int, misplaced: int = 0, unpriced: int = 0, unmetered: int = 0) -> str:
    return ("# TYPE meterline_streams_events_total counter\n"
            f'meterline_streams_events_total{{outcome="accepted"}} {accepted}.0\n'
            f'meterline_streams_events_total{{outcome="duplicate"}} {duplicate}.0\n'
            f'meterline_streams_events_total{{outcome="unmetered"}} {unmetered}.0\n'
            "# TYPE meterline_streams_event_notes_total counter\n"
            f'meterline_streams_event_notes_total{{note="misplaced"}} {misplaced}.0\n'
            f'meterline_streams_event_notes_total{{note="unpriced"}} {unpriced}.0\n')


def test_event_outcomes_are_summed_over_the_workers() -> None:
    probes = {"streams-0": _probe(_events_metrics(10, 1)), "streams-1": _probe(_events_metrics(5, 2)),
              "ledger": _probe(METRICS)}
    report = health.events(probes)
    assert report["outcomes"] == {"accepted": 15, "duplicate": 3, "unmetered": 0}
    assert report["notes"] == {"misplaced": 0, "unpriced": 0}
    assert report["notices"] == []  # clean traffic calls for nothing


@pytest.mark.parametrize(("counts", "says"), [
    ({"misplaced": 7}, ["7 events arrived in a partition other than their subject's", "murmur2_random"]),
    ({"unpriced": 4}, ["4 times an event met a meter without an active price", "meterline prices create"]),
    ({"unmetered": 3}, ["3 events were accepted but charged nothing"]),
])
def test_each_notice_appears_with_its_count_and_what_to_do(counts: dict[str, int], says: list[str]) -> None:
    report = health.events({"streams-0": _probe(_events_metrics(10, 0, **counts))})
    assert len(report["notices"]) == 1, report["notices"]
    assert all(text in report["notices"][0] for text in says), report["notices"]


def test_notices_never_make_the_stack_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    probes = {"streams-0": _probe(_events_metrics(10, 0, misplaced=2, unpriced=1, unmetered=1))}
    verdict = _verdict(monkeypatch, probes, {"streams-0": {"alive": True}})
    assert verdict["healthy"] is True and verdict["problems"] == []
    assert len(verdict["events"]["notices"]) == 3
