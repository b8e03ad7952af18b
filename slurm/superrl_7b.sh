#!/bin/bash
# SuperRL (reward-gated RL/SFT) on Qwen2.5-7B, 64 GPUs = 8 nodes x 8 (configs/superrl_7b.yaml).
#     sbatch slurm/superrl_7b.sh [dotted.key=value ...]      (from the repository root; options and variables: slurm/common.sh)
# The #SBATCH values match configs/superrl_7b.yaml's launch section (tests/unit/test_configs_recipes.py checks it).
#SBATCH --job-name=superrl_7b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

common=${MEGAHYBRID_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh
if [[ ! -f $common ]]; then
    echo "superrl_7b.sh: $common not found: submit from the repository root or set MEGAHYBRID_HOME" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$common"
megahybrid_sbatch_main configs/superrl_7b.yaml "$@"
