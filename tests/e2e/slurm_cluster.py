"""A real Slurm cluster for tests (Debian's slurmctld/slurmd/munge, started by hand): one node, or several
fake nodes on loopback, one slurmd each in its own UTS namespace (`slurm2`).

What it does (ENVIRONMENT.md, "Slurm"): installs the Debian packages with apt-get when `sbatch`/`slurmctld` are
missing (needs root), writes a private slurm.conf + gres.conf + munge key under one temporary directory, starts
munged, slurmctld and slurmd from that directory on free ports (so it never touches a system Slurm), declares 8
fake GPUs (character devices made with mknod) so the unmodified `#SBATCH --gpus-per-node=8` lines are accepted,
waits (bounded) until the node is idle, and stops every daemon by the PID it recorded.

Clients find this cluster through `SLURM_CONF` (see `SlurmCluster.env`). Accounting is off, so job states are
read with `scontrol show job` (kept for `MinJobAge` seconds after the end), never with sacct.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}
NUM_FAKE_GPUS = 8
NUM_CPUS = 16  # declared, not real: `config_overrides` lets slurmd advertise more than the 2 real cores


class SlurmUnavailable(RuntimeError):
    pass


def ensure_packages(binaries: list[str], packages: list[str], timeout: float = 600) -> None:
    """apt-get install `packages` when any of `binaries` is missing (CI: fresh Debian, root, only the venv)."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in binaries):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{binaries} missing and not root: cannot apt-get install {packages}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                                   f"\n{proc.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise SlurmUnavailable(f"daemon did not write its pid file {path} within {timeout:.0f} s")


@dataclass
class JobInfo:
    job_id: str
    state: str
    exit_code: str
    fields: dict = field(default_factory=dict)


@dataclass
class SlurmCluster:
    root: Path
    node: str
    env: dict
    pids: dict = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    """Node names (one slurmd each); a multi-node cluster's are fake hosts, one UTS namespace each."""

    # ------------------------------------------------------------------------------------------------ clients
    def run(self, *cmd: str, env: dict | None = None, timeout: float = 60, check: bool = True,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> JobInfo | None:
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode:
            return None
        fields = dict(tok.split("=", 1) for tok in proc.stdout.split() if "=" in tok)
        return JobInfo(job_id, fields.get("JobState", "?"), fields.get("ExitCode", "?"), fields)

    def wait(self, job_id: str, timeout: float, states: set[str] = TERMINAL_STATES) -> JobInfo:
        """Poll `scontrol show job` until the job reaches one of `states`; cancel it and fail on timeout."""
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info is not None and info.state in states:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: "
                             f"{info.fields if info else 'unknown to scontrol'}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = []
        for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes)):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------------ daemons
    def stop(self) -> None:
        for name in (*[f"slurmd-{n}" for n in self.nodes], "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _write_config(root: Path, ctld_host: str, ctld_port: int, nodes: dict[str, int]) -> None:
    """slurm.conf for the nodes {name: slurmd port}; every path a slurmd writes is per node (%n)."""
    gpu_dir = root / "dev"
    gpu_dir.mkdir()
    for i in range(NUM_FAKE_GPUS):  # gres File= must be character devices; 1,3 is /dev/null's major/minor
        os.mknod(gpu_dir / f"gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir()
    node_lines = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={port} CPUs={NUM_CPUS} RealMemory=2000 "
                           f"Gres=gpu:{NUM_FAKE_GPUS} State=UNKNOWN" for n, port in nodes.items())
    for n in nodes:
        (root / "spool" / n).mkdir()
    conf = f"""\
ClusterName=megahybridtest
SlurmctldHost={ctld_host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/run/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
GresTypes=gpu
MinJobAge=600
KillWait=5
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    (root / "slurm.conf").write_text(conf)
    (root / "gres.conf").write_text(f"Name=gpu File={gpu_dir}/gpu[0-{NUM_FAKE_GPUS - 1}]\n")
    (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")


def _start_munge(root: Path) -> int:
    run_dir = root / "run"
    key = run_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    for path in (run_dir, key):
        shutil.chown(path, "munge", "munge")
    os.chmod(run_dir, 0o755)
    cmd = ["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={run_dir}/munge.socket",
           f"--key-file={key}", f"--pid-file={run_dir}/munged.pid", f"--seed-file={run_dir}/munged.seed",
           f"--log-file={run_dir}/munged.log", "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise SlurmUnavailable(f"munged failed to start: {proc.stderr}")
    return _read_pid(run_dir / "munged.pid", 10)


HOSTS_FILE = Path("/etc/hosts")


def _resolve_on_loopback(names: list[str]) -> None:
    """Fake node names must resolve (the job's rendezvous host is its first node): map them to 127.0.0.1."""
    text = HOSTS_FILE.read_text()
    missing = [n for n in names if not any(n in line.split()[1:] for line in text.splitlines() if line.strip())]
    if missing:
        with open(HOSTS_FILE, "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # megahybrid test cluster\n")


def start_cluster(timeout: float = 60, num_nodes: int = 1) -> SlurmCluster:
    """Start a private cluster; the caller must call `.stop()` (the fixtures do).

    One node: this host. Several: fake hosts `mhnode1..N`, all on 127.0.0.1, each slurmd in its own UTS
    namespace (`unshare --uts`) with its own host name and port, so the job's tasks see `hostname` = their node,
    exactly like separate machines (ENVIRONMENT.md, "Simulating several nodes")."""
    ensure_packages(["sbatch", "slurmctld", "slurmd", "munged"], PACKAGES)
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd needs root")
    host = socket.gethostname().split(".")[0]
    names = [host] if num_nodes == 1 else [f"mhnode{i + 1}" for i in range(num_nodes)]
    if num_nodes > 1:
        _resolve_on_loopback(names)
    root = Path(tempfile.mkdtemp(prefix="mh-slurm-", dir="/tmp"))
    os.chmod(root, 0o755)  # munged (user munge) must traverse it
    _write_config(root, host, _free_port(), {n: _free_port() for n in names})
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        env.pop(var)
    cluster = SlurmCluster(root=root, node=names[0], env=env, nodes=names)
    conf = str(root / "slurm.conf")
    try:
        cluster.pids["munged"] = _start_munge(root)
        daemons = [("slurmctld", ["/usr/sbin/slurmctld", "-f", conf, "-i"])]  # -i: ignore stale state
        for n in names:
            cmd = ["/usr/sbin/slurmd", "-f", conf]
            if num_nodes > 1:
                cmd = ["unshare", "--uts", "sh", "-c", f"hostname {n} && exec {' '.join(cmd)}"]
            daemons.append((f"slurmd-{n}", cmd))
        for name, cmd in daemons:  # each daemonizes and writes its pid file
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            if proc.returncode:
                raise SlurmUnavailable(f"{name} failed to start: {proc.stderr}\n{cluster.diagnostics()}")
            cluster.pids[name] = _read_pid(root / "run" / f"{name}.pid", 15)
        _wait_idle(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        proc = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        state = proc.stdout.strip()
        if proc.returncode == 0 and state.split() == ["idle"] * len(cluster.nodes):
            return
        time.sleep(0.5)
    raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s (states {state!r})\n{cluster.diagnostics()}")


_SHARED: dict = {"cluster": None, "users": 0}


@pytest.fixture(scope="session")
def slurm():
    """A running private Slurm cluster, shared by every test module that imports this fixture (started once,
    reference-counted); daemons stopped by PID when the last user is torn down."""
    if _SHARED["cluster"] is None:
        _SHARED["cluster"] = start_cluster()
    _SHARED["users"] += 1
    try:
        yield _SHARED["cluster"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            cluster, _SHARED["cluster"] = _SHARED["cluster"], None
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm2():
    """A private 2-node cluster (mhnode1, mhnode2 on 127.0.0.1) for one test module."""
    cluster = start_cluster(num_nodes=2)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
