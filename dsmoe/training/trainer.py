"""The one trainer: data -> model -> expert parallelism -> DeepSpeed engine -> loop, with resume.

Debug mode and multi-process runs share this code path; only the process group differs (world of one
without a launcher). Communication beyond DeepSpeed's own is the MoE dispatcher's and a few all-reduces of
scalars for logging and stopping.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..cpu_allocator import keep_cpu_allocations
from .checkpoint import CheckpointError, latest_checkpoint, load_hf_state, read_trainer_state, save_checkpoint
from .config import ConfigError, RunConfig, validate
from .lm import apply_trainable
from .metrics import MetricsLogger, truncate_after, write_plots
from .optimizer_state import FILE as MOMENTS_FILE, load_moments, portable, set_param, zero_moments
from .rng_state import load_rng_state
from .parallel import (DistInfo, engine_knows_dsmoe_layers, init_distributed, optimizer_param_groups,
                       setup_expert_parallel)

log = logging.getLogger("dsmoe.train")


@dataclass
class RunSummary:
    output_dir: str
    steps: int
    final_loss: float | None
    val_loss: float | None
    val_perplexity: float | None
    checkpoint: str | None
    stopped_early: bool = False
    files: list[str] = field(default_factory=list)


@dataclass
class LogWindow:
    """Sums over the steps since the last metrics line."""

    loss: float = 0.0
    aux: float = 0.0
    n: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, out) -> None:
        self.loss += float(out.lm_loss.detach())
        self.aux += float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
        self.n += 1


@dataclass
class RunTotals:
    """Per MoE layer over the run (for the end summary and expert_load.png)."""

    load: torch.Tensor | None = None
    """(MoE layers, E) computed assignments."""
    dropped: list[float] = field(default_factory=list)
    null: list[float] = field(default_factory=list)
    n: int = 0
    """Micro batches counted in ``dropped`` / ``null``."""
    last_loss: float | None = None

    def add(self, stats) -> None:
        if not self.n:
            self.dropped, self.null = [0.0] * len(stats), [0.0] * len(stats)
        for i, st in enumerate(stats):
            self.dropped[i] += float(st.dropped_tokens)
            self.null[i] += float(st.null_fraction)
        self.n += 1


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The JSON config with the batch sizes, clipping and precision filled in from the run config."""
    ds = cfg.load_deepspeed()
    t = cfg.train
    for key, want in (("train_micro_batch_size_per_gpu", t.micro_batch_size),
                      ("gradient_accumulation_steps", t.grad_accum_steps)):
        if ds.get(key, "auto") not in ("auto", want):
            raise ConfigError(f"deepspeed={cfg.deepspeed}: {key}={ds[key]} disagrees with train "
                              f"({want}); set it to \"auto\" in the JSON or change train.*")
        ds[key] = want
    ds.pop("train_batch_size", None)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = t.grad_clip
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("wall_clock_breakdown", False)
    for prec in ("bf16", "fp16"):
        if ds.get(prec, {}).get("enabled") == "auto":
            ds[prec]["enabled"] = torch.cuda.is_available() and (prec == "bf16")
    return ds


class Trainer:
    def __init__(self, cfg: RunConfig, debug: bool = False):
        self.cfg = cfg
        self.debug = debug
        self._stop = False

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        """Process group -> output folder -> data -> model (+ checkpoint weights) -> expert parallelism ->
        DeepSpeed engine -> resume."""
        self._init_process_group()
        self._prepare_output()
        self._load_data()
        model = self._build_model()
        setup_expert_parallel(model, self.ep, self.zero_stage)
        model.to(self.dist.device)
        self._build_engine(model)
        self.engine.train()                  # from_pretrained hands models over in eval mode
        self.start_step = 0
        t = self.cfg.train
        self.loader = self.data.train_loader(t.micro_batch_size, rank=self.dist.rank,
                                             world_size=self.dist.world_size, seed=t.seed)
        if self.ckpt is not None:
            self._restore()
        else:
            torch.manual_seed(t.seed + 1000 * (self.dist.rank + 1))

    def _init_process_group(self) -> None:
        self.dist: DistInfo = init_distributed()
        if self.dist.device.type == "cpu":
            keep_cpu_allocations()       # reuse activation memory across steps instead of page-faulting it in
        world = self.dist.world_size
        if self.debug and world != 1:
            raise ConfigError(f"--debug runs one process without a launcher, but WORLD_SIZE={world}; "
                              f"drop --debug under deepspeed/torchrun")
        validate(self.cfg, world)
        self.ds_config = prepare_deepspeed_config(self.cfg)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.ep = self.cfg.parallel.expert_parallel_size
        self.topology = {"world_size": world, "expert_parallel_size": self.ep, "zero_stage": self.zero_stage}

    def _prepare_output(self) -> None:
        self.out = Path(self.cfg.train.output_dir)
        if self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1, default=str))
        self.ckpt = latest_checkpoint(self.out)
        self.state: dict[str, Any] = read_trainer_state(self.ckpt) if self.ckpt is not None else {}

    def _load_data(self) -> None:
        """Rank 0 trains/caches the tokenizer and packs first; the other ranks then hit the cache."""
        from dsmoe.data import build_data

        if self.dist.rank == 0:
            self.data = build_data(self.cfg.data, output_dir=self.out)
        dist.barrier()
        if self.dist.rank != 0:
            self.data = build_data(self.cfg.data, output_dir=self.out)

    def _build_model(self):
        """The model, identically initialised on every rank; on resume with the checkpoint's (unsharded)
        weights, so any expert-parallel size continues from any other."""
        t, lm = self.cfg.train, self.cfg.lm
        mcfg = self._model_config()
        torch.manual_seed(t.seed)
        model = lm.build(mcfg)
        if self.debug:                                 # per-layer routing statistics to the dsmoe.debug logger
            lm.set_debug(model, t.log_every)
        if self.ckpt is not None:
            self._check_compatible(model.config)
            missing, unexpected = model.load_state_dict(load_hf_state(self.ckpt / "model"), strict=False)
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            missing = [k for k in missing if not k.endswith("load_accum") and not (tied and k == "lm_head.weight")]
            if missing or unexpected:
                raise CheckpointError(f"{self.ckpt / 'model'}: weights do not fit the model (missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}); the model config changed since the checkpoint")
            if tied:
                model.tie_weights()
        counts = apply_trainable(model, t.trainable, self._added_token_ids())
        if self.dist.rank == 0:
            log.info("model: %s, %.2fM parameters (%.2fM trainable: train.trainable=%s)", lm.describe(),
                     counts["total"] / 1e6, counts["trainable"] / 1e6, t.trainable)
        return model

    def _build_engine(self, model) -> None:
        """AdamW (or the DeepSpeed JSON's own optimizer, e.g. CPU Adam for offload) with the cosine schedule."""
        import deepspeed

        t = self.cfg.train
        groups = optimizer_param_groups(model, t.weight_decay)

        def sched(opt):
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))

        with engine_knows_dsmoe_layers(self.zero_stage):
            if "optimizer" in self.ds_config:
                params = self.ds_config["optimizer"].setdefault("params", {})
                if params.get("lr", "auto") == "auto":
                    params["lr"] = t.lr
                engine, opt, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups,
                                                                 lr_scheduler=sched, config=self.ds_config)
            else:
                opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))
                engine, opt, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                                 config=self.ds_config)
        self.engine, self.optimizer, self.scheduler = engine, opt, scheduler
        self.model = engine.module

    def _added_token_ids(self) -> list[int]:
        """Ids of the tokens the data's prompt adds to the vocabulary (the period tokens), for none-but-new."""
        from dsmoe.data.prompts import DocumentPrompt

        vocab = self.data.tokenizer.get_vocab()
        return [vocab[t] for t in DocumentPrompt.of(self.cfg.data).tokens()]

    def _model_config(self):
        """The model's config with what the data decides: vocabulary, special tokens, context length."""
        tok = self.data.tokenizer
        return self.cfg.lm.model_config(self.data.vocab_size, tok.eos_token_id, tok.pad_token_id,
                                        self.cfg.data.seq_len)

    def _check_compatible(self, mcfg) -> None:
        saved = json.loads((self.ckpt / "model" / "config.json").read_text())
        for key in self.cfg.lm.compat_keys:
            if key in saved and saved[key] != getattr(mcfg, key, None):
                raise CheckpointError(f"{self.ckpt}: was written with model.{key}={saved[key]}, the config now says "
                                      f"{getattr(mcfg, key, None)}; use another train.output_dir or the old value")

    def _restore(self) -> None:
        """Continue from ``self.ckpt``: the weights are already loaded (from the gathered HF folder); here the
        optimizer moments (``optimizer.safetensors``), schedule, step, RNG streams and data position. All of it is
        safetensors/JSON, so any expert-parallel size, world size or ZeRO stage resumes from any other. Without
        that file (``train.portable_optimizer_state: false``, or an optimizer dsmoe cannot read) a same-topology
        resume goes through DeepSpeed's own engine checkpoint (a pickle-based format)."""
        st, rank = self.state, self.dist.rank
        step = int(st["step"])
        same = st.get("topology") == self.topology
        moments = (self.ckpt / MOMENTS_FILE).exists() and portable(self.engine, self.zero_stage)
        engine_state = self.ckpt / "deepspeed"
        if not moments and same and engine_state.exists():
            load_path, _ = self.engine.load_checkpoint(str(engine_state), tag="state", load_module_strict=False)
            if load_path is None:
                raise CheckpointError(f"{engine_state}: DeepSpeed could not load it; delete {self.ckpt} to resume "
                                      f"from the previous checkpoint")
        else:
            for _ in range(step):
                self.scheduler.step()
            self.engine.global_steps = step
            if moments:
                try:
                    load_moments(self.engine, self.model, self.zero_stage, self.ckpt)
                except (KeyError, ValueError) as e:
                    raise CheckpointError(str(e.args[0])) from None
            if rank == 0 and (not same or not moments):
                what = ("weights, optimizer moments, step, schedule and data position are restored" if moments else
                        "weights, step, schedule and data position are restored; optimizer moments restart "
                        f"({self.ckpt / MOMENTS_FILE} is missing or the optimizer is not one dsmoe can read)")
                log.warning("resuming %s written with %s on %s: %s", self.ckpt.name, st.get("topology"),
                            self.topology, what)
        if not (same and load_rng_state(self.ckpt / "rng", rank)):
            torch.manual_seed(self.cfg.train.seed + 1000 * (rank + 1) + step)
        self.loader.load_state_dict(st["data"])
        self.start_step = int(st["step"])
        if rank == 0:
            truncate_after(self.out / "metrics.jsonl", self.start_step)

    # ------------------------------------------------------------------ loop
    def _reset_routers_if_due(self, step: int) -> None:
        """``model.router_reset_step``: before the first step >= it, give every router fresh weights (the same
        on every rank) in the model *and* in ZeRO's fp32 master copy, and clear their Adam moments, so the
        reset survives the optimizer step and replicas stay identical. The model's own in-forward reset then
        sees it done."""
        values = self.cfg.lm.router_reset(self.model, step, self.cfg.train.seed)
        if values is None:
            return
        for p, v in values:
            set_param(self.engine, p, v, self.zero_stage)
        if portable(self.engine, self.zero_stage):
            zero_moments(self.engine, [p for p, _ in values], self.zero_stage)
        self.cfg.lm.after_router_reset(self.model)
        if self.dist.rank == 0:
            log.info("step %d: routers reset (model.router_reset_step=%d)", step, self.model.config.router_reset_step)

    def _on_sigterm(self, *_):
        self._stop = True

    def _sync_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.dist.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _save(self, step: int) -> Path:
        state = {"topology": self.topology, "data": self.loader.state_dict(), "config": self.cfg.to_dict()}
        ours = portable(self.engine, self.zero_stage)
        return save_checkpoint(self.engine, self.model, step, self.out, state, self.zero_stage,
                               self.cfg.train.keep_checkpoints, moments=ours and self.cfg.train.portable_optimizer_state,
                               engine_state=not (ours and self.cfg.train.portable_optimizer_state))

    @torch.no_grad()
    def evaluate(self, max_batches: int = 0) -> tuple[float, float]:
        """Held-out mean token NLL and perplexity over the validation split (all ranks)."""
        self.engine.eval()
        nll = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        for i, batch in enumerate(self.data.val_batches(self.cfg.train.micro_batch_size, self.dist.rank,
                                                        self.dist.world_size)):
            if max_batches and i >= max_batches:
                break
            labels = batch["labels"].to(self.dist.device)
            out = self.cfg.lm.forward(self.engine, batch["input_ids"].to(self.dist.device), labels, None)
            n = (labels[:, 1:] != -100).sum()
            nll += torch.stack([out.lm_loss.double() * n, n.double()])
        dist.all_reduce(nll)
        self.engine.train()
        mean = float(nll[0] / nll[1].clamp_min(1))
        return mean, math.exp(min(mean, 50))

    def run(self) -> RunSummary:
        """Build, then train from the start (or resumed) step to ``train.max_steps``: each step trains, logs,
        checkpoints and checks for a stop (SIGTERM, ``train.steps_per_run``); the end saves, evaluates and
        reports."""
        self._build()
        t = self.cfg.train
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.metrics = MetricsLogger(self.out, self.dist.rank == 0)
        self.totals = RunTotals()
        self.window = LogWindow()
        bar = self._progress_bar()
        step, saved_step, ckpt, stopped = self.start_step, self.start_step, self.ckpt, False
        while step < t.max_steps and not stopped:
            out, usage = self._train_step(step)
            step += 1
            if bar is not None:
                bar.update(1)
            self._log_if_due(step, out, usage, bar)
            if step % t.save_every == 0 and step < t.max_steps:
                saved_step, ckpt = step, self._save(step)
            stopped = self._should_stop(step)
        if bar is not None:
            bar.close()
        if step != saved_step:
            ckpt = self._save(step)
        summary = self._finish(step, ckpt, stopped)
        signal.signal(signal.SIGTERM, old_handler)
        dist.barrier()
        return summary

    def _progress_bar(self):
        t = self.cfg.train
        if self.dist.rank != 0:
            return None
        if self.start_step >= t.max_steps:
            print(f"{self.ckpt} is already at train.max_steps={t.max_steps}: evaluating it; raise train.max_steps "
                  f"to train on, or choose a new train.output_dir", flush=True)
            return None
        if not t.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=t.max_steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)

    def _train_step(self, step: int):
        """One optimizer step over ``grad_accum_steps`` micro batches, then the aux-loss-free bias update.
        Returns the last micro batch's output and the step's (MoE layers, E) expert usage (None without MoE)."""
        t = self.cfg.train
        self._reset_routers_if_due(step)
        usage = None
        for _ in range(t.grad_accum_steps):
            batch = next(self.loader)
            out = self.cfg.lm.forward(self.engine, batch["input_ids"].to(self.dist.device),
                                      batch["labels"].to(self.dist.device), step)
            self.engine.backward(out.loss)
            self.engine.step()
            self.window.add(out)
            if out.expert_usage:
                u = torch.stack([x.detach().float().cpu() for x in out.expert_usage])
                usage = u if usage is None else usage + u
                self.totals.add(out.moe_stats)
        self.cfg.lm.after_optimizer_step(self.model)
        self.window.tokens += t.micro_batch_size * t.grad_accum_steps * self.cfg.data.seq_len * self.dist.world_size
        if usage is not None:
            self.totals.load = usage if self.totals.load is None else self.totals.load + usage
        return out, usage

    def _log_if_due(self, step: int, out, usage, bar) -> None:
        t = self.cfg.train
        if step % t.log_every and step != t.max_steps:
            return
        record = self._log_record(step, usage, out)
        self.totals.last_loss = record["loss"]
        if t.eval_every and step % t.eval_every == 0:
            record["val_loss"], record["val_ppl"] = self.evaluate(t.eval_batches)
        self.metrics.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.window = LogWindow()

    def _should_stop(self, step: int) -> bool:
        """SIGTERM on any rank, or ``train.steps_per_run`` steps done in this invocation (before max_steps)."""
        t = self.cfg.train
        if self._sync_stop():
            return True
        return bool(t.steps_per_run) and step - self.start_step >= t.steps_per_run and step < t.max_steps

    def _finish(self, step: int, ckpt, stopped: bool) -> RunSummary:
        """Held-out evaluation (unless stopped early), plots, summary.json and the printed summary."""
        t = self.cfg.train
        summary = RunSummary(str(self.out), step, self.totals.last_loss, None, None,
                             str(ckpt) if ckpt else None, stopped)
        if not stopped:
            summary.val_loss, summary.val_perplexity = self.evaluate(t.eval_batches)
            self.metrics.log({"step": step, "val_loss": summary.val_loss, "val_ppl": summary.val_perplexity})
        self.metrics.close()
        if self.dist.rank == 0:
            load = self.totals.load
            if t.plots and not stopped:
                ids = self._moe_layer_ids(len(load) if load is not None else 0)
                summary.files += [str(p) for p in write_plots(self.out, load, ids)]
            summary.files += [str(self.out / "metrics.jsonl"), str(self.out / "tensorboard")]
            (self.out / "summary.json").write_text(json.dumps(summary.__dict__, indent=1))
            self._print_summary(summary)
        return summary

    def _log_record(self, step, usage, out) -> dict[str, Any]:
        w = self.window
        vals = torch.tensor([w.loss, w.aux, w.n], dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(vals)
        elapsed = time.perf_counter() - w.t0
        record: dict[str, Any] = {
            "step": step, "loss": float(vals[0] / vals[2]), "aux_loss": float(vals[1] / vals[2]),
            "lr": float(self.scheduler.get_last_lr()[0]), "tokens_per_s": w.tokens / max(elapsed, 1e-9),
        }
        if usage is not None:
            share = usage / usage.sum(-1, keepdim=True).clamp_min(1)
            record["expert_load"] = [[round(float(v), 4) for v in row] for row in share]
            record["imbalance"] = [round(float(r.max() / r.mean().clamp_min(1e-9)), 3) for r in usage]
        if out.moe_stats:
            record["dropped_tokens"] = [float(st.dropped_tokens) for st in out.moe_stats]
            record["null_fraction"] = [float(st.null_fraction) for st in out.moe_stats]
        return record

    def _moe_layer_ids(self, n: int) -> list[int]:
        ids = self.cfg.lm.moe_layer_ids(self.model)
        return ids if len(ids) == n else list(range(n))

    def _print_summary(self, s: RunSummary) -> None:
        why = "SIGTERM" if self._stop else "train.steps_per_run"
        lines = [f"done: {s.steps} steps" + (f" (stopped by {why}; re-run the same command to resume)"
                                             if s.stopped_early else "")]
        if s.val_loss is not None:
            lines.append(f"held-out loss {s.val_loss:.4f}  perplexity {s.val_perplexity:.2f}")
        tot = self.totals
        if tot.load is not None:
            lines.append("expert load per MoE layer (share of computed assignments; null share and dropped "
                         "assignments over the run):")
            share = tot.load / tot.load.sum(-1, keepdim=True).clamp_min(1)
            for i, (lid, row) in enumerate(zip(self._moe_layer_ids(len(share)), share)):
                extra = ""
                if tot.n:
                    extra = f"  null {tot.null[i] / tot.n:.3f}  dropped {int(tot.dropped[i])}"
                lines.append(f"  layer {lid}: min {float(row.min()):.3f}  max {float(row.max()):.3f}  "
                             f"(uniform {1 / row.numel():.3f}){extra}")
        lines.append(f"checkpoint: {s.checkpoint}")
        lines.append(f"wrote: {', '.join(s.files + [str(Path(s.output_dir) / 'summary.json')])}")
        print("\n".join(lines), flush=True)
