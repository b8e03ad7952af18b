"""`megahybrid compare FILE`: run several methods with the same budget and seed, one after another, then write
`comparison.md` and PNG curves. Each method is a fresh `megahybrid train` process (own ranks, own engines), so
one method's failure or state never leaks into the next."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from megahybrid.config.compare import load_compare
from megahybrid.config.loader import dump_yaml


def run_comparison(config_path: str, overrides: list[str]) -> int:
    from megahybrid.training.plots import write_plots
    from megahybrid.training.report import summarize_run, write_comparison

    spec = load_compare(config_path, overrides)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for label, cfg in spec.runs.items():
        resolved = spec.out_dir / f"{label}.yaml"
        resolved.write_text(dump_yaml(cfg))
        print(f"[compare] {label}: megahybrid train {resolved}", flush=True)
        start = time.time()
        code = subprocess.call([sys.executable, "-m", "megahybrid", "train", str(resolved)])
        wall = time.time() - start
        if code != 0:
            failed.append(label)
            print(f"[compare] {label}: exited with code {code}", file=sys.stderr, flush=True)
            continue
        results.append(summarize_run(label, Path(cfg.train.run_dir), wall))
    write_plots({r.method: Path(spec.runs[r.method].train.run_dir) for r in results}, spec.out_dir / "plots")
    line = write_comparison(results, spec.out_dir / "comparison.md")
    print(line, flush=True)
    return 1 if failed else 0
