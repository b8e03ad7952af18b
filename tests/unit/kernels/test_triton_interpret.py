"""impl='triton' through Triton's CPU interpreter (in a subprocess: TRITON_INTERPRET must be set before the
kernels are decorated) against the float64 reference: values and gradients to 1e-5 relative."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the `triton` package (cpu extra) is not installed")

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


def _run_helper(*flags):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(HERE / "kernels_triton_check.py"), *flags], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_triton_kernels_match_reference_in_interpreter():
    results = _run_helper()
    assert set(results) == {"all_outputs", "small_random", "entropy_only", "logp_only", "frozen_weight",
                            "main_grad"}
    fused = results.pop("main_grad")
    assert fused["weight_grad_is_none"] and fused["main_grad"] <= 1e-5, f"accumulate_into_main_grad: {fused}"
    for case, errors in results.items():
        for name, err in errors.items():
            if case == "frozen_weight" and name == "grad_weight":
                assert err is None, "a frozen weight must get no gradient"
                continue
            assert err is not None and err <= 1e-5, f"{case}/{name}: relative error {err}"


@pytest.mark.timeout(120)
def test_triton_on_cpu_without_interpreter_raises_clearly():
    message = _run_helper("--no-interpret")["error"]
    assert message and "TRITON_INTERPRET=1" in message and "CUDA" in message
