"""Fine-tuning measured: ResNet-18 pretrained on DeepLense Model II physics (``deeplense2``), then trained on the
realistic ``euclid`` preset, against the same euclid training from a fresh initialisation at an equal step count,
with 2 seeds each (``model.init_from``; ``jobs/resnet18_substructure_euclid_finetune.yaml``).

CPU size, the difficulty ladder's protocol (benchmarks/SCIENCE.md): 3,750 images per set (3,000 train, 375 val,
375 test), the pretraining 6 epochs (276 steps, as ``resnet18-ladder-dl2``), each euclid run 3 epochs (138 steps).
Writes ``benchmarks/results/finetune_deeplense2_euclid.json`` and prints a Markdown table.

    nice -n 10 python benchmarks/finetune.py [--work data/science] [--steps-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = {  # as benchmarks/science.py's ladder-dl2 and ladder-euclid
    "dl2": ("--task", "substructure", "--seed", "2", "--preset", "deeplense2"),
    "euclid": ("--task", "substructure", "--seed", "2", "--preset", "euclid"),
}
N = 3750


def cpu_minutes() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) / 60


def run(*args: str) -> None:
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, env={**os.environ, "LENSTRAIN_NO_PROGRESS": "1"})


def simulate(name: str, out: Path) -> None:
    if not (out / "manifest.json").is_file():
        run("-m", "shards", "simulate", *SETS[name], "--n", str(N), "--out", str(out), "--workers", "1")


def train(job: str, run_dir: Path, *sets: str) -> dict:
    if not (run_dir / "eval" / "test" / "metrics.json").is_file():
        start, cpu = time.monotonic(), cpu_minutes()
        args = [x for s in sets for x in ("--set", s)]
        run("-m", "lenstrain", "train", job, "--run-dir", str(run_dir), *args)
        run("-m", "lenstrain", "eval", str(run_dir), "--split", "test", "--checkpoint", "latest")
        (run_dir / "cost.json").write_text(json.dumps({"wall_min": (time.monotonic() - start) / 60,
                                                       "cpu_min": cpu_minutes() - cpu}))
    metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    cost = json.loads((run_dir / "cost.json").read_text())
    init = run_dir / "init.json"
    return {"run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
            "step": metrics["step"], "auc": metrics["metrics"]["auc"], "accuracy": metrics["metrics"]["accuracy"],
            "loss": metrics["metrics"]["loss"], "samples": metrics["samples"], **cost,
            **({"init": json.loads(init.read_text())["counts"]} if init.is_file() else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "science", help="data and runs (default data/science)")
    parser.add_argument("--epochs", type=float, default=3, help="epochs of each euclid run (default 3: 138 steps)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune_deeplense2_euclid.json")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    simulate("dl2", work / "ladder-dl2")
    simulate("euclid", work / "ladder-euclid")
    common = ("data.workers=1", "train.val_every_steps=0", "checkpoint.every_steps=0", "checkpoint.best_metric=null")
    pre = work / "runs" / "ft-pretrain-dl2"
    pretrain = train("jobs/resnet18_substructure_deeplense2.yaml", pre, f"data.shards={work / 'ladder-dl2'}",
                     "train.epochs=6", *common)
    rows = {"pretrain": pretrain, "scratch": [], "finetune": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        euclid = (f"data.shards={work / 'ladder-euclid'}", f"train.epochs={args.epochs:g}", f"seed={seed}", *common)
        rows["scratch"].append({"seed": seed, **train("jobs/resnet18_substructure_euclid.yaml",
                                                      work / "runs" / f"ft-scratch-s{seed}", *euclid)})
        rows["finetune"].append({"seed": seed, **train("jobs/resnet18_substructure_euclid_finetune.yaml",
                                                       work / "runs" / f"ft-finetune-s{seed}", *euclid,
                                                       f"model.init_from={pre}")})
    total = pretrain["cpu_min"] + sum(r["cpu_min"] for k in ("scratch", "finetune") for r in rows[k])
    result = {"what": __doc__.split("\n\n")[0], "protocol": {"images_per_set": N, "pretrain_epochs": 6,
                                                           "euclid_epochs": args.epochs, "model": "resnet18",
                                                           "machine": f"{os.cpu_count()} cores, nice 10"},
              **rows, "cpu_minutes_total": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| run | start | seed | steps | test AUC | test accuracy | CPU-min |\n|---|---|---|---|---|---|---|")
    print(f"| pretrain | fresh (deeplense2) | 0 | {pretrain['step']} | {pretrain['auc']:.3f} | "
          f"{pretrain['accuracy']:.3f} | {pretrain['cpu_min']:.1f} |")
    for kind, start in (("scratch", "fresh"), ("finetune", "deeplense2 weights")):
        for r in rows[kind]:
            print(f"| euclid {kind} | {start} | {r['seed']} | {r['step']} | {r['auc']:.3f} | {r['accuracy']:.3f} | "
                  f"{r['cpu_min']:.1f} |")
    print(f"\ntotal {total:.1f} CPU-minutes; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
