"""launch/bench_train.py: --smoke runs end to end (tiny sizes) and writes its JSON; the FLOP count matches the
dense baseline to the active FFN width."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "bench_train.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "machine: CPU" in proc.stdout
    assert "FLOPs/token = 6*N_active + 12*L*(heads*head_dim)*T" in proc.stdout
    assert "MoE/dense" in proc.stdout

    res = json.loads(out.read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"mixtral", "deepseek", "dense"}
    for r in rows.values():
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["mfu_pct"] is None                    # no peak on CPU without --peak-tflops
    for m in ("mixtral", "deepseek"):
        assert rows[m]["assignments"] > 0 and rows[m]["computed_assignments"] == rows[m]["assignments"]  # dropless
        assert 0.95 < res["ratios"][m]["flops_per_token_vs_dense"] < 1.1
        assert res["ratios"][m]["time_per_token_vs_dense"] > 0
    assert rows["mixtral"]["target_mfu_pct"] == 45 and rows["deepseek"]["target_mfu_pct"] == 30


def test_active_params_match_dense():
    """Routed experts count top_k/E: each MoE model's active params exceed the dense model's by its routers only."""
    bt = load_bench()
    s = bt.Sizes(hidden=64, heads=4, kv_heads=2, layers=3, seq=16, batch=1, ffn=128, vocab=97)
    models = {n: bt.RoutedLMForCausalLM(bt.make_config(n, s)) for n in bt.MODELS}
    act = {n: bt.count_params(m)["active"] for n, m in models.items()}
    h, f, L, v = s.hidden, s.ffn, s.layers, s.vocab
    attn = 2 * h * h + 2 * h * (h // 2)            # q, o + k, v with half the heads
    assert act["dense"] == L * (attn + 3 * h * f + 2 * h) + h + v * h
    assert act["mixtral"] - act["dense"] == L * 8 * h                 # 8-expert routers, all layers MoE
    assert act["deepseek"] - act["dense"] == (L - 1) * 64 * h         # first layer dense
    total, six_n, attn_flops = bt.flops_per_token(models["dense"], s.seq)
    assert six_n == 6 * act["dense"] and attn_flops == 12 * L * h * s.seq and total == six_n + attn_flops
