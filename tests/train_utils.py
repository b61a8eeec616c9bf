"""Helpers for tests that run launch/train.py for real (a subprocess per run)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launch_utils import REPO_ROOT, check_returncode, launch_env, run_deepspeed

TINY = REPO_ROOT / "tests" / "configs" / "tiny.yaml"
TRAIN = REPO_ROOT / "launch" / "train.py"


def train_debug(out_dir: Path, *overrides: str, timeout: float = 300, check: bool = True):
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY), "--debug", f"train.output_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    proc.stdout = proc.stdout + proc.stderr if check else proc.stdout
    if check:
        check_returncode(proc)
    return proc


def train_deepspeed(out_dir: Path, *overrides: str, num_procs: int = 2, timeout: float = 400,
                    env: dict | None = None):
    proc = run_deepspeed(TRAIN, ["--config", TINY, f"train.output_dir={out_dir}", *overrides], num_procs=num_procs,
                         timeout=timeout, env=env)
    check_returncode(proc)
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def summary(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())
