#!/bin/bash
# SASR (adaptive SFT/GRPO steps) on Qwen2.5-1.5B-Instruct, 1 node x 8 GPUs (configs/sasr_1p5b.yaml).
#     sbatch slurm/sasr_1p5b.sh [dotted.key=value ...]      (from the repository root; options and variables: slurm/common.sh)
# The #SBATCH values match configs/sasr_1p5b.yaml's launch section (tests/unit/test_configs_recipes.py checks it).
#SBATCH --job-name=sasr_1p5b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

common=${MEGAHYBRID_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh
if [[ ! -f $common ]]; then
    echo "sasr_1p5b.sh: $common not found: submit from the repository root or set MEGAHYBRID_HOME" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$common"
megahybrid_sbatch_main configs/sasr_1p5b.yaml "$@"
