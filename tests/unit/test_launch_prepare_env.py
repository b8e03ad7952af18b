"""megahybrid.launch.prepare on the batch host (issue 12): a GPU allocation on a CPU-only torch is refused
without importing torch, and a pre-emption lead time under ~2 measured steps is warned about."""
import json
import subprocess
import sys

from megahybrid.config.schema import RunConfig
from megahybrid.launch import prepare


def test_torch_build_is_read_without_importing_torch():
    code = ("import sys; from megahybrid.launch.prepare import torch_cuda_build; "
            "print(torch_cuda_build()[1], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import torch  # the reference: what torch itself says

    assert out == [str(torch.version.cuda), "False"]


def test_gpu_allocation_on_cpu_torch_is_a_problem(monkeypatch):
    job = {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8"}
    monkeypatch.setattr(prepare, "torch_cuda_build", lambda: ("/venv/torch", None))
    [problem] = prepare.environment_problems(job)
    assert "8 GPU(s) per node" in problem and "/venv/torch" in problem and "CPU-only build" in problem
    assert prepare.environment_problems({**job, "MEGAHYBRID_ALLOW_CPU_TORCH": "1"}) == []
    assert prepare.environment_problems({**job, "SLURM_GPUS_ON_NODE": "0"}) == []
    assert prepare.environment_problems({"SLURM_GPUS_ON_NODE": "8"}) == []  # not inside a job
    monkeypatch.setattr(prepare, "torch_cuda_build", lambda: ("/venv/torch", "12.8"))
    assert prepare.environment_problems(job) == []


def test_preempt_lead_time_is_checked_against_the_last_measured_step(tmp_path):
    cfg = RunConfig()
    cfg.train.run_dir, cfg.launch.preempt_signal_s = str(tmp_path), 300
    assert prepare.preempt_warning(cfg) is None  # nothing measured yet
    lines = [json.dumps({"step": 1, "time/step_s": 100.0}), json.dumps({"step": 2, "time/step_s": 180.0}),
             '{"step": 3, "time/st']  # the last line cut by the kill that ended the previous job
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    warning = prepare.preempt_warning(cfg)
    assert "preempt_signal_s=300 is less than 2x the last measured step (180 s at step 2" in warning
    cfg.launch.preempt_signal_s = 360
    assert prepare.preempt_warning(cfg) is None
