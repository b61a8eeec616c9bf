"""The comparison table of a mixture on held-out documents of every slice.

Rows: each single expert, an optional dense baseline, ``equal``, ``router`` (log-prob mixture), ``logits-soft``
(router weights, logits combiner), ``argmax`` and ``oracle`` (the gold slice's expert). Every row is computed from
the same expert forward passes on exactly the same scored tokens: each document is cut into windows of
``seq_len`` tokens that overlap by one (a window starts with the last token of the one before, as context), so
every token of a document's text is scored exactly once whatever prompt prefix precedes it (the prefix, the
separator before it and padding are never scored, and the prompt variants score the same tokens); a row's
perplexity is exp(summed NLL / scored tokens) per slice and overall (token-weighted; one averaging for every
row). No query date is applied (every expert is usable). The gate is also scored as a slice classifier
(accuracy, confusion matrix) and as a year predictor (MAE beside the training-mean-year baseline), per document
(its posterior after reading the document's whole text, without the prompt prefix).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import combine as C
from .files import atomic_write
from .gate_training import GateAccuracy, gate_accuracy, gate_posteriors
from .year_prediction import YearPrediction, year_mae


@dataclass
class EvalDocument:
    """One held-out document: its token ids, year and gold slice (expert index)."""

    ids: list[int]
    year: int
    slice: int
    prompt_len: int = 0
    """Leading context-only tokens: the separator and any prompt prefix (never scored, never read by the gate)."""


@dataclass
class EvalRow:
    """Perplexity of one way of predicting, per slice (by expert name) and overall."""

    name: str
    ppl: dict[str, float]
    overall: float


@dataclass
class MixtureEvaluation:
    """The table, the gate's accuracy and its year prediction."""

    slices: dict[str, list[int]]
    tokens: dict[str, int]
    """Scored tokens per slice (the same for every row)."""
    documents: dict[str, int]
    rows: list[EvalRow] = field(default_factory=list)
    gate: GateAccuracy | None = None
    years: YearPrediction | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self, name: str) -> EvalRow:
        return next(r for r in self.rows if r.name == name)

    def format_table(self) -> str:
        names = list(self.slices)
        head = f"{'row':<22}" + "".join(f"{n:>12}" for n in names) + f"{'overall':>12}"
        lines = [head, f"{'scored tokens':<22}" + "".join(f"{self.tokens[n]:>12}" for n in names)
                 + f"{sum(self.tokens.values()):>12}"]
        for r in self.rows:
            lines.append(f"{r.name:<22}" + "".join(f"{r.ppl[n]:>12.2f}" for n in names) + f"{r.overall:>12.2f}")
        if self.gate is not None:
            lines.append(f"gate accuracy {self.gate.accuracy:.3f} on {self.gate.sequences} documents; "
                         f"confusion[gold][pred] {self.gate.confusion}")
        if self.years is not None:
            y = self.years
            lines.append(f"year MAE: gate expected {y.mae_expected:.1f}, gate argmax {y.mae_argmax:.1f}, "
                         f"training-mean baseline ({y.baseline_year:.0f}) {y.mae_baseline:.1f} years")
        return "\n".join(lines)

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``mixture_eval.json`` and ``mixture_eval.png`` into ``out_dir`` (atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js = out / "mixture_eval.json"
        atomic_write(js, lambda p: Path(p).write_text(json.dumps(self.to_dict(), indent=1)))
        png = out / "mixture_eval.png"
        atomic_write(png, self._plot)
        return js, png

    def _plot(self, path: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(self.slices) + ["overall"]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names)), 4.5))
        width = 0.8 / max(len(self.rows), 1)
        for i, r in enumerate(self.rows):
            vals = [r.ppl[n] for n in self.slices] + [r.overall]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=r.name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_ylabel("perplexity (held-out, token-weighted)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)


def windows(docs: list[EvalDocument], seq_len: int) -> list[tuple[int, list[int], int]]:
    """(document index, ids, prompt tokens in this window) of every window of ``seq_len`` tokens; consecutive
    windows share one token (the context of the next window's first target)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens (one context, one target)")
    out = []
    for d, doc in enumerate(docs):
        for start in range(0, max(len(doc.ids) - 1, 1), seq_len - 1):
            piece = doc.ids[start:start + seq_len]
            if len(piece) >= 2:
                out.append((d, piece, max(0, min(doc.prompt_len - start, len(piece)))))
    return out


def padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] right-padded with ``pad_id``, attention mask [B, T]) of token lists of any lengths."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def evaluate_mixture(model, docs: list[EvalDocument], seq_len: int, batch_size: int = 8,
                     train_mean_year: float | None = None, baseline=None, pad_id: int = 0) -> MixtureEvaluation:
    """The comparison table of ``model`` (an :class:`ExpertMixtureForCausalLM`) on ``docs``; ``baseline``: an
    optional dense causal LM of the same vocabulary (its row is called "dense")."""
    cfg = model.config
    names, n = cfg.expert_names, cfg.num_experts
    present = {d.slice for d in docs}
    missing = [names[k] for k in range(n) if k not in present]
    if missing:
        raise ValueError(f"slice(s) {missing} have no held-out documents; widen the data (data.max_documents, "
                         "data.val_fraction) or drop those slices")
    model.eval()
    has_router = model.router is not None
    rows = [f"expert:{x}" for x in names] + (["dense"] if baseline is not None else []) + ["equal"]
    rows += ["router", "logits-soft", "argmax"] if has_router else []
    rows += ["oracle"]
    nll = {r: torch.zeros(n, dtype=torch.float64) for r in rows}
    tokens = torch.zeros(n, dtype=torch.long)
    wins = windows(docs, seq_len)
    device = model.device
    for s in range(0, len(wins), batch_size):
        chunk = wins[s:s + batch_size]
        ids, mask = padded([w[1] for w in chunk], pad_id)
        t = ids.shape[1]
        prompt = torch.arange(t)[None, :] < torch.tensor([w[2] for w in chunk])[:, None]
        ids, mask, prompt = ids.to(device), mask.to(device), prompt.to(device)
        gold = torch.tensor([docs[w[0]].slice for w in chunk], device=device)
        scored = mask[:, 1:].bool() & ~prompt[:, 1:]
        targets = ids[:, 1:]
        logits = model.expert_outputs(ids, mask).full[:, :, :-1]               # (N, B, T-1, V)
        logp = torch.log_softmax(logits, -1)
        tl = logp.gather(-1, targets[None, ..., None].expand(n, -1, -1, 1)).squeeze(-1)   # (N, B, T-1)
        per_row: dict[str, torch.Tensor] = {f"expert:{x}": tl[k] for k, x in enumerate(names)}
        if baseline is not None:
            bl = torch.log_softmax(baseline(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], -1)
            per_row["dense"] = bl.gather(-1, targets[..., None]).squeeze(-1)
        everyone = torch.ones(len(chunk), n, dtype=torch.bool, device=device)
        per_row["equal"] = C.mix_log_probs(C.equal_log_weights(everyone, t - 1), tl)
        if has_router:
            lw, _, _, _ = model.gate(ids, mask, None, "router", prompt_mask=prompt)
            per_row["router"] = C.mix_log_probs(lw[:, :-1], tl)
            soft = torch.log_softmax(C.mix_logits(lw[:, :-1], logits), -1)
            per_row["logits-soft"] = soft.gather(-1, targets[..., None]).squeeze(-1)
            am, _, _, _ = model.gate(ids, mask, None, "argmax", prompt_mask=prompt)
            per_row["argmax"] = C.mix_log_probs(am[:, :-1], tl)
        per_row["oracle"] = C.mix_log_probs(C.one_hot_log_weights(gold, n, t - 1), tl)
        w = scored.double()
        for r in rows:
            contrib = -(per_row[r].double() * w).sum(-1).cpu()                  # (B,)
            nll[r].index_add_(0, gold.cpu(), contrib)
        tokens.index_add_(0, gold.cpu(), scored.sum(-1).cpu())
    result = MixtureEvaluation(
        slices={x: list(cfg.slices[k]) for k, x in enumerate(names)},
        tokens={x: int(tokens[k]) for k, x in enumerate(names)},
        documents={x: sum(d.slice == k for d in docs) for k, x in enumerate(names)})
    total = int(tokens.sum())
    for r in rows:
        result.rows.append(EvalRow(r, {x: C.nll_to_ppl(float(nll[r][k]), int(tokens[k])) for k, x in enumerate(names)},
                                   C.nll_to_ppl(float(nll[r].sum()), total)))
    if has_router:
        posteriors = document_posteriors(model, docs, batch_size, pad_id)
        result.gate = gate_accuracy(posteriors, torch.tensor([d.slice for d in docs]), n)
        if train_mean_year is not None:
            result.years = year_mae(posteriors, torch.tensor([d.year for d in docs]), cfg.slices, train_mean_year)
    return result


@torch.no_grad()
def document_posteriors(model, docs: list[EvalDocument], batch_size: int = 8, pad_id: int = 0) -> torch.Tensor:
    """[D, N] float64: the gate's posterior over slices after reading each document's whole text (its prompt
    prefix and separator left out, so every prompt variant gives the same posteriors)."""
    out = []
    for s in range(0, len(docs), batch_size):
        ids, mask = padded([d.ids[d.prompt_len:] or d.ids[-1:] for d in docs[s:s + batch_size]], pad_id)
        out.append(gate_posteriors(model, ids.to(model.device), mask.to(model.device)).double().cpu())
    return torch.cat(out)
