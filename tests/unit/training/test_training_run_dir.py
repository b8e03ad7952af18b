"""Checkpoint directories: atomic commit, rotation, discovery of the newest complete one past damaged / unmarked /
leftover directories, a writer killed mid-save, and the resolved config file."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megahybrid.config.loader import load_config, to_dict
from megahybrid.training.run_dir import MARKER, CheckpointDirs, write_resolved_config

REPO_ROOT = str(Path(__file__).resolve().parents[3])  # subprocesses import megahybrid from this checkout
pytestmark = pytest.mark.timeout(60)


def payload(step):
    return {"model/weights.bin": bytes([step % 256]) * (3000 + step), "meta.json": json.dumps({"step": step}).encode()}


def save(dirs, step, files=None):
    staging = dirs.staging(step)
    for rel, data in (files or payload(step)).items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return dirs.commit(staging, step)


def contents(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and p.name != MARKER}


def names(root):
    return sorted(p.name for p in root.iterdir())


def test_commit_writes_manifest_and_rotates(tmp_path):
    dirs = CheckpointDirs(tmp_path, keep=2)
    for step in (1, 2, 3):
        final = save(dirs, step)
        assert final == tmp_path / f"step_{step:06d}"
    assert names(tmp_path) == ["step_000002", "step_000003"]
    assert dirs.latest_complete() == tmp_path / "step_000003"
    assert dirs.step_of(dirs.latest_complete()) == 3
    assert contents(tmp_path / "step_000003") == payload(3)
    manifest = json.loads((tmp_path / "step_000003" / MARKER).read_text())
    assert manifest["step"] == 3
    assert manifest["files"] == {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                 for rel, data in payload(3).items()}


def test_same_step_replaced_and_later_steps_dropped(tmp_path):
    dirs = CheckpointDirs(tmp_path, keep=3)
    for step in (1, 2, 3):
        save(dirs, step)
    new = {"meta.json": b'{"step": 3, "again": true}'}
    save(dirs, 3, new)
    assert names(tmp_path) == ["step_000001", "step_000002", "step_000003"]
    assert contents(tmp_path / "step_000003") == new
    # A run restarted from step 1 that saves step 2: the old step 3 belongs to an abandoned history.
    save(dirs, 2)
    assert names(tmp_path) == ["step_000001", "step_000002"]
    assert dirs.latest_complete() == tmp_path / "step_000002"


def test_keep_one_never_deletes_the_new_checkpoint(tmp_path):
    dirs = CheckpointDirs(tmp_path, keep=1)
    save(dirs, 1)
    save(dirs, 2)
    assert names(tmp_path) == ["step_000002"]
    with pytest.raises(ValueError, match="keep_checkpoints"):
        CheckpointDirs(tmp_path, keep=0)
    with pytest.raises(ValueError, match="step_XXXXXX"):
        dirs.step_of(tmp_path / "latest")


def test_damaged_unmarked_and_leftover_dirs_are_ignored(tmp_path, capsys):
    dirs = CheckpointDirs(tmp_path, keep=10)
    for step in (1, 2, 3, 6, 7):
        save(dirs, step)
    # step 3: marker written, then a file cut short (truncated mid-write).
    weights = tmp_path / "step_000003" / "model" / "weights.bin"
    os.truncate(weights, weights.stat().st_size // 2)
    # step 4: files but no marker.
    (tmp_path / "step_000004").mkdir()
    (tmp_path / "step_000004" / "meta.json").write_text("{}")
    # step 5: a staging dir left by a crashed save.
    (tmp_path / ".tmp-step_000005-4242" / "model").mkdir(parents=True)
    # step 6: a file missing; step 7: same size, different bytes.
    (tmp_path / "step_000006" / "meta.json").unlink()
    (tmp_path / "step_000007" / "meta.json").write_bytes(b'{"step": 9}')

    assert dirs.latest_complete() == tmp_path / "step_000002"
    assert not (tmp_path / ".tmp-step_000005-4242").exists()
    assert f"ignoring partial checkpoint {tmp_path / '.tmp-step_000005-4242'}" in capsys.readouterr().err
    reasons = {p.name: r for p, r in dirs.skipped().items()}
    assert set(reasons) == {"step_000003", "step_000004", "step_000006", "step_000007"}
    assert "bytes, the manifest says" in reasons["step_000003"]
    assert reasons["step_000004"] == "no COMPLETE marker"
    assert reasons["step_000006"] == "meta.json is missing"
    assert "sha256" in reasons["step_000007"]


def test_parked_checkpoint_restored_when_replacement_never_landed(tmp_path):
    dirs = CheckpointDirs(tmp_path, keep=2)
    save(dirs, 1)
    save(dirs, 2)
    # Injected fault: a crash between parking the old step 2 and renaming the new one into place.
    os.rename(tmp_path / "step_000002", tmp_path / ".replaced-step_000002-999")
    (tmp_path / ".tmp-step_000002-999").mkdir()
    assert dirs.latest_complete() == tmp_path / "step_000002"
    assert contents(tmp_path / "step_000002") == payload(2)
    assert names(tmp_path) == ["step_000001", "step_000002"]


def test_no_checkpoints(tmp_path):
    assert CheckpointDirs(tmp_path / "absent", keep=2).latest_complete() is None
    assert CheckpointDirs(tmp_path, keep=2).latest_complete() is None


WRITER = """
import sys, time
from pathlib import Path
from megahybrid.training.run_dir import CheckpointDirs
dirs = CheckpointDirs(Path(sys.argv[1]), keep=2)
staging = dirs.staging(1)
(staging / "weights.bin").write_bytes(bytes(range(256)) * 64)
dirs.commit(staging, 1)
staging = dirs.staging(2)
with open(staging / "weights.bin", "wb") as f:
    f.write(b"x" * 4096)
    f.flush()
    print("writing", flush=True)
    while True:
        f.write(b"x" * 4096)
        f.flush()
        time.sleep(0.001)
"""


def test_writer_killed_mid_save_keeps_last_good_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.05)
        staging = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step_000002-")]
        assert staging, names(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    dirs = CheckpointDirs(tmp_path, keep=2)
    assert dirs.latest_complete() == tmp_path / "step_000001"
    assert (tmp_path / "step_000001" / "weights.bin").read_bytes() == bytes(range(256)) * 64
    assert names(tmp_path) == ["step_000001"]


def test_resolved_config_written_atomically(tmp_path):
    source = tmp_path / "exp.yaml"
    source.write_text("train:\n  steps: 7\noptim:\n  lr: 3.0e-4\n")
    cfg = load_config(source, validate=False)
    path = write_resolved_config(tmp_path / "run", cfg)
    assert path == tmp_path / "run" / "config.yaml"
    written = yaml.safe_load(path.read_text())
    assert written == to_dict(cfg)
    assert (written["train"]["steps"], written["optim"]["lr"], written["train"]["save_every"]) == (7, 3e-4, 50)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temp file left


def test_a_save_that_cannot_fit_is_refused_with_a_message(tmp_path, monkeypatch, capsys):
    import shutil

    import megahybrid.training.run_dir as run_dir_module

    dirs = CheckpointDirs(tmp_path, keep=2)
    save(dirs, 1)
    size = sum(p.stat().st_size for p in (tmp_path / "step_000001").rglob("*") if p.is_file() and p.name != "COMPLETE")
    real = shutil.disk_usage
    monkeypatch.setattr(run_dir_module.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=size - 1))  # one byte short
    with pytest.raises(OSError, match="not enough free space .* for the checkpoint of step 2"):
        dirs.staging(2)
    assert "not enough free space" in capsys.readouterr().err
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # nothing half-written
    assert dirs.latest_complete() == tmp_path / "step_000001"
    monkeypatch.setattr(run_dir_module.shutil, "disk_usage", lambda path: real(path)._replace(free=size))
    assert dirs.staging(2).is_dir()
