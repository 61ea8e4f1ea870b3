"""Peak resident memory of this process over a block, for benchmarks that must show they run in bounded RAM.

Sampled by a thread (``ru_maxrss`` cannot be reset between phases); a spike shorter than the interval can be
missed, so figures are a lower bound of the true peak at that resolution."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


class PeakRss:
    def __init__(self, interval_s: float = 0.05) -> None:
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self.start_bytes = self.peak_bytes = 0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def start_mib(self) -> float:
        return self.start_bytes / 2**20
