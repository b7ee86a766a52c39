"""The end-to-end demo behind ``./run demo``.

Simulates a small Euclid-like halo-mass shard set, looks at it, trains ``jobs/smoke.yaml`` through the
launcher (locally by default, as run ``smoke``; on the devcluster with ``--slurm``, as its own run
``smoke-slurm``, so that it trains there even after a local demo), evaluates the best checkpoint on the test
split and compares it with predicting the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lenstrain.checkpointing.rundir import RunDir
from shards.manifest import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "data" / "shards" / "demo-halo-mass"
RUN = RunDir(ROOT / "runs" / "smoke")
SLURM_RUN = RunDir(ROOT / "runs" / "smoke-slurm")


def step(title: str, *cmd: str, check: bool = True, env: dict | None = None) -> int:
    print(f"\n==> {title}\n$ python {' '.join(cmd)}", flush=True)
    code = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env).returncode
    if check and code != 0:
        sys.exit(f"demo: step failed with exit status {code}: {title}")
    return code


def slurm_env() -> dict:
    subprocess.run([str(ROOT / "slurm" / "devcluster"), "up"], check=True)
    out = subprocess.run([str(ROOT / "slurm" / "devcluster"), "env"], capture_output=True, text=True, check=True)
    env = dict(os.environ)
    env["SLURM_CONF"] = out.stdout.strip().split("=", 1)[1].strip("'\"")
    return env


def wait_for_run(run: RunDir, env: dict, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    progress = run.progress
    while time.monotonic() < deadline:
        try:
            state = json.loads(progress.read_text()).get("state")
        except (OSError, ValueError):
            state = None
        if state in ("done", "failed"):
            return
        time.sleep(5)
        subprocess.run([sys.executable, "-m", "launcher", "status", run.root.name], cwd=ROOT, env=env)
    sys.exit("demo: the SLURM job did not finish in time; see `python -m launcher status`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slurm", action="store_true", help="submit to the local devcluster instead of --local")
    parser.add_argument("--n", type=int, default=3000, help="images to simulate")
    args = parser.parse_args(argv)

    if not (SHARDS / MANIFEST_NAME).is_file():
        step("simulate a Euclid-like halo-mass shard set", "-m", "shards", "simulate", "--task", "halo_mass",
             "--instrument", "euclid", "--n", str(args.n), "--workers", "2", "--seed", "0", "--out", str(SHARDS))
    step("inspect it (and draw a grid of images)", "-m", "shards", "inspect", str(SHARDS),
         "--grid", str(ROOT / "runs" / "demo-grid.png"))
    step("verify every shard against the manifest", "-m", "shards", "verify", str(SHARDS))

    run = SLURM_RUN if args.slurm else RUN
    if args.slurm:
        env = slurm_env()
        step("submit jobs/smoke.yaml to the devcluster", "-m", "launcher", "submit", "jobs/smoke.yaml",
             "--name", run.root.name, "--set", "resources.cluster=devcluster", "--set", "resources.partition=debug",
             env=env)
        wait_for_run(run, env)
    else:
        step("train jobs/smoke.yaml locally through the launcher", "-m", "launcher", "submit", "jobs/smoke.yaml",
             "--local")
    step("status", "-m", "launcher", "status", check=False)
    step("evaluate the best checkpoint on the test split", "-m", "lenstrain", "eval", str(run.root), "--split", "test")

    metrics = json.loads((run.eval / "test" / "metrics.json").read_text())
    r2 = metrics["metrics"]["r2"]
    print("\n==> result")
    print(f"test R^2 = {r2:.3f}  (predicting the mean scores 0; 1 is perfect)")
    print(f"plots and predictions: {run.eval / 'test'}")
    print(f"TensorBoard:           .venv/bin/tensorboard --logdir {run.root.parent}")
    if args.slurm:
        print("the devcluster is still up for you to explore (sinfo, sacct, python -m launcher status); "
              "stop it with: slurm/devcluster down")
    return 0 if r2 is not None and r2 > 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
