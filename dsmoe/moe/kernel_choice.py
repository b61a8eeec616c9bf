"""``expert_kernel="adaptive"``: time the grouped and the bucketed expert kernels on a layer's own calls, keep the faster.

Which one wins on a CPU depends on the machine's load and on the routing, not only on the shape: grouped GEMM
computes no padding but runs one parallel region per expert and projection, so when another process holds a
core every region waits for a descheduled thread; the bucketed layout (:mod:`dsmoe.moe.buckets`) pads a few
percent of the rows and runs one batched GEMM per bucket, which degrades far less. On a 2-core machine they
are even when idle at E=64 and bucketed is ~1.3x faster with one core busy. The chooser measures instead of
guessing:

- the first calls alternate the two kernels until each has ``warmup`` samples;
- then every call uses the kernel with the lower median time per assignment over its last ``window`` samples;
- every ``probe_every`` calls the other kernel is run once, so a change of load is noticed.

A sample is the wall-clock time from the row plan to the experts' output, plus, when the call is
backpropagated, the experts' backward (from the gradient reaching their output to it leaving their input rows):
the backward holds two thirds of the GEMMs and most of the difference under load. Only meaningful where
kernels run synchronously (CPU); the layer uses grouped on GPU.
Results then depend on timing, so runs are not bitwise reproducible: every other kernel is.
"""
from __future__ import annotations

import statistics
import time
from collections import deque

import torch

KERNELS = ("grouped", "bucketed")


class KernelChooser:
    """Per-layer bookkeeping of the adaptive expert kernel choice."""

    def __init__(self, warmup: int = 2, window: int = 5, probe_every: int = 50):
        self.warmup, self.probe_every = warmup, probe_every
        self.samples = {k: deque(maxlen=window) for k in KERNELS}
        self.calls = 0

    def best(self) -> str:
        """The kernel with the lower median time per assignment so far (grouped on a tie or without samples)."""
        med = {k: statistics.median(v) if v else float("inf") for k, v in self.samples.items()}
        return min(KERNELS, key=lambda k: (med[k], KERNELS.index(k)))

    def pick(self) -> str:
        """The kernel for the next call."""
        self.calls += 1
        for k in KERNELS:
            if len(self.samples[k]) < self.warmup:
                return k
        best = self.best()
        if self.calls % self.probe_every == 0:
            return next(k for k in KERNELS if k != best)
        return best

    def record(self, kernel: str, seconds: float, assignments: int) -> None:
        self.samples[kernel].append(seconds / max(assignments, 1))

    def summary(self) -> dict:
        """Calls so far, the current choice and the median microseconds per 1000 assignments of each kernel."""
        return {"calls": self.calls, "choice": self.best(),
                **{f"{k}_us_per_1k": 1e9 * statistics.median(v) if v else None for k, v in self.samples.items()}}

    def timer(self, kernel: str, assignments: int) -> "KernelTimer":
        """Start timing one call of ``kernel`` (now: the row plan is next)."""
        return KernelTimer(self, kernel, assignments)


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``fn`` when the gradient passes through."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


class KernelTimer:
    """One call's sample: forward time, plus the experts' backward when the rows carry a gradient."""

    def __init__(self, chooser: KernelChooser, kernel: str, assignments: int):
        self.chooser, self.kernel, self.assignments = chooser, kernel, assignments
        self.t0, self.forward_s, self.backward_t0, self.watch_backward = time.perf_counter(), 0.0, None, False

    def input(self, rows: torch.Tensor) -> torch.Tensor:
        """Mark the experts' input rows (their gradient leaving ends the backward)."""
        if not (torch.is_grad_enabled() and rows.requires_grad):
            return rows
        self.watch_backward = True
        return _Mark.apply(rows, self._backward_done)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """Mark the experts' output (its gradient arriving starts the backward); records forward-only calls."""
        self.forward_s = time.perf_counter() - self.t0
        if self.watch_backward and y.requires_grad:
            return _Mark.apply(y, self._backward_start)
        self.chooser.record(self.kernel, self.forward_s, self.assignments)
        return y

    def _backward_start(self):
        self.backward_t0 = time.perf_counter()

    def _backward_done(self):
        if self.backward_t0 is not None:
            total = self.forward_s + time.perf_counter() - self.backward_t0
            self.chooser.record(self.kernel, total, self.assignments)
