"""Shared helpers of the launch/bench_*.py scripts: the machine line, a CPU-contention meter, a busy-core
spinner, timing utilities."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata

import torch


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def machine_line(device: str, dtype: torch.dtype, packages: tuple[str, ...] = ()) -> str:
    """One line naming the CPU (and GPU), core/thread counts, torch and ``packages`` versions, device and dtype."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    parts = [f"CPU {cpu} ({cores} cores usable, {torch.get_num_threads()} torch threads)",
             f"torch {torch.__version__}", *(f"{p} {_version(p)}" for p in packages),
             f"python {platform.python_version()}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts.insert(1, f"GPU {props.name} (cc {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    parts.append(openmp_note())
    parts.append(f"device={device} dtype={str(dtype).replace('torch.', '')}")
    return "machine: " + " | ".join(parts)


OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def openmp_note() -> str:
    """The OpenMP settings this process started with (how idle worker threads wait decides the speed on a shared
    machine: spinning threads compete with other processes for their cores)."""
    set_ = [f"{k}={os.environ[k]}" for k in OPENMP_VARIABLES if k in os.environ]
    return "OpenMP: " + (" ".join(set_) if set_ else "defaults")


class CpuContention:
    """Share of the machine's CPUs used by *other* processes (and hypervisor steal) while timing (Linux only)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)   # user nice system irq softirq steal
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), r.ru_utime + r.ru_stime

    def share(self) -> float | None:
        end = self._read()
        if end is None or self.start is None:
            return None
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(other, 0.0) / (wall * (os.cpu_count() or 1)) if wall > 0 else None


class BusyCore:
    """A helper process spinning on one CPU while the block runs: a shared machine, measured instead of guessed.

    ``with BusyCore(True): ...`` starts ``python -c 'while True: pass'`` pinned to the last CPU this process may
    use (Linux; elsewhere unpinned) and kills it on exit, even on an exception. ``BusyCore(False)`` does nothing.
    """

    def __init__(self, enabled: bool = True):
        self.enabled, self.proc, self.cpu = enabled, None, None

    def __enter__(self):
        if not self.enabled:
            return self
        code = "while True: pass"
        if hasattr(os, "sched_getaffinity"):
            self.cpu = max(os.sched_getaffinity(0))
            code = f"import os; os.sched_setaffinity(0, {{{self.cpu}}})\n" + code
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        time.sleep(0.2)                       # let it start spinning before the first timed step
        return self

    def describe(self) -> str:
        if not self.enabled:
            return "busy core: none"
        return f"busy core: a spinning process pinned to CPU {self.cpu}" if self.cpu is not None \
            else "busy core: a spinning process (unpinned)"

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        return False


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median(v) -> float:
    return statistics.median(v) if v else float("nan")


def setup_device(device: str | None, dtype: str | None, threads: int | None) -> tuple[str, torch.dtype, str]:
    """Resolve ``--device``/``--dtype`` to (device, dtype, dtype name), apply ``--threads`` and select GPU 0.
    Default: cuda + bf16 when a GPU is present, else cpu + fp32. Exits with a message on an impossible ask."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    name = dtype or ("bf16" if device == "cuda" else "fp32")
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.set_device(0)
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[name], name


def log(msg: str) -> None:
    """Progress lines go to stderr, so stdout carries only the results."""
    print(msg, file=sys.stderr, flush=True)
