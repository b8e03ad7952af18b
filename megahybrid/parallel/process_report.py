"""Why a process died, in words a person can act on (used by the local launcher and the worker pools).

A process killed by a signal says nothing itself: SIGKILL cannot be caught. The one watching it (the launcher for
ranks, a pool for its engines and reward workers) reads the signal from the exit status and, for SIGKILL, looks
for the usual culprit, the kernel's out-of-memory killer: the cgroup's `oom_kill` counter went up, or the job's
resident memory was near what the machine (or its cgroup) allows.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

NEAR_MEMORY = 0.8
"""Fraction of the machine's memory above which a SIGKILL is attributed to the out-of-memory killer."""
MEMORY_SETTINGS = ("train.micro_batch_size (activations per rank), rollout.max_num_seqs and "
                   "rollout.kv_cache_memory_bytes (engine memory), rollout.num_workers / parallel.world_size "
                   "(processes per node)")
"""The settings that bound a job's memory, named by the out-of-memory message (see `memory_settings`)."""
GIB = 1 << 30


def memory_settings() -> str:
    """MEMORY_SETTINGS, led by the micro-batch token budget where the config has one."""
    from megahybrid.config.schema import TrainConfig

    if "max_tokens_per_micro_batch" in {f.name for f in dataclasses.fields(TrainConfig)}:
        return f"train.max_tokens_per_micro_batch (the token budget) or {MEMORY_SETTINGS}"
    return MEMORY_SETTINGS


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def machine_memory_bytes() -> int | None:
    """Physical memory, or the cgroup's limit when it is lower (a container's OOM killer fires at the limit)."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(path).read_text().strip())
        except (OSError, ValueError):  # missing, or "max" (no limit)
            continue
        if total is None or 0 < limit < total:
            total = limit
    return total


def oom_kill_count() -> int | None:
    """The cgroup's count of OOM kills so far (None where the kernel does not expose it)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in Path(path).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process visible in /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: the fields after the last ')' are plain
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    children = children_map() if children is None else children
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def describe_exit(what: str, pid: int | None, returncode: int, *, peak_rss: int = 0, job_rss: int = 0,
                  oom_kills_before: int | None = None) -> str:
    """One message: which process, how it ended, and for SIGKILL the likely cause and the settings to lower.

    `peak_rss`: the largest resident memory seen of this process (with its children); `job_rss`: of the whole
    job; `oom_kills_before`: `oom_kill_count()` when the job started.
    """
    who = f"{what} (pid {pid})" if pid is not None else what
    if returncode >= 0:
        return f"{who} exited with code {returncode}"
    signum = -returncode
    text = f"{who} was killed by {signal_name(signum)}"
    if signum != signal.SIGKILL:
        return text
    memory, kills = machine_memory_bytes(), oom_kill_count()
    oom_counted = kills is not None and oom_kills_before is not None and kills > oom_kills_before
    near = memory is not None and max(peak_rss, job_rss) >= NEAR_MEMORY * memory
    if oom_counted or near:
        limit = f" of {memory / GIB:.1f} GiB" if memory else ""
        seen = f"the job used up to {job_rss / GIB:.1f} GiB{limit}"
        seen += f", {what} alone {peak_rss / GIB:.1f} GiB" if peak_rss else ""
        seen += "; the kernel counted an OOM kill" if oom_counted else ""
        return (f"{text}. Likely cause: out of memory ({seen}). "
                f"Lower {memory_settings()}.")
    if not (peak_rss or job_rss):
        return text  # nothing measured: no guess
    return f"{text} (memory was not near the limit: killed from outside, e.g. by a person or a scheduler)"
