"""Peak memory of one stage: the process's resident set size (RSS) on the CPU, allocated memory on CUDA.

CPU method (Linux): a daemon thread reads the resident set size every ``interval_s`` seconds while the stage
runs and keeps the largest value (it reads ``/proc/self/statm``, whose second field is the VmRSS of
``/proc/self/status`` in pages: one read costs ~10 us instead of ~60-300 us). Where the kernel allows it
(Linux >= 4.0), the stage also resets the kernel's own high-water mark (writing ``5`` to
``/proc/self/clear_refs``) and reads ``VmHWM`` afterwards, which catches spikes shorter than the sampling
interval; the reported peak is the larger of the two. Limits: RSS counts touched pages of the whole process
(other threads, freed-but-kept malloc arenas, memory-mapped files), so the peak minus the stage's starting RSS
under-counts when the stage reuses memory that an earlier stage freed but the allocator kept, and over-counts
when another thread allocates at the same time. Without ``/proc`` (macOS, Windows) only the process's
lifetime peak (``ru_maxrss``) is known and the per-stage values are NaN.

CUDA method: ``torch.cuda.reset_peak_memory_stats`` before the stage, ``torch.cuda.max_memory_allocated``
after it (the caching allocator's allocated bytes, not what ``nvidia-smi`` shows, which includes the cache
and the CUDA context).
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass
from types import TracebackType

import torch

STATUS_PATH = "/proc/self/status"
STATM_PATH = "/proc/self/statm"
CLEAR_REFS_PATH = "/proc/self/clear_refs"
MEMINFO_PATH = "/proc/meminfo"
MB = 1024.0 * 1024.0


def read_status_kib(path: str = STATUS_PATH) -> dict[str, int]:
    """The ``Vm*`` fields of /proc/self/status in KiB ({} where the file does not exist)."""
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key.startswith("Vm"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


class _StatmReader:
    """Reads the current RSS in KiB from /proc/self/statm with one pread on a descriptor kept open."""

    def __init__(self) -> None:
        self.page_kib = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4
        try:
            self.fd: int | None = os.open(STATM_PATH, os.O_RDONLY)
        except OSError:
            self.fd = None

    def kib(self) -> int | None:
        """Current RSS in KiB, or None where statm cannot be read."""
        if self.fd is None:
            return read_status_kib().get("VmRSS")
        try:
            return int(os.pread(self.fd, 128, 0).split()[1]) * self.page_kib
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def rss_mb() -> float:
    """The process's current resident set size in MiB (NaN where /proc is missing)."""
    kib = read_status_kib().get("VmRSS")
    return float("nan") if kib is None else kib / 1024.0


def lifetime_peak_rss_mb() -> float:
    """The process's peak RSS since start (or since the last reset) in MiB: VmHWM, else ru_maxrss."""
    kib = read_status_kib().get("VmHWM")
    if kib is not None:
        return kib / 1024.0
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError):
        return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where that is not allowed."""
    try:
        with open(CLEAR_REFS_PATH, "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def available_memory_bytes(device: torch.device) -> float:
    """Memory a stage could still take: free VRAM on CUDA, MemAvailable from /proc/meminfo on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open(MEMINFO_PATH, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float("inf")


@dataclass
class MemoryReading:
    """Memory of one run of a stage, in MiB."""

    rss_start_mb: float  # RSS when the stage started
    rss_peak_mb: float  # largest RSS while it ran (process total: models included)
    rss_delta_mb: float  # rss_peak_mb - rss_start_mb: what the stage itself added at its peak
    rss_sampled_peak_mb: float  # the sampling thread's largest reading alone
    rss_method: str  # "VmHWM+sampled", "sampled" or "unavailable"
    samples: int  # number of VmRSS readings taken
    vram_peak_mb: float | None = None  # CUDA: max_memory_allocated during the stage (absolute)
    vram_delta_mb: float | None = None  # CUDA: that minus memory_allocated at the start

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return asdict(self)


class MemoryMonitor:
    """Context manager measuring one stage's peak memory (see the module notes for the method and limits).

    ``with MemoryMonitor(device) as mon: run()`` then ``mon.reading``.
    """

    process_peak_mb: float = float("nan")  # largest RSS seen by any monitor in this process

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = float(interval_s)
        self.reading: MemoryReading | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_kib = 0
        self._samples = 0
        self._start_mb = float("nan")
        self._hwm_reset = False
        self._vram_start = 0
        self._reader: _StatmReader | None = None

    def _sample(self) -> None:
        kib = self._reader.kib() if self._reader is not None else None
        if kib is not None:
            self._peak_kib = max(self._peak_kib, kib)
            self._samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "MemoryMonitor":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._vram_start = torch.cuda.memory_allocated(self.device)
        self._reader = _StatmReader()
        self._hwm_reset = reset_peak_rss()
        self._start_mb = rss_mb()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._reader is not None:
            self._reader.close()
        sampled = self._peak_kib / 1024.0 if self._samples else float("nan")
        peak, method = sampled, "sampled" if self._samples else "unavailable"
        if self._hwm_reset:
            hwm = read_status_kib().get("VmHWM")
            if hwm is not None:
                peak, method = max(sampled, hwm / 1024.0), "VmHWM+sampled"
        vram_peak = vram_delta = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
            vram_peak, vram_delta = top / MB, (top - self._vram_start) / MB
        if not math.isnan(peak):
            MemoryMonitor.process_peak_mb = (peak if math.isnan(MemoryMonitor.process_peak_mb)
                                             else max(MemoryMonitor.process_peak_mb, peak))
        delta = peak - self._start_mb if not (math.isnan(peak) or math.isnan(self._start_mb)) else float("nan")
        self.reading = MemoryReading(rss_start_mb=self._start_mb, rss_peak_mb=peak, rss_delta_mb=delta,
                                     rss_sampled_peak_mb=sampled, rss_method=method, samples=self._samples,
                                     vram_peak_mb=vram_peak, vram_delta_mb=vram_delta)


__all__ = ["MemoryMonitor", "MemoryReading", "read_status_kib", "rss_mb", "lifetime_peak_rss_mb",
           "reset_peak_rss", "available_memory_bytes"]
