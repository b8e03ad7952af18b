"""`python -m megahybrid ...` (what torchrun launches).

The guard matters: Megatron's checkpoint writer and the rollout workers start processes with `spawn`, which
re-imports the main module in the child."""
import sys

from megahybrid.cli import main

if __name__ == "__main__":
    sys.exit(main())
