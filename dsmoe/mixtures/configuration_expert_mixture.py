"""ExpertMixtureConfig: a mixture of whole causal LMs, one per time slice, combined by a gate."""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from dsmoe.models.cache_compat import CACHE_NAME

COMBINES = ("logprob", "logits")
DATE_POLICIES = ("start", "end")
MODES = ("equal", "router", "argmax", "oracle")
"""Fixed gating modes; ``"expert:<name>"`` (one expert alone) is accepted besides these."""


class ExpertMixtureConfig(PreTrainedConfig):
    """Configuration of :class:`dsmoe.mixtures.ExpertMixtureForCausalLM` (``model_type="dsmoe_expert_mixture"``).

    Each expert is a complete causal LM of any transformers architecture; its config is stored here (its weights
    are stored with the mixture's own weights, so a saved mixture folder is self-contained). Every field is
    checked at construction (also when loading a ``config.json``); a bad value raises ``ValueError`` naming the
    field, the value and the fix.
    """

    model_type = "dsmoe_expert_mixture"
    keys_to_ignore_at_inference = [CACHE_NAME]

    expert_configs: list[dict] | None = None
    """One config dict per expert (``PreTrainedConfig.to_dict()``, with its ``model_type``), in slice order."""
    expert_names: list[str] | None = None
    """A unique name per expert (``mode="expert:<name>"``). Default: the slices as ``"1790-1849"``."""
    slices: list[list[int]] | None = None
    """``[start_year, end_year]`` (inclusive) of the text each expert was trained on, ordered, not overlapping."""
    expert_sources: list[str | None] | None = None
    """Where each expert was loaded from (a folder), for the record; never read back."""
    vocab_size: int = 0
    """The vocabulary shared by every expert (checked against each expert config)."""
    combine: str = "logprob"
    """"logprob": log p(x) = logsumexp_k(log w_k + log p_k(x)), a proper mixture; "logits": log_softmax of the
    weighted sum of the experts' logits (the "soft" gate of the diachronic period experts)."""
    default_mode: str | None = None
    """Gating used when ``forward`` gets no ``mode``: "equal", "router", "argmax", "oracle" or "expert:<name>".
    Default: "router" with a router, else "equal"."""
    date_policy: str = "start"
    """Which experts a query date may use: "start" (its slice starts at or before the date) or "end" (its slice
    ends at or before the date: no text after the date at all)."""
    top_k_experts: int | None = None
    """Router mode: keep the k best usable experts per position and renormalise; None = all."""
    use_router: bool = False
    """Build the learned causal prefix router (needed for modes "router" and "argmax")."""
    router_embed_dim: int = 64
    """Width of the router's own token embedding."""
    router_hidden_size: int = 0
    """0: the router is one Linear on the pooled prefix; > 0: Linear-ReLU-Linear with this hidden width."""
    entropy_coef: float = 0.01
    """Weight of the routing-entropy regulariser in ``aux_loss`` (router mode)."""
    balance_coef: float = 0.01
    """Weight of the load-balance regulariser in ``aux_loss`` (router mode)."""
    z_loss_coef: float = 1e-4
    """Weight of the router z-loss in ``aux_loss`` (router mode)."""
    sequence_length: int | None = None
    """Longest input the mixture accepts (None: no check beyond the experts' own limits)."""
    tie_word_embeddings: bool = False
    """The mixture itself ties nothing (experts keep their own tying)."""
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self.expert_configs = [c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in (self.expert_configs or [])]
        n = len(self.expert_configs)
        if self.slices is not None:
            self.slices = [list(s) if isinstance(s, (list, tuple)) else s for s in self.slices]
        if self.expert_names is None and self.slices is not None and n:
            self.expert_names = [f"{s[0]}-{s[1]}" if isinstance(s, list) and len(s) == 2 else str(i)
                                 for i, s in enumerate(self.slices)]
        if self.expert_sources is None:
            self.expert_sources = [None] * n
        if not self.vocab_size and n:
            self.vocab_size = self.expert_configs[0].get("vocab_size") or 0
        if self.default_mode is None:
            self.default_mode = "router" if self.use_router else "equal"
        self._validate()
        super().__post_init__(**kwargs)

    @property
    def num_experts(self) -> int:
        """Number of experts N."""
        return len(self.expert_configs)

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ExpertMixtureConfig.{name}={getattr(self, name)!r}: {why}")

        n = self.num_experts
        if n == 0:
            raise bad("expert_configs", "a mixture needs at least one expert; list their configs (or use from_experts)")
        for i, c in enumerate(self.expert_configs):
            if "model_type" not in c:
                raise ValueError(f"ExpertMixtureConfig.expert_configs[{i}] has no model_type; pass the expert's "
                                 "config object or its to_dict()")
        check_slices(self.slices, n, "ExpertMixtureConfig.slices")
        if not isinstance(self.expert_names, list) or len(self.expert_names) != n or \
                not all(isinstance(x, str) and x for x in self.expert_names):
            raise bad("expert_names", f"must be {n} non-empty strings, one per expert")
        if len(set(self.expert_names)) != n:
            raise bad("expert_names", "names must be unique")
        if len(self.expert_sources) != n:
            raise bad("expert_sources", f"must have one entry per expert ({n})")
        vocabs = [c.get("vocab_size") for c in self.expert_configs]
        if any(v != self.vocab_size for v in vocabs):
            raise ValueError(f"experts have different vocabularies (vocab_size {vocabs}); a mixture needs one shared "
                             "tokenizer: train or resize every expert to the same vocabulary")
        if self.combine not in COMBINES:
            raise bad("combine", f"must be one of {COMBINES}")
        if self.date_policy not in DATE_POLICIES:
            raise bad("date_policy", f"must be one of {DATE_POLICIES}")
        k = self.top_k_experts
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n):
            raise bad("top_k_experts", f"must be an integer in [1, {n}] (the expert count) or None")
        for name in ("router_embed_dim",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        if not isinstance(self.router_hidden_size, int) or self.router_hidden_size < 0:
            raise bad("router_hidden_size", "must be a non-negative integer (0 = a single Linear)")
        for name in ("entropy_coef", "balance_coef", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if self.sequence_length is not None and (not isinstance(self.sequence_length, int)
                                                 or self.sequence_length <= 0):
            raise bad("sequence_length", "must be a positive integer or None")
        parse_mode(self.default_mode, self.expert_names, self.use_router, "ExpertMixtureConfig.default_mode")


def check_slices(slices: Any, n: int, key: str) -> None:
    """Raise ValueError (naming ``key``) unless ``slices`` are ``n`` ordered, non-overlapping [start, end] years."""
    if not isinstance(slices, list) or len(slices) != n:
        raise ValueError(f"{key}={slices!r}: give one [start_year, end_year] per expert ({n} experts)")
    for i, s in enumerate(slices):
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(y, int) and not isinstance(y, bool)
                                                                       for y in s)):
            raise ValueError(f"{key}[{i}]={s!r}: a slice is [start_year, end_year], two integers")
        if s[0] > s[1]:
            raise ValueError(f"{key}[{i}]={list(s)}: start year after end year; write [start, end]")
        if i and s[0] <= slices[i - 1][1]:
            why = "overlaps" if s[0] >= slices[i - 1][0] else "comes before"
            raise ValueError(f"{key}[{i}]={list(s)} {why} {key}[{i - 1}]={list(slices[i - 1])}; list the slices in "
                             "time order without overlap (one expert per slice)")


def parse_mode(mode: str, names: list[str], has_router: bool, key: str = "mode") -> tuple[str, int | None]:
    """``(kind, expert index)`` of a gating mode; ValueError naming ``key`` for an unknown mode or name."""
    if isinstance(mode, str) and mode.startswith("expert:"):
        name = mode[len("expert:"):]
        if name not in names:
            raise ValueError(f"{key}={mode!r}: no expert named {name!r}; experts are {names}")
        return "expert", names.index(name)
    if mode not in MODES:
        raise ValueError(f"{key}={mode!r}: must be one of {MODES} or 'expert:<name>' with a name from {names}")
    if mode in ("router", "argmax") and not has_router:
        raise ValueError(f"{key}={mode!r} needs the learned router; build the mixture with use_router=True "
                         "(from_experts(..., router=True)) or use mode 'equal'")
    return mode, None
