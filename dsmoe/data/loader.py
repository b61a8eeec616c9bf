"""Resumable, deterministic, data-parallel batch iteration over packed blocks."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from .packing import lm_batch


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise the torch.distributed rank/world size, or (0, 1) when not initialised."""
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (dist.get_world_size() if world_size is None else world_size)
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of one epoch, derived from (seed, epoch) by hashing (no seed collisions across runs)."""
    digest = hashlib.sha256(f"dsmoe.data/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class PackedLoader:
    """Infinite (or ``epochs``-long) iterator of ``{"input_ids", "labels"}`` batches of ``[micro_batch, seq_len]``.

    Each step consumes one *global batch* of ``micro_batch * world_size`` blocks of a per-epoch
    permutation (seeded by ``epoch_seed(seed, epoch)``); data-parallel rank ``r`` gets rows
    ``[r * micro_batch, (r + 1) * micro_batch)`` of it, so ranks see disjoint blocks and every rank
    makes the same number of steps. The tail that does not fill a global batch is left out of that
    epoch (it is reshuffled into later ones). ``state_dict()`` is ``(epoch, position)`` plus checks;
    a loader restored from it yields exactly the batches an uninterrupted one would have.

    ``rank``/``world_size`` are the *data-parallel* rank and size; by default they are read from
    ``torch.distributed`` when it is initialised, else (0, 1). ``scored`` (a BoolTensor shaped like
    ``blocks``) marks the tokens that are training targets; the others (prompt prefixes) get the label -100.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        micro_batch: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        epochs: int | None = None,
        scored: torch.Tensor | None = None,
    ) -> None:
        if blocks.dim() != 2 or blocks.dtype != torch.long:
            raise ValueError(f"blocks must be a 2-D LongTensor, got {tuple(blocks.shape)} {blocks.dtype}")
        _check_scored(blocks, scored)
        self.scored = scored
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch!r}: expected an integer >= 1")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs!r}: expected an integer >= 1 or None (infinite)")
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        _check_rank(self.rank, self.world_size)
        self.blocks = blocks
        self.micro_batch = micro_batch
        self.seed = seed
        self.epochs = epochs
        self.epoch = 0
        self.position = 0  # global batches already consumed in the current epoch
        self._perm: tuple[int, torch.Tensor] | None = None
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(blocks)} training blocks cannot fill one global batch of micro_batch*world_size="
                f"{self.global_batch}; lower the batch size or data.seq_len, or use more data"
            )

    @property
    def global_batch(self) -> int:
        """Blocks consumed per step over all ranks."""
        return self.micro_batch * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Steps (batches per rank) in one epoch."""
        return len(self.blocks) // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        """Block order of ``epoch`` (identical on every rank)."""
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self.blocks), generator=gen))
        return self._perm[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        start = self.position * self.global_batch + self.rank * self.micro_batch
        idx = self.permutation(self.epoch)[start : start + self.micro_batch]
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return lm_batch(self.blocks[idx], None if self.scored is None else self.scored[idx])

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: ``epoch``, ``position`` (global batches done this epoch) and checks."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_blocks": len(self.blocks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. A different global batch is accepted when the blocks already
        consumed this epoch divide evenly into the new one."""
        if state["num_blocks"] != len(self.blocks) or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for {state['num_blocks']} blocks with seed {state['seed']}, this loader has "
                f"{len(self.blocks)} blocks with seed {self.seed}; resume with the same data config and seed"
            )
        consumed = state["position"] * state["global_batch"]
        if consumed % self.global_batch:
            raise ValueError(
                f"cannot resume: {consumed} blocks consumed this epoch is not a multiple of the new global batch "
                f"{self.global_batch}; resume with micro_batch*world_size={state['global_batch']}"
            )
        self.epoch, self.position = int(state["epoch"]), consumed // self.global_batch
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0


def _check_scored(blocks: torch.Tensor, scored: torch.Tensor | None) -> None:
    if scored is not None and (scored.dtype != torch.bool or scored.shape != blocks.shape):
        raise ValueError(f"scored must be a BoolTensor shaped like blocks {tuple(blocks.shape)}, got "
                         f"{tuple(scored.shape)} {scored.dtype}")


def iter_eval_batches(
    blocks: torch.Tensor, batch_size: int, rank: int | None = None, world_size: int | None = None,
    scored: torch.Tensor | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over all ``blocks`` in order, rank ``r`` taking blocks ``r, r + world_size, ...``.

    Every rank yields the same number of batches with the same shapes (needed when evaluation runs
    collectives such as expert all-to-all): a rank one block short gets a filler row whose labels
    are all -100 (ignored by the loss). ``scored`` as in :class:`PackedLoader`.
    """
    _check_scored(blocks, scored)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    rank, world_size = _dist_rank_world(rank, world_size)
    _check_rank(rank, world_size)
    if len(blocks) == 0:
        return
    per_rank = math.ceil(len(blocks) / world_size)
    mine = torch.arange(rank, len(blocks), world_size)
    for start in range(0, per_rank, batch_size):
        idx = mine[start : start + batch_size]
        batch = lm_batch(blocks[idx], None if scored is None else scored[idx])
        fill = min(start + batch_size, per_rank) - start - len(idx)
        if fill:
            pad = blocks[:1].expand(fill, -1)
            batch = {
                "input_ids": torch.cat([batch["input_ids"], pad]),
                "labels": torch.cat([batch["labels"], torch.full_like(pad, -100)]),
            }
        yield batch
