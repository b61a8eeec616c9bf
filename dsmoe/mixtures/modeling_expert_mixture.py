"""ExpertMixtureForCausalLM: whole causal LMs (one per time slice) mixed per position by a gate.

Every expert is a complete transformers causal LM (GPT-2, Llama, OLMo, ... of one shared vocabulary). For each
position t the gate gives weights w[b, t, k] over the experts (:mod:`.combine`), and the mixture predicts token
t+1 with

* ``combine="logprob"``: log p(x) = logsumexp_k(log w_k + log p_k(x)), a proper mixture of distributions;
* ``combine="logits"``: log_softmax(sum_k w_k * logits_k), the "soft" gate of the diachronic period experts.

Gating modes: ``equal`` (uniform over the usable experts), ``router`` (the learned causal prefix router, optional
top-k), ``argmax`` (the router's best expert only), ``oracle`` (the gold slice of each sequence, from
``slice_labels`` or its year given as ``date``) and ``expert:<name>`` (one expert alone).

Time-causal masking: with a query ``date`` an expert trained on text after that date gets weight exactly zero
(``-inf`` in log space) and is not even run; ``date_policy`` says what "after" means (see the config).

Experts are frozen by default (``requires_grad=False``) and then run under ``torch.no_grad()``; only the router
trains. Which experts this process runs is decided by its :mod:`.placement` (all of them by default); the model
asks the placement to gather the experts' outputs (target log-probs, or full-vocabulary log-probs / logits
where a full mixture is asked for) and holds no process-group code itself.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_utils import PreTrainedModel

from dsmoe.models.cache_compat import CACHE_NAME, cache_kwargs, model_output, output_cache, pick_cache
from dsmoe.moe.losses import entropy_loss, load_balance_loss, z_loss

from . import combine as C
from .configuration_expert_mixture import COMBINES, ExpertMixtureConfig, check_slices, parse_mode
from .placement import LocalPlacement
from .router import PrefixRouter, RouterState

ExpertMixtureOutput = model_output("ExpertMixtureOutput", [
    ("loss", torch.FloatTensor), ("logits", torch.FloatTensor), ("cache", Any),
    ("expert_weights", torch.FloatTensor), ("aux_loss", torch.FloatTensor), ("nll", torch.FloatTensor),
    ("router_logits", torch.FloatTensor), ("token_log_probs", torch.FloatTensor), ("token_mask", torch.BoolTensor),
], module=__name__, doc="""Output of :class:`ExpertMixtureForCausalLM`.

    ``logits`` [B, T, V]: the mixture's log-probabilities (normalised); ``loss``: ``nll`` + ``aux_loss``;
    ``nll``: mean negative log-likelihood of the scored targets; ``aux_loss``: the router regularisers (router
    mode, else 0); ``expert_weights`` [B, T, N]: the weight of each expert at each position (exact zeros for
    masked experts); ``router_logits`` [B, T, N] (router/argmax modes, masked experts at -inf);
    ``token_log_probs`` [B, T-1]: log p(labels[:, t+1]) (0 where not scored); ``token_mask`` [B, T-1]: the scored
    targets (not -100, not padding, not prompt); the cache of every expert and the router (generation).""")
ExpertMixtureOutput.combined_log_probs = property(lambda self: self.logits,
                                                  doc="The mixture's log-probabilities (same as ``logits``).")


@dataclass
class ExpertOutputs:
    """What this process's experts produced: ``full`` [N_local, B, T', V] (logits or log-probs, or None),
    ``target_log_probs`` [N_local, B, T-1] (or None) and each expert's new KV cache (a list of N)."""

    full: torch.Tensor | None
    target_log_probs: torch.Tensor | None
    caches: list


@dataclass
class MixtureCache:
    """What generation carries between steps: each expert's own KV cache (None for an expert not run) and the
    router's running prefix statistics."""

    experts: list = field(default_factory=list)
    router: RouterState | None = None
    seen: int = 0
    """Tokens already processed."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class ExpertMixtureForCausalLM(PreTrainedModel, GenerationMixin):
    """A mixture of whole causal LMs over time slices (see the module docstring)."""

    config_class = ExpertMixtureConfig
    config: ExpertMixtureConfig
    base_model_prefix = "mixture"
    main_input_name = "input_ids"
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def __init__(self, config: ExpertMixtureConfig, experts: list[PreTrainedModel] | None = None):
        super().__init__(config)
        if experts is None:
            experts = [AutoModelForCausalLM.from_config(build_expert_config(c)) for c in config.expert_configs]
        self.experts = nn.ModuleList(experts)
        for e in self.experts:          # frozen, deterministic functions (no dropout) until someone unfreezes them
            e.requires_grad_(False)
            e.eval()
        self.router = PrefixRouter(config.vocab_size, config.num_experts, config.router_embed_dim,
                                   config.router_hidden_size) if config.use_router else None
        self.placement = LocalPlacement(config.num_experts)
        self.tokenizer = None
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_experts(cls, experts: list, slices: list | None = None, names: list[str] | None = None, combine: str = "logprob",
                     router: bool | dict | None = None, date_policy: str = "start", top_k: int | None = None,
                     **config_kwargs) -> "ExpertMixtureForCausalLM":
        """A mixture of ``experts`` (HF folders or loaded causal LMs of one vocabulary) over ``slices``
        ``[(start_year, end_year), ...]`` (one per expert, in time order; default: each expert config's
        ``dsmoe_slice = {"name", "start_year", "end_year"}``, which also names the experts). ``router``: None/False = no learned
        router (mode "equal"), True = the default router, or a dict with ``embed_dim`` / ``hidden_size``.
        Other keyword arguments are :class:`ExpertMixtureConfig` fields."""
        if not isinstance(experts, (list, tuple)) or not experts:
            raise ValueError("experts: give a non-empty list of HF model folders or loaded causal LMs")
        models, sources = [], []
        for i, e in enumerate(experts):
            if isinstance(e, (str, Path)):
                models.append(load_expert(e, f"experts[{i}]"))
                sources.append(str(e))
            else:
                models.append(e)
                sources.append(getattr(e.config, "_name_or_path", None) or None)
        if slices is None:
            slices, names = slices_from_configs(models, names)
        slices = [list(s) if isinstance(s, (list, tuple)) else s for s in slices]
        check_slices(slices, len(experts), "slices")
        vocabs = [m.get_output_embeddings().weight.shape[0] for m in models]
        if len(set(vocabs)) != 1:
            raise ValueError(f"experts have different vocabularies (output sizes {vocabs}); a mixture needs one "
                             "shared tokenizer: train or resize every expert to the same vocabulary")
        router_opts = {} if router in (None, False, True) else dict(router)
        unknown = set(router_opts) - {"embed_dim", "hidden_size"}
        if unknown:
            raise ValueError(f"router: unknown option(s) {sorted(unknown)}; use embed_dim and hidden_size")
        first = models[0].config
        config = ExpertMixtureConfig(
            expert_configs=[m.config.to_dict() for m in models], expert_names=names, slices=slices,
            expert_sources=sources, vocab_size=vocabs[0], combine=combine, date_policy=date_policy,
            top_k_experts=top_k,
            use_router=router not in (None, False), router_embed_dim=router_opts.get("embed_dim", 64),
            router_hidden_size=router_opts.get("hidden_size", 0),
            **{"pad_token_id": getattr(first, "pad_token_id", None), "bos_token_id": getattr(first, "bos_token_id", None),
               "eos_token_id": getattr(first, "eos_token_id", None), **config_kwargs})
        model = cls(config, experts=models)
        model.eval()
        return model

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """Each expert keeps its own tying (e.g. GPT-2's lm_head = wte), under its ``experts.<i>.`` prefix."""
        tied = {}
        for i, e in enumerate(self.experts):
            if isinstance(e, PreTrainedModel):
                tied.update({f"experts.{i}.{k}": f"experts.{i}.{v}"
                             for k, v in e.get_expanded_tied_weights_keys(all_submodels=True).items()})
        return tied

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PrefixRouter):
            init.normal_(module.embed.weight, std=0.02)
            for lin in module.modules():
                if isinstance(lin, nn.Linear):
                    init.normal_(lin.weight, std=0.02)
                    init.zeros_(lin.bias)

    def train(self, mode: bool = True):
        """Train mode for the router; frozen experts stay in eval mode (no dropout: they are fixed functions)."""
        super().train(mode)
        if self._experts_frozen():
            for e in self.experts:
                e.eval()
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Config (with every expert's config) + all weights (experts and router) in safetensors, and
        ``model.tokenizer`` when set."""
        if not self.placement.holds_all:
            raise ValueError("save_pretrained: this process holds only some experts (expert placement); save the "
                             "mixture from a process that holds all of them, before placing it")
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None:          # the shared tokenizer travels with the mixture
            self.tokenizer.save_pretrained(save_directory)
        return result

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False        # the mixture carries a MixtureCache of the experts' own caches

    # ------------------------------------------------------------------ gating
    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def allowed_experts(self, kind: str, index: int | None, usable: torch.Tensor, slice_labels, date) -> torch.Tensor:
        """[B, N] bool: the experts a row may weight under a mode (the time mask, narrowed by oracle/expert)."""
        names = self.config.expert_names
        if kind == "expert":
            if not bool(usable[:, index].all()):
                raise ValueError(f"mode='expert:{names[index]}': that expert was trained on text after the query "
                                 f"date {date} (date_policy={self.config.date_policy!r}); pick an earlier expert")
            return F.one_hot(torch.full_like(usable[:, 0], index, dtype=torch.long), self.num_experts).bool()
        if kind == "oracle":
            gold = self.gold_slices(slice_labels, date, usable.shape[0], usable.device)
            chosen = F.one_hot(gold, self.num_experts).bool()
            if not bool((usable | ~chosen).all()):
                raise ValueError("mode='oracle': a gold slice ends after the query date under date_policy='end'; "
                                 "use date_policy='start' or pass slice_labels without date")
            return chosen
        return usable

    def gold_slices(self, slice_labels, date, batch_size: int, device) -> torch.Tensor:
        """[B] gold slice index from ``slice_labels`` or from each row's year (``date``)."""
        if slice_labels is not None:
            gold = torch.as_tensor(slice_labels, dtype=torch.long, device=device).reshape(-1)
            if gold.numel() not in (1, batch_size):
                raise ValueError(f"slice_labels: expected one expert index per row ({batch_size}), got {gold.numel()}")
            gold = gold.expand(batch_size)
            if bool(((gold < 0) | (gold >= self.num_experts)).any()):
                raise ValueError(f"slice_labels={gold.tolist()}: each must be an expert index in "
                                 f"[0, {self.num_experts})")
            return gold
        if date is None:
            raise ValueError("mode='oracle' needs the gold slice of each sequence: pass slice_labels=[...] (expert "
                             "indices) or date=<the document's year>")
        years = torch.as_tensor(date, dtype=torch.long, device=device).reshape(-1)
        if years.numel() not in (1, batch_size):
            raise ValueError(f"date: expected an int or one date per row ({batch_size}), got {years.numel()}")
        years = years.expand(batch_size)
        return C.slice_of_year(self.config.slices, years)

    def gate(self, input_ids: torch.Tensor, attention_mask=None, date=None, mode: str | None = None,
             slice_labels=None, prompt_mask=None, router_state: RouterState | None = None):
        """The gate alone: ``(log_w [B, T, N], router_logits [B, T, N] or None, allowed [B, N], state)``."""
        kind, index = parse_mode(mode or self.config.default_mode, self.config.expert_names, self.router is not None)
        b, t = input_ids.shape
        usable = C.usable_experts(self.config.slices, date, b, self.config.date_policy, input_ids.device)
        allowed = self.allowed_experts(kind, index, usable, slice_labels, date)
        router_logits, state = None, None
        if kind in ("router", "argmax"):
            read = self.read_mask(input_ids, attention_mask, prompt_mask)
            raw, state = self.router(input_ids, read, router_state)
            router_logits = raw.float().masked_fill(~allowed[:, None, :], C.NEG_INF)
            if kind == "router":
                log_w = C.router_log_weights(raw.float(), allowed, self.config.top_k_experts)
            else:
                log_w = C.one_hot_log_weights(router_logits.argmax(-1), self.num_experts)
        elif kind == "equal":
            log_w = C.equal_log_weights(allowed, t)
        else:
            log_w = C.one_hot_log_weights(allowed.float().argmax(-1), self.num_experts, t)
        return log_w, router_logits, allowed, state

    @staticmethod
    def read_mask(input_ids, attention_mask=None, prompt_mask=None) -> torch.Tensor:
        """[B, T] bool: tokens the router may read (not padding, not a prompt prefix)."""
        read = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            read &= attention_mask.bool()
        if prompt_mask is not None:
            read &= ~prompt_mask.bool()
        return read

    def aux_losses(self, router_logits: torch.Tensor, log_w: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """Router regularisers on the read positions: entropy, load balance and z-loss, weighted by the config."""
        cfg = self.config
        sel = read.bool()
        if not bool(sel.any()):
            return router_logits.new_zeros(())
        logits = router_logits[sel]                                          # (M, N), masked at -inf
        probs = torch.softmax(logits, -1)
        k = cfg.top_k_experts or 1
        topk_idx = log_w[sel].topk(k, dim=-1).indices
        return (cfg.entropy_coef * entropy_loss(probs)
                + cfg.balance_coef * load_balance_loss(probs, topk_idx, self.num_experts)
                + cfg.z_loss_coef * z_loss(logits))

    # ------------------------------------------------------------------ experts
    def _experts_frozen(self) -> bool:
        return not any(p.requires_grad for e in self.experts for p in e.parameters())

    def expert_outputs(self, input_ids, attention_mask=None, run: torch.Tensor | None = None, caches=None,
                       use_cache: bool = False, logits_to_keep: int = 0, targets: torch.Tensor | None = None,
                       keep: str | None = "logits") -> ExpertOutputs:
        """Run this process's experts (those in ``run`` [N] bool; all by default) one after another.

        ``targets`` [B, T-1]: also return each expert's log-prob of them; ``keep``: "logits" or "log_probs" to
        return the full-vocabulary outputs (float32), None to drop each expert's [B, T, V] output as soon as its
        target log-probs are taken (what gate training over large experts needs). An expert not run gives
        zeros."""
        b, t = input_ids.shape
        t_out = logits_to_keep if logits_to_keep else t
        full, tl, new_caches = [], [], [None] * self.num_experts
        grad = contextlib.nullcontext() if not self._experts_frozen() else torch.no_grad()
        with grad:
            for k in self.placement.local_experts:
                if run is not None and not bool(run[k]):
                    full.append(None)
                    tl.append(None)
                    continue
                kw: dict[str, Any] = {"use_cache": use_cache}
                if use_cache:
                    kw.update(cache_kwargs(caches[k] if caches else None))
                if logits_to_keep:
                    kw["logits_to_keep"] = logits_to_keep
                res = self.experts[k](input_ids=input_ids, attention_mask=attention_mask, **kw)
                logits = res.logits.float()
                new_caches[k] = output_cache(res) if use_cache else None
                del res
                log_p = torch.log_softmax(logits, -1) if targets is not None or keep == "log_probs" else None
                tl.append(None if targets is None else
                          log_p[:, :-1].gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1))
                full.append(logits if keep == "logits" else log_p if keep == "log_probs" else None)
                del logits, log_p

        def stack(xs, shape):
            return torch.stack([torch.zeros(shape, device=input_ids.device) if x is None else x for x in xs])

        return ExpertOutputs(
            full=stack(full, (b, t_out, self.config.vocab_size)) if keep else None,
            target_log_probs=stack(tl, (b, t - 1)) if targets is not None else None, caches=new_caches)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, date=None, mode: str | None = None, slice_labels=None,
                prompt_mask: torch.Tensor | None = None, combine: str | None = None, cache: MixtureCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_logits: bool = True,
                past_key_values=None, return_dict: bool | None = None, **kwargs) -> ExpertMixtureOutput:
        """``date``: None, an int or a LongTensor [B] (the query date of each row); ``mode``: the gating (default
        ``config.default_mode``); ``slice_labels`` [B]: gold expert indices (oracle); ``prompt_mask`` [B, T]:
        True on prompt-prefix tokens (period token, "This text was written in the year ...") that the router
        never reads and that are never scored; ``labels`` [B, T]: the input ids themselves (shifted inside),
        -100 = ignore; ``combine``: override ``config.combine``; ``return_logits=False`` with labels computes
        only the targets' log-probs (no [B, T, V] mixture)."""
        cache = pick_cache(cache, past_key_values)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, time] token ids, got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        seen = cache.seen if cache is not None else 0
        if self.config.sequence_length is not None and seen + t > self.config.sequence_length:
            raise ValueError(f"input of {seen + t} tokens exceeds sequence_length={self.config.sequence_length}; "
                             "cut the input or raise sequence_length")
        combine = combine or self.config.combine
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r}: must be one of {COMBINES}")
        use_cache = bool(use_cache) if use_cache is not None else cache is not None
        step_mask = attention_mask[:, -t:] if attention_mask is not None else None
        if prompt_mask is not None:
            if prompt_mask.shape[0] != b or prompt_mask.shape[1] < t:
                raise ValueError(f"prompt_mask: expected shape [{b}, {t}] like input_ids (True on prompt-prefix "
                                 f"tokens), got {tuple(prompt_mask.shape)}")
            prompt_mask = prompt_mask[:, -t:]           # generation passes the whole mask, inputs are the new tokens
        log_w, router_logits, allowed, state = self.gate(
            input_ids, step_mask, date, mode, slice_labels, prompt_mask, cache.router if cache else None)
        run = allowed.any(0)
        keep_positions = 0 if labels is not None else logits_to_keep
        full_needed = return_logits or labels is None or combine == "logits"
        targets = labels[:, 1:] if labels is not None else None
        outs = self.expert_outputs(input_ids, attention_mask, run, cache.experts if cache else None, use_cache,
                                   keep_positions, targets if combine == "logprob" else None,
                                   keep=("log_probs" if combine == "logprob" else "logits") if full_needed else None)
        out: dict[str, Any] = {"expert_weights": log_w.exp(), "router_logits": router_logits}

        aux = log_w.new_zeros(())
        if router_logits is not None and (mode or self.config.default_mode) == "router":
            aux = self.aux_losses(router_logits, log_w, self.read_mask(input_ids, step_mask, prompt_mask))
        out["aux_loss"] = aux

        every = self.placement.gather(outs.full) if full_needed else None                # (N, B, T', V)
        if labels is not None:
            scored = targets != -100
            if step_mask is not None:
                scored &= step_mask[:, 1:].bool()
            if prompt_mask is not None:
                scored &= ~prompt_mask[:, 1:].bool()
            if combine == "logprob":
                tl = self.placement.gather(outs.target_log_probs)                          # (N, B, T-1)
                token_lp = C.mix_log_probs(log_w[:, :-1], tl)
            else:
                mixed = torch.log_softmax(C.mix_logits(log_w[:, :-1], every[:, :, :-1]), -1)
                token_lp = mixed.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
            token_lp = token_lp.masked_fill(~scored, 0.0)
            nll = -token_lp.sum() / scored.sum().clamp_min(1)
            out.update(token_log_probs=token_lp, token_mask=scored, nll=nll, loss=nll + aux)
        if return_logits or labels is None:
            lw = log_w[:, -every.shape[2]:]
            if combine == "logprob":
                out["logits"] = C.mix_log_probs(lw, every)
            else:
                out["logits"] = torch.log_softmax(C.mix_logits(lw, every), -1)
        if use_cache:
            out.update(cache_kwargs(MixtureCache(outs.caches, state, seen + t)))
        return ExpertMixtureOutput(**out)

    # ------------------------------------------------------------------ generation
    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        if CACHE_NAME != "cache" and CACHE_NAME in outputs:
            model_kwargs[CACHE_NAME] = outputs[CACHE_NAME]
        prompt_mask = model_kwargs.get("prompt_mask")
        if prompt_mask is not None:       # generated tokens are text, never prompt
            model_kwargs["prompt_mask"] = torch.cat([prompt_mask, prompt_mask.new_zeros(
                (prompt_mask.shape[0], num_new_tokens))], dim=-1)
        return model_kwargs

    def generate_from_string(self, text: str, max_new_tokens: int = 50, date=None, tokenizer=None,
                             **generate_kwargs) -> str:
        """Greedy continuation of ``text`` at a query ``date`` (decoded, prompt included). ``tokenizer``: the
        mixture's shared tokenizer (default: the one saved with the mixture folder, or ``model.tokenizer``)."""
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("generate_from_string needs the experts' tokenizer: pass tokenizer=... or set "
                             "model.tokenizer (a mixture folder saved with its tokenizer loads it)")
        enc = tok(text, return_tensors="pt")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else tok.eos_token_id
        generate_kwargs.setdefault("do_sample", False)
        ids = self.generate(enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device),
                            max_new_tokens=max_new_tokens, date=date, pad_token_id=pad, **generate_kwargs)
        return tok.decode(ids[0], skip_special_tokens=True)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        for e in model.experts:          # loading hands back trainable parameters: the experts stay frozen
            e.requires_grad_(False)
        folder = Path(str(args[0] if args else kwargs.get("pretrained_model_name_or_path", "")))
        if (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer
            model.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return model


def slices_from_configs(models: list, names: list[str] | None) -> tuple[list[list[int]], list[str] | None]:
    """Slices (and names, unless given) from each expert config's ``dsmoe_slice`` entry."""
    found = []
    for i, m in enumerate(models):
        entry = getattr(m.config, "dsmoe_slice", None)
        if not isinstance(entry, dict) or not {"start_year", "end_year"} <= set(entry):
            raise ValueError(f"slices: not given and experts[{i}] has no dsmoe_slice {{start_year, end_year}} in its "
                             "config; pass slices=[(start_year, end_year), ...]")
        found.append(entry)
    slices = [[e["start_year"], e["end_year"]] for e in found]
    if names is None and all(e.get("name") for e in found):
        names = [str(e["name"]) for e in found]
    return slices, names


def build_expert_config(values: dict) -> PreTrainedConfig:
    """An expert's config object from its stored dict."""
    d = dict(values)
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except ValueError as err:
        raise ValueError(f"ExpertMixtureConfig.expert_configs: model_type={model_type!r} is not a transformers "
                         f"architecture this installation knows ({str(err).splitlines()[0]})") from None


def load_expert(path, key: str) -> PreTrainedModel:
    """A causal LM from an HF folder; one-line FileNotFoundError naming ``key`` when the folder is missing."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no model folder there (no config.json); give a folder "
                                "written by save_pretrained")
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
