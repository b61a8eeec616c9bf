"""Deterministic train/validation split by document.

A document goes to validation when a hash of ``(seed, doc_id)`` falls below ``val_fraction``. The
decision depends on the document alone, not on which other documents are present, so the validation
speeches of a year-filtered run (a period expert) are exactly the full run's validation speeches of
that period: no document is trained on by one model and evaluated on by another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def doc_score(doc_id: str, seed: int) -> float:
    """Uniform-looking number in [0, 1) fixed by ``(seed, doc_id)``."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(doc_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Return (train indices, validation indices), both sorted, disjoint and non-empty.

    About ``val_fraction`` of the documents go to validation; if the hash picks none, the
    lowest-scoring document does, and if it picks all, the highest-scoring one goes back to train.
    """
    if len(doc_ids) < 2:
        raise ValueError(
            f"only {len(doc_ids)} document(s) left after data.year_min/data.year_max/data.max_documents; "
            "the train/validation split needs at least 2: widen the filter or use a bigger source"
        )
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("document ids are not unique; set data.id_field to a unique column or null (row index)")
    scores = [doc_score(d, seed) for d in doc_ids]
    val = {i for i, s in enumerate(scores) if s < val_fraction}
    order = sorted(range(len(scores)), key=scores.__getitem__)
    if not val:
        val = {order[0]}
    elif len(val) == len(scores):
        val.discard(order[-1])
    train = [i for i in range(len(doc_ids)) if i not in val]
    return train, sorted(val)
