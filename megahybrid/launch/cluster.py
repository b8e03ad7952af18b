"""Cluster profiles: `configs/clusters/<name>.yaml`, the site-specific half of a launch (partition, account,
container, modules, environment). The run config names its profile in `launch.cluster`; `MEGAHYBRID_CLUSTER`
(a name or a path) overrides it.

String values may use `${VAR}` and `${VAR:-default}`: the value comes from the environment when the profile is
read, so one profile serves many users (`partition: ${MEGAHYBRID_PARTITION:-}`). An empty string means unset.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from megahybrid.config.loader import ConfigError, read_yaml

CLUSTERS_DIR = Path(__file__).resolve().parents[2] / "configs" / "clusters"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class ClusterProfile:
    name: str = "tiny"
    """Profile name (the file stem)."""
    partition: str | None = None
    """Slurm partition (None = the cluster's default partition)."""
    account: str | None = None
    """Slurm account (None = the user's default account)."""
    qos: str | None = None
    """Slurm QOS (None = default)."""
    container_image: str | None = None
    """Pyxis/enroot image for `srun --container-image` (None = run in the host environment)."""
    container_mounts: list[str] = field(default_factory=list)
    """`src:dst` mounts for the container (a comma-separated string is split); the repository is always mounted."""
    modules: list[str] = field(default_factory=list)
    """Environment modules loaded (`module load`) on the batch host before srun."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run on every node before torchrun (e.g. `source /path/venv/bin/activate`)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported on every node (NCCL settings, caches, ...)."""
    log_dir: str = "logs/slurm"
    """Root of the per-job log directories (relative paths: to the directory the job runs in)."""
    nemo_run_home: str | None = None
    """NeMo-Run's home (experiment records); None = `<repo>/.nemo_runs` (never a path containing `/nemo_run`)."""
    python: str = "python"
    """Python interpreter on the nodes (inside the container when there is one)."""


def expand(value: str, where: str) -> str:
    """`${VAR}` / `${VAR:-default}` from the environment; a missing VAR without a default is an error."""
    def sub(match: re.Match) -> str:
        var, default = match.group(1), match.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is None:
            raise ConfigError([f"{where}: environment variable {var} is not set (write ${{{var}:-default}} "
                               f"for an optional value)"])
        return default

    return _VAR.sub(sub, value)


def _expand_tree(value, where: str):
    if isinstance(value, str):
        return expand(value, where)
    if isinstance(value, list):
        return [_expand_tree(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand_tree(v, f"{where}.{k}") for k, v in value.items()}
    return value


def cluster_path(name: str) -> Path:
    """A profile name (`tiny`) or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name)
    return CLUSTERS_DIR / f"{name}.yaml"


def load_cluster(name: str | None = None) -> ClusterProfile:
    """Read and check a profile; unknown keys and wrong types raise ConfigError naming file and key."""
    name = os.environ.get("MEGAHYBRID_CLUSTER") or name or "tiny"
    path = cluster_path(name)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml")))
        raise ConfigError([f"launch.cluster: no cluster profile {path} (profiles in {CLUSTERS_DIR}: {known})"])
    data = read_yaml(path)
    fields = {f.name: f for f in dataclasses.fields(ClusterProfile)}
    problems, kwargs = [], {"name": path.stem}
    for key, value in data.items():
        where = f"{path}: {key}"
        if key not in fields or key == "name":
            valid = [k for k in fields if k != "name"]
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            problems.append(f"{where}: unknown key; {hint}")
            continue
        try:
            value = _expand_tree(value, where)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if key == "container_mounts" and isinstance(value, str):  # `${MEGAHYBRID_MOUNTS:-}`: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if key in ("container_mounts", "modules", "setup"):
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                problems.append(f"{where}: expected a list of strings, got {value!r}")
                continue
        elif key == "env":
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping of NAME: value, got {value!r}")
                continue
            value = {str(k): str(v) for k, v in value.items()}
        elif value is not None and not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
            continue
        if value == "" and fields[key].default is None:  # `${VAR:-}` with VAR unset: the field's "unset"
            value = None
        kwargs[key] = value
    if problems:
        raise ConfigError(problems)
    return ClusterProfile(**kwargs)
