"""Helpers for tests that launch real multi-process jobs in a subprocess (the DeepSpeed launcher).

For in-process torch.multiprocessing gloo tests see ``dist_utils.py``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dsmoe.deepspeed_comm import shm_segment_names
from dsmoe.ports import free_port  # noqa: F401  (re-exported for the tests)

REPO_ROOT = Path(__file__).resolve().parent.parent


def deepspeed_launcher() -> str:
    """The ``deepspeed`` launcher of the running interpreter's environment (falls back to PATH)."""
    exe = Path(sys.executable).parent / "deepspeed"
    if exe.exists():
        return str(exe)
    found = shutil.which("deepspeed")
    if found is None:
        raise FileNotFoundError("no deepspeed launcher next to sys.executable or on PATH")
    return found


def launch_env(extra: dict | None = None) -> dict:
    """Environment for launched workers: the repo root importable, one OpenMP thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def run_deepspeed(script: str | Path, args: list[str] = (), num_procs: int = 2, timeout: float = 300,
                  env: dict | None = None, retries: int = 1) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --master_port <free> script args`` (works on CPU: DeepSpeed picks its CPU
    accelerator and gloo). stdout+stderr are captured together in ``.stdout``. Retries on a port clash.

    Also checks that the job left none of DeepSpeed's CPU shared-memory segments behind in /dev/shm
    (``dsmoe.deepspeed_comm``): each is 64 MiB of RAM that would outlive the run."""
    for attempt in range(retries + 1):
        port = free_port()
        cmd = [deepspeed_launcher(), "--num_gpus", str(num_procs), "--master_port", str(port),
               str(script), *map(str, args)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        check_no_shm_left(port, proc)
        if proc.returncode == 0 or "address already in use" not in proc.stdout.lower() or attempt == retries:
            return proc
    return proc


def check_no_shm_left(port: int | str, proc: subprocess.CompletedProcess) -> None:
    """Remove DeepSpeed CPU shared-memory segments a job on ``port`` left behind (so a crashed job does not
    keep 64 MiB of RAM each); fail when a job that exited 0 left any (dsmoe must release them)."""
    leaked = shm_segment_names(port)
    for seg in leaked:
        seg.unlink(missing_ok=True)
    assert not leaked or proc.returncode != 0, \
        f"{' '.join(map(str, proc.args))} left DeepSpeed shared-memory segments: {[p.name for p in leaked]}"


def check_returncode(proc: subprocess.CompletedProcess, tail: int = 6000) -> None:
    """Fail with the launched job's output tail when it exited non-zero."""
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, proc.args))} exited {proc.returncode}; output tail:\n"
                             f"{proc.stdout[-tail:]}")
