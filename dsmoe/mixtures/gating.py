"""The prompt gate of the FFN merge: an MLP on mean-pooled embeddings of a frozen encoder.

The gate classifies a prompt into one of N domains (one per merged model); its softmax gives the mixing
weights of the FFN merge. Training (:func:`train_gating`) embeds every text once with the frozen encoder
(attention-masked mean pooling), keeps the embeddings in memory for all epochs, trains the MLP with
cross-entropy and keeps the weights of the epoch with the best validation macro-F1. A gate folder holds::

    best_model.safetensors    the MLP at the best validation macro-F1
    final_model.safetensors   the MLP after the last epoch
    training_info.json        config, architecture, class names, per-epoch metrics, test metrics

Nothing here unpickles a file: weights are safetensors, metadata JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write

BEST_FILE = "best_model.safetensors"
FINAL_FILE = "final_model.safetensors"
INFO_FILE = "training_info.json"


# ---------------------------------------------------------------------------------------------- config
@dataclass
class GatingConfig:
    """Training settings of the prompt gate (``launch/train_gating.py`` flags of the same names)."""

    base_model: str = ""
    """HF folder of the frozen encoder whose mean-pooled embeddings the gate reads (a sentence encoder such as
    all-MiniLM-L6-v2, or the experts' own base model)."""
    output_dir: str = "gating"
    """Folder the gate is written to (best/final safetensors and training_info.json)."""
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    """Widths of the MLP's hidden layers ([] = a linear classifier)."""
    dropout: float = 0.1
    """Dropout after every hidden layer (training only)."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    batch_size: int = 32
    """Embeddings per optimizer step."""
    num_epochs: int = 10
    """Passes over the training split."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    train_split: float = 0.8
    """Fraction of the texts used for training ..."""
    val_split: float = 0.1
    """... for picking the best epoch (macro-F1) ..."""
    test_split: float = 0.1
    """... and for the final test metrics; the three must sum to 1.0."""
    seed: int = 42
    """Seeds the split, the MLP init and the batch order."""
    max_length: int = 256
    """Encoder tokens per text (longer texts are truncated)."""
    embed_batch_size: int = 16
    """Texts per encoder forward when embedding."""

    def __post_init__(self):
        if isinstance(self.hidden_dims, str):
            self.hidden_dims = parse_hidden_dims(self.hidden_dims)
        self.hidden_dims = list(self.hidden_dims)
        if not all(isinstance(d, int) and d > 0 for d in self.hidden_dims):
            raise ValueError(f"GatingConfig.hidden_dims={self.hidden_dims!r}: must be positive integers")
        for name in ("batch_size", "num_epochs", "max_length", "embed_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GatingConfig.{name}={v!r}: must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"GatingConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if not self.learning_rate > 0:
            raise ValueError(f"GatingConfig.learning_rate={self.learning_rate!r}: must be > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"GatingConfig.weight_decay={self.weight_decay!r}: must be >= 0")
        for name in ("train_split", "val_split", "test_split"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"GatingConfig.{name}={v!r}: must be in [0, 1]")
        total = self.train_split + self.val_split + self.test_split
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train_split + val_split + test_split = {self.train_split} + {self.val_split} + "
                             f"{self.test_split} = {total:g}: the splits must sum to 1.0")
        if self.train_split <= 0 or self.val_split <= 0:
            raise ValueError(f"GatingConfig.train_split={self.train_split}, val_split={self.val_split}: both must "
                             f"be > 0 (the best epoch is picked on the validation split)")


def parse_hidden_dims(text: str) -> list[int]:
    """ "512,256" -> [512, 256]; "" -> []."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"hidden_dims={text!r}: give comma-separated integers such as \"512,256\"") from None


# ---------------------------------------------------------------------------------------------- the MLP
class GatingMLP(nn.Module):
    """Linear -> ReLU -> Dropout per hidden width, then Linear to ``num_classes`` logits."""

    def __init__(self, input_dim: int, num_classes: int, hidden_dims: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.input_dim, self.num_classes = input_dim, num_classes
        self.hidden_dims, self.dropout = list(hidden_dims), dropout

    def arch(self) -> dict:
        """What rebuilds this MLP: input_dim, num_classes, hidden_dims, dropout."""
        return {"input_dim": self.input_dim, "num_classes": self.num_classes, "hidden_dims": self.hidden_dims,
                "dropout": self.dropout}

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (B, D) -> logits (B, num_classes)."""
        return self.net(emb.to(self.net[0].weight.dtype))

    def class_directions(self, at: torch.Tensor) -> torch.Tensor:
        """(num_classes, D): the gradient of each class logit w.r.t. the embedding at ``at`` (D,) (the rows of the
        weight for a linear gate), centred over the classes (softmax ignores a shared shift)."""
        x = at.detach().to(self.net[0].weight.dtype).clone().requires_grad_(True)
        was = self.training
        self.eval()
        jac = torch.autograd.functional.jacobian(lambda v: self.net(v), x)        # (C, D)
        self.train(was)
        return (jac - jac.mean(0, keepdim=True)).detach()


# ---------------------------------------------------------------------------------------------- the encoder
class FrozenEncoder:
    """A frozen HF encoder (any ``AutoModel`` folder with a tokenizer) giving mean-pooled text embeddings.

    Not an ``nn.Module`` on purpose: models holding it neither save nor train its weights."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"base_model={str(path)!r}: not an HF model folder (no config.json); give the folder "
                             f"of the frozen encoder")
        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """(len(texts), D) float32 on CPU: the mean of the last hidden states over each text's real tokens."""
        out = []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)                # (B, T, 1)
            out.append(((hidden * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class ClassificationMetrics:
    """Accuracy, macro-F1 and the confusion matrix (rows: true class, columns: predicted) of one split."""

    loss: float
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassificationMetrics:
    """Metrics of ``logits`` (N, C) against ``labels`` (N,)."""
    pred = logits.argmax(-1)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    tp = conf.diag().float()
    precision = tp / conf.sum(0).clamp_min(1)
    recall = tp / conf.sum(1).clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    n = max(len(labels), 1)
    return ClassificationMetrics(loss=float(F.cross_entropy(logits, labels)) if len(labels) else math.nan,
                                 accuracy=float(tp.sum()) / n, macro_f1=float(f1.mean()),
                                 confusion=conf.tolist())


# ---------------------------------------------------------------------------------------------- training
@dataclass
class GatingResult:
    """What :func:`train_gating` produced: the folder, the best MLP and its metrics."""

    output_dir: Path
    gate: GatingMLP
    best_epoch: int
    test: ClassificationMetrics
    history: list[dict]


def split_indices(labels: torch.Tensor, cfg: GatingConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified split: each class's indices, shuffled with the seed, cut into train / val / test by the
    config's fractions (so every split sees every domain in proportion)."""
    g = torch.Generator().manual_seed(cfg.seed)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train = int(round(cfg.train_split * len(idx)))
        n_val = int(round(cfg.val_split * len(idx)))
        if n_train == 0 or n_val == 0:
            raise ValueError(f"class {c} has {len(idx)} texts, too few for train_split={cfg.train_split}, "
                             f"val_split={cfg.val_split}; give more texts per domain")
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:])):
            part.append(chunk)
    return tuple(torch.cat(p) for p in parts)


def train_gating(texts: list[str], labels: list[int], cfg: GatingConfig, class_names: list[str] | None = None,
                 encoder: FrozenEncoder | None = None) -> GatingResult:
    """Embed ``texts`` once with the frozen encoder, train the gate, write the gate folder (see module doc).

    ``labels[i]`` in [0, N) is the domain (= the merged model) of ``texts[i]``; ``class_names`` name them.
    The kept epoch has the best validation macro-F1 (ties: the lowest validation loss)."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    num_classes = max(labels) + 1 if labels else 0
    if num_classes < 2 or sorted(set(labels)) != list(range(num_classes)):
        raise ValueError(f"labels must cover classes 0..N-1 with N >= 2 (got {sorted(set(labels))})")
    class_names = list(class_names) if class_names is not None else [f"model{i + 1}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    encoder = encoder or FrozenEncoder(cfg.base_model, max_length=cfg.max_length)
    emb = encoder.embed(texts, cfg.embed_batch_size)                        # computed once, reused every epoch
    y = torch.tensor(labels, dtype=torch.long)
    tr, va, te = split_indices(y, cfg)

    torch.manual_seed(cfg.seed)
    gate = GatingMLP(emb.shape[1], num_classes, cfg.hidden_dims, cfg.dropout)
    opt = torch.optim.AdamW(gate.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed + 1)
    history, best_key, best_epoch, best_state = [], None, 0, None
    for epoch in range(1, cfg.num_epochs + 1):
        gate.train()
        total, seen = 0.0, 0
        for idx in tr[torch.randperm(len(tr), generator=order)].split(cfg.batch_size):
            loss = F.cross_entropy(gate(emb[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        val = _evaluate(gate, emb[va], y[va], num_classes)
        history.append({"epoch": epoch, "train_loss": total / seen, "val_loss": val.loss,
                        "val_accuracy": val.accuracy, "val_macro_f1": val.macro_f1})
        key = (val.macro_f1, -val.loss)            # best macro-F1; among equals, the lowest validation loss
        if best_key is None or key > best_key:
            best_key, best_epoch = key, epoch
            best_state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
    final_state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
    gate.load_state_dict(best_state)
    test = _evaluate(gate, emb[te], y[te], num_classes)
    info = {"config": dataclasses.asdict(cfg), "base_model": encoder.path, "arch": gate.arch(),
            "class_names": class_names, "num_texts": len(texts),
            "split_sizes": {"train": len(tr), "val": len(va), "test": len(te)},
            "embedding_mean": emb[tr].mean(0).tolist(), "best_epoch": best_epoch, "history": history,
            "test": dataclasses.asdict(test)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / BEST_FILE, lambda p: save_file(best_state, str(p)))
    atomic_write(out / FINAL_FILE, lambda p: save_file(final_state, str(p)))
    atomic_write(out / INFO_FILE, lambda p: Path(p).write_text(json.dumps(info, indent=1)))
    return GatingResult(out, gate.eval(), best_epoch, test, history)


@torch.no_grad()
def _evaluate(gate: GatingMLP, emb: torch.Tensor, y: torch.Tensor, num_classes: int) -> ClassificationMetrics:
    gate.eval()
    return classification_metrics(gate(emb), y, num_classes)


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedGate:
    """A trained gate: the MLP (eval mode), its class names, encoder folder and training info."""

    gate: GatingMLP
    class_names: list[str]
    base_model: str
    info: dict


def load_gate(path: str | os.PathLike, which: str = "best") -> LoadedGate:
    """Load a gate folder written by :func:`train_gating` (``which``: "best" or "final"), or one of its
    ``.safetensors`` files (training_info.json must sit beside it)."""
    p = Path(path)
    folder, weights = (p.parent, p) if p.suffix == ".safetensors" else (p, p / (BEST_FILE if which == "best"
                                                                                   else FINAL_FILE))
    info_path = folder / INFO_FILE
    if not weights.is_file() or not info_path.is_file():
        raise ValueError(f"gating={str(path)!r}: not a gate folder (needs {weights.name} and {INFO_FILE}); "
                         f"train one with launch/train_gating.py")
    try:
        info = json.loads(info_path.read_text())
        arch = info["arch"]
        gate = GatingMLP(arch["input_dim"], arch["num_classes"], arch["hidden_dims"], arch.get("dropout", 0.0))
        gate.load_state_dict(load_file(str(weights)))
    except (KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"gating={str(path)!r}: {info_path.name} or {weights.name} is damaged or does not match "
                         f"({type(err).__name__}); retrain the gate") from None
    return LoadedGate(gate.eval(), list(info["class_names"]), str(info["base_model"]), info)
