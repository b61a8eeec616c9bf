"""The time-aware expert mixture under the names its original release used: ``TiMoEConfig`` and ``TiMoE``.

Thin aliases over :class:`dsmoe.mixtures.ExpertMixtureConfig` / :class:`dsmoe.mixtures.ExpertMixtureForCausalLM`
(no second implementation):

* ``TiMoEConfig(num_experts, expert_configs, use_router=False, top_k_experts=None, sequence_length=1024,
  slices=None, first_year=2013, window_years=2)`` builds an ``ExpertMixtureConfig`` with the log-prob combiner
  and date policy "start". Without ``slices`` expert k covers the consecutive window
  [first_year + k * window_years, first_year + (k + 1) * window_years - 1] (2013-2014, 2015-2016, ...).
  ``expert_configs`` are transformers configs (any causal-LM architecture) or dicts; a dict without
  ``model_type`` is read as GPT-2 config keys.
* ``TiMoE`` is ``ExpertMixtureForCausalLM``: ``TiMoE(config)`` builds randomly initialised experts,
  ``out.combined_log_probs`` is the mixture's log-probabilities, ``generate_from_string(text, max_new_tokens,
  date)`` generates at a query date (pass ``tokenizer=`` or set ``model.tokenizer`` first).

Options of the original that dsmoe does not implement are refused with a ValueError, never ignored.
"""
from __future__ import annotations

from transformers import GPT2Config

from dsmoe.mixtures import ExpertMixtureConfig, ExpertMixtureForCausalLM

TiMoE = ExpertMixtureForCausalLM

_PASSED_THROUGH = ("combine", "date_policy", "expert_names", "router_embed_dim", "router_hidden_size",
                   "entropy_coef", "balance_coef", "z_loss_coef", "pad_token_id", "bos_token_id", "eos_token_id")


def TiMoEConfig(num_experts: int, expert_configs: list, use_router: bool = False, top_k_experts: int | None = None,
                sequence_length: int | None = 1024, slices: list | None = None, first_year: int = 2013,
                window_years: int = 2, **kwargs) -> ExpertMixtureConfig:
    """An :class:`ExpertMixtureConfig` from the original option names (see the module docstring)."""
    unknown = sorted(set(kwargs) - set(_PASSED_THROUGH))
    if unknown:
        raise ValueError(f"TiMoEConfig: option(s) {unknown} are not supported by dsmoe's time-aware mixture; "
                         f"supported: num_experts, expert_configs, use_router, top_k_experts, sequence_length, "
                         f"slices, first_year, window_years, {', '.join(_PASSED_THROUGH)}")
    if not isinstance(expert_configs, (list, tuple)) or Ellipsis in expert_configs:
        raise ValueError("TiMoEConfig.expert_configs: give one config per expert (e.g. GPT2Config(...)), "
                         "not a placeholder")
    if num_experts != len(expert_configs):
        raise ValueError(f"TiMoEConfig.num_experts={num_experts!r} but {len(expert_configs)} expert_configs; give "
                         "one config per expert")
    if not isinstance(window_years, int) or window_years < 1:
        raise ValueError(f"TiMoEConfig.window_years={window_years!r}: must be a positive integer")
    configs = [GPT2Config(**c) if isinstance(c, dict) and "model_type" not in c else c for c in expert_configs]
    if slices is None:
        slices = [[first_year + k * window_years, first_year + (k + 1) * window_years - 1] for k in range(num_experts)]
    first = configs[0] if not isinstance(configs[0], dict) else GPT2Config()
    kwargs.setdefault("combine", "logprob")
    kwargs.setdefault("eos_token_id", getattr(first, "eos_token_id", None))
    kwargs.setdefault("bos_token_id", getattr(first, "bos_token_id", None))
    return ExpertMixtureConfig(expert_configs=configs, slices=[list(s) for s in slices], use_router=use_router,
                               top_k_experts=top_k_experts, sequence_length=sequence_length, **kwargs)
