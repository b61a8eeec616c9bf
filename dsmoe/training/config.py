"""The run configuration: sections model, data, train, parallel, plus the DeepSpeed JSON path.

One YAML file (``launch/configs/*.yaml``) plus dotted overrides (``model.n_routed_experts=16``). Every
error is a :class:`ConfigError` whose message is one line naming the key, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dsmoe.data import DataConfig
from dsmoe.data.prompts import parse_year_ranges
from dsmoe.moe import backend_class
from dsmoe.suggest import did_you_mean

from .errors import ConfigError
from .lm import TRAINABLE, TrainableLM, parse_model_section

REPO_ROOT = Path(__file__).resolve().parents[2]
__all__ = ["ConfigError", "RunConfig", "TrainConfig", "ParallelConfig", "load_config", "validate"]


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    output_dir: str = "runs/quickstart"
    """Where checkpoints, metrics.jsonl, TensorBoard events and plots go; re-running resumes from it."""
    max_steps: int = 300
    """Optimizer steps to train for (the run ends there; a resumed run continues up to it)."""
    micro_batch_size: int = 8
    """Sequences per rank per micro step."""
    grad_accum_steps: int = 1
    """Micro steps per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of ``lr``."""
    warmup_steps: int = 20
    """Linear learning-rate warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and router expert biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    seed: int = 0
    """Seed of the model init and every random stream (each rank offsets it by its rank)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines / TensorBoard points."""
    eval_every: int = 0
    """Steps between held-out evaluations (0 = only at the end)."""
    eval_batches: int = 0
    """Validation batches per evaluation (0 = the whole validation split)."""
    steps_per_run: int = 0
    """Stop (with a checkpoint) after this many steps in one invocation, as if preempted; 0 = run to max_steps.
    For job slots shorter than the run: re-running the command continues."""
    save_every: int = 100
    """Steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep."""
    portable_optimizer_state: bool = True
    """Write Adam's moments by parameter name (``optimizer.safetensors``, twice the fp32 model size): every
    resume, with any expert-parallel size, world size or ZeRO stage, continues from it, and nothing is unpickled.
    false: write DeepSpeed's own engine checkpoint instead (a pickle-based format that only the same topology
    resumes from; another topology then restarts the moments)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    plots: bool = True
    """Write loss-curve and expert-load PNGs at the end."""
    trainable: str = "all"
    """Which parameters train: "all"; "ffn" (only the feed-forward blocks, e.g. to fine-tune the FFNs of a
    pretrained model for an FFN merge; everything else stays frozen and holds no optimizer state); or
    "none-but-new" (only the embedding rows of the tokens ``data.prompt: period_token`` adds to a
    ``model.pretrained`` vocabulary; every other weight and row stays bit-identical)."""


@dataclass
class ParallelConfig:
    """How the model is laid out over processes."""

    expert_parallel_size: int = 1
    """Ranks that share one copy of the experts (each holds E/ep of them); must divide the world size."""


@dataclass(frozen=True)
class TimeSlice:
    name: str
    start: int
    end: int


@dataclass
class SlicesConfig:
    """Slice experts: one model per time slice of a dated corpus, trained on that slice's documents only, with
    one shared tokenizer (empty ``ranges``: one ordinary run)."""

    ranges: list = field(default_factory=list)
    """Inclusive year ranges, e.g. ["1790-1849", "1850-1899", "1900-1949", "1950-2026"]: ordered and
    non-overlapping; one expert each, named by its range."""
    baseline: bool = True
    """Also train one model on all slices together with the experts' total number of training steps."""
    only: str | None = None
    """Train only this slice (its name or 0-based index) or "baseline": one task of a job array. None: all,
    one after the other."""

    def parsed(self) -> list[TimeSlice]:
        try:
            ranges = parse_year_ranges(self.ranges, "slices.ranges")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return [TimeSlice(f"{start}-{end}", start, end) for start, end in ranges]

    def selected(self) -> list[str]:
        """Names of the runs to do now: the slices (or the one of ``only``), then "baseline"."""
        names = [s.name for s in self.parsed()]
        runs = names + (["baseline"] if self.baseline else [])
        if self.only is None:
            return runs
        only = str(self.only)
        if only.isdigit() and int(only) < len(runs):
            return [runs[int(only)]]
        if only in runs:
            return [only]
        raise ConfigError(f"slices.only={self.only!r}: not one of {runs} or an index below {len(runs)}")


@dataclass
class MixtureStageConfig:
    """After the slice experts (``slices.ranges``): mix them, train the gate over the frozen experts and print
    the comparison table on every slice's held-out documents."""

    enabled: bool = True
    """Run this stage once every slice expert (and the baseline) is trained."""
    combine: str = "logprob"
    """"logprob" (a proper mixture of the experts' distributions) or "logits" (weighted sum of logits)."""
    date_policy: str = "start"
    """Experts usable for a query date: "start" (slice starts at or before it) or "end" (no text after it)."""
    top_k: int | None = None
    """Keep only the top-k router weights (renormalised); None = all usable experts."""
    router_hidden_size: int = 64
    """Width of the causal router MLP."""
    gate_objective: str = "mixture_nll"
    """"mixture_nll" (the mixture's NLL + router regularisers) or "slice_ce" (a slice classifier)."""
    gate_steps: int = 100
    """Gate optimizer steps over windows of the slices' training documents."""
    gate_lr: float = 3e-3
    """Gate AdamW learning rate."""
    gate_dates: bool = False
    """Give each training window its document's year as the query date. With dates, the time mask hides every
    expert of a later slice, so on early documents the router is never asked to choose and learns only to
    prefer the latest usable expert; without (the default) it learns to tell the slices apart from the text,
    and the time mask still applies whenever a date is given at inference."""
    batch_size: int = 8
    """Windows per batch, for gate training and evaluation."""


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`dsmoe.models.RoutedLMConfig` (vocab_size is taken from the tokenizer); or
    ``architecture: <transformers model_type>`` + its config keys; or ``pretrained: PATH`` (+ overrides)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slices: SlicesConfig = field(default_factory=SlicesConfig)
    mixture: MixtureStageConfig = field(default_factory=MixtureStageConfig)
    deepspeed: str = "ds_configs/debug.json"
    """Path of a DeepSpeed JSON config (relative paths: the working directory, then the dsmoe repo)."""
    lm: TrainableLM | None = field(default=None, repr=False, compare=False)
    """The ``model`` section parsed once (by :func:`load_config` / :func:`validate`) into the model kind the
    trainer trains; the trainer fills in what the data decides (vocabulary size, special tokens, context length)."""

    def to_dict(self) -> dict[str, Any]:
        out = {"model": dict(self.model), "data": self.data.to_dict(), "train": dataclasses.asdict(self.train),
               "parallel": dataclasses.asdict(self.parallel), "deepspeed": self.deepspeed}
        if self.slices.ranges:
            out["slices"] = dataclasses.asdict(self.slices)
            out["mixture"] = dataclasses.asdict(self.mixture)
        return out

    def deepspeed_path(self) -> Path:
        return resolve_path(self.deepspeed, "deepspeed")

    def load_deepspeed(self) -> dict[str, Any]:
        path = self.deepspeed_path()
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed={self.deepspeed}: not valid JSON ({e}); fix the file") from None


def resolve_path(value: str, key: str) -> Path:
    p = Path(os.path.expanduser(value))
    for cand in (p, REPO_ROOT / p):
        if cand.exists():
            return cand
    raise ConfigError(f"{key}={value}: file not found (looked in {Path.cwd()} and {REPO_ROOT}); give an existing path")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    key = f"{section}.{f.name}"
    default = f.default if f.default is not dataclasses.MISSING else None
    if value is None:
        return None
    typ = str(f.type)
    if isinstance(default, bool) or typ == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if isinstance(default, int) and "float" not in typ:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if isinstance(default, float) or typ.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if isinstance(default, tuple):
        return tuple(value)
    return value


def build_section(section: str, cls, values: dict[str, Any]):
    """A typed config section from a mapping; unknown keys (with the closest valid name) and bad values are
    ConfigErrors naming ``section.key``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}={values!r}: expected a mapping of keys")
    known = {f.name: f for f in fields(cls)}
    for k in values:
        if k not in known:
            raise ConfigError(f"{section}.{k}: unknown key{did_you_mean(k, known)} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(section, known[k], v) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(msg if msg.startswith(section) else f"{section}: {msg}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def read_config_tree(path: str | os.PathLike | None, overrides: list[str] | None, sections: str) -> dict[str, Any]:
    """A YAML config file (or {}) as a dict with dotted ``section.key=value`` overrides applied; ``sections``
    names the expected sections in the error for a file that is not a mapping."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(str(path), "--config")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: expected a mapping with sections {sections}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides look like section.key=value")
        k, v = item.split("=", 1)
        _set_dotted(tree, k.strip(), _parse_scalar(v))
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults) and apply ``key=value`` overrides."""
    tree = read_config_tree(path, overrides, "model, data, train, parallel, slices, mixture")
    sections = {"model", "data", "train", "parallel", "slices", "mixture", "deepspeed"}
    for k in tree:
        if k not in sections:
            raise ConfigError(f"{k}: unknown section (known: {', '.join(sorted(sections))})")
    model = tree.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model={model!r}: expected a mapping of RoutedLMConfig keys")
    cfg = RunConfig(
        model=dict(model), lm=parse_model_section(model),
        data=build_section("data", DataConfig, tree.get("data") or {}),
        train=build_section("train", TrainConfig, tree.get("train") or {}),
        parallel=build_section("parallel", ParallelConfig, tree.get("parallel") or {}),
        slices=build_section("slices", SlicesConfig, tree.get("slices") or {}),
        mixture=build_section("mixture", MixtureStageConfig, tree.get("mixture") or {}),
        deepspeed=str(tree.get("deepspeed", RunConfig.deepspeed)),
    )
    if cfg.data.prompt == "period_token" and cfg.data.prompt_periods is None and cfg.slices.ranges:
        cfg.data = dataclasses.replace(cfg.data, prompt_periods=[s.name for s in cfg.slices.parsed()])
    validate(cfg)
    return cfg


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Check every parallel degree against the model in one place, before anything is built."""
    t, ep = cfg.train, cfg.parallel.expert_parallel_size
    for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "save_every", "keep_checkpoints"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be a positive integer")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr}: must be > 0")
    if ep <= 0:
        raise ConfigError(f"parallel.expert_parallel_size={ep}: must be a positive integer")
    if cfg.slices.ranges:
        cfg.slices.parsed()
        cfg.slices.selected()
        m = cfg.mixture
        for name, allowed in (("combine", ("logprob", "logits")), ("date_policy", ("start", "end")),
                              ("gate_objective", ("mixture_nll", "slice_ce"))):
            if getattr(m, name) not in allowed:
                raise ConfigError(f"mixture.{name}={getattr(m, name)!r}: must be one of {allowed}")
        for name in ("router_hidden_size", "gate_steps", "batch_size"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"mixture.{name}={getattr(m, name)}: must be a positive integer")
        n = len(cfg.slices.ranges)
        if m.top_k is not None and not 1 <= m.top_k <= n:
            raise ConfigError(f"mixture.top_k={m.top_k}: must be between 1 and the number of slices ({n})")
    if t.trainable not in TRAINABLE:
        raise ConfigError(f"train.trainable={t.trainable!r}: must be one of {TRAINABLE}")
    if cfg.lm is None:
        cfg.lm = parse_model_section(cfg.model)
    stage = int(cfg.load_deepspeed().get("zero_optimization", {}).get("stage", 0))
    if t.trainable == "none-but-new":
        if cfg.lm.folder is None:
            raise ConfigError("train.trainable=none-but-new: trains the embeddings of tokens added to a pretrained "
                              "model only; set model.pretrained (or use train.trainable=all from scratch)")
        if cfg.data.prompt != "period_token":
            raise ConfigError(f"train.trainable=none-but-new: data.prompt={cfg.data.prompt} adds no token to train; "
                              "use data.prompt=period_token")
        if stage == 3:
            raise ConfigError(f"train.trainable=none-but-new: not supported under ZeRO stage 3 (deepspeed="
                              f"{cfg.deepspeed}); a few embedding rows need no sharding, use a zero1/zero2 config")
    mcfg = cfg.lm.config
    use_moe = bool(getattr(mcfg, "use_moe", False))
    if ep > 1 and not use_moe:
        raise ConfigError(f"parallel.expert_parallel_size={ep}: the model ({cfg.lm.describe()}) has no routed "
                          f"experts to shard; use 1")
    if use_moe and mcfg.n_routed_experts % ep:
        raise ConfigError(f"model.n_routed_experts={mcfg.n_routed_experts}: not divisible by "
                          f"parallel.expert_parallel_size={ep}; pick a divisor")
    if use_moe and stage == 3 and not backend_class(mcfg.moe_backend).zero3_compatible:
        raise ConfigError(f"model.moe_backend={mcfg.moe_backend}: this MoE backend cannot run under ZeRO stage 3 "
                          f"(deepspeed={cfg.deepspeed}); use model.moe_backend=dsmoe or a zero1/zero2 config")
    if world_size is not None and world_size % ep:
        raise ConfigError(f"parallel.expert_parallel_size={ep}: does not divide the world size {world_size}")
