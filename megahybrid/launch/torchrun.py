"""`torchrun` with signal dispositions that survive Slurm pre-emption: `python -m megahybrid.launch.torchrun ARGS`
takes exactly torchrun's arguments (slurm/launch_node.sh uses it).

Inside a Slurm step, a step signal reaches every process of the step: this agent, the ranks, and the ranks' own
children (rollout engines, reward workers). So:
- SIGUSR1 (pre-emption warning) is set to SIG_IGN here. A default SIGUSR1 would kill the agent, and an ignored
  signal is inherited across exec: ranks and their children start ignoring it, and only the trainer, which
  installs its own handler (checkpoint at the next step boundary, exit 0), reacts to it.
- SIGTERM (cancel, time limit) gets a no-op handler and is removed from TORCHELASTIC_SIGNALS_TO_HANDLE, so the
  agent neither dies nor kills the ranks while they write their checkpoint (Slurm's KillWait bounds that). A
  handler, unlike SIG_IGN, is reset on exec: ranks start with the default SIGTERM and still die of one sent
  before the trainer installs its handler (for example the agent's own SIGTERM after another rank failed).
"""
from __future__ import annotations

import os
import runpy
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    sys.argv = ["torchrun", *sys.argv[1:]]
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
