"""launch/bench_moe.py --smoke runs end to end (tiny sizes) and writes its JSON: keeps the benchmark from rotting."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_moe_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    env["CUDA_VISIBLE_DEVICES"] = ""   # CPU path; a first run on a fresh machine JIT-builds DeepSpeed's shm op (~1.5 min)
    env["OMP_WAIT_POLICY"] = "PASSIVE"   # the machine line must name the OpenMP setting the run started with
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_moe.py"), "--smoke", "--device", "cpu",
                           "--threads", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "machine: CPU" in proc.stdout
    assert "OpenMP: " in proc.stdout and "OMP_WAIT_POLICY=PASSIVE" in proc.stdout
    assert "% of dense" in proc.stdout and "the strongest other" in proc.stdout and "null efficiency" in proc.stdout
    assert "malloc: heap only" in proc.stdout          # the CPU allocation setting is applied and named

    res = json.loads(out.read_text())
    labels = {(r["shape"], r["contender"]) for r in res["rows"]}
    for s in ("a", "b"):
        for c in ("dsmoe dropless", "dsmoe grouped", "dsmoe padded", "dsmoe adaptive", "dsmoe cf=1.25",
                  "deepspeed cf=1.25", "dense SwiGLU", "transformers Mixtral eager", "transformers Mixtral grouped_mm",
                  "transformers Qwen3-MoE grouped_mm"):
            assert (s, c) in labels
        # the transformers blocks hold the dsmoe layer's weights: the same function
        assert max(res["max_abs_diff_vs_dsmoe"][s].values()) < 1e-5
    assert ("c", "dsmoe dropless +4 null") in labels
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["tflops"] > 0
        if "assignments" in r:
            assert 0 < r["computed_assignments"] <= r["assignments"]
    null = res["ratios"]["c/null"]
    assert 0.3 < null["null_share"] < 0.7          # the router bias steered ~half of the choices to null experts
    assert res["ratios"]["a/dsmoe dropless"]["speedup_vs_deepspeed"] > 0
    assert res["ratios"]["b/dsmoe adaptive"]["speedup_vs_transformers"] > 0


def test_bench_moe_busy_core_smoke(tmp_path):
    """--busy-core runs a spinner for the duration (and stops it); transformers/DeepSpeed can be left out."""
    out = tmp_path / "busy.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_moe.py"), "--smoke", "--device", "cpu",
                           "--threads", "1", "--shapes", "b", "--busy-core", "--no-deepspeed", "--no-transformers",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["busy_core"] and "spinning process" in res["busy_core_note"]
    assert {r["contender"] for r in res["rows"]} == {"dense SwiGLU", "dsmoe dropless", "dsmoe grouped",
                                                     "dsmoe padded", "dsmoe adaptive", "dsmoe cf=1.25"}
