"""launchers/launch.py with real NeMo-Run executors: the sbatch script it would submit, SlurmExecutor jobs on the
local Slurm (tests/e2e/slurm_cluster.py) whose final state the launcher must report as its exit code, and a
LocalExecutor training run.

What needs the trainer: `test_local_executor_trains_the_tiny_config_for_two_steps`. The Slurm jobs run the
preflight probe (`--preflight`) through the same launch_node.sh / torchrun path as training.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the fixture module, also under --import-mode=importlib
from slurm_cluster import slurm  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = str(ROOT / "launchers/launch.py")
TINY = str(ROOT / "configs/tiny/srft_arith.yaml")
SMALL = ["train.prompts_per_step=4", "rollout.n=2", "data.num_eval=4", "train.micro_batch_size=6",
         "logging.tensorboard=false", "logging.plots=false", "logging.progress=false"]

pytestmark = pytest.mark.e2e


def launcher(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 300,
             columns: int = 300) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)
    full_env = {**(env or os.environ), "NEMORUN_HOME": str(tmp_path / "nemo_home"), "COLUMNS": str(columns),
                "MEGAHYBRID_PYTHON": sys.executable, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
                "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, LAUNCH, *args], cwd=tmp_path, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(180)
def test_dryrun_prints_the_sbatch_script_built_from_the_yaml(tmp_path):
    env = {**os.environ, "MEGAHYBRID_PARTITION": "gpu-long", "MEGAHYBRID_ACCOUNT": "proj42"}
    env.pop("MEGAHYBRID_CONTAINER", None)
    proc = launcher(tmp_path, str(ROOT / "configs/srft_7b.yaml"), "train.steps=3", "--dryrun", env=env, columns=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "trainer: 32 GPUs = TP 2 x PP 1 x DP 16" in out  # the layout is printed first
    for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=USR1@300", "#SBATCH --time=24:00:00",
                 "#SBATCH --partition=gpu-long", "#SBATCH --account=proj42"):
        assert re.search(rf"^\s*{re.escape(line)}\s*$", out, re.M), line
    assert "--kill-on-bad-exit=1" in out and "--container-image" not in out
    # one unwrapped line at an 80-column terminal, so the printed script can be copied and submitted
    assert f"bash {ROOT}/slurm/launch_node.sh {ROOT}/configs/srft_7b.yaml train.steps=3\n" in out
    assert f"export MEGAHYBRID_HOME={ROOT}" in out
    assert "Submitted" not in out and "submitted Slurm job" not in out


def run_logs(tmp_path: Path) -> str:
    logs = sorted((tmp_path / "nemo_home").rglob("*.log")) + sorted((tmp_path / "nemo_home").rglob("*.out"))
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs)


def submitted_job(stdout: str) -> str:
    match = re.search(r"submitted Slurm job (\d+)", stdout)
    assert match, stdout
    return match.group(1)


@pytest.mark.timeout(400)
def test_slurm_executor_reports_completed_and_failed_runs(slurm, tmp_path):
    env = {**slurm.env, "MEGAHYBRID_LOG_ROOT": str(tmp_path / "logs")}
    common = [TINY, f"train.run_dir={tmp_path / 'run'}", "--preflight", "--poll", "1", "--timeout", "240"]
    ok = launcher(tmp_path, *common, env=env)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:] + run_logs(tmp_path)
    job = submitted_job(ok.stdout)
    assert slurm.job(job).state == "COMPLETED" and "finished: COMPLETED" in ok.stdout
    records = [json.loads((tmp_path / "run/preflight" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["world_size"], r["slurm_job_id"]) for r in records] == [(2, job), (2, job)]

    bad = launcher(tmp_path, *common, "--probe-args", "--fail-rank 0", env=env)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    job = submitted_job(bad.stdout)
    assert slurm.job(job).state == "FAILED" and "finished: FAILED" in bad.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_executor_trains_the_tiny_config_for_two_steps(tmp_path):
    run_dir = tmp_path / "run"
    proc = launcher(tmp_path, TINY, *SMALL, "train.steps=2", "train.save_every=2", f"train.run_dir={run_dir}",
                    "--executor", "local", timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + run_logs(tmp_path)
    assert "finished: SUCCEEDED" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [1, 2]
    assert (run_dir / "checkpoints/step_000002/COMPLETE").is_file()
