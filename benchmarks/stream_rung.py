"""The lens-drawn rung with data that never runs out: a fixed 6,000-image set against the stream, at equal steps.

ResNet-18, 3 classes (no_sub / cdm / vortex), DeepLense Model II physics with the main lens drawn
(``--preset deeplense2 --lens drawn --halo-mass 11.2,12.1``, the ``resnet18-ladder-drawn`` rung of SCIENCE.md),
the reference protocol (``jobs/resnet18_substructure_deeplense2.yaml``: AdamW 1e-3, weight decay 0.05, one-cycle,
batch 64, images divided by their maximum, flips), the same number of steps in both arms:

* ``fixed``: the train split (6,000 images) of a set of 7,500 simulated with seed 1, epoch after epoch;
* ``stream``: ``jobs/stream_substructure.yaml``, fresh images from stream seed 11 (12 for the second seed).

Both validate on that set's validation split and are tested on its test split (750 images each); each arm runs
with model seeds 0 and 1. One data worker per run (a thread for the shards, a process for the stream), one torch
thread. Results, with the CPU time each run took, go to ``benchmarks/results/stream_rung.json``; runs already
there are kept (``--force`` reruns them).

    python benchmarks/stream_rung.py                           # the comparison as committed (186 steps)
    python benchmarks/stream_rung.py --steps 4685 --arms stream --seeds 0   # the stream to 300k images
    python benchmarks/stream_rung.py --curve --steps 2400 --every 300     # test AUC against images seen
    python benchmarks/stream_rung.py --curve --steps 2400 --every 300 --curve-model smooth_residual_net

``--curve`` trains one stream run (model seed 0, stream seed 11) with a checkpoint every ``--every`` steps,
evaluates each checkpoint on the test split as it appears (``lenstrain eval --step N``), and writes the points
to ``benchmarks/results/stream_curve.json`` as they come, then plots them to ``benchmarks/stream_curve.png``
(``--plot`` only replots). Run again, it resumes the run from its last checkpoint and keeps the points it has.
Each point holds the training CPU seconds (trainer and its workers) spent by then, so a run cut short still
says what its points cost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stream_rung.json"
SET_FLAGS = ["--task", "substructure", "--preset", "deeplense2", "--lens", "drawn", "--halo-mass", "11.2,12.1",
             "--seed", "1", "--n", "7500"]
FIXED_JOB, STREAM_JOB = "jobs/resnet18_substructure_deeplense2.yaml", "jobs/stream_substructure.yaml"
STREAM_SEEDS = {0: 11, 1: 12}


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu(pid: int) -> float:
    """CPU seconds so far of a process, its reaped children and its live descendants (Linux /proc; 0 when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = sum(int(x) for x in stat[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime
    return own + sum(_tree_cpu(int(child)) for child in children)


def _run(argv: list[str], log: Path) -> float:
    """Run ``python -m ...`` with its output in ``log``; its CPU seconds (with its worker processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LENSTRAIN_NO_PROGRESS": "1"}
    cpu = _child_cpu()
    with open(log, "a") as fh:
        code = subprocess.call([sys.executable, *argv], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} exited {code}; see {log}")
    return _child_cpu() - cpu


def _curve(log: Path, every: int, steps: int) -> list[dict]:
    """(step, val/auc, val/accuracy) at each validation (every ``every`` steps and at the end), from the log."""
    out = []
    for line in log.read_text().splitlines():
        if "] validation " in line:
            values = dict(re.findall(r"(val/\w+) ([-\d.e+naif]+)", line))
            out.append({"step": min((len(out) + 1) * every, steps), "val_auc": float(values["val/auc"]),
                        "val_accuracy": float(values["val/accuracy"])})
    return out


def _save(results: dict) -> None:
    """Merge into the file as it is now (two arms may run at once, each in its own process)."""
    current = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    current = {**current, **{k: v for k, v in results.items() if k != "runs"},
               "runs": {**current.get("runs", {}), **results["runs"]}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(current, indent=1) + "\n")


CURVE, CURVE_PNG = RESULTS.with_name("stream_curve.json"), ROOT / "benchmarks" / "stream_curve.png"
CURVE_JOBS = {  # --curve-model: its stream job, and its label in the plot
    "resnet18": (STREAM_JOB, "ResNet-18, stream"),
    "smooth_residual_net": ("jobs/stream_substructure_smooth.yaml", "smooth_residual_net + smooth target, stream"),
}


def _curves() -> dict:
    """{model: its curve}; a file from before there were several curves holds ResNet-18's alone."""
    data = json.loads(CURVE.read_text()) if CURVE.is_file() else {}
    return data.get("curves", {"resnet18": data} if "points" in data else {})


def _curve_point(run_dir: Path, step: int, log: Path, train_cpu: float) -> dict:
    """Test metrics of one checkpoint, with the training CPU seconds (trainer and its workers) spent by this call
    when it was scored: an upper bound on the CPU the run took to reach it, partial runs included."""
    cpu = _run(["-m", "lenstrain", "eval", str(run_dir), "--split", "test", "--step", str(step)], log)
    metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())["metrics"]
    return {"step": step, "images_seen": step * 64, "test_auc": metrics["auc"], "test_accuracy": metrics["accuracy"],
            "eval_cpu_s": round(cpu, 1), "train_cpu_s_at_scoring": round(train_cpu, 1)}


def _complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.parent.name.removeprefix("step-")) for p in root.glob("step-*/COMPLETE")) if root.is_dir() else []


def curve(args: argparse.Namespace, shards: Path) -> None:
    """One stream run, each checkpoint scored on the test split as it appears (see the module's docstring)."""
    job = CURVE_JOBS[args.curve_model][0]
    name = f"stream-s0-curve-{args.steps}" + ("" if args.curve_model == "resnet18" else f"-{args.curve_model}")
    run_dir, log = args.root / "runs" / name, args.root / f"{name}.log"
    sets = [f"data.shards={shards}", "train.epochs=null", f"train.max_steps={args.steps}", "seed=0",
            f"train.val_every_steps={args.every}", f"checkpoint.every_steps={args.every}", "checkpoint.keep=1000",
            "data.workers=1", "log.every_steps=50", f"data.stream.seed={STREAM_SEEDS[0]}"]
    train = ["-m", "lenstrain", "train", job, "--run-dir", str(run_dir)] + [x for s in sets for x in ("--set", s)]
    curves = _curves()
    result = curves.get(args.curve_model, {})
    if result.get("command") != _command(train):
        result = curves[args.curve_model] = {"command": _command(train), "points": []}

    def save() -> None:  # merged into the file as it is now: two curves may run at once
        CURVE.write_text(json.dumps({"curves": {**_curves(), args.curve_model: result}}, indent=1) + "\n")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LENSTRAIN_NO_PROGRESS": "1"}
    start = _child_cpu()
    with open(log, "a") as fh:
        trainer = subprocess.Popen([sys.executable, *train], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    while True:
        train_cpu = _tree_cpu(trainer.pid)  # before poll: an exited trainer keeps its times until it is reaped
        done = trainer.poll() is not None
        for step in (s for s in _complete_steps(run_dir) if s not in {p["step"] for p in result["points"]}):
            result["points"].append(_curve_point(run_dir, step, log, train_cpu))
            result["points"].sort(key=lambda p: p["step"])
            save()
            print(f"step {step}: test AUC {result['points'][-1]['test_auc']:.3f}", flush=True)
        if done:
            break
        time.sleep(20)
    if trainer.returncode != 0:
        raise SystemExit(f"training exited {trainer.returncode}; see {log}")
    result["train_and_eval_cpu_s_this_call"] = round(_child_cpu() - start, 1)
    save()


def _command(train: list[str]) -> str:
    return "python " + " ".join(train).replace(str(ROOT) + "/", "")


def plot_curve() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rung = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, result in _curves().items():
        points = result["points"]
        ax.plot([p["images_seen"] for p in points], [p["test_auc"] for p in points], "o-", label=CURVE_JOBS[model][1])
    fixed = [r for r in rung.values() if r["arm"] == "fixed"]
    if fixed:
        ax.scatter([r["images_seen"] for r in fixed], [r["test_auc"] for r in fixed], marker="s", color="C3",
                   label="ResNet-18, fixed 6,000 images")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.axhline(0.70, color="C2", lw=0.8, ls=":", label="goal 0.70")
    ax.set(xlabel="training images seen", ylabel="test macro AUC (750 images)",
           title="Lens-drawn rung, 3 classes: test AUC against images seen")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(CURVE_PNG, dpi=110)
    return CURVE_PNG


def curve_table() -> str:
    """The curves as a markdown table: test macro AUC and accuracy at each checkpoint, with the CPU time."""
    lines = ["| model | step | images seen | test macro AUC | test accuracy |", "|---|---|---|---|---|"]
    for model, result in _curves().items():
        lines += [f"| {model} | {p['step']} | {p['images_seen']:,} | {p['test_auc']:.3f} | {p['test_accuracy']:.3f} |"
                  for p in result["points"]]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=186, help="training steps of each run (default 186: 2 epochs "
                        "of the fixed set, 11,904 images)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["fixed", "stream"], choices=["fixed", "stream"])
    parser.add_argument("--val-every", type=int, default=93)
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "stream-rung")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--curve", action="store_true", help="test AUC against images seen, one stream run")
    parser.add_argument("--every", type=int, default=300, help="with --curve: steps between checkpoints")
    parser.add_argument("--curve-model", default="resnet18", choices=list(CURVE_JOBS),
                        help="with --curve: which stream job (default resnet18)")
    parser.add_argument("--plot", action="store_true", help="only replot benchmarks/stream_curve.png and print "
                        "the curves as a table")
    return parser


def _rung_run(args: argparse.Namespace, shards: Path, arm: str, seed: int) -> dict:
    """Train one arm of the rung (the fixed set or the stream) for args.steps and score it on the test split."""
    name = f"{arm}-s{seed}-{args.steps}"
    run_dir, log = args.root / "runs" / name, args.root / f"{name}.log"
    subprocess.call(["rm", "-rf", str(run_dir), str(log)])
    sets = [f"data.shards={shards}", "train.epochs=null", f"train.max_steps={args.steps}", f"seed={seed}",
            f"train.val_every_steps={args.val_every}", "checkpoint.every_steps=0", "data.workers=1",
            "log.every_steps=25"]
    if arm == "stream":
        sets.append(f"data.stream.seed={STREAM_SEEDS.get(seed, 11 + seed)}")
    train = ["-m", "lenstrain", "train", FIXED_JOB if arm == "fixed" else STREAM_JOB, "--run-dir", str(run_dir)]
    for item in sets:
        train += ["--set", item]
    wall = time.perf_counter()
    cpu = _run(train, log)
    wall = time.perf_counter() - wall
    _run(["-m", "lenstrain", "eval", str(run_dir), "--split", "test", "--checkpoint", "latest"], log)
    metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())["metrics"]
    return {
        "arm": arm, "seed": seed, "stream_seed": STREAM_SEEDS.get(seed, 11 + seed) if arm == "stream" else None,
        "steps": args.steps, "images_seen": args.steps * 64,
        "distinct_images": args.steps * 64 if arm == "stream" else 6000,
        "test_auc": metrics["auc"], "test_accuracy": metrics["accuracy"], "test_images": 750,
        "val_curve": _curve(log, args.val_every, args.steps), "train_cpu_s": round(cpu, 1),
        "train_wall_s": round(wall, 1),
        "command": "python " + " ".join(train[:4] + [str(x) for x in train[4:]]).replace(str(ROOT) + "/", ""),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.plot:
        print(f"wrote {plot_curve()}\n{curve_table()}")
        return 0

    args.root.mkdir(parents=True, exist_ok=True)
    shards = args.root / "dl2-drawn"
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    results["set"] = {"command": " ".join(["python -m shards simulate", *SET_FLAGS, "--out", "DIR"]),
                      "train": 6000, "val": 750, "test": 750}
    if not (shards / "manifest.json").is_file():
        _run(["-m", "shards", "simulate", *SET_FLAGS, "--workers", "1", "--out", str(shards), "--overwrite"],
             args.root / "simulate.log")
    if args.curve:
        curve(args, shards)
        print(f"wrote {CURVE} and {plot_curve()}")
        return 0
    for arm in args.arms:
        for seed in args.seeds:
            name = f"{arm}-s{seed}-{args.steps}"
            if name in results["runs"] and not args.force:
                print(f"{name}: kept (AUC {results['runs'][name]['test_auc']:.3f})")
                continue
            results["runs"][name] = run = _rung_run(args, shards, arm, seed)
            _save(results)
            print(f"{name}: test AUC {run['test_auc']:.3f}, accuracy {run['test_accuracy']:.3f}, "
                  f"{run['train_cpu_s'] / 60:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
