"""What the trainer needs from a causal LM, as one interface with two implementations.

The ``model:`` section of a run config names the model:

- RoutedLM (the default): the section is ``RoutedLMConfig`` keys (MoE options, warmup, bias balancing ...);
- any transformers causal LM: ``architecture: gpt2 | llama | olmo | olmo2 | mistral | qwen2 | ...`` (a
  transformers ``model_type``) plus that architecture's config keys, trained from scratch; or
  ``pretrained: PATH`` (an HF folder: config + safetensors) plus optional config overrides, fine-tuned.

:class:`TrainableLM` is what the trainer calls: build the config from what the data decides (vocabulary,
special tokens, context length), build the model, run one forward and normalise its output
(:class:`LMStep`), the per-step hooks (expert-bias update, router reset) and the checkpoint compatibility keys.
``train.trainable`` (``all`` | ``ffn`` | ``none-but-new``) is applied by :func:`apply_trainable` for both.
"""
from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

TRAINABLE = ("all", "ffn", "none-but-new")
# module names that hold a transformer block's feed-forward network, across the architectures we train
FFN_MODULE_NAMES = ("mlp", "ffn", "feed_forward", "block_sparse_moe")


@dataclass
class LMStep:
    """One forward's output as the trainer uses it."""

    loss: torch.Tensor                       # what is backpropagated (LM loss + auxiliary losses)
    lm_loss: torch.Tensor                    # mean next-token NLL over the labelled tokens
    aux_loss: torch.Tensor | None = None
    expert_usage: list = field(default_factory=list)   # per MoE layer (E,) computed assignments
    moe_stats: list = field(default_factory=list)      # per MoE layer MoEStats


class TrainableLM(ABC):
    """How the trainer builds, calls and maintains one kind of causal LM."""

    compat_keys: tuple[str, ...] = ("hidden_size", "num_hidden_layers", "vocab_size")
    """Config keys a checkpoint must share with the run config to be resumed."""
    folder: Path | None = None
    """The pretrained HF folder the model is fine-tuned from (None: trained from scratch)."""

    @abstractmethod
    def model_config(self, vocab_size: int, eos_token_id: int | None, pad_token_id: int | None, seq_len: int):
        """The transformers config to build, with what the data decides filled in."""

    @abstractmethod
    def build(self, config) -> nn.Module:
        """A fresh model (identically initialised on every rank: the caller seeds torch)."""

    @abstractmethod
    def forward(self, engine, input_ids: torch.Tensor, labels: torch.Tensor, step: int | None) -> LMStep:
        """One forward through ``engine`` (the DeepSpeed engine or the bare model)."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Per-step maintenance after the optimizer step (nothing by default)."""

    def router_reset(self, model: nn.Module, step: int, seed: int) -> list[tuple[nn.Parameter, torch.Tensor]] | None:
        """Parameters to overwrite before ``step`` (and whose moments to clear), or None: nothing is due."""
        return None

    def after_router_reset(self, model: nn.Module) -> None:
        """Called once the reset values are in place."""

    def moe_layer_ids(self, model: nn.Module) -> list[int]:
        return []

    def set_debug(self, model: nn.Module, every: int) -> None:
        """Per-layer debug statistics (RoutedLM's routing logger); nothing by default."""

    def describe(self) -> str:
        return type(self).__name__


# ---------------------------------------------------------------------------------------------- RoutedLM
class RoutedLMSpec(TrainableLM):
    """dsmoe's RoutedLM: the ``model:`` section is ``RoutedLMConfig`` keys, trained from scratch; or
    ``pretrained: PATH`` of a RoutedLM folder (e.g. a Branch-Train-MiX merge) with optional RoutedLM keys
    overriding its config (training-time options such as aux_loss_coef, bias_update_rate, capacity), fine-tuned
    with the MoE machinery (bias balancing, EP) intact."""

    compat_keys = ("hidden_size", "num_hidden_layers", "n_routed_experts", "vocab_size", "use_moe",
                   "moe_intermediate_size", "use_null_expert", "n_shared_experts")

    def __init__(self, section: dict[str, Any], folder: Path | None = None):
        from dsmoe.models import RoutedLMConfig

        self.section, self.folder = dict(section), folder
        known = set(RoutedLMConfig.__annotations__)
        for k in section:
            if k not in known:
                from dsmoe.suggest import did_you_mean
                raise ConfigError(f"model.{k}: unknown key{did_you_mean(k, known | {'architecture', 'pretrained'})}"
                                  f" (the model keys are the options of dsmoe.models.RoutedLMConfig, or "
                                  f"'architecture' / 'pretrained' for a transformers causal LM)")
        try:
            if folder is None:
                self.config = RoutedLMConfig(**section)
            else:
                saved = RoutedLMConfig.from_pretrained(folder).to_dict()
                keep = {k: v for k, v in saved.items() if k in known}
                self.config = RoutedLMConfig(**{**keep, **section})
        except (TypeError, ValueError) as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(msg if msg.startswith("model.") else f"model: {msg}") from None

    def model_config(self, vocab_size, eos_token_id, pad_token_id, seq_len):
        mcfg = copy.deepcopy(self.config)
        if self.folder is not None:
            mcfg.vocab_size = max(vocab_size, mcfg.vocab_size)   # grown when the tokenizer gained tokens
            mcfg.max_position_embeddings = max(seq_len, mcfg.max_position_embeddings)
            return mcfg
        mcfg.vocab_size = vocab_size
        mcfg.eos_token_id = self.section.get("eos_token_id", eos_token_id)
        if "pad_token_id" not in self.section:
            mcfg.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        mcfg.max_position_embeddings = max(seq_len, self.section.get("max_position_embeddings", 0))
        return mcfg

    def build(self, config):
        from dsmoe.models import RoutedLMForCausalLM
        if self.folder is None:
            return RoutedLMForCausalLM(config)
        grown = config.vocab_size
        saved = copy.deepcopy(config)
        saved.vocab_size = self.config.vocab_size
        model = RoutedLMForCausalLM.from_pretrained(self.folder, config=saved, dtype=torch.float32)
        if grown > saved.vocab_size:                          # the tokenizer outgrew the folder's vocabulary
            model.resize_token_embeddings(grown)
        return model

    def forward(self, engine, input_ids, labels, step):
        kw = {} if step is None else {"step": step}
        out = engine(input_ids=input_ids, labels=labels, **kw)
        return LMStep(out.loss, out.lm_loss, out.aux_loss, list(out.expert_usage or []), list(out.moe_stats or []))

    def after_optimizer_step(self, model):
        model.update_expert_bias()

    def router_reset(self, model, step, seed):
        core = model.model
        reset_at = model.config.router_reset_step
        if reset_at is None or step < reset_at or bool(core.router_reset_done):
            return None
        return core.router_reset_values(torch.Generator().manual_seed(seed * 1_000_003 + step))

    def after_router_reset(self, model):
        model.model.reset_router_buffers()

    def moe_layer_ids(self, model):
        return list(model.config.moe_layers)

    def set_debug(self, model, every):
        model.set_debug(True, every=every)

    def describe(self):
        return "RoutedLM" + (f" from {self.folder}" if self.folder else "")


# ---------------------------------------------------------------------------------------------- transformers
class HFCausalLMSpec(TrainableLM):
    """A transformers causal LM: ``architecture`` (+ config keys, from scratch) or ``pretrained: PATH``."""

    def __init__(self, section: dict[str, Any]):
        from transformers import AutoConfig, CONFIG_MAPPING

        section = dict(section)
        self.architecture = section.pop("architecture", None)
        self.pretrained = section.pop("pretrained", None)
        self.overrides = section
        if self.pretrained is not None:
            folder = pretrained_folder(self.pretrained)
            self.folder = folder
            base = AutoConfig.from_pretrained(folder)
            if self.architecture is not None and self.architecture != base.model_type:
                raise ConfigError(f"model.architecture={self.architecture}: the folder {folder} holds a "
                                  f"{base.model_type} model; drop model.architecture or make them agree")
            self.architecture = base.model_type
        else:
            if self.architecture not in CONFIG_MAPPING:
                from dsmoe.suggest import did_you_mean
                raise ConfigError(f"model.architecture={self.architecture}: not a transformers model type"
                                  f"{did_you_mean(str(self.architecture), set(CONFIG_MAPPING.keys()))} (e.g. gpt2, "
                                  f"llama, olmo, olmo2, mistral, qwen2)")
            self.folder = None
            base = CONFIG_MAPPING[self.architecture]()
        known = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
        for k in self.overrides:
            if k not in known:
                from dsmoe.suggest import did_you_mean
                raise ConfigError(f"model.{k}: not a {self.architecture} config key{did_you_mean(k, known)}")
        try:
            self.config = self._configured(base)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {str(e).splitlines()[0]}") from None

    def _configured(self, base):
        cfg = copy.deepcopy(base)
        for k, v in self.overrides.items():
            setattr(cfg, k, v)
        if hasattr(cfg, "validate"):
            cfg.validate()
        return cfg

    def model_config(self, vocab_size, eos_token_id, pad_token_id, seq_len):
        cfg = copy.deepcopy(self.config)
        if self.folder is None or vocab_size > cfg.vocab_size:
            cfg.vocab_size = vocab_size          # from scratch: the tokenizer's; fine-tuning: grown if needed
        if self.folder is None:
            if "eos_token_id" not in self.overrides:
                cfg.eos_token_id = eos_token_id
            bos = getattr(cfg, "bos_token_id", None)
            if "bos_token_id" not in self.overrides and isinstance(bos, int) and bos >= vocab_size:
                cfg.bos_token_id = eos_token_id      # the architecture's default id lies outside our vocabulary
            if "pad_token_id" not in self.overrides:
                cfg.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        for key in ("max_position_embeddings", "n_positions"):
            if hasattr(cfg, key) and key not in self.overrides:
                have = getattr(cfg, key)
                if self.folder is not None and have < seq_len:
                    raise ConfigError(f"model.pretrained={self.pretrained}: {key}={have} is below data.seq_len="
                                      f"{seq_len}; lower data.seq_len")
                setattr(cfg, key, max(have, seq_len))
        cfg.use_cache = False
        if hasattr(cfg, "loss_type") and cfg.loss_type is None:
            cfg.loss_type = "ForCausalLM"        # what transformers picks anyway, without its warning
        return cfg

    def build(self, config):
        from transformers import AutoModelForCausalLM

        if self.folder is None:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32, use_safetensors=True,
                                                     **self.overrides)
        if config.vocab_size > model.config.vocab_size:      # the tokenizer outgrew the folder's vocabulary
            model.resize_token_embeddings(config.vocab_size)
        model.config.use_cache = False
        return model

    def forward(self, engine, input_ids, labels, step):
        out = engine(input_ids=input_ids, labels=labels)
        return LMStep(out.loss, out.loss)

    def describe(self):
        return f"{self.architecture} (transformers)" + (f" from {self.folder}" if self.folder else "")


def pretrained_folder(value) -> Path:
    """``model.pretrained``: an HF folder with config.json and safetensors weights, or a ConfigError."""
    folder = Path(str(value)).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.pretrained={value}: no config.json there; give an HF model folder "
                          f"(config.json + model.safetensors)")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"model.pretrained={value}: no *.safetensors weights there (dsmoe loads no pickles); "
                          f"save the model with save_pretrained(safe_serialization=True)")
    return folder


def parse_model_section(section: dict[str, Any]) -> TrainableLM:
    """The ``model:`` section as the model kind the trainer will train."""
    if not isinstance(section, dict):
        raise ConfigError(f"model={section!r}: expected a mapping of model keys")
    arch = section.get("architecture")
    if "pretrained" in section:
        folder = pretrained_folder(section["pretrained"])
        saved_type = json.loads((folder / "config.json").read_text()).get("model_type")
        from dsmoe.models import RoutedLMConfig
        if saved_type == RoutedLMConfig.model_type:
            if arch not in (None, "routed_lm"):
                raise ConfigError(f"model.architecture={arch}: the folder {folder} holds a RoutedLM; drop "
                                  f"model.architecture")
            return RoutedLMSpec({k: v for k, v in section.items() if k not in ("architecture", "pretrained")},
                                folder)
        return HFCausalLMSpec(section)
    if arch in (None, "routed_lm"):
        return RoutedLMSpec({k: v for k, v in section.items() if k != "architecture"})
    return HFCausalLMSpec(section)


def apply_trainable(model: nn.Module, policy: str, new_token_ids: list[int] | None = None) -> dict[str, int]:
    """Freeze what ``train.trainable`` leaves out; returns trainable / total parameter counts.

    ``none-but-new`` trains only the embedding rows (input and, if untied, output) of ``new_token_ids``, the
    tokens the data added to a pretrained model's vocabulary (the period tokens of ``data.prompt:
    period_token``): every other weight, and every other row, stays bit-identical (their gradient is zeroed
    and the embeddings are left out of weight decay)."""
    if policy not in TRAINABLE:
        raise ConfigError(f"train.trainable={policy!r}: must be one of {TRAINABLE}")
    if policy == "none-but-new":
        _train_new_rows_only(model, new_token_ids)
    elif policy == "ffn":
        ffn = {id(p) for name, mod in model.named_modules() if name.split(".")[-1] in FFN_MODULE_NAMES
               for p in mod.parameters()}
        if not ffn:
            raise ConfigError(f"train.trainable=ffn: no feed-forward modules (named {', '.join(FFN_MODULE_NAMES)}) "
                              f"in {type(model).__name__}; use train.trainable=all")
        for p in model.parameters():
            p.requires_grad_(id(p) in ffn)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if policy == "none-but-new":
        trainable = sum(len(new_token_ids) * p.shape[1] for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


NO_DECAY = "_dsmoe_no_decay"          # attribute set on parameters that must not be weight-decayed


def _train_new_rows_only(model: nn.Module, new_token_ids: list[int] | None) -> None:
    if not new_token_ids:
        raise ConfigError("train.trainable=none-but-new: the data adds no token to the model's vocabulary; it trains "
                          "the embeddings of added tokens only (data.prompt=period_token with model.pretrained)")
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    weights = [emb.weight] + ([out.weight] if out is not None and out.weight is not emb.weight else [])
    for p in model.parameters():
        p.requires_grad_(False)
    rows = torch.zeros(emb.weight.shape[0], 1, dtype=torch.bool)
    rows[torch.tensor(new_token_ids)] = True
    for w in weights:
        w.requires_grad_(True)
        setattr(w, NO_DECAY, True)
        w.register_hook(lambda g, keep=rows: g * keep.to(device=g.device, dtype=g.dtype))
