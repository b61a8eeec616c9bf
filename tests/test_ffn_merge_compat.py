"""The original FFN-merge API through dsmoe.compat (MoEModel, MoEInference) and launch/moe_inference.py: the
original Python API example runs with only its imports changed, the result keeps model1_prob, model2_prob, ...,
and bad inputs give one line and exit 2."""
from __future__ import annotations

import textwrap

import pytest
import torch

import dsmoe  # noqa: F401
from dsmoe.compat import MoEInference, MoEModel
from dsmoe.mixtures import FFNMergeForCausalLM
from merge_utils import cli_main, domain_texts, world  # noqa: F401  (world: fixture)


# The original README's Python API example, with its imports changed to dsmoe.compat and its paths to fixtures.
SEED_EXAMPLE = '''
from dsmoe.compat import MoEInference

# Load from saved model
inference = MoEInference(
    saved_model_path="models/moe-merged"
)

from dsmoe.compat import MoEInference

# Initialize from components
inference = MoEInference(
    model1_path="path/to/model1",
    model2_path="path/to/model2",
    gating_model_path="path/to/gating_network",
    routing_mode="weighted_sum"
)

from dsmoe.compat import MoEModel

# Load from saved model
model = MoEModel.from_pretrained("models/moe-merged")

# Generate text
result = inference.generate(
    prompt="Your prompt here",
    max_new_tokens=100,
    temperature=0.7
)

print(result["text"])
print(f"Model 1 prob: {result['gating_probs']['model1_prob']:.4f}")
print(f"Model 2 prob: {result['gating_probs']['model2_prob']:.4f}")

# Get gating probabilities only
probs = inference.get_gating_probs("Your text here")
print(probs)
'''


@pytest.fixture(scope="module")
def merged(world):
    folders = world.experts[:2]
    FFNMergeForCausalLM.from_components(folders, gating=world.gate2).save_pretrained(world.root / "moe-merged")
    return world.root, folders


def test_the_original_python_api_example_runs_through_compat(merged, capsys):
    root, folders = merged
    code = (SEED_EXAMPLE.replace("models/moe-merged", str(root / "moe-merged"))
            .replace("path/to/model1", str(folders[0])).replace("path/to/model2", str(folders[1]))
            .replace("path/to/gating_network", str(root / "gate2")))
    torch.manual_seed(0)
    exec(compile(textwrap.dedent(code), "seed_example", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    p1 = float(next(line for line in out if line.startswith("Model 1 prob:")).split(":")[1])
    p2 = float(next(line for line in out if line.startswith("Model 2 prob:")).split(":")[1])
    assert abs(p1 + p2 - 1) < 1e-3
    assert out[-1].startswith("{'model1_prob': ") and "'model2_prob': " in out[-1]


def test_compat_names_are_dsmoes_own_classes_and_keys(merged):
    root, folders = merged
    assert MoEModel is FFNMergeForCausalLM
    inf = MoEInference(model_paths=folders, gating_model_path=root / "gate2")
    probs = inf.get_gating_probs(domain_texts(1, 1, seed=40)[0])
    assert list(probs) == ["model1_prob", "model2_prob"] and probs["model2_prob"] > 0.5
    want = inf.model.gating_probs_for([domain_texts(1, 1, seed=40)[0]])[0]
    assert probs["model2_prob"] == pytest.approx(float(want[1]))
    greedy = inf.generate(domain_texts(0, 1)[0], max_new_tokens=5, do_sample=False)
    assert set(greedy) == {"text", "gating_probs"} and greedy["text"]
    saved = MoEInference(saved_model_path=root / "moe-merged", routing_mode="select_one")
    assert saved.model.config.routing_mode == "select_one"
    with pytest.raises(TypeError, match="'use_flash_attention' is not supported"):
        MoEInference(saved_model_path=root / "moe-merged", use_flash_attention=True)


def test_moe_inference_cli(merged, capsys):
    root, folders = merged
    main = cli_main("moe_inference")
    prompt = domain_texts(1, 1, seed=41)[0]
    assert main(["--saved_model_path", str(root / "moe-merged"), "--prompt", prompt, "--no_sample",
                 "--max_new_tokens", "4"]) == 0
    saved_out = capsys.readouterr().out.splitlines()
    assert saved_out[-2].startswith("model1_prob: ") and saved_out[-1].startswith("model2_prob: ")
    assert main(["--model1_path", str(folders[0]), "--model2_path", str(folders[1]), "--gating_model_path",
                 str(root / "gate2"), "--prompt", prompt, "--no_sample", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == saved_out       # components == the saved merge


@pytest.mark.parametrize("args, message", [
    (["--saved_model_path", "{expert}", "--prompt", "hi"], "holds a 'llama' model, not an FFN merge"),
    (["--saved_model_path", "{merged}", "--prompt", "apple " * 200], "exceed the model's context of 128 tokens"),
    (["--model_paths", "{expert}", "{expert}", "{expert}", "--gating_model_path", "{gate}", "--prompt", "hi"],
     "the gate has 2 classes but 3 models were given"),
    (["--model1_path", "{expert}", "--prompt", "hi"], "--saved_model_path: give a saved merge"),
])
def test_moe_inference_cli_errors_are_one_line(merged, capsys, args, message):
    root, folders = merged
    fill = {"expert": str(folders[0]), "merged": str(root / "moe-merged"), "gate": str(root / "gate2")}
    assert cli_main("moe_inference")([a.format(**fill) for a in args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsmoe: error:")]
    assert len(err) == 1 and message in err[0], err
