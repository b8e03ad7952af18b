"""Launch plumbing shared by slurm/*.sh and launchers/ (NeMo-Run): cluster profiles, job preparation, preflight."""
