"""End-to-end GRPO step time: megahybrid (`megahybrid train`) vs TRL 1.16's `GRPOTrainer` on the same work.

Same model and initial weights, same prompts (our data pipeline renders and tokenizes them; the peer checks that
TRL's tokenization gives the same ids), same batch (prompts x rollouts, one optimizer step per batch), response
length, temperature 1.0, no KL, clipped surrogate with group-normalised advantages and token-mean loss, same
optimizer settings (read from our resolved config). Two shapes:

  tiny  configs/tiny/base.yaml (random-init tiny Llama, char tokenizer, builtin:arith), 64 prompts x 4 x 8 tokens
  smol  configs/smollm2/grpo.yaml (SmolLM2-135M-Instruct, gsm_symbolic), 8 prompts x 4 x 64 tokens

Ours: `megahybrid train <config> <shape overrides>` with nothing else changed (our defaults are measured as they
are), evaluation off, no periodic checkpoints, no plots; the per-step `time/*` metrics come from the run's
metrics.jsonl. The initial weights for TRL come from a `train.steps=0` run of the same config (its weights folder:
HF weights + tokenizer). TRL: `benchmarks/trl_grpo_peer.py` in its own venv (`.venv-trl/`, created here on first
use), generation with transformers on the training model, 2 torch threads, at the setting fixed in TRL_SETTINGS
(chosen by `--sweep-trl`, figures in benchmarks/results/).

Prints the median seconds a step over steps `--first-step`..`--steps` (tiny; default 5..8) and
`--smol-first-step`..`--smol-steps` (smol; default 2..3: a smol step takes minutes on a 2-core box) and each
system's split; the last line is `e2e: tiny_ratio=<TRL s/step / ours s/step> smol_ratio=<...>`.

    .venv/bin/python benchmarks/e2e_step.py [--shapes tiny,smol] [--steps 8] [--smol-steps 3] [--ours-root DIR]
                                            [--skip-trl]
    .venv/bin/python benchmarks/e2e_step.py --sweep-trl [--shapes ...]     # TRL batch-setting sweep only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"  # the CPU wheel on local disk (pip find-links), as scripts/setup_env.sh installs it

COMMON_OVERRIDES = [  # not part of a step: off so they do not pollute the figures
    "data.num_eval=0", "train.eval_every=0", "train.save_every=0",
    "logging.plots=false", "logging.tensorboard=false", "logging.progress=false",
]

SHAPES = {
    "tiny": {
        "config": "configs/tiny/base.yaml",
        "overrides": ["algorithm.name=grpo", "train.prompts_per_step=64", "rollout.n=4", "rollout.max_new_tokens=8"],
        "prompts_per_step": 64, "n": 4, "max_new_tokens": 8,
    },
    "smol": {
        "config": "configs/smollm2/grpo.yaml",
        "overrides": ["train.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=64"],
        "prompts_per_step": 8, "n": 4, "max_new_tokens": 64,
        "data": {"train": ("gsm_symbolic", 2000, 0), "eval": ("gsm_symbolic", 200, 1)},
    },
}

# TRL at its best (issue 17.3): the fastest setting of the --sweep-trl sweep that fits the 24 GiB box, one per
# shape, the same for every run (figures: benchmarks/results/e2e_trl_sweep_2026-12-02.txt). Larger micro-batches
# won at tiny; gradient checkpointing (TRL's default) and continuous batching lost.
TRL_SETTINGS = {
    "tiny": {"per_device_train_batch_size": 256, "gradient_accumulation_steps": 1, "generation": "generate",
             "gradient_checkpointing": False},
    # issue 17.3 measured 4 micro-batches of 8 at 34 s a step against 44-51 s for one of 32 on this box; the
    # sweep here (results/e2e_trl_sweep_2026-12-02.txt) ran out of time before 8 x 4, so this is TRL at its best
    "smol": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "generation": "generate",
             "gradient_checkpointing": False},
}

STEP_KEYS = {
    "ours": ("time/step_s", "time/rollout_s", "time/old_logp_s", "time/train_s", "time/sync_s"),
    "trl": ("time/step_s", "time/rollout_s", "time/generate_s", "time/train_s"),
}


# ---------------------------------------------------------------- pure parts (tests/unit/test_e2e_benchmark.py)
def read_step_records(path: str | os.PathLike) -> dict[int, dict]:
    """Per-step records of a metrics JSONL (ours or the peer's): {step: record}, lines without `time/step_s`
    (evaluation lines, say) skipped, a repeated step (a resumed run) keeping its last line."""
    out: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if "step" in rec and "time/step_s" in rec:
                out[int(rec["step"])] = rec
    return out


def median_over_steps(records: dict[int, dict], first: int, last: int, keys) -> dict[str, float]:
    """Median of each key over steps first..last (inclusive; a key missing from a step counts as absent)."""
    chosen = [records[s] for s in sorted(records) if first <= s <= last]
    if not chosen:
        raise ValueError(f"no steps in {first}..{last} (have {sorted(records)})")
    out = {"steps": float(len(chosen))}
    for k in keys:
        vals = [float(r[k]) for r in chosen if k in r]
        if vals:
            out[k] = statistics.median(vals)
    return out


def fmt_ratio(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3f}"


def final_line(tiny_ratio: float | None, smol_ratio: float | None) -> str:
    """The benchmark's last line; a ratio not measured (shape or TRL skipped) prints as nan."""
    return f"e2e: tiny_ratio={fmt_ratio(tiny_ratio)} smol_ratio={fmt_ratio(smol_ratio)}"


def split_line(name: str, med: dict[str, float]) -> str:
    parts = [f"{k.removeprefix('time/')}={med[k]:.3f}" for k in med if k.startswith("time/")]
    return f"  {name:5s} s/step {med['time/step_s']:.3f}  (" + " ".join(parts) + f"; {int(med['steps'])} steps)"


def trl_setting_str(s: dict) -> str:
    return (f"per_device_train_batch_size={s['per_device_train_batch_size']} "
            f"gradient_accumulation_steps={s['gradient_accumulation_steps']} "
            f"gradient_checkpointing={s['gradient_checkpointing']} generation={s['generation']}")


# ---------------------------------------------------------------- running things
def log(msg: str) -> None:
    print(msg, flush=True)


def ours_env(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_logged(cmd: list[str], log_path: Path, **kw) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"e2e_step: command failed (rc={rc}): {' '.join(cmd)}\n  log {log_path}:\n    "
                         + "\n    ".join(tail))


def git_commit(root: Path) -> str:
    try:
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shape_overrides(shape: str, work: Path) -> list[str]:
    spec = SHAPES[shape]
    over = list(spec["overrides"])
    for split, (task, num, seed) in spec.get("data", {}).items():
        path = work / "data" / f"{task}_{split}_{num}_s{seed}.jsonl"
        over.append(f"data.{split}={path}")
    return over + COMMON_OVERRIDES


def make_data(shape: str, work: Path, root: Path) -> None:
    """gsm_symbolic files as configs/smollm2/base.yaml's comments make them (written locally by reasoning-gym)."""
    for split, (task, num, seed) in SHAPES[shape].get("data", {}).items():
        path = work / "data" / f"{task}_{split}_{num}_s{seed}.jsonl"
        if not path.exists():
            log(f"[e2e] making {path.name}")
            run_logged([sys.executable, "-m", "megahybrid", "data", "make", task, "--num", str(num), "--seed",
                        str(seed), "--out", str(path)], work / "logs" / f"data_{path.stem}.log",
                       cwd=root, env=ours_env(root))


def run_ours(shape: str, work: Path, root: Path, steps: int, run_name: str = "ours") -> Path:
    run_dir = work / shape / run_name
    cmd = [sys.executable, "-m", "megahybrid", "train", str(root / SHAPES[shape]["config"]),
           *shape_overrides(shape, work), f"train.steps={steps}", f"train.run_dir={run_dir}", "--fresh"]
    log(f"[e2e] {shape}: ours: megahybrid train {SHAPES[shape]['config']} "
        + " ".join(SHAPES[shape]["overrides"]) + f" train.steps={steps} (+ eval/checkpoints/plots off)")
    t0 = time.perf_counter()
    run_logged(cmd, work / "logs" / f"{shape}_{run_name}.log", cwd=root, env=ours_env(root))
    log(f"[e2e] {shape}: ours: {steps} steps, wall {time.perf_counter() - t0:.0f} s")
    return run_dir


def initial_weights(shape: str, work: Path, root: Path) -> Path:
    """HF folder (weights + tokenizer) of the initial policy: the weights folder of a `train.steps=0` run of
    the same config (cached per megahybrid commit)."""
    run_dir = work / shape / f"init_{git_commit(root)}"
    weights = run_dir / "weights"
    if not (weights / "config.json").exists() or not list(weights.glob("*.safetensors")):
        log(f"[e2e] {shape}: writing the initial weights (train.steps=0 run)")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_ours(shape, work, root, 0, run_name=run_dir.name)
    return weights


EXPORT_PROMPTS = r"""
import json, sys
from megahybrid.config.loader import load_config
from megahybrid.training.entry import prepare_data
from megahybrid.data.tokenize import prompt_token_ids
from transformers import AutoTokenizer
config, weights, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cfg = load_config(config, overrides)
tok = AutoTokenizer.from_pretrained(weights)
train, _ = prepare_data(cfg, tok)
with open(out, "w") as f:
    for ex in train:
        text, ids = prompt_token_ids(tok, ex.prompt, cfg.data.template)
        f.write(json.dumps({"prompt": text, "answer": ex.answer, "prompt_ids": ids}) + "\n")
print(len(train))
"""


def export_prompts(shape: str, work: Path, root: Path, weights: Path) -> Path:
    """Our training prompts (rendered and filtered by our data pipeline, with our token ids) as JSONL."""
    out = work / shape / f"prompts_{git_commit(root)}.jsonl"
    if not out.exists():
        run_logged([sys.executable, "-c", EXPORT_PROMPTS, str(root / SHAPES[shape]["config"]), str(weights),
                    str(out), *shape_overrides(shape, work)], work / "logs" / f"{shape}_prompts.log",
                   cwd=root, env=ours_env(root))
    return out


def resolved_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def ensure_trl_venv(venv: Path) -> Path:
    """`.venv-trl/`: TRL 1.16 + the local CPU torch wheel, apart from the project venv (see benchmarks/README)."""
    py = venv / "bin" / "python"
    check = f"import trl, torch; assert trl.__version__ == '{TRL_VERSION}', trl.__version__"
    if py.exists() and subprocess.call([str(py), "-c", check], stderr=subprocess.DEVNULL) == 0:
        return py
    log(f"[e2e] creating {venv} (torch {TORCH_VERSION} CPU wheel + trl {TRL_VERSION}; a few minutes)")
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
    if not py.exists():
        subprocess.check_call([base, "-m", "venv", str(venv)])
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.check_call(pip + ["--upgrade", "pip", "setuptools", "wheel"])
    subprocess.check_call(pip + [f"torch=={TORCH_VERSION}"])  # first, so nothing pulls a CUDA build
    subprocess.check_call(pip + [f"trl=={TRL_VERSION}"])
    subprocess.check_call([str(py), "-c", check])
    return py


def run_trl(shape: str, work: Path, trl_py: Path, weights: Path, prompts: Path, cfg: dict, steps: int,
            setting: dict, tag: str) -> Path:
    spec = SHAPES[shape]
    algo, optim = cfg["algorithm"], cfg["optim"]
    if algo.get("kl_coef", 0.0) != 0.0 or algo.get("loss_agg") != "token_mean" or not algo.get("clip", True):
        raise SystemExit(f"e2e_step: {shape}: our GRPO settings changed ({algo}); map them to TRL's here")
    out = work / shape / f"trl_{tag}.jsonl"
    cmd = [str(trl_py), str(REPO / "benchmarks" / "trl_grpo_peer.py"), "--model", str(weights),
           "--prompts", str(prompts), "--out", str(out), "--work-dir", str(work / shape / "trl_out"),
           "--prompts-per-step", str(spec["prompts_per_step"]), "--n", str(spec["n"]),
           "--max-new-tokens", str(spec["max_new_tokens"]), "--steps", str(steps),
           "--per-device-train-batch-size", str(setting["per_device_train_batch_size"]),
           "--gradient-accumulation-steps", str(setting["gradient_accumulation_steps"]),
           "--generation", setting["generation"],
           "--gradient-checkpointing", "true" if setting["gradient_checkpointing"] else "false",
           "--lr", str(optim["lr"]), "--warmup-steps", str(optim["warmup_steps"]),
           "--weight-decay", str(optim["weight_decay"]), "--max-grad-norm", str(optim["clip_grad"]),
           "--adam-beta1", str(optim["adam_beta1"]), "--adam-beta2", str(optim["adam_beta2"]),
           "--adam-eps", str(optim["adam_eps"]),
           "--epsilon-low", str(algo["clip_ratio_low"]), "--epsilon-high", str(algo["clip_ratio_high"]),
           "--scale-rewards", "group" if algo.get("norm_adv_by_std", True) else "none",
           "--loss-type", "dapo",  # token-mean over the global batch = our loss_agg token_mean
           "--temperature", str(cfg["rollout"]["temperature"]), "--seed", str(cfg["train"]["seed"]),
           "--threads", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    log(f"[e2e] {shape}: trl: {trl_setting_str(setting)}, {steps} steps")
    t0 = time.perf_counter()
    run_logged(cmd, work / "logs" / f"{shape}_trl_{tag}.log", env=env)
    log(f"[e2e] {shape}: trl: wall {time.perf_counter() - t0:.0f} s")
    return out


def sweep_candidates(shape: str) -> list[dict]:
    total = SHAPES[shape]["prompts_per_step"] * SHAPES[shape]["n"]
    out = []
    pdbs = total
    while pdbs >= max(4, total // 8):
        out.append({"per_device_train_batch_size": pdbs, "gradient_accumulation_steps": total // pdbs,
                    "gradient_checkpointing": False, "generation": "generate"})
        pdbs //= 2
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,smol", help="comma-separated: tiny, smol")
    ap.add_argument("--steps", type=int, default=8, help="steps a run (N); the median is over steps first..N")
    ap.add_argument("--first-step", type=int, default=5, help="first step of the median (earlier: warm-up)")
    ap.add_argument("--smol-steps", type=int, default=3,
                    help="N for the smol shape (its steps take minutes on a 2-core box: see benchmarks/README)")
    ap.add_argument("--smol-first-step", type=int, default=2, help="first step of the smol median")
    ap.add_argument("--ours-root", default=str(REPO), help="megahybrid checkout to measure (default: this one)")
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "e2e_step"))
    ap.add_argument("--trl-venv", default=str(REPO / ".venv-trl"))
    ap.add_argument("--skip-trl", "--only-ours", dest="skip_trl", action="store_true", help="measure ours only")
    ap.add_argument("--skip-ours", "--only-trl", dest="skip_ours", action="store_true", help="measure TRL only")
    ap.add_argument("--sweep-trl", action="store_true",
                    help="TRL only: each batch setting (and continuous batching at the best one) for --steps steps")
    ap.add_argument("--sweep-batches", default="",
                    help="--sweep-trl: per_device_train_batch_size values to try (default: all from the whole "
                         "batch down to 1/8 of it, halving)")
    ap.add_argument("--sweep-extra", default="gc,cb",
                    help="--sweep-trl: also try, at the fastest batch setting, gradient checkpointing on (gc; TRL's "
                         "default) and transformers continuous batching (cb; ~11 GiB RSS at tiny)")
    args = ap.parse_args(argv)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r} (tiny, smol)")
    steps_of = {s: (args.first_step, args.steps) for s in SHAPES}
    steps_of["smol"] = (args.smol_first_step, args.smol_steps)
    for s in shapes:
        if steps_of[s][1] < steps_of[s][0]:
            ap.error(f"{s}: steps (N={steps_of[s][1]}) must be >= the first step of the median ({steps_of[s][0]})")
    root, work = Path(args.ours_root).resolve(), Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"[e2e] ours: megahybrid at {root} (commit {git_commit(root)}); median over steps "
        + ", ".join(f"{s} {steps_of[s][0]}..{steps_of[s][1]}" for s in shapes) + "; "
        f"host {os.cpu_count()} CPUs, load avg {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    trl_py = None if (args.skip_trl and not args.sweep_trl) else ensure_trl_venv(Path(args.trl_venv))

    ratios: dict[str, float | None] = {"tiny": None, "smol": None}
    for shape in shapes:
        make_data(shape, work, root)
        first, last = steps_of[shape]
        meds = {}
        if not args.skip_ours and not args.sweep_trl:
            run_dir = run_ours(shape, work, root, last)
            meds["ours"] = median_over_steps(read_step_records(run_dir / "metrics.jsonl"), first, last,
                                             STEP_KEYS["ours"])
        if trl_py is not None:
            weights = initial_weights(shape, work, root)
            prompts = export_prompts(shape, work, root, weights)
            cfg = resolved_config(weights.parent)
            if args.sweep_trl:
                sweep(shape, work, trl_py, weights, prompts, cfg, args, first, last)
                continue
            setting = TRL_SETTINGS[shape]
            out = run_trl(shape, work, trl_py, weights, prompts, cfg, last, setting, "run")
            recs = read_step_records(out)
            meds["trl"] = median_over_steps(recs, first, last, STEP_KEYS["trl"])
            meds["trl"]["rss"] = max(r.get("mem/max_rss_gib", 0.0) for r in recs.values())
        if not meds:
            continue
        log(f"{shape}: {SHAPES[shape]['prompts_per_step']} prompts x {SHAPES[shape]['n']} rollouts x "
            f"{SHAPES[shape]['max_new_tokens']} new tokens; median over steps {first}..{last}")
        for name, med in meds.items():
            log(split_line(name, med))
        if "trl" in meds:
            log(f"  trl setting: {trl_setting_str(TRL_SETTINGS[shape])}; 2 torch threads; "
                f"max RSS {meds['trl']['rss']:.2f} GiB")
        if "ours" in meds and "trl" in meds:
            ratios[shape] = meds["trl"]["time/step_s"] / meds["ours"]["time/step_s"]
            log(f"  {shape}_ratio (TRL s/step / ours s/step) = {fmt_ratio(ratios[shape])}")
    if not args.sweep_trl:
        log(final_line(ratios["tiny"], ratios["smol"]))
    return 0


def sweep(shape: str, work: Path, trl_py: Path, weights: Path, prompts: Path, cfg: dict, args, first: int,
          last: int) -> None:
    """TRL's batch settings at one shape (gradient checkpointing off): median s/step over steps first..N of each,
    then `--sweep-extra` at the fastest. Prints one line per setting and the fastest."""
    rows = []

    def one(setting: dict) -> None:
        tag = f"sweep_b{setting['per_device_train_batch_size']}_g{setting['gradient_accumulation_steps']}_" \
              f"gc{int(setting['gradient_checkpointing'])}_{setting['generation']}"
        try:
            recs = read_step_records(run_trl(shape, work, trl_py, weights, prompts, cfg, last, setting, tag))
            med = median_over_steps(recs, first, last, STEP_KEYS["trl"])
            med["rss"] = max(r.get("mem/max_rss_gib", 0.0) for r in recs.values())
        except SystemExit as e:  # a setting that fails (out of memory, unsupported) is a sweep result too
            log(f"[e2e] {shape}: {trl_setting_str(setting)} failed: {str(e).splitlines()[0]}")
            med = None
        rows.append((setting, med))
        if med:
            log(f"sweep {shape}: {trl_setting_str(setting)}: " + split_line("trl", med).strip()
                + f"  max RSS {med['rss']:.2f} GiB")

    wanted = {int(b) for b in args.sweep_batches.split(",") if b.strip()}
    for setting in sweep_candidates(shape):
        if not wanted or setting["per_device_train_batch_size"] in wanted:
            one(setting)
    done = [(s, m) for s, m in rows if m]
    if done:
        best = min(done, key=lambda sm: sm[1]["time/step_s"])[0]
        if "gc" in args.sweep_extra:
            one(dict(best, gradient_checkpointing=True))  # TRL's default
        if "cb" in args.sweep_extra:
            one(dict(best, generation="continuous_batching"))
        done = [(s, m) for s, m in rows if m]
        best = min(done, key=lambda sm: sm[1]["time/step_s"])[0]
        log(f"sweep {shape}: fastest: {trl_setting_str(best)}")


if __name__ == "__main__":
    sys.exit(main())
