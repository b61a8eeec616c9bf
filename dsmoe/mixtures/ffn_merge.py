"""FFNMergeForCausalLM: N fine-tunes of one causal LM merged FFN-by-FFN under a prompt gate.

Attention, embeddings and norms (the trunk) exist once; every decoder layer holds the N models' FFNs in a
:class:`MergedFFN`. A gate (:mod:`dsmoe.mixtures.gating`) classifies the prompt once into probabilities
p (B, N), and every FFN output is ``sum_i p_i * FFN_i(h)`` (``weighted_sum``) or ``FFN_argmax(p)(h)``
(``select_one``). ``forward(..., gating_probs=p)`` overrides the gate. ``generate`` computes p from the
prompt once and keeps it for every generated token (the KV cache holds the prompt's keys and values).

Saved folders (``save_pretrained``) hold the trunk once, N FFNs per layer and the gate's MLP in safetensors;
the gate's frozen encoder is referenced by its folder (``config.gating_encoder``), not copied.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin

from dsmoe.models.cache_compat import cache_kwargs, model_output, output_cache, pick_cache

from .configuration_ffn_merge import ROUTING_MODES, FFNMergeConfig
from .gating import FrozenEncoder, GatingMLP, load_gate
from .merge_checks import decoder_layers, ffn_key_pattern, shared_trunk

FFNMergeCausalLMOutput = model_output("FFNMergeCausalLMOutput", [
    ("loss", torch.FloatTensor), ("logits", torch.FloatTensor), ("cache", Cache),
    ("gating_probs", torch.FloatTensor)], module=__name__, doc="""Output of :class:`FFNMergeForCausalLM`.

    ``loss``: next-token cross-entropy when labels are given; ``logits`` (B, T, V); the KV cache (``cache``, or
    ``past_key_values`` before transformers 5.24); ``gating_probs`` (B, N) fp32: the mixing weights used.""")


class MergedFFN(nn.Module):
    """The N FFNs of one decoder layer, mixed with per-sequence weights set by the model around each forward."""

    def __init__(self, ffns: list[nn.Module], routing_mode: str):
        super().__init__()
        self.ffns = nn.ModuleList(ffns)
        self.routing_mode = routing_mode
        self.mix: torch.Tensor | None = None        # (B, N), set by FFNMergeForCausalLM.forward only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H)."""
        if self.mix is None:
            raise RuntimeError("MergedFFN runs inside FFNMergeForCausalLM.forward, which sets its mixing weights")
        w = self.mix.to(x.dtype)                                                # (B, N)
        if self.routing_mode == "select_one":
            pick = w.argmax(-1)                                                 # (B,)
            out = x.new_zeros(x.shape)
            for i in pick.unique().tolist():
                rows = pick == i
                out[rows] = self.ffns[i](x[rows])
            return out
        out = None
        for i, ffn in enumerate(self.ffns):
            if bool((w[:, i] == 0).all()):              # nothing to add (keeps one-hot gates exact and cheap)
                continue
            y = w[:, i, None, None] * ffn(x)
            out = y if out is None else out + y
        return out if out is not None else x.new_zeros(x.shape)


class FFNMergePreTrainedModel(PreTrainedModel):
    config_class = FFNMergeConfig
    config: FFNMergeConfig
    base_model_prefix = "trunk"
    _supports_sdpa = True
    _skip_keys_device_placement = ["cache", "past_key_values"]


class FFNMergeForCausalLM(FFNMergePreTrainedModel, GenerationMixin):
    """N causal LMs merged FFN-by-FFN (see the module doc). Build with :meth:`from_components`."""

    def __init__(self, config: FFNMergeConfig):
        super().__init__(config)
        trunk_config = config.trunk()
        trunk_config._attn_implementation = config._attn_implementation or "sdpa"
        self.trunk = AutoModelForCausalLM.from_config(trunk_config)
        for layer in decoder_layers(self.trunk):
            ffn = getattr(layer, config.ffn_name)
            setattr(layer, config.ffn_name,
                    MergedFFN([copy.deepcopy(ffn) for _ in range(config.num_models)], config.routing_mode))
        a = config.gating_arch
        self.gate = GatingMLP(a["input_dim"], a["num_classes"], a["hidden_dims"], a.get("dropout", 0.0)) \
            if a is not None else None
        self.tokenizer = None           # the LM tokenizer (decodes prompts for the gate), set when loaded
        self._encoder = None            # the gate's frozen encoder, loaded on first use
        self.post_init()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_components(cls, models: list, gating: str | os.PathLike | None = None,
                        routing_mode: str = "weighted_sum", allow_different_trunks: bool = False,
                        base_model: str | os.PathLike | None = None, names: list[str] | None = None,
                        tokenizer=None) -> "FFNMergeForCausalLM":
        """Merge N >= 2 causal LMs (HF folders or loaded ``PreTrainedModel``s, gate-class order).

        ``gating``: a gate folder from ``train_gating`` (or None: pass ``gating_probs`` to ``forward``);
        ``base_model``: the gate's encoder folder (default: the one it was trained on); the trunk is the first
        model's (all must have the same non-FFN weights) or, with ``allow_different_trunks``, the mean.
        ``tokenizer``: the LM tokenizer (default: the first model folder's, if it has one)."""
        if len(models) < 2:
            raise ValueError(f"models: the FFN merge needs at least 2 models, got {len(models)}")
        names = list(names) if names is not None else [
            str(m) if isinstance(m, (str, os.PathLike)) else f"model {i + 1}" for i, m in enumerate(models)]
        loaded = [load_causal_lm(m, name) for m, name in zip(models, names)]
        trunk_state = shared_trunk(loaded, names, allow_different_trunks)
        gate = load_gate(gating) if gating is not None else None
        if gate is not None and gate.gate.num_classes != len(models):
            raise ValueError(f"gating={str(gating)!r}: the gate has {gate.gate.num_classes} classes but "
                             f"{len(models)} models were given; train the gate on one dataset per model")
        first = loaded[0]
        config = FFNMergeConfig(
            trunk_config=first.config.to_dict(), num_models=len(models), routing_mode=routing_mode,
            gating_arch=gate.gate.arch() if gate is not None else None,
            gating_encoder=str(base_model if base_model is not None else gate.base_model) if gate else None,
            encoder_max_length=gate.info["config"].get("max_length", 256) if gate else 256, model_names=names)
        model = cls(config).to(next(first.parameters()).dtype)
        missing, unexpected = model.trunk.load_state_dict(trunk_state, strict=False)
        is_ffn = ffn_key_pattern(config.ffn_name)
        missing = [k for k in missing if not is_ffn.match(k) and k not in _tied_keys(model.trunk)]
        if missing or unexpected:
            raise ValueError(f"the trunk weights do not line up (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for layer, *sources in zip(decoder_layers(model.trunk), *(decoder_layers(m) for m in loaded)):
            merged = getattr(layer, config.ffn_name)
            for ffn, src in zip(merged.ffns, sources):
                ffn.load_state_dict(getattr(src, config.ffn_name).state_dict())
        if gate is not None:
            model.gate.load_state_dict(gate.gate.state_dict())
        if tokenizer is None and isinstance(models[0], (str, os.PathLike)):
            tokenizer = _maybe_tokenizer(models[0])
        model.tokenizer = tokenizer
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a folder written by :meth:`save_pretrained` (also through ``AutoModelForCausalLM`` after
        ``import dsmoe``); one line naming the folder when it is not an FFN merge."""
        folder = Path(pretrained_model_name_or_path)
        _check_merge_folder(folder)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.tokenizer = _maybe_tokenizer(folder)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Weights (trunk once, N FFNs per layer, the gate) in safetensors, config in JSON, and the tokenizer."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    def set_routing_mode(self, routing_mode: str) -> None:
        """Switch between "weighted_sum" and "select_one" (e.g. to evaluate both on one loaded merge)."""
        if routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode={routing_mode!r}: choose one of {ROUTING_MODES}")
        self.config.routing_mode = routing_mode
        for layer in decoder_layers(self.trunk):
            getattr(layer, self.config.ffn_name).routing_mode = routing_mode

    def set_gating_encoder(self, path: str | os.PathLike) -> None:
        """Read prompts with the encoder at ``path`` instead of the one the gate was trained on (same width)."""
        self.config.gating_encoder = str(path)
        self._encoder = None

    # ------------------------------------------------------------------ gate
    @property
    def num_models(self) -> int:
        return self.config.num_models

    def encoder(self) -> FrozenEncoder:
        """The gate's frozen encoder (loaded once from ``config.gating_encoder``)."""
        if self._encoder is None:
            if self.config.gating_encoder is None:
                raise ValueError("this merge has no gate; pass gating_probs (B, N) to forward / generate")
            encoder = FrozenEncoder(self.config.gating_encoder, max_length=self.config.encoder_max_length)
            if self.gate is not None and encoder.dim != self.gate.input_dim:
                raise ValueError(f"base_model={self.config.gating_encoder!r}: its embeddings are {encoder.dim} wide "
                                 f"but the gate reads {self.gate.input_dim}; use the encoder the gate was trained on")
            self._encoder = encoder
        return self._encoder

    @torch.no_grad()
    def gating_probs_for(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), N) fp32: the gate's softmax for each prompt."""
        if self.gate is None:
            raise ValueError("this merge has no gate; pass gating_probs (B, N) to forward / generate")
        emb = self.encoder().embed(list(texts)).to(self.gate.net[0].weight.device)
        return self.gate(emb).float().softmax(-1)

    def _gate_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("the gate classifies text, but this merge has no tokenizer to decode input_ids; "
                             "pass gating_probs, or save the models' tokenizer with the merge")
        rows = input_ids if attention_mask is None else [r[m.bool()] for r, m in zip(input_ids, attention_mask)]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        return self.gating_probs_for(texts)

    def _resolve_probs(self, gating_probs, input_ids, attention_mask, batch: int, cache) -> torch.Tensor:
        n = self.num_models
        if gating_probs is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("gating_probs is needed for a continuation step (the gate classifies the whole "
                                 "prompt; generate() computes it once and passes it on)")
            if input_ids is None:
                raise ValueError("gating_probs is needed with inputs_embeds (the gate reads the prompt's text)")
            gating_probs = self._gate_from_ids(input_ids, attention_mask)
        p = torch.as_tensor(gating_probs, dtype=torch.float32, device=self.device)
        if p.dim() == 1:
            p = p.unsqueeze(0).expand(batch, -1)
        if p.shape != (batch, n):
            raise ValueError(f"gating_probs has shape {tuple(p.shape)}; expected (batch={batch}, num_models={n})")
        return p

    @contextlib.contextmanager
    def _mixing(self, probs: torch.Tensor):
        ffns = [getattr(layer, self.config.ffn_name) for layer in decoder_layers(self.trunk)]
        for f in ffns:
            f.mix = probs
        try:
            yield
        finally:
            for f in ffns:
                f.mix = None

    # ------------------------------------------------------------------ forward / generate
    def get_input_embeddings(self):
        return self.trunk.get_input_embeddings()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, gating_probs: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: Cache | None = None,
                **kwargs) -> FFNMergeCausalLMOutput:
        """``gating_probs`` (B, N) or (N,): the mixing weights (default: the gate on the prompt's text).
        ``labels`` (B, T) are the input ids (shifted inside), -100 = ignore. The cache may be passed as
        ``cache`` or ``past_key_values``."""
        cache = pick_cache(cache, past_key_values)
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        probs = self._resolve_probs(gating_probs, input_ids, attention_mask, batch, cache)
        with self._mixing(probs):
            out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                             logits_to_keep=logits_to_keep, **cache_kwargs(cache), **kwargs)
        return FFNMergeCausalLMOutput(loss=out.loss, logits=out.logits, **cache_kwargs(output_cache(out)),
                                      gating_probs=probs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, gating_probs: torch.Tensor | None = None, **kwargs):
        """``transformers`` generation; the gate classifies the prompt once and its probabilities are kept for
        every generated token (pass ``gating_probs`` to fix them)."""
        if gating_probs is None and input_ids is not None:
            gating_probs = self._gate_from_ids(input_ids, kwargs.get("attention_mask"))
        if gating_probs is not None:
            b = input_ids.shape[0] if input_ids is not None else 1
            gating_probs = self._resolve_probs(gating_probs, input_ids, None, b, None)
        return super().generate(input_ids=input_ids, gating_probs=gating_probs, **kwargs)

    def prepare_inputs_for_generation(self, *args, gating_probs=None, **kwargs):
        inputs = self.trunk.prepare_inputs_for_generation(*args, **kwargs)
        inputs["gating_probs"] = gating_probs
        return inputs


def _tied_keys(model: nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if getattr(model.config, "tie_word_embeddings", False) else set()


def load_causal_lm(model, name: str, want: str = "the fine-tuned model's folder") -> PreTrainedModel:
    """``model`` itself when loaded, else the fp32 causal LM of the HF folder ``model`` (``name`` and ``want``
    word the error for a folder without a config)."""
    if isinstance(model, nn.Module):
        return model
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{name}: not an HF model folder (no config.json); give {want}")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _maybe_tokenizer(folder):
    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(folder)


def _check_merge_folder(folder: Path) -> None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{folder}: not a saved FFN merge (no config.json); save one with "
                         f"FFNMergeForCausalLM.save_pretrained")
    try:
        kind = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError:
        kind = None
    if kind != FFNMergeConfig.model_type:
        raise ValueError(f"{folder}: holds a {kind!r} model, not an FFN merge ({FFNMergeConfig.model_type}); "
                         f"give a folder written by FFNMergeForCausalLM.save_pretrained")
