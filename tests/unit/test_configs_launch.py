"""Cluster profiles and job preparation (megahybrid/launch): env expansion, strict keys, allocation checks, and
shell assignments that bash reads back unchanged."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from megahybrid.config.loader import ConfigError, load_config
from megahybrid.launch import cluster as cl
from megahybrid.launch import prepare
from megahybrid.launch.nemo import nemorun_home, slurm_job_id

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny/srft_arith.yaml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return str(path)


def test_default_profile_takes_site_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEGAHYBRID_PARTITION", "gpu-long")
    monkeypatch.setenv("MEGAHYBRID_MOUNTS", "/data:/data, /scratch:/scratch")
    monkeypatch.delenv("MEGAHYBRID_ACCOUNT", raising=False)
    monkeypatch.delenv("MEGAHYBRID_CONTAINER", raising=False)
    monkeypatch.delenv("MEGAHYBRID_CLUSTER", raising=False)
    prof = cl.load_cluster("default")
    assert prof.partition == "gpu-long" and prof.account is None and prof.container_image is None
    assert prof.container_mounts == ["/data:/data", "/scratch:/scratch"]
    assert prof.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_profile_errors_name_the_file_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGAHYBRID_CLUSTER", raising=False)
    monkeypatch.delenv("SITE_ACCOUNT", raising=False)
    path = write(tmp_path, "partiton: x\nmodules: cuda\naccount: ${SITE_ACCOUNT}\n")
    with pytest.raises(ConfigError) as err:
        cl.load_cluster(path)
    text = "\n".join(err.value.problems)
    assert f"{path}: partiton: unknown key; did you mean 'partition'?" in text
    assert f"{path}: modules: expected a list of strings" in text
    assert "environment variable SITE_ACCOUNT is not set" in text
    with pytest.raises(ConfigError, match="no cluster profile"):
        cl.load_cluster("no_such_cluster")


def test_megahybrid_cluster_overrides_the_config(tmp_path, monkeypatch):
    path = write(tmp_path, "partition: debug\nsetup: ['module load x']\n")
    monkeypatch.setenv("MEGAHYBRID_CLUSTER", path)
    prof = cl.load_cluster("tiny")
    assert (prof.name, prof.partition, prof.setup) == ("site", "debug", ["module load x"])


def test_allocation_checks_nodes_and_gpus():
    cfg = load_config(ROOT / "configs/srft_7b.yaml")
    assert prepare.allocation_problems(cfg, {}) == []  # outside a job nothing is checked
    ok = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_GPUS_ON_NODE": "8"}
    assert prepare.allocation_problems(cfg, ok) == []
    bad = prepare.allocation_problems(cfg, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_GPUS_PER_NODE": "gpu:4"})
    assert len(bad) == 2
    assert "launch.nodes is 8 but the job has 1 launcher task(s)" in bad[0]
    assert "launch.gpus_per_node is 8 but the job has 4 GPU(s)" in bad[1]


def test_nproc_per_node_is_the_trainer_share_of_a_node():
    assert prepare.nproc_per_node(load_config(ROOT / "configs/srft_7b.yaml")) == 4
    assert prepare.nproc_per_node(load_config(TINY)) == 2  # CPU: parallel.world_size ranks on one node
    with pytest.raises(ConfigError, match="rollout.nodes > 0"):
        prepare.nproc_per_node(load_config(ROOT / "configs/srft_7b.yaml", [
            "rollout.nodes=2", "parallel.world_size=48", "rollout.num_workers=8", "rollout.gpus_per_worker=2",
            "train.prompts_per_step=96"]))


def test_shell_assignments_survive_bash_eval(tmp_path):
    cfg = load_config(TINY, ["train.run_dir=/tmp/run dir/it's"])
    prof = cl.ClusterProfile(name="t", setup=["echo 'a b'", "export X=$HOME"], env={"NCCL_X": "a b\"c"},
                             container_mounts=["/a:/a", "/b:/b"])
    lines = prepare.shell_assignments(cfg, prof, None)
    script = "\n".join(lines) + '\nprintf "%s|" "$MH_RUN_DIR" "$MH_SETUP" "$NCCL_X" "$MH_CONTAINER_MOUNTS" "$MH_NPROC_PER_NODE"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("|")[:5] == ["/tmp/run dir/it's", "echo 'a b'\nexport X=$HOME", 'a b"c', "/a:/a,/b:/b", "2"]


def test_prepare_writes_config_and_plan_and_exits_2_on_errors(tmp_path, capsys):
    assert prepare.main(["--log-dir", str(tmp_path / "logs"), str(TINY), "train.steps=3"]) == 0
    assert "train:\n" in (tmp_path / "logs/config.yaml").read_text()
    assert "steps: 3" in (tmp_path / "logs/config.yaml").read_text()
    assert "layout: 1 CPU node(s), 2 trainer rank(s)" in (tmp_path / "logs/plan.txt").read_text()
    assert "MH_NPROC_PER_NODE=2" in capsys.readouterr().out
    assert prepare.main([str(TINY), "train.stepz=3"]) == 2
    assert "train.stepz: unknown key" in capsys.readouterr().err


def test_nemo_run_helpers(tmp_path):
    assert slurm_job_id("slurm_tunnel://nemo_run/1234") == "1234"
    with pytest.raises(RuntimeError, match="cannot read a Slurm job id"):
        slurm_job_id("local://nemo_run/abc")
    with pytest.raises(ConfigError, match="contains '/nemo_run'"):
        nemorun_home(cl.ClusterProfile(nemo_run_home=str(tmp_path / "nemo_run" / "x")))
    assert nemorun_home(cl.ClusterProfile(nemo_run_home=str(tmp_path / "nr"))) == (tmp_path / "nr").resolve()
