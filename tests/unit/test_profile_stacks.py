"""bench.pipeline --profile: py-spy's collapsed stacks summarised into where a process's time went. The summary
is what the scale issue's analysis is read from, so its attribution (innermost frame, by package) is pinned on
hand-written stacks, and one real py-spy run against a busy child shows the sampler attaches and names the
function that was burning the CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench.profile_stacks import collect, frame_function, frame_package, parse_collapsed, record, summarize

RAW = textwrap.dedent("""\
    <module> (meterline/__main__.py:3);run (streams/worker.py:40);meter (streams/metering.py:120) 60
    <module> (meterline/__main__.py:3);run (streams/worker.py:40);execute (psycopg/cursor.py:700) 30
    <module> (meterline/__main__.py:3);poll (confluent_kafka/deserializing_consumer.py:90) 10
    this line has no count
    """)


def test_each_sample_counts_once_for_the_package_running_when_it_was_taken() -> None:
    summary = summarize(parse_collapsed(RAW))
    assert summary.samples == 100
    assert summary.by_package == [("streams", 60), ("psycopg", 30), ("confluent_kafka", 10)]
    assert summary.hottest[0] == ("streams/metering.py:meter", 60)
    assert summary.lines()[0] == "100 active samples; by package: streams 60%, psycopg 30%, confluent_kafka 10%"


def test_frames_name_their_package_and_function_without_the_line() -> None:
    assert frame_package("send (confluent_kafka/serializing_producer.py:12)") == "confluent_kafka"
    assert frame_package("dumps (json/__init__.py:231)") == "json"
    assert frame_package("select (selectors.py:469)") == "selectors"
    assert frame_package("<module> (<string>:1)") == "<string>"
    assert frame_function("Ledger.apply (ledger/consumer.py:88)") == "ledger/consumer.py:Ledger.apply"


def test_nothing_sampled_says_so_instead_of_dividing_by_zero() -> None:
    assert summarize([]).lines() == ["no active samples (idle the whole time, or py-spy could not attach)"]


def test_py_spy_attaches_to_a_running_process_and_names_its_hot_function(tmp_path: Path) -> None:
    busy = tmp_path / "busy.py"
    busy.write_text(textwrap.dedent("""\
        import time

        def spin_for_the_profiler():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                sum(range(1000))

        spin_for_the_profiler()
        """))
    child = subprocess.Popen([sys.executable, str(busy)])
    try:
        time.sleep(0.5)
        out = tmp_path / "stacks.txt"
        summary = collect(record(child.pid, 2, out), out)
    finally:
        child.kill()
        child.wait()
    assert not isinstance(summary, str), summary
    assert summary.samples >= 20  # 2 s at 50 Hz, all of it active
    assert any("spin_for_the_profiler" in name for name, _ in summary.hottest[:3])
