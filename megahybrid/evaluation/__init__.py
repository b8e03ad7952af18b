"""Evaluation: avg@k / pass@k metrics (SPEC.md section 7)."""
from megahybrid.evaluation.metrics import avg_at_k, pass_at_1, pass_at_k, pass_at_k_estimate

__all__ = ["avg_at_k", "pass_at_1", "pass_at_k", "pass_at_k_estimate"]
