"""RNG states in checkpoints: safetensors + JSON, legacy pickles read without executing code."""
import logging
import os
import random

import numpy as np
import torch

from dsmoe.training.rng_state import load_rng_state, rng_file, save_rng_state


def _draw():
    return torch.rand(4), random.random(), np.random.randn(3)


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def test_round_trip_restores_every_stream(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.randn()                                       # a cached Gaussian must travel too
    path = save_rng_state(tmp_path, 0)
    assert path == rng_file(tmp_path, 0) and path.suffix == ".safetensors"
    want = _draw()
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    assert load_rng_state(tmp_path, 0)
    assert _same(_draw(), want)
    assert not load_rng_state(tmp_path, 1)                  # no state for that rank: nothing restored


def test_legacy_pickle_is_read_with_weights_only(tmp_path):
    torch.manual_seed(4), random.seed(5), np.random.seed(6)
    legacy = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
              "cuda": None}
    torch.save(legacy, tmp_path / "rank_0.pt")              # what checkpoints held before
    want = _draw()
    torch.manual_seed(0)
    assert load_rng_state(tmp_path, 0)
    assert _same(_draw(), want)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_legacy_file_is_refused_not_executed(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"torch": torch.get_rng_state(), "evil": _Payload()}, tmp_path / "rank_0.pt")
    with caplog.at_level(logging.WARNING, logger="dsmoe.train"):
        assert not load_rng_state(tmp_path, 0)
    assert not (tmp_path / "PWNED").exists()
    assert "rank_0.pt" in caplog.text and "RNG state not restored" in caplog.text
