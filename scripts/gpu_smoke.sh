#!/usr/bin/env bash
# GPU smoke test (issue 12) for one machine with NVIDIA GPU(s) and CUDA 12/13 drivers, from a fresh clone:
#     bash scripts/gpu_smoke.sh            (about 10 minutes at most; one PASS/FAIL line per check, exit 1 on any FAIL)
# 1. installs the pinned GPU stack (setup.cfg `gpu` extra: vllm==0.32.0 + its CUDA torch 2.13.0,
#    transformer-engine[pytorch]>=2.9,<2.12) into its own venv, $MEGAHYBRID_GPU_VENV [.venv-gpu]; in an NGC
#    container the venv sees the image's packages (--system-site-packages). Offline: MEGAHYBRID_WHEELS=<dir of wheels>.
# 2. checks: the Triton and TE-FP8 LM heads against the chunked path and a float64 reference (values, gradients,
#    time); a CUDA vLLM engine on the tiny model with a weight sync into it and log-probs matching Hugging Face;
#    the `gpu` pytest files; a world-size-1 NCCL tiny SRFT run of 3 steps; with a second GPU, a 2-rank (DP 2) NCCL
#    run and the NCCL broadcast weight sync test.
# Logs: $MEGAHYBRID_SMOKE_DIR [runs/gpu_smoke]/<check>.log.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
VENV=${MEGAHYBRID_GPU_VENV:-$ROOT/.venv-gpu}
OUT=${MEGAHYBRID_SMOKE_DIR:-$ROOT/runs/gpu_smoke}
START=$SECONDS
BUDGET_S=${MEGAHYBRID_SMOKE_BUDGET_S:-590}  # every check's timeout is cut to what is left of this
FAILED=0
mkdir -p "$OUT"

line() { echo "$1 $2: $3"; [[ $1 == FAIL ]] && FAILED=1; return 0; }

# check NAME TIMEOUT_S CMD...: one PASS/FAIL line (the command's own PASS/FAIL lines when it prints them).
check() {
    local name=$1 limit=$2 rc t0=$SECONDS left=$((BUDGET_S - (SECONDS - START)))
    shift 2
    if ((left < 15)); then
        line FAIL "$name" "not run: the ${BUDGET_S} s budget is spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    if grep -qE '^(PASS|FAIL) ' "$OUT/$name.log"; then
        grep -E '^(PASS|FAIL) ' "$OUT/$name.log"
        grep -q '^FAIL ' "$OUT/$name.log" && FAILED=1
        ((rc == 0)) || grep -q '^FAIL ' "$OUT/$name.log" || line FAIL "$name" "exit $rc (log $OUT/$name.log)"
    elif ((rc == 0)); then
        line PASS "$name" "$((SECONDS - t0)) s ($(tail -n 1 "$OUT/$name.log" | cut -c1-150))"
    else
        local why="exit $rc after $((SECONDS - t0)) s"
        ((rc == 124)) && why+=" (timeout ${limit} s)"
        line FAIL "$name" "$why; log $OUT/$name.log: $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-300)"
    fi
}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >"$OUT/gpus.txt" 2>&1; then
    line FAIL gpus "nvidia-smi found no GPU ($(head -n 1 "$OUT/gpus.txt" 2>/dev/null))"
    exit 2
fi
NGPU=$(grep -c '^GPU ' "$OUT/gpus.txt")
line PASS gpus "$NGPU GPU(s): $(head -n 1 "$OUT/gpus.txt" | cut -c1-100)"

# ---- 1. the pinned stack, in its own venv (vLLM and its torch first; TE separately, so a TE build that fails
# or is slow only fails the TE checks)
pip_args=(--disable-pip-version-check --progress-bar off)
[[ -n ${MEGAHYBRID_WHEELS:-} ]] && pip_args+=(--find-links "$MEGAHYBRID_WHEELS")
if [[ ! -x $VENV/bin/python ]] && ! python3 -m venv --system-site-packages "$VENV"; then
    line FAIL install "python3 -m venv $VENV failed"
    exit 2
fi
py=$VENV/bin/python
check install_vllm 360 "$py" -m pip install "${pip_args[@]}" -e "${ROOT}[test]" "vllm==0.32.0" triton
if "$py" -c "import transformer_engine.pytorch" >/dev/null 2>&1; then  # e.g. an NGC image's own build
    line PASS install_te "present: $("$py" -m pip show transformer-engine 2>/dev/null | grep -m1 '^Version')"
else  # transformer_engine_torch compiles against this torch: slow without a wheel cache
    check install_te 240 "$py" -m pip install "${pip_args[@]}" --no-build-isolation \
        "transformer-engine[pytorch]>=2.9,<2.12"
fi
check torch_cuda 60 "$py" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA in torch'; \
print(f'torch {torch.__version__} cuda {torch.version.cuda} vllm {vllm.__version__}', torch.cuda.get_device_name(0))"

# ---- 2. checks
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS=4 MEGAHYBRID_CHECK_COLLECTIVES=1
check heads 180 "$py" scripts/gpu_smoke_checks.py heads "$OUT/heads"
check engine 240 "$py" scripts/gpu_smoke_checks.py engine "$OUT/engine"
check gpu_pytest 300 "$py" -m pytest -q -x -m gpu -p no:cacheprovider tests/unit/kernels tests/dist/test_megatron_gpu.py

tiny=(configs/tiny/srft_arith.yaml train.steps=3 train.save_every=3 train.eval_every=0 data.num_eval=4
    train.prompts_per_step=4 rollout.n=2 train.micro_batch_size=6 logging.tensorboard=false logging.plots=false
    logging.progress=false parallel.backend=nccl rollout.gpus_per_worker=1 rollout.gpu_memory_utilization=0.25)
"$py" -m megahybrid plan "${tiny[@]}" parallel.world_size=1 >"$OUT/plan.txt" 2>&1
check train_nccl_ws1 240 "$py" -m megahybrid train "${tiny[@]}" parallel.world_size=1 "train.run_dir=$OUT/run_ws1"
if ((NGPU >= 2)); then
    check train_nccl_dp2 300 "$py" -m megahybrid.launch.torchrun --standalone --nproc-per-node=2 \
        -m megahybrid train "${tiny[@]}" parallel.world_size=2 "train.run_dir=$OUT/run_dp2"
    check broadcast_sync 300 "$py" -m pytest -q -x -p no:cacheprovider tests/e2e/test_rollout_gpu.py
else
    echo "SKIP train_nccl_dp2, broadcast_sync: one GPU (NCCL cannot put two ranks on one device)"
fi

echo "gpu_smoke: $((SECONDS - START)) s, logs in $OUT: $( ((FAILED)) && echo FAILED || echo all passed)"
exit "$FAILED"
