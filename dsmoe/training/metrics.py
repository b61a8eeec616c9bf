"""Run logging: metrics.jsonl, TensorBoard events, and end-of-run plots (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step so the log has no duplicates."""
    # keep training rows up to the checkpoint; an end-of-run evaluation row at that step is written again
    rows = [r for r in read_metrics(path)
            if r.get("step", 0) < step or (r.get("step") == step and "loss" in r)]
    if path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)


def write_plots(output_dir: Path, load: torch.Tensor | None, layer_ids: list[int]) -> list[Path]:
    """loss_curve.png from metrics.jsonl and expert_load.png (MoE layers x experts share of assignments)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = read_metrics(output_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output_dir / "loss_curve.png", dpi=120)
        plt.close(fig)
        written.append(output_dir / "loss_curve.png")
    if load is not None and load.numel():
        share = load.float() / load.float().sum(-1, keepdim=True).clamp_min(1)
        fig, ax = plt.subplots(figsize=(max(4, share.shape[1] * 0.5), max(2.5, share.shape[0] * 0.5)))
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("expert"), ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(layer_ids)), [str(i) for i in layer_ids])
        ax.set_title("share of computed assignments")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(output_dir / "expert_load.png", dpi=120)
        plt.close(fig)
        written.append(output_dir / "expert_load.png")
    return written
