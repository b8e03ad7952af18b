"""Pre-emption: a real SIGUSR1/SIGTERM sent to a process looping under PreemptionHandler makes it save and exit 0;
handlers are restored; `agree` over a real 2-process gloo group equals any() of the ranks' flags."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megahybrid.training.signals import PreemptionHandler, agree

REPO_ROOT = str(Path(__file__).resolve().parents[3])  # subprocesses import megahybrid from this checkout
pytestmark = pytest.mark.timeout(90)

LOOP = """
import json, signal, sys, time
from pathlib import Path
from megahybrid.training.signals import PreemptionHandler
out = Path(sys.argv[1])
with PreemptionHandler() as handler:
    step = 0
    while not handler.requested:
        step += 1
        time.sleep(0.005)  # one "training step"
        if step == 1:
            print("ready", flush=True)
        if step > 10000:
            sys.exit(3)  # never signalled: fail instead of hanging
    (out / "saved.json").write_text(json.dumps({"step": step, "signal": handler.signal_name}))
restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
sys.exit(0 if restored else 4)
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_and_exits_zero(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved["signal"] == sig.name and saved["step"] >= 1


def test_handler_sets_flag_and_restores_previous(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with PreemptionHandler() as handler:
            assert not handler.requested
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before kill() returns
            assert handler.requested and handler.signal_name == "SIGUSR1"
        assert seen == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_handler_refuses_other_threads():
    errors = []

    def enter():
        try:
            with PreemptionHandler():
                pass
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(timeout=10)
    assert errors and "main thread" in errors[0]


AGREE = """
import json, sys
import torch.distributed as dist
from megahybrid.training.signals import agree
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
cases = [[True, False], [False, False], [False, True], [True, True]]
print(json.dumps([agree(flags[rank], None) for flags in cases]), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_agree_all_reduces_max_over_gloo(tmp_path):
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(rank), str(store)], stdout=subprocess.PIPE,
                              text=True, env=_env()) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    expected = [any(flags) for flags in [[True, False], [False, False], [False, True], [True, True]]]
    for out in outputs:
        assert json.loads(out.strip().splitlines()[-1]) == expected


def test_agree_without_process_group_returns_flag():
    assert agree(True) is True and agree(False) is False


AGREE_NCCL = """
import sys
import torch
import torch.distributed as dist
from megahybrid.training.signals import agree
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
print(agree(True), agree(False), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_agree_uses_cuda_tensors_with_nccl(tmp_path):
    out = subprocess.run([sys.executable, "-c", AGREE_NCCL, str(tmp_path / "store")], capture_output=True,
                         text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]
