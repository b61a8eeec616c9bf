"""The comparison table on a cut State of the Union corpus, the bench smoke run and the memory plan."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import dsmoe  # noqa: F401
from dsmoe.data import DataConfig
from dsmoe.data.sources import load_documents
from dsmoe.data.tokenizer import train_bpe
from dsmoe.mixtures import ExpertMixtureForCausalLM
from dsmoe.mixtures.gate_training import GateTrainingConfig, train_gate

from mixture_utils import expert_configs, one_torch_thread, save_experts

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
REPO = Path(__file__).resolve().parent.parent
SOTU_SLICES = [(1790, 1849), (1850, 1899), (1900, 1949), (1950, 2026)]
CUT = ["data.max_documents=24", "data.max_chars_per_doc=1200", "data.val_fraction=0.5"]


def launch_main(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def saved_mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("sotu_mix")
    docs = load_documents(DataConfig(max_documents=24, max_chars_per_doc=1200), root / "hf")
    tok = train_bpe([list(docs["text"])], vocab_size=400)
    vocab = len(tok)
    dirs = save_experts(root / "experts", vocab=vocab, configs=expert_configs(vocab) + expert_configs(vocab)[:1])
    save_experts(root / "dense", seed=7, vocab=vocab, configs=expert_configs(vocab)[1:2])
    torch.manual_seed(0)
    model = ExpertMixtureForCausalLM.from_experts(dirs, SOTU_SLICES, router={"hidden_size": 16})
    ids = tok(list(docs["text"][:4]), add_special_tokens=False)["input_ids"]
    batch = torch.tensor([x[:32] for x in ids])
    train_gate(model, [{"input_ids": batch}], GateTrainingConfig(steps=3))
    model.save_pretrained(root / "mix")
    tok.save_pretrained(root / "mix")
    return root


def test_eval_mixture_writes_one_table_on_the_same_tokens(saved_mixture, capsys):
    root = saved_mixture
    rc = launch_main("eval_mixture")([str(root / "mix"), "--baseline", str(root / "dense" / "expert0"),
                                      "--seq-len", "48", "--out", str(root / "eval"), *CUT])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    res = json.loads((root / "eval" / "mixture_eval.json").read_text())
    assert (root / "eval" / "mixture_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = list(res["slices"])
    assert names == ["1790-1849", "1850-1899", "1900-1949", "1950-2026"]
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == [f"expert:{n}" for n in names] + ["dense", "equal", "router", "logits-soft", "argmax",
                                                           "oracle"]
    assert all(res["tokens"][n] > 0 and res["documents"][n] > 0 for n in names)
    for r in rows.values():
        assert all(math.isfinite(v) and v > 1 for v in r["ppl"].values()) and math.isfinite(r["overall"])
    for n in names:        # the oracle row is, slice by slice, that slice's own expert on the same tokens
        assert rows["oracle"]["ppl"][n] == pytest.approx(rows[f"expert:{n}"]["ppl"][n], rel=1e-9)
    tokens = [res["tokens"][n] for n in names]     # overall = token-weighted over the slices, for every row
    for r in rows.values():
        logs = sum(t * math.log(r["ppl"][n]) for t, n in zip(tokens, names))
        assert r["overall"] == pytest.approx(math.exp(logs / sum(tokens)), rel=1e-9)
    g = res["gate"]
    assert sum(map(sum, g["confusion"])) == g["sequences"] == sum(res["documents"].values())
    assert 0 <= g["accuracy"] <= 1
    assert res["years"]["documents"] == g["sequences"] and res["years"]["mae_baseline"] > 0
    assert "oracle" in printed.out and "year MAE" in printed.out


def test_prompt_variants_score_the_same_tokens_and_the_gate_never_reads_the_prompt(saved_mixture, capsys):
    """Variant E (the year sentence before each document, gold year included) against B (no prompt): the
    experts see the prompt, so their rows change; the scored tokens are the same, and the gate, which reads the
    text only, gives the same accuracy, confusion and year predictions to the last digit."""
    root, main = saved_mixture, launch_main("eval_mixture")
    res = {}
    for prompt in ("none", "year_prefix"):
        out = root / f"eval_{prompt}"
        assert main([str(root / "mix"), "--seq-len", "48", "--out", str(out), *CUT, f"data.prompt={prompt}"]) == 0
        capsys.readouterr()
        res[prompt] = json.loads((out / "mixture_eval.json").read_text())
    b, e = res["none"], res["year_prefix"]
    assert b["tokens"] == e["tokens"] and b["documents"] == e["documents"]
    assert b["gate"] == e["gate"] and b["years"] == e["years"]
    assert b["rows"][0]["overall"] != e["rows"][0]["overall"]            # the experts did read the prompt


def test_eval_mixture_bad_input_is_one_line_exit_2(saved_mixture, tmp_path, capsys):
    main = launch_main("eval_mixture")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_bytes((saved_mixture / "mix" / "config.json").read_bytes())
    cases = [
        ([str(tmp_path / "no_weights")], "no weights"),
        ([str(tmp_path / "missing")], "MIXTURE_DIR="),
        ([str(saved_mixture / "experts" / "expert0")], "not an expert mixture"),
        ([str(saved_mixture / "mix"), "data.year_max=1899", *CUT[:2]], "slice [1900, 1949] has no training"),
        ([str(saved_mixture / "mix"), "train.steps=3"], "only data.key=value"),
        ([str(saved_mixture / "mix"), "data.prompt=period_token", "data.prompt_periods=[1790-2026]", *CUT],
         "the tokenizer has no token <|1790-2026|>"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("dsmoe: error:") and needle in err and "\n" not in err, err


def test_bench_mixture_smoke(tmp_path, capsys):
    assert launch_main("bench_mixture")(["--smoke", "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["tokens_per_s"] > 0 and res["peak_memory_gib"] > 0 and res["machine"].startswith("machine: ")


def test_memory_plan_of_three_olmo_7b_experts(tmp_path, capsys):
    assert launch_main("plan_memory")(["--json", str(tmp_path / "plan.json"), "--batches", "1,64",
                                       "--seq-lens", "2048"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert 6.8e9 < plan["expert_params"] < 7.0e9                     # OLMo-7B, counted on the meta device
    assert plan["expert_weights_gib"] == pytest.approx(3 * plan["expert_params"] * 2 / 2**30, rel=1e-3)
    small, big = plan["rows"]
    assert small["fits"] and not big["fits"]
    assert "fits" in capsys.readouterr().out
