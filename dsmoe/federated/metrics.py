"""metrics.jsonl of a federated run (one row per round) and its end-of-run plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsmoe.training.metrics import read_metrics


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_after_round(path: Path, last_round: int) -> None:
    """On resume: keep the rows of rounds <= last_round (the checkpointed ones), atomically."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r.get("round", 0) <= last_round]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_plots(output_dir: Path) -> list[Path]:
    """accuracy.png (global test accuracy / macro-F1 and per-client accuracy per round) and expert_usage.png
    (clients x experts share of each client's tokens per MoE layer, last round) from metrics.jsonl."""
    rows = [r for r in read_metrics(output_dir / "metrics.jsonl") if "test_accuracy" in r]
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in rows]
    ax.plot(rounds, [r["test_accuracy"] for r in rows], "o-", label="global test accuracy", lw=2)
    ax.plot(rounds, [r["test_macro_f1"] for r in rows], "s--", label="global test macro-F1")
    clients = sorted({c for r in rows for c in r.get("client_accuracy", {})}, key=int)
    for c in clients:
        pts = [(r["round"], r["client_accuracy"][c]) for r in rows if c in r.get("client_accuracy", {})]
        ax.plot(*zip(*pts), ":", alpha=0.6, label=f"client {c} (local data)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(output_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    usage = next((r["expert_usage"] for r in reversed(rows) if r.get("expert_usage")), None)
    if usage:
        layers = sorted(next(iter(usage.values())))
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 3), squeeze=False)
        ids = sorted(usage, key=int)
        for ax, layer in zip(axes[0], layers):
            mat = [[v / max(sum(usage[c][layer]), 1) for v in usage[c][layer]] for c in ids]
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(layer, fontsize=8)
            ax.set_xlabel("expert")
            ax.set_ylabel("client")
            ax.set_yticks(range(len(ids)), ids)
        fig.colorbar(im, ax=axes[0].tolist(), label="share of the client's tokens")
        written.append(output_dir / "expert_usage.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return written
