"""Where a process's time goes, from py-spy's sampled stacks (``bench.pipeline --profile``).

py-spy (``record --format raw``) writes one line per distinct stack: ``frame;frame;…;frame count``, outermost
frame first, each frame ``function (path:line)`` with the path relative to its ``sys.path`` entry — so the first
path segment names the package (``psycopg``, ``faust``, ``streams``, ``json``). Idle threads (blocked in a
wait) are not sampled unless py-spy is told to, so the samples are the process's *active* time.

Two views, both as a share of the active samples:
- **by package, innermost frame**: who was running when sampled (``psycopg`` = talking to PostgreSQL,
  ``confluent_kafka`` = the client, ``streams`` = metering itself). Each sample counts once; shares add to 100 %.
- **hottest functions, innermost frame**: the few functions with the most self time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

Stack = tuple[str, ...]


@dataclass(frozen=True)
class StackSummary:
    samples: int
    by_package: list[tuple[str, int]]  # most first
    hottest: list[tuple[str, int]]  # most first

    def lines(self, *, top: int = 6) -> list[str]:
        if not self.samples:
            return ["no active samples (idle the whole time, or py-spy could not attach)"]
        return [f"{self.samples:,} active samples; by package: " + self._shares(self.by_package[:top]),
                "hottest: " + self._shares(self.hottest[:top])]

    def _shares(self, rows: list[tuple[str, int]]) -> str:
        return ", ".join(f"{name} {100 * n / self.samples:.0f}%" for name, n in rows)


def parse_collapsed(text: str) -> list[tuple[Stack, int]]:
    """``frame;…;frame count`` lines → (frames, count); lines that do not end in a count are skipped."""
    stacks = []
    for line in text.splitlines():
        frames, _, count = line.rstrip().rpartition(" ")
        if frames and count.isdigit():
            stacks.append((tuple(frames.split(";")), int(count)))
    return stacks


def frame_package(frame: str) -> str:
    """``send (confluent_kafka/serializing_producer.py:12)`` → ``confluent_kafka``; ``f (<string>:1)`` → ``<string>``."""
    _, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    first = path.split("/", 1)[0]
    return first.removesuffix(".py") or "?"


def frame_function(frame: str) -> str:
    """``Ledger.apply (ledger/consumer.py:88)`` → ``ledger/consumer.py:Ledger.apply`` (lines dropped: one row per
    function)."""
    name, _, where = frame.rpartition(" (")
    return f"{where.rstrip(')').rsplit(':', 1)[0]}:{name}" if name else frame


def summarize(stacks: list[tuple[Stack, int]]) -> StackSummary:
    by_package: Counter[str] = Counter()
    hottest: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        by_package[frame_package(frames[-1])] += count
        hottest[frame_function(frames[-1])] += count
    return StackSummary(samples=sum(by_package.values()), by_package=by_package.most_common(),
                        hottest=hottest.most_common())


def record(pid: int, seconds: float, out: Path, *, rate_hz: int = 50) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (non-blocking: the target is never paused, so its
    figures stay its own; py-spy's own CPU is the profiling cost, one sampler per process)."""
    return subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                             "--rate", str(rate_hz), "--format", "raw", "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def py_spy() -> str:
    """The py-spy of this interpreter's environment (a dev dependency), else the one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def collect(sampler: subprocess.Popen[bytes], out: Path, *, timeout_s: float = 60.0) -> StackSummary | str:
    """The summary once ``sampler`` finished, or why there is none."""
    try:
        _, err = sampler.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        sampler.kill()
        return "py-spy did not finish"
    if not out.exists():
        return f"py-spy wrote nothing: {err.decode(errors='replace').strip()[-300:]}"
    return summarize(parse_collapsed(out.read_text(errors="replace")))
