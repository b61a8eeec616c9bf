"""Per-domain held-out perplexity of merged models and of the experts they come from, on the same scored tokens.

Rows: each expert alone; the FFN merge under its gate in ``weighted_sum`` and ``select_one`` mode; the oracle
merge (the gold domain's one-hot gate); and any RoutedLM folders given (e.g. a BTX model before and after its
fine-tune). Every row scores the same tokens: each text is tokenised once with the experts' tokenizer, cut to
``seq_len`` tokens and scored at every position after the first, one text per forward (no padding). The gate's
accuracy per domain (argmax = gold domain) comes with the table.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .ffn_merge import FFNMergeForCausalLM
from .files import atomic_write


@dataclass
class MergeEvalResult:
    """Perplexity per row and domain, the scored tokens per domain and the gate's accuracy per domain."""

    domains: list[str]
    tokens: dict[str, int]
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    gate_accuracy: dict[str, float] = field(default_factory=dict)
    machine: str = ""


@torch.no_grad()
def _nll(model, ids: torch.Tensor, **kw) -> float:
    """Summed next-token NLL of one text (1, T)."""
    logits = model(input_ids=ids, use_cache=False, **kw).logits
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))


@torch.no_grad()
def evaluate_merge(merge: FFNMergeForCausalLM, experts: list, texts: dict[str, list[str]],
                   extra: dict[str, object] | None = None, seq_len: int = 256, tokenizer=None) -> MergeEvalResult:
    """Score every row (see the module doc). ``experts``: the N source causal LMs in gate-class order;
    ``texts``: domain name -> held-out texts, in the same order; ``extra``: name -> more causal LMs (RoutedLMs)."""
    tok = tokenizer if tokenizer is not None else merge.tokenizer
    if tok is None:
        raise ValueError("evaluate_merge: the merge has no tokenizer; pass tokenizer=")
    domains = list(texts)
    if len(domains) != merge.num_models or len(experts) != merge.num_models:
        raise ValueError(f"evaluate_merge: {len(domains)} domains and {len(experts)} experts for a merge of "
                         f"{merge.num_models} models; give one domain and one expert per merged model")
    ids = {d: [tok(t, return_tensors="pt")["input_ids"][:, :seq_len] for t in texts[d]] for d in domains}
    ids = {d: [x for x in xs if x.shape[1] >= 2] for d, xs in ids.items()}
    tokens = {d: sum(x.shape[1] - 1 for x in xs) for d, xs in ids.items()}
    empty = [d for d, n in tokens.items() if n == 0]
    if empty:
        raise ValueError(f"evaluate_merge: domain {empty[0]!r} has no text of 2 or more tokens")
    gate = {d: merge.gating_probs_for(texts[d]) if merge.gate is not None else None for d in domains}
    result = MergeEvalResult(domains=domains, tokens=tokens)
    if merge.gate is not None:
        result.gate_accuracy = {d: float((gate[d].argmax(-1) == i).float().mean()) for i, d in enumerate(domains)}

    def score(name: str, fn) -> None:
        result.perplexity[name] = {d: math.exp(sum(fn(i, j, x) for j, x in enumerate(ids[d])) / tokens[d])
                                   for i, d in enumerate(domains)}

    for e, expert in enumerate(experts):
        score(f"expert {e + 1} ({domains[e]})", lambda i, j, x, m=expert: _nll(m.eval(), x))
    mode = merge.config.routing_mode
    merge.eval()
    try:
        if merge.gate is not None:
            for m in ("weighted_sum", "select_one"):
                merge.set_routing_mode(m)
                score(f"merge {m} (gate)", lambda i, j, x: _nll(merge, x, gating_probs=gate[domains[i]][j:j + 1]))
        merge.set_routing_mode("weighted_sum")
        score("merge oracle (gold domain)",
              lambda i, j, x: _nll(merge, x, gating_probs=F.one_hot(torch.tensor([i]), merge.num_models).float()))
    finally:
        merge.set_routing_mode(mode)
    for name, model in (extra or {}).items():
        score(name, lambda i, j, x, m=model: _nll(m.eval(), x))
    return result


def write_report(result: MergeEvalResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``merge_eval.json`` and ``merge_eval.png`` (grouped bars: perplexity per row and domain) in ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / "merge_eval.json", out / "merge_eval.png"
    atomic_write(js, lambda p: Path(p).write_text(json.dumps(asdict(result), indent=1)))
    rows = list(result.perplexity)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * len(result.domains) / 2), 4))
    width = 0.8 / len(result.domains)
    for k, d in enumerate(result.domains):
        ax.bar([r + k * width for r in range(len(rows))], [result.perplexity[r][d] for r in rows], width, label=d)
    ax.set_xticks([r + 0.4 - width / 2 for r in range(len(rows))])
    ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity")
    ax.legend(title="domain")
    ax.set_title(result.machine or "per-domain perplexity", fontsize=8)
    fig.tight_layout()
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return js, png
