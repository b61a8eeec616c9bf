"""launch/eval_merge.py: per-domain perplexity of the experts, the merge in both modes, the oracle merge and a BTX
model on the same scored tokens, with the gate's accuracy; JSON + PNG; one-line errors."""
from __future__ import annotations

import json

import pytest

import dsmoe  # noqa: F401
from dsmoe.mixtures import btx_merge
from merge_utils import cli_main, domain_texts, world  # noqa: F401  (world: fixture)


@pytest.fixture(scope="module")
def setup(world):
    root, folders = world.root, world.experts[:2]
    btx_merge(folders, top_k=1).save_pretrained(root / "btx")
    specs = []
    for d in range(2):
        path = root / f"heldout_{d}.txt"
        path.write_text("\n".join(domain_texts(d, 4, seed=50)))
        specs.append(str(path))
    return root, folders, specs


def test_eval_merge_table(setup, capsys):
    root, folders, specs = setup
    out = root / "report"
    rc = cli_main("eval_merge")(["--experts", *map(str, folders), "--gating", str(root / "gate2"),
                                 "--domains", *specs, "--btx", str(root / "btx"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    res = json.loads((out / "merge_eval.json").read_text())
    d0, d1 = res["domains"]
    ppl = res["perplexity"]
    assert list(ppl) == [f"expert 1 ({d0})", f"expert 2 ({d1})", "merge weighted_sum (gate)",
                         "merge select_one (gate)", "merge oracle (gold domain)", "routed btx"]
    oracle = ppl["merge oracle (gold domain)"]
    # identical trunks: the oracle merge on domain d is expert d
    assert oracle[d0] == pytest.approx(ppl[f"expert 1 ({d0})"][d0], rel=1e-5)
    assert oracle[d1] == pytest.approx(ppl[f"expert 2 ({d1})"][d1], rel=1e-5)
    assert res["gate_accuracy"] == {d0: 1.0, d1: 1.0}
    assert ppl["merge select_one (gate)"] == pytest.approx(oracle, rel=1e-5)     # a right gate picks the oracle
    assert ppl[f"expert 1 ({d0})"][d0] < ppl[f"expert 2 ({d1})"][d0]           # the fine-tunes specialised
    assert all(n > 0 for n in res["tokens"].values()) and res["machine"]
    assert (out / "merge_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gate accuracy" in capsys.readouterr().out


def test_eval_merge_errors(setup, capsys):
    root, folders, specs = setup
    main = cli_main("eval_merge")
    assert main(["--experts", *map(str, folders), "--domains", specs[0], "--out", str(root / "eval_x")]) == 2
    assert main(["--experts", str(folders[0]), str(root / "nowhere"), "--domains", *specs,
                 "--out", str(root / "eval_x")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsmoe: error:")]
    assert len(err) == 2 and "1 sources for 2 experts" in err[0] and "nowhere: not an HF model folder" in err[1]
    assert not (root / "eval_x").exists()
