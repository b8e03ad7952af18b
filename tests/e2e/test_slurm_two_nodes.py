"""The real `sbatch slurm/srft_7b.sh` path on a real 2-node Slurm: two slurmd, each in its own UTS namespace
(hosts mhnode1 and mhnode2 on 127.0.0.1, tests/e2e/slurm_cluster.py), so slurm/common.sh resolves the node list
and the rendezvous host, and srun starts one launcher per node, exactly as on a cluster. The run dir must pass
the same checks as the simulated 2-node job: both nodes' engines served prompts, the weights went by broadcast,
and the metrics equal a 1-node run of the same config (2 ranks, one pool of 2 engines)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the fixture module, also under --import-mode=importlib
from slurm_cluster import slurm2  # noqa: E402,F401
from test_slurm_scripts import SMALL, TINY, job_env, node_logs, output  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMON = [*SMALL, "train.steps=2", "train.eval_every=0", "parallel.world_size=2", "rollout.num_workers=2"]
NOT_COMPARED = ("time/", "perf/", "rollout/")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(900)
def test_srft_7b_script_on_two_slurm_nodes(slurm2, tmp_path):
    run_dir = tmp_path / "run"
    job = slurm2.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", f"--output={tmp_path}/%x-%j.out",
                        str(ROOT / "slurm/srft_7b.sh"), *COMMON, "launch.nodes=2", f"train.run_dir={run_dir}",
                        env=job_env(tmp_path, MEGAHYBRID_CONFIG=TINY), cwd=tmp_path)
    info = slurm2.wait(job, 800)
    out, nodes = output(tmp_path, "srft_7b", job), node_logs(tmp_path, "srft_7b", job)
    assert (info.state, info.exit_code) == ("COMPLETED", "0:0"), out[-3000:] + nodes[-6000:]
    assert "layout: 2 CPU node(s), 2 trainer rank(s)" in out and "1 per node" in out
    assert "rendezvous mhnode1:" in out  # common.sh took the first host of the job's node list
    assert "launch_node: mhnode1 procid=0" in nodes and "launch_node: mhnode2 procid=1" in nodes

    ref_dir = tmp_path / "one_node"
    ref = subprocess.run([sys.executable, "-m", "megahybrid", "train", TINY, *COMMON, f"train.run_dir={ref_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=job_env(tmp_path))
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = _records(run_dir / "metrics.jsonl"), _records(ref_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if not k.startswith(NOT_COMPARED)} == \
               {k: v for k, v in w.items() if not k.startswith(NOT_COMPARED)}
    assert all(r["rollout/node0_prompts"] > 0 and r["rollout/node1_prompts"] > 0 for r in got)
    assert got[-1]["sync/bytes"] > 0
    assert (run_dir / "checkpoints/step_000002/COMPLETE").is_file()
    assert (run_dir / "logs/node0/worker0.log").is_file() and (run_dir / "logs/node1/worker0.log").is_file()
