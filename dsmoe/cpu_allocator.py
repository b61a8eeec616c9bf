"""Keep large CPU tensors in the malloc heap instead of fresh ``mmap`` pages (glibc on Linux only).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to
the kernel on free. A training step that allocates and frees the same activation-sized tensors every step then
pays a page fault per 4 KiB on first touch, every step: ~8 ms per 32 MiB tensor on a 2-core machine, a fifth of a
small MoE layer's forward+backward. :func:`keep_cpu_allocations` turns that off for this process
(``mallopt(M_MMAP_MAX, 0)``, and a trim threshold high enough that freed memory stays in the heap), so a freed
tensor's pages are reused by the next step. The process's resident memory then stays at its high-water mark,
which is what a training loop reaches every step anyway.

Entry points call it (the trainer and the benchmarks when they run on CPU); importing dsmoe changes nothing.
The environment variable ``DSMOE_SYSTEM_MALLOC=1`` keeps glibc's defaults, to compare.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1        # the largest mallopt takes (2 GiB): free heap top kept up to that

_state: dict[str, bool] = {}


def keep_cpu_allocations() -> bool:
    """Apply the setting once per process; returns True when it is in effect (glibc found and not opted out)."""
    if "on" in _state:
        return _state["on"]
    on = False
    if sys.platform.startswith("linux") and os.environ.get("DSMOE_SYSTEM_MALLOC", "") not in ("1", "true", "yes"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):      # not glibc (musl, ...): nothing to tune
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            on = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    _state["on"] = on
    return on


def allocator_note() -> str:
    """How CPU memory is allocated in this process, for benchmark and run logs."""
    if _state.get("on"):
        return "malloc: heap only (no mmap for large tensors)"
    return "malloc: system default"
