"""Pre-emption: SIGTERM / SIGUSR1 (Slurm sends SIGUSR1 `launch.preempt_signal_s` before the time limit, SIGTERM
on cancel/pre-emption) only set a flag; the loop checks it at a safe point (between steps), checkpoints and exits 0.

Python runs signal handlers in the main thread, and `signal.signal` may only be called there: enter
PreemptionHandler from the main thread of the trainer process. Under torchrun a signal may reach one rank only
(Slurm signals the launcher's process group, a user may `kill` one pid), so the loop decides with
`agree(handler.requested, group)`: every rank stops at the same step if any rank was signalled.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager: while active, the given signals set `.requested` (and `.signal_name`) instead of killing
    the process; the previous handlers are restored on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set flags: a handler runs between bytecodes of whatever the loop is doing (maybe mid-save).
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be entered from the main thread: Python delivers signals "
                               "to the main thread only and signal.signal() fails elsewhere")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def agree(flag: bool, group: Any = None) -> bool:
    """True on every rank if `flag` is True on any rank of `group` (an all-reduce MAX; a collective, so every
    rank of the group must call it at the same point). Without an initialised process group: `flag`."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    from megahybrid.parallel.collectives import collective_device

    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())
