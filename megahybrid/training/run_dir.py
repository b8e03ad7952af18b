"""Crash-safe checkpoint directories and the resolved config of a run directory.

A checkpoint is written into a staging directory `root/.tmp-step_XXXXXX-<tag>`, then committed: every file is
fsynced, a `COMPLETE` marker holding a manifest (relative path -> size, and sha256 of files up to 1 MiB) is
written inside, and the directory is renamed atomically to `root/step_XXXXXX`. A crash at any point leaves either
the old set of complete checkpoints or the old set plus the new one. `latest_complete` trusts a directory only if
its marker is present and every file in its manifest has the recorded size (and hash), so a directory truncated or
damaged after the fact is skipped and the previous good one is used.

Multi-rank saves (Megatron distributed checkpointing writes from every rank into one directory): rank 0 calls
`staging` and shares the path (e.g. `torch.distributed.broadcast_object_list`), every rank writes, a barrier, then
rank 0 alone calls `commit`. Only rank 0 calls `latest_complete` before the others read (it cleans up leftovers).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

MARKER = "COMPLETE"
HASH_LIMIT = 1 << 20
"""Files up to this size also get a sha256 in the manifest (metadata, small state); larger ones only a size."""
_STEP_RE = re.compile(r"^step_(\d{6,})$")
_REPLACED_RE = re.compile(r"^\.replaced-step_(\d{6,})-")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[TextIO]:
    """A text file to write `path` through, piece by piece: readers see either the old or the new content, never
    a partial file. If the body raises (or the disk fills), the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` so that readers see either the old or the new content, never a partial file."""
    with atomic_writer(path) as f:
        f.write(text)


def write_resolved_config(run_dir: Path, cfg: Any) -> Path:
    """`run_dir/config.yaml`: the fully resolved RunConfig (defaults, bases and overrides applied)."""
    from megahybrid.config.loader import dump_yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    atomic_write_text(path, dump_yaml(cfg))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def build_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {"size": bytes[, "sha256": hex]} of every file under `directory` (the marker excluded)."""
    manifest = {}
    for path in _files(directory):
        size = path.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= HASH_LIMIT:
            entry["sha256"] = _sha256(path)
        manifest[path.relative_to(directory).as_posix()] = entry
    return manifest


def verify(directory: Path) -> str | None:
    """None if `directory` is a complete checkpoint, else the reason it is not."""
    marker = Path(directory) / MARKER
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MARKER} marker"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} marker ({e})"
    for rel, entry in manifest.items():
        path = Path(directory) / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {entry['size']}"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


class CheckpointDirs:
    """Checkpoint directories `root/step_XXXXXX` with atomic commit, rotation and discovery of the newest
    complete one."""

    def __init__(self, root: Path, keep: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints: expected >= 1 (the newest checkpoint is always kept), got {keep}")
        self.root = Path(root)
        self.keep = keep

    def path_of(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    @staticmethod
    def step_of(path: Path) -> int:
        match = _STEP_RE.match(Path(path).name)
        if match is None:
            raise ValueError(f"{path}: not a checkpoint directory name (expected step_XXXXXX)")
        return int(match.group(1))

    def staging(self, step: int, tag: str | None = None) -> Path:
        """A fresh empty directory to write the checkpoint of `step` into (tag defaults to this process id)."""
        path = self.root / f".tmp-step_{step:06d}-{tag if tag is not None else os.getpid()}"
        if path.exists():
            shutil.rmtree(path)
        self._check_space(step)
        path.mkdir(parents=True)
        return path

    def _check_space(self, step: int) -> None:
        """Refuse to start a save that cannot fit: the next checkpoint is about as large as the newest one, and old
        ones are rotated out only after the new one is committed. (A save that fails part-way is ignored anyway;
        this only turns a cryptic writer error into a message.)"""
        newest = max((p for p in self._all_step_dirs() if (p / MARKER).is_file()), key=self.step_of, default=None)
        if newest is None:
            return
        need = sum(f.stat().st_size for f in _files(newest))
        free = shutil.disk_usage(self.root).free
        if free < need:
            message = (f"not enough free space in {self.root} for the checkpoint of step {step}: "
                       f"{free >> 20} MiB free, the last one ({newest.name}) took {need >> 20} MiB. "
                       "Earlier checkpoints are intact; free space and run again (resume: auto)")
            print(f"[megahybrid] {message}", file=sys.stderr, flush=True)
            raise OSError(errno.ENOSPC, message)

    def commit(self, staging: Path, step: int) -> Path:
        """Make `staging` the complete checkpoint of `step` (replacing an older one of the same step), then rotate."""
        staging = Path(staging)
        files = _files(staging)
        for path in [*files, *{p.parent for p in files}, staging]:
            _fsync(path)
        marker = {"step": step, "files": build_manifest(staging)}
        atomic_write_text(staging / MARKER, json.dumps(marker, indent=1, sort_keys=True))
        final = self.path_of(step)
        parked = None
        if final.exists():
            # Directories cannot be renamed over non-empty ones: park the old one where latest_complete can
            # still recover it if we crash before the new one is in place.
            parked = self.root / f".replaced-{final.name}-{os.getpid()}"
            os.rename(final, parked)
        os.rename(staging, final)
        _fsync(self.root)
        if parked is not None:
            shutil.rmtree(parked)
        self._rotate(newest=final)
        return final

    def _all_step_dirs(self) -> list[Path]:
        """Every `step_XXXXXX` directory, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
        return sorted(dirs, key=self.step_of)

    def _rotate(self, newest: Path) -> None:
        """Keep the newest `keep` marked checkpoints up to `newest`. Directories of later steps are an abandoned
        history (a run restarted from an earlier step): left there, the next `resume: auto` would jump into it."""
        step = self.step_of(newest)
        older = []
        for path in self._all_step_dirs():
            if self.step_of(path) > step:
                shutil.rmtree(path)
            elif path != newest and (path / MARKER).is_file():
                older.append(path)
        for path in older[:max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(path)

    def _clean_leftovers(self) -> None:
        """Remove staging dirs of crashed saves; restore a parked same-step checkpoint whose replacement never
        landed."""
        for path in self.root.iterdir():
            if not path.is_dir():
                continue
            replaced = _REPLACED_RE.match(path.name)
            if replaced:
                final = self.path_of(int(replaced.group(1)))
                if not final.exists() and verify(path) is None:
                    os.rename(path, final)
                    continue
            if path.name.startswith((".tmp-", ".replaced-")):
                # a save cut short (killed, disk full): say so, since it is why the resume starts earlier
                print(f"[megahybrid] ignoring partial checkpoint {path} (its save did not finish); removing it",
                      file=sys.stderr, flush=True)
                shutil.rmtree(path)

    def latest_complete(self) -> Path | None:
        """The newest checkpoint whose marker and manifest check out; call on rank 0 only (it cleans up)."""
        if not self.root.is_dir():
            return None
        self._clean_leftovers()
        for path in reversed(self._all_step_dirs()):
            if verify(path) is None:
                return path
        return None

    def skipped(self) -> dict[Path, str]:
        """Step directories that are not complete checkpoints, with the reason (for a log line on resume)."""
        if not self.root.is_dir():
            return {}
        return {p: reason for p in self._all_step_dirs() if (reason := verify(p)) is not None}
