"""The drift alarm: stop a run whose rollout engine and trainer disagree about the policy (SPEC 10.B metrics).

`mismatch/k3` estimates KL(pi_engine || pi_old) on the engine's own samples. Kernel and dtype differences keep it
small and steady; a weight sync that did not happen (or loaded the wrong weights) makes it jump and stay up. The
alarm warns the first time the bound is crossed and raises after `patience` consecutive steps above it, so a single
noisy step does not kill a run. Its counter is checkpointed (a resumed run keeps counting).
"""
from __future__ import annotations

import sys
from typing import Any

LIKELY_CAUSES = ("a stale or skipped weight sync (the engines still sample from older weights), a dtype or kernel "
                 "mismatch between the engine and the trainer (e.g. bf16 engine vs fp32 trainer, different "
                 "attention/log-softmax kernels), or the sampling temperature applied differently on the two sides "
                 "(rollout.temperature must match what the engine used)")


class MismatchAlarmError(RuntimeError):
    """The engine/trainer log-prob drift stayed above `rollout.max_mismatch_k3` for `rollout.mismatch_patience`
    steps."""


class MismatchAlarm:
    def __init__(self, bound: float | None, patience: int):
        self.bound, self.patience = bound, max(1, int(patience))
        self.consecutive = 0
        self.warned = False

    def check(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Look at this step's `mismatch/k3`; returns `mismatch/alarm_steps`; raises when patience runs out."""
        k3 = metrics.get("mismatch/k3")
        if self.bound is None or k3 is None:
            return {}
        self.consecutive = self.consecutive + 1 if k3 > self.bound else 0
        if self.consecutive and not self.warned:
            self.warned = True
            print(f"[megahybrid] warning: step {step}: mismatch/k3 = {k3:.4g} > rollout.max_mismatch_k3 = "
                  f"{self.bound:g}; the run stops if this lasts {self.patience} steps. Likely causes: "
                  f"{LIKELY_CAUSES}.", file=sys.stderr, flush=True)
        if self.consecutive >= self.patience:
            raise MismatchAlarmError(
                f"step {step}: mismatch/k3 = {k3:.4g} stayed above rollout.max_mismatch_k3 = {self.bound:g} for "
                f"{self.consecutive} consecutive steps (rollout.mismatch_patience = {self.patience}); stopping. "
                f"Likely causes: {LIKELY_CAUSES}.")
        return {"mismatch/alarm_steps": float(self.consecutive)}

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.warned = int(state.get("consecutive", 0)), bool(state.get("warned", False))
