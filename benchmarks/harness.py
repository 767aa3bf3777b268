"""Timing of one stage: warm-up runs (excluded), then ``repeats`` measured runs; median wall time and the
largest peak memory of the measured runs.

Every run is preceded by an untimed ``setup`` (e.g. a fresh, cold RefDiff) and ``gc.collect()``; on CUDA the
device is synchronised before the clock starts and before it stops, so asynchronous kernels are counted in
the stage that launched them.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .memory import MemoryMonitor, MemoryReading


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Wall times (seconds) and memory of the measured runs of one stage; warm-up runs are kept apart."""

    name: str
    times: list[float]
    warmup_times: list[float]
    memory: list[MemoryReading]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        """Median wall time of the measured runs (NaN when there is none)."""
        return statistics.median(self.times) if self.times else float("nan")

    def peak(self, attr: str) -> float:
        """Largest value of a MemoryReading field over the measured runs (NaN when unknown)."""
        values = [getattr(m, attr) for m in self.memory if getattr(m, attr) is not None]
        values = [v for v in values if not math.isnan(v)]
        return max(values) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: median, every time, memory peaks, and the per-run readings."""
        out: dict[str, Any] = {
            "median_s": self.median,
            "times_s": list(self.times),
            "warmup_s": list(self.warmup_times),
            "rss_delta_mb": self.peak("rss_delta_mb"),
            "rss_peak_mb": self.peak("rss_peak_mb"),
            "rss_method": self.memory[0].rss_method if self.memory else "unavailable",
        }
        if any(m.vram_peak_mb is not None for m in self.memory):
            out["vram_peak_mb"] = self.peak("vram_peak_mb")
            out["vram_delta_mb"] = self.peak("vram_delta_mb")
        out["runs"] = [m.to_dict() for m in self.memory]
        if self.extra:
            out["extra"] = self.extra
        return out


@dataclass
class Timer:
    """Runs and measures stages with one set of options."""

    device: torch.device
    repeats: int = 3
    warmup: int = 1
    rss_interval_s: float = 0.002
    log: Callable[[str], None] | None = None
    slow_repeats: int | None = None  # repeats of the slow measurements (SAM, end to end); None: ``repeats``
    slow_warmup: int | None = None  # warm-up runs of the slow measurements; None: ``warmup``

    def counts(self, slow: bool = False) -> tuple[int, int]:
        """(repeats, warmup) of a measurement; ``slow`` ones (minutes each on a CPU) may use fewer."""
        if not slow:
            return self.repeats, self.warmup
        return (self.repeats if self.slow_repeats is None else self.slow_repeats,
                self.warmup if self.slow_warmup is None else self.slow_warmup)

    def _run_once(self, fn: Callable[..., Any], setup: Callable[[], Any] | None) -> tuple[float, MemoryReading, Any]:
        """One run: untimed setup and gc, then the timed call inside a memory monitor."""
        arg = setup() if setup is not None else None
        gc.collect()
        synchronize(self.device)
        with MemoryMonitor(self.device, self.rss_interval_s) as mon:
            start = time.perf_counter()
            out = fn(arg) if setup is not None else fn()
            synchronize(self.device)
            elapsed = time.perf_counter() - start
        del arg
        assert mon.reading is not None
        return elapsed, mon.reading, out

    def _log(self, m: Measurement) -> None:
        if self.log is None:
            return
        delta = m.peak("rss_delta_mb")
        vram = m.peak("vram_peak_mb")
        extra = f", VRAM peak {vram:,.0f} MB" if not math.isnan(vram) else ""
        self.log(f"  {m.name}: median {m.median:.4f} s over {len(m.times)} run(s), peak +{delta:,.0f} MB RSS{extra}")

    def measure(self, name: str, fn: Callable[..., Any], setup: Callable[[], Any] | None = None,
                repeats: int | None = None, warmup: int | None = None, slow: bool = False
                ) -> tuple[Measurement, Any]:
        """Run ``fn`` warm-up + repeats times (``setup()`` untimed before each; its result is passed to
        ``fn`` when a setup is given). Returns the Measurement and the last run's output."""
        default_repeats, default_warmup = self.counts(slow)
        repeats = default_repeats if repeats is None else repeats
        warmup = default_warmup if warmup is None else warmup
        m = Measurement(name, [], [], [])
        out: Any = None
        for run in range(warmup + repeats):
            elapsed, reading, out = self._run_once(fn, setup)
            if run < warmup:
                m.warmup_times.append(elapsed)
            else:
                m.times.append(elapsed)
                m.memory.append(reading)
        self._log(m)
        return m, out

    def measure_interleaved(self, fns: dict[str, Callable[[], Any]], slow: bool = False
                            ) -> tuple[dict[str, Measurement], dict[str, Any]]:
        """Measure several alternatives in turn (A, B, C, A, B, C, ...), so that a drift in the machine's load
        hits all of them alike; use it for ratios of alternatives. Warm-up rounds come first. Returns the
        Measurements and each alternative's last output."""
        repeats, warmup = self.counts(slow)
        out = {name: Measurement(name, [], [], []) for name in fns}
        last: dict[str, Any] = {}
        for run in range(warmup + repeats):
            for name, fn in fns.items():
                elapsed, reading, last[name] = self._run_once(fn, None)
                if run < warmup:
                    out[name].warmup_times.append(elapsed)
                else:
                    out[name].times.append(elapsed)
                    out[name].memory.append(reading)
        for m in out.values():
            self._log(m)
        return out, last


__all__ = ["Measurement", "Timer", "synchronize"]
