"""Splitting a training set over clients: IID or Dirichlet label skew, deterministic by seed.

The Dirichlet scheme is the one of Flower Datasets' ``DirichletPartitioner`` (Hsu et al. 2019): for every class,
proportions over the clients are drawn from Dirichlet(alpha) and the class's examples are cut by them; the draw
is repeated until every client holds at least ``min_partition_size`` examples. It is implemented here on plain
label arrays because ``flwr-datasets`` 0.6 pins ``datasets<5``, below what dsmoe installs.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_DIRICHLET_TRIES = 1000


def partition_indices(labels: Sequence[int], num_clients: int, scheme: str, alpha: float, seed: int,
                      min_partition_size: int = 1) -> list[list[int]]:
    """Disjoint, sorted index lists (one per client) covering ``range(len(labels))``.

    ``scheme``: "iid" (a seeded shuffle cut into near-equal parts) or "dirichlet" (label skew of strength
    ``alpha``; smaller = more skewed). Raises ``ValueError`` naming the option when it cannot be done.
    """
    n = len(labels)
    if num_clients < 1:
        raise ValueError(f"federation.num_clients={num_clients}: must be a positive integer")
    if num_clients * min_partition_size > n:
        raise ValueError(f"federation.num_clients={num_clients}: the training split has {n} examples, fewer than "
                         f"num_clients x data.min_partition_size={min_partition_size}; use fewer clients or more data")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
        return [sorted(int(i) for i in p) for p in parts]
    if scheme != "dirichlet":
        raise ValueError(f"data.partition={scheme!r}: must be iid or dirichlet")
    if not alpha > 0:
        raise ValueError(f"data.alpha={alpha!r}: must be > 0")
    y = np.asarray(labels)
    classes = np.unique(y)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_partition_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"data.alpha={alpha}: no Dirichlet draw in {MAX_DIRICHLET_TRIES} gave every one of "
                     f"{num_clients} clients data.min_partition_size={min_partition_size} examples; raise alpha, "
                     "lower min_partition_size or use fewer clients")
