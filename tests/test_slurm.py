"""slurm/*.sbatch run for real on CPU, with stand-in srun / scontrol / sbatch commands first on PATH.

The stand-in srun starts the task once per "node" (SLURM_NODEID set) in parallel on this machine; two "nodes"
are the host names localhost and 127.0.0.1.  Each case is one DeepSpeed launch of the tiny config (~30-40 s).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch_utils import REPO_ROOT, check_no_shm_left, free_port, launch_env

pytestmark = pytest.mark.skipif(os.name != "posix", reason="bash scripts")

SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case "$1 $2" in
  "show hostnames") printf '%s\n' $FAKE_SLURM_HOSTS ;;
  "show job") echo "JobId=$3 JobName=dsmoe JobState=RUNNING Reason=None" ;;
  requeue*) echo "REQUEUE $2" >> "$FAKE_SLURM_LOG" ;;
  *) echo "stand-in scontrol: unsupported: $*" >&2; exit 1 ;;
esac
"""

SRUN = r"""#!/usr/bin/env bash
# stand-in srun: the command once per node, in parallel, with SLURM_NODEID/SLURM_PROCID; first failure wins
n=${SLURM_JOB_NUM_NODES:-1}
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in --nodes=*) n=${1#--nodes=} ;; esac
  shift
done
echo "srun nodes=$n $*" >> "$FAKE_SLURM_LOG"
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=$n "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || { r=$?; (( rc == 0 )) && rc=$r; }; done
exit $rc
"""

SBATCH = r"""#!/usr/bin/env bash
# stand-in sbatch: run the script in the foreground (options before it are ignored)
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec bash "$@"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("sbatch", SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm_calls.log"
    log.touch()

    def env(hosts: list[str], out: Path, overrides: list[str], gpus_per_node: int, ep: int = 2) -> dict:
        e = launch_env()
        for k in [k for k in e if k.startswith(("SLURM_", "SRUN_", "SBATCH_"))]:
            del e[k]                                   # when pytest itself runs inside a Slurm job
        e.update({
            "PATH": f"{bin_dir}{os.pathsep}{e['PATH']}",
            "FAKE_SLURM_HOSTS": " ".join(hosts), "FAKE_SLURM_LOG": str(log),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": f"node[0-{len(hosts) - 1}]",
            "SLURM_JOB_NUM_NODES": str(len(hosts)), "SLURM_SUBMIT_DIR": str(REPO_ROOT),
            "DSMOE_JOB_DIR": str(tmp_path / "job"), "DSMOE_POLL_S": "0.5",
            "CONFIG": "tests/configs/tiny.yaml", "GPUS_PER_NODE": str(gpus_per_node),
            "MASTER_PORT": str(free_port()),
            "OVERRIDES": " ".join([f"train.output_dir={out}", f"parallel.expert_parallel_size={ep}",
                                   "deepspeed=ds_configs/zero2.json", *overrides]),
        })
        return e

    return env, log


def sbatch(script: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    for attempt in range(2):
        proc = subprocess.run(["sbatch", f"slurm/{script}"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        check_no_shm_left(env["MASTER_PORT"], proc)
        if proc.returncode == 0 or "address already in use" not in proc.stdout.lower() or attempt:
            return proc
        env = {**env, "MASTER_PORT": str(free_port())}
    return proc


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def latest_step(out: Path) -> int:
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


def test_1node_requeues_until_max_steps(tmp_path, fake_slurm):
    """train.steps_per_run=2 of max_steps=4: the first job stops early and requeues, the requeued one finishes."""
    make_env, log = fake_slurm
    out = tmp_path / "run"
    env = make_env(["localhost"], out, ["train.max_steps=4", "train.steps_per_run=2"], 2)
    first = sbatch("train_1node.sbatch", env)
    assert first.returncode == 0, first.stdout[-6000:]
    assert summary(out)["stopped_early"] and summary(out)["steps"] == 2 and latest_step(out) == 2
    assert log.read_text().count("REQUEUE 4242") == 1, log.read_text()
    assert (tmp_path / "job" / "hostfile").read_text() == "localhost slots=2\n"

    again = sbatch("train_1node.sbatch", {**env, "SLURM_RESTART_COUNT": "1"})   # what Slurm runs after requeue
    assert again.returncode == 0, again.stdout[-6000:]
    s = summary(out)
    assert s["steps"] == 4 and not s["stopped_early"], s
    assert latest_step(out) == 4
    assert log.read_text().count("REQUEUE") == 1, log.read_text()
    assert "(restart 1)" in again.stdout and "training finished" in again.stdout, again.stdout[-3000:]


def test_2nodes_no_ssh(tmp_path, fake_slurm):
    """Two "nodes" (localhost, 127.0.0.1) x 1 process: one deepspeed --no_ssh --node_rank N per node."""
    make_env, log = fake_slurm
    out = tmp_path / "run"
    hosts = ["localhost", "127.0.0.1"]
    proc = sbatch("train_multinode.sbatch", make_env(hosts, out, ["train.max_steps=4"], 1))
    assert proc.returncode == 0, proc.stdout[-6000:]
    s = summary(out)
    assert s["steps"] == 4 and not s["stopped_early"], s
    assert latest_step(out) == 4
    assert (tmp_path / "job" / "hostfile").read_text().splitlines() == ["localhost slots=1", "127.0.0.1 slots=1"]
    calls = log.read_text()
    assert "srun nodes=2" in calls and "REQUEUE" not in calls, calls
    for rank in range(2):
        assert f"--no_ssh --node_rank {rank} --master_addr localhost" in proc.stdout
    assert "training finished" in proc.stdout, proc.stdout[-3000:]


def test_sigterm_checkpoints_and_requeues(tmp_path, fake_slurm):
    make_env, log = fake_slurm
    out = tmp_path / "run"
    env = make_env(["localhost"], out, ["train.max_steps=100000", "train.save_every=100000"], 2)
    proc = subprocess.Popen(["sbatch", "slurm/train_1node.sbatch"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and \
                (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[0][-6000:]
        proc.send_signal(signal.SIGTERM)               # the batch shell only, like --signal=B:TERM@120
        text, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, text[-6000:]
    assert (out / "summary.json").exists(), text[-6000:]
    s = summary(out)
    assert s["stopped_early"] and s["steps"] >= 2, s
    assert latest_step(out) == s["steps"]
    assert "REQUEUE 4242" in log.read_text(), log.read_text()
    assert "received SIGTERM" in text and "requeueing job 4242" in text, text[-3000:]


def test_slice_experts_job_array_task(tmp_path, fake_slurm):
    """slurm/train_slices.sbatch as array task 1 of [1790-1899, 1900-2026] (+ baseline): only that slice trains
    (2 ranks, EP=2), its HF folder carries the slice, and a finished task is not requeued."""
    make_env, log = fake_slurm
    out = tmp_path / "slices"
    env = make_env(["localhost"], out, ["train.max_steps=2", "slices.ranges=[1790-1899,1900-2026]"], 2)
    env["SLURM_ARRAY_TASK_ID"] = "1"
    proc = sbatch("train_slices.sbatch", env)
    assert proc.returncode == 0, proc.stdout[-6000:]
    conf = json.loads((out / "experts" / "1900-2026" / "hf" / "config.json").read_text())
    assert conf["dsmoe_slice"]["start_year"] == 1900
    assert not (out / "experts" / "1790-1899").exists() and not (out / "baseline").exists()
    assert summary(out) == {"stopped_early": False, "runs": ["1900-2026"]}
    assert "REQUEUE" not in log.read_text() and "training finished" in proc.stdout
    no_array = {k: v for k, v in env.items() if k != "SLURM_ARRAY_TASK_ID"}
    bad = subprocess.run(["bash", "slurm/train_slices.sbatch"], cwd=REPO_ROOT, env=no_array, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "job array" in bad.stderr
