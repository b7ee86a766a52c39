"""The science experiments, run as the jobs in ``jobs/``, with their results written to benchmarks/SCIENCE.md.

One command runs them all (CPU-sized by default; ``--full`` for GPU sizes)::

    python benchmarks/science.py                      # CPU sizes: data/science, runs/science
    python benchmarks/science.py --only zoo-resnet18  # one experiment
    python benchmarks/science.py --full               # the GPU sizes
    python benchmarks/science.py --report             # rewrite SCIENCE.md from the results already there

Each experiment simulates its data set (``python -m shards simulate``; reused when it is already there with
the same arguments), trains a job from ``jobs/`` (``python -m lenstrain train``, with ``--set`` overrides for
the data set and the size), evaluates it (``python -m lenstrain eval``) and stores what the table needs in
``<run>/science.json``: test metrics, parameters, steps, wall and CPU time, and the commands. SCIENCE.md is
regenerated between its ``science:begin`` and ``science:end`` markers; the text around them is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "SCIENCE.md"
RESULTS = ROOT / "benchmarks" / "results"  # the committed result files SCIENCE.md is generated from
sys.path.insert(0, str(ROOT))  # the small-CNN ladder reuses tests/test_learnability.py
BEGIN, END = "<!-- science:begin -->", "<!-- science:end -->"


@dataclass(frozen=True)
class DataSet:
    args: tuple[str, ...]  # python -m shards simulate arguments, without --n and --out
    n: int  # CPU size
    n_full: int


@dataclass(frozen=True)
class Experiment:
    name: str
    table: str
    job: str
    data: str  # a key of DATA
    sets: tuple[str, ...] = ()  # --set overrides at CPU size
    sets_full: tuple[str, ...] = ()
    split: str = "test"
    cpu: bool = True  # run at CPU size (False: only with --full)
    note: str = ""
    seeds: tuple[int, ...] = (0, 1)  # every row of a table is a mean over these seeds


_SUB = ("--task", "substructure", "--seed", "2")
_DRAWN = ("--lens", "drawn", "--halo-mass", "11.2,12.1")
DATA: dict[str, DataSet] = {
    "deeplense2": DataSet(("--task", "substructure", "--seed", "1", "--preset", "deeplense2"), 7500, 33750),
    "euclid": DataSet(("--task", "substructure", "--seed", "1", "--preset", "euclid"), 7500, 33750),
    "ladder-dl2": DataSet((*_SUB, "--preset", "deeplense2"), 3750, 33750),
    "ladder-drawn": DataSet((*_SUB, "--preset", "deeplense2", *_DRAWN), 3750, 33750),
    "ladder-faint": DataSet(
        (*_SUB, "--preset", "deeplense2", *_DRAWN, "--source-mag", "22.5,24.5"), 3750, 33750
    ),
    "ladder-euclid": DataSet((*_SUB, "--preset", "euclid"), 3750, 33750),
    # The realistic halo-mass task with the lens galaxy's light (the default of halo_mass on euclid).
    "halo-euclid": DataSet(("--task", "halo_mass", "--seed", "3", "--preset", "euclid"), 10000, 50000),
    **{
        f"axion-dl{m}": DataSet(
            ("--task", "axion_mass", "--seed", "4", "--preset", f"deeplense{m}", "--fidelity", "replica"),
            10000,
            30000,
        )
        for m in (1, 2, 3)
    },
    "fsub-euclid": DataSet(("--task", "subhalo_fraction", "--seed", "5", "--preset", "euclid"), 10000, 30000),
    **{
        f"replica-dl{m}": DataSet(
            ("--task", "substructure", "--seed", "1", "--preset", f"deeplense{m}", "--fidelity", "replica"),
            7500,
            90000,
        )
        for m in (1, 2, 3)
    },
}

# The regression zoo and the methods on ResNet-18: one protocol (MSE, Adam, cosine) for every model, each from
# its own halo-mass job in jobs/ (the methods: jobs/resnet18_halo_mass.yaml), and on ResNet-18
# one change to that protocol at a time. CPU size: 2 epochs of the 8,000 halo-euclid training images.
def _zoo_sets(full: bool, *changes: str) -> tuple[str, ...]:
    protocol = {
        "data.workers": "8" if full else "1",
        "data.batch_size": "64",
        "train.epochs": "10" if full else "2",
        "train.precision": "bf16",
        "train.loss": "mse",
        "optim.name": "adam",
        "optim.lr": "1e-3",
        "optim.weight_decay": "1e-5",
        "schedule.name": "cosine",
        "schedule.warmup_steps": "500" if full else "30",
        "data.normalize": "asinh",
        "train.val_every_steps": "0",
        "checkpoint.every_steps": "0",
        "checkpoint.best_metric": "null",
    }
    half_epoch = "500" if full else "62"  # steps
    protocol.update(change.format(half_epoch=half_epoch).split("=", 1) for change in changes)
    return tuple(f"{key}={value}" for key, value in protocol.items())


ZOO_MODELS = {  # model: (job, extra --set overrides)
    "mresunet": ("mresunet_halo_mass", ()),
    "attention_unet": ("attention_unet_halo_mass", ()),
    "residual_attention_56": ("residual_attention_halo_mass", ()),
    "resnet18": ("resnet18_halo_mass", ()),
    "resnet34": ("resnet34_halo_mass", ()),
    "resnet50": ("resnet50_halo_mass", ()),
    "alternet_18": ("alternet18_halo_mass", ()),
    "xresnet_alternet_18": ("xresnet_alternet18_halo_mass", ()),
    "efficientnetv2_s": ("efficientnetv2_halo_mass", ()),
}
ZOO = [
    Experiment(
        f"zoo-{model}",
        "zoo",
        f"jobs/{job}.yaml",
        "halo-euclid",
        _zoo_sets(False, *extra),
        _zoo_sets(True, *extra),
        note=f"the job's model set to {model}" if extra else "",
    )
    for model, (job, extra) in ZOO_MODELS.items()
]
METHOD_CHANGES = {  # name: (changes to the zoo protocol, note)
    "huber": (("train.loss=huber", "train.huber_delta=0.1"), "Huber loss, delta 0.1 of the scaled target"),
    "radam": (("optim.name=radam",), "RAdam"),
    "lion": (("optim.name=lion", "optim.lr=1e-4"), "Lion at 1e-4 (a tenth of Adam's rate, as its authors advise)"),
    "onecycle": (("schedule.name=onecycle",), "one-cycle (peak 1e-3, 30% rising) instead of cosine"),
    "plateau": (
        ("schedule.name=plateau", "schedule.patience=1", "train.val_every_steps={half_epoch}"),
        "plateau (patience 1): halve the rate after 2 validations in a row (every half epoch) with no lower val loss",
    ),
}
METHODS = [
    Experiment(
        f"methods-{name}",
        "methods",
        "jobs/resnet18_halo_mass.yaml",
        "halo-euclid",
        _zoo_sets(False, *changes),
        _zoo_sets(True, *changes),
        note=note,
    )
    for name, (changes, note) in METHOD_CHANGES.items()
]


_LADDER = ("train.epochs=6", "train.val_every_steps=0", "checkpoint.every_steps=0")
_FULL = ("data.batch_size=128", "data.workers=8", "train.epochs=30", "train.val_every_steps=0")
_HALO_SETS = (
    "data.workers=1",
    "train.val_every_steps=0",
    "checkpoint.every_steps=0",
    "checkpoint.best_metric=null",
)
# Published figures on DeepLense's own sets, set beside ours (see SCIENCE.md for how the budgets differ).
DEEPLENSE_AXION_MAE = {1: (0.285, 0.274), 2: (0.216, 0.221), 3: (0.133, 0.126)}  # dex: ResNet-34, best
DEEPLENSE_3CLASS = {
    1: "CvT accuracy 91.5%",
    2: "CvT accuracy 99.4%, ResNet-18 micro-F1 0.91",
    3: "CvT accuracy 99.0%",
}
_HALO_BEST = (
    *_HALO_SETS,
    "optim.name=adamw",
    "optim.lr=1e-3",
    "optim.weight_decay=0.05",
    "schedule.name=onecycle",
    "train.epochs=4",
)
EXPERIMENTS: list[Experiment] = [
    Experiment(
        "resnet18-deeplense2",
        "must",
        "jobs/resnet18_substructure_deeplense2.yaml",
        "deeplense2",
        sets_full=_FULL,
    ),
    Experiment(
        "alternet18-deeplense2",
        "must",
        "jobs/alternet18_substructure_deeplense2.yaml",
        "deeplense2",
        sets_full=_FULL,
    ),
    Experiment(
        "resnet18-euclid", "must", "jobs/resnet18_substructure_euclid.yaml", "euclid", sets_full=_FULL
    ),
    *(
        Experiment(
            f"resnet18-{rung}", "ladder", "jobs/resnet18_substructure_deeplense2.yaml", rung, _LADDER, _FULL
        )
        for rung in ("ladder-dl2", "ladder-drawn", "ladder-faint", "ladder-euclid")
    ),
    Experiment(
        "resnet18-halo-euclid",
        "halo",
        "jobs/resnet18_halo_mass.yaml",
        "halo-euclid",
        (*_HALO_BEST, "data.normalize=asinh"),
        note="AdamW 1e-3, one-cycle, 4 epochs, asinh pixels",
    ),
    Experiment(
        "resnet18-halo-euclid-global",
        "halo",
        "jobs/resnet18_halo_mass.yaml",
        "halo-euclid",
        _HALO_BEST,
        note="the same with the job's global pixel normalisation (mean and std): the lens light's range swamps the ring",
        seeds=(0,),
    ),
    *(
        Experiment(
            f"axion-dl{m}",
            "axion",
            f"jobs/axion_mass_deeplense{m}.yaml",
            f"axion-dl{m}",
            ("train.epochs=4", "train.val_every_steps=0", "checkpoint.every_steps=0", "checkpoint.best_metric=null"),
            ("data.workers=8", "train.epochs=30", "data.batch_size=128"),
            cpu=m != 1,
            note=f"DeepLense Model {'I' * m}: ResNet-34 {DEEPLENSE_AXION_MAE[m][0]}, best {DEEPLENSE_AXION_MAE[m][1]}",
        )
        for m in (1, 2, 3)
    ),
    Experiment(
        "fsub-euclid",
        "fsub",
        "jobs/subhalo_fraction_euclid.yaml",
        "fsub-euclid",
        ("train.epochs=4", "train.val_every_steps=0", "checkpoint.every_steps=0", "checkpoint.best_metric=null"),
        ("data.workers=8", "train.epochs=30", "data.batch_size=128"),
    ),
    *(
        Experiment(
            f"{model}-replica-dl{m}",
            "replica",
            f"jobs/{model}_substructure_deeplense2.yaml",
            f"replica-dl{m}",
            ("train.epochs=4", "train.val_every_steps=0", "checkpoint.every_steps=0", "checkpoint.best_metric=null"),
            _FULL,
            cpu=m != 1,
            note=f"DeepLense Model {'I' * m}: " + DEEPLENSE_3CLASS[m],
        )
        for m in (1, 2, 3)
        for model in ("resnet18", "alternet18")
    ),
    *ZOO,
    *METHODS,
]

TABLES = {
    "must": "Three classes (no_sub / cdm / vortex), 6,000 training images, 8 epochs: deeplense2 and realistic euclid",
    "ladder": "The difficulty ladder: ResNet-18, 3,000 training images, 6 epochs, from DeepLense physics to realistic",
    "halo": "Halo-mass regression on the realistic `euclid` preset with lens light (drawn redshifts, 0.2 dex "
    "lensing-mass scatter), 8,000 training images",
    "zoo": "The regression zoo on the halo-euclid set: MSE, Adam 1e-3 (weight decay 1e-5), cosine after 30 "
    "warm-up steps, batch 64, bf16, asinh pixels, 2 epochs (250 steps; `--full`: 10 epochs of 40,000 images)",
    "methods": "Methods on ResNet-18: the zoo's protocol with one change at a time (the first row is the zoo's)",
    "axion": "Axion-mass regression on DeepLense replicas (vortex class, log10 m_a in [-24, -22]), 8,000 "
    "training images, 4 epochs; test MAE in dex beside DeepLense's published figures",
    "fsub": "Subhalo mass fraction on realistic `euclid` (cdm class, 1-5%), 8,000 training images, 4 epochs",
    "replica": "Three classes on DeepLense replicas (`--fidelity replica`), 6,000 training images, 4 epochs",
}
TABLE_BASELINE = {"methods": "zoo-resnet18"}  # a row of another table, repeated first in this one


# ------------------------------------------------------------------------------------------ running
def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        code = subprocess.call(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LENSTRAIN_NO_PROGRESS": "1"},
        )
    if code != 0:
        raise SystemExit(f"failed ({code}): {shlex.join(cmd)}; see {log}")


def ensure_data(name: str, root: Path, full: bool, workers: int, log: Path) -> tuple[Path, list[str]]:
    spec = DATA[name]
    out = root / name
    n = spec.n_full if full else spec.n
    cmd = _python(
        "-m", "shards", "simulate", *spec.args, "--n", str(n), "--out", str(out), "--workers", str(workers)
    )
    stamp = out / "science-args.json"
    wanted = {"args": list(spec.args), "n": n}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        _run([*cmd, "--overwrite"], log)
        stamp.write_text(json.dumps(wanted) + "\n")
    return out, cmd


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_experiment(exp: Experiment, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate ``exp`` with ``seed``; its result goes to benchmarks/results/NAME-sSEED.json."""
    name = f"{exp.name}-s{seed}"
    run_dir = args.runs / name
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = args.runs / f"{name}.log"
    data, sim_cmd = ensure_data(exp.data, args.data, args.full, args.workers, log)
    sets = exp.sets_full if args.full else exp.sets
    train = _python(
        "-m",
        "lenstrain",
        "train",
        exp.job,
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.shards={data}",
        "--set",
        f"seed={seed}",
        *(x for s in sets for x in ("--set", s)),
    )
    evaluate = _python(
        "-m", "lenstrain", "eval", str(run_dir), "--split", exp.split, "--checkpoint", "latest"
    )
    if run_dir.exists():
        subprocess.call(["rm", "-rf", str(run_dir)])
    wall, cpu = time.perf_counter(), _child_cpu()
    _run(train, log)
    wall, cpu = time.perf_counter() - wall, _child_cpu() - cpu
    _run(evaluate, log)
    metrics = json.loads((run_dir / "eval" / exp.split / "metrics.json").read_text())
    progress = json.loads((run_dir / "progress.json").read_text())
    found = re.findall(r"([\d,]+) parameters", log.read_text())
    result = {
        "experiment": exp.name,
        "seed": seed,
        "table": exp.table,
        "job": exp.job,
        "data": exp.data,
        "note": exp.note,
        "split": exp.split,
        "samples": metrics["samples"],
        "model": metrics["model"],
        "metrics": metrics["metrics"],
        "steps": progress.get("step"),
        "parameters": int(found[-1].replace(",", "")) if found else None,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "full": args.full,
        "commands": [shlex.join(c[1:]).replace(str(ROOT) + "/", "") for c in (sim_cmd, train, evaluate)],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ------------------------------------------------------------------------------------------ oracle ladder
RUNGS = {  # preset and knobs of each rung, as the simulate options of the ladder's data sets
    "deeplense2": ("deeplense2", {}),
    "deeplense2, lens drawn": ("deeplense2", {"lens": "drawn", "halo_mass": (11.2, 12.1)}),
    "deeplense2, lens drawn, source 22.5-24.5 mag": (
        "deeplense2",
        {"lens": "drawn", "halo_mass": (11.2, 12.1), "source_mag": (22.5, 24.5)},
    ),
    "euclid (realistic)": ("euclid", {}),
    "deeplense1": ("deeplense1", {}),
    "deeplense3": ("deeplense3", {}),
}


def _auc(pos: list[float], neg: list[float]) -> float:
    import numpy as np

    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


def oracle_ladder(per_class: int) -> list[dict]:
    """The AUC of an oracle that knows each image's smooth lens: its reduced chi^2 against that lens, as the
    score of cdm (or vortex) against no_sub. An upper bound for any model, measured without training."""
    import numpy as np

    from shards.simulate import physics as P
    from shards.simulate.cli import plan

    rows = []
    for rung, (preset, knobs) in RUNGS.items():
        config = plan("substructure", 3 * per_class, preset=preset, physics=knobs, seed=7)
        chi2: dict[str, list[float]] = {c: [] for c in config.classes}
        for i in range(3 * per_class):
            p = P.draw_params(config, i)
            smooth = P.render_clean(config, P.smooth_twin(p))
            sigma = P.noise_sigma(smooth, config.instrument, p["exposure"])
            chi2[p["substructure_name"]].append(
                float(np.mean(((P.render(config, p)[0] - smooth) / sigma) ** 2))
            )
        rows.append(
            {
                "rung": rung,
                "cdm": _auc(chi2["cdm"], chi2["no_sub"]),
                "vortex": _auc(chi2["vortex"], chi2["no_sub"]),
                "median_chi2": {c: float(np.median(v)) for c, v in chi2.items()},
                "per_class": per_class,
            }
        )
    return rows


def small_cnn_ladder(positives: tuple[str, ...], budget: dict | None = None) -> list[dict]:
    """Test AUC of the learnability test's small CNN (tests/test_learnability.py), trained per rung on
    no_sub and each of ``positives`` in turn with the test's budget (training images, epochs; ``budget``
    overrides it) and tested on the test's number of new images."""
    import numpy as np
    import torch

    from shards.simulate import physics as P
    from shards.simulate.cli import plan
    from tests import test_learnability as T

    torch.set_num_threads(1)
    budget, n_test, rows = budget or T.BUDGET, T.N_TEST, []
    for rung, (preset, knobs) in RUNGS.items():
        if preset in ("deeplense1", "deeplense3"):  # the ladder proper: deeplense2 down to euclid
            continue
        row = {"rung": rung, "n_test": n_test, "budget": {c: list(budget[c]) for c in positives}}
        for positive in positives:
            n_train, epochs = budget[positive]
            config = plan("substructure", 3 * (n_train + n_test), preset=preset, physics=knobs, seed=0)
            sim, offset = P.Simulator(config), config.classes.index(positive)
            idx = [3 * (k // 2) + (0 if k % 2 == 0 else offset) for k in range(n_train + n_test)]
            x = np.stack([sim(i)[0] for i in idx])
            x /= x.max(axis=(1, 2, 3), keepdims=True)  # as per_image_max
            y = np.asarray([k % 2 for k in range(len(idx))], dtype=np.float32)
            torch.manual_seed(0)
            model = T._small_cnn()
            T._train(model, x[:n_train], y[:n_train], seed=0, epochs=epochs)
            model.eval()
            with torch.no_grad():
                scores = model(torch.from_numpy(x[n_train:])).squeeze(1).numpy()
            row[positive] = T._auc(scores, y[n_train:])
            print(f"[science] small CNN, {rung}: {positive} vs no_sub AUC {row[positive]:.3f}", flush=True)
        rows.append(row)
    return rows


def render_small(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    sizes = "; ".join(f"{c}: {n:,} training images, {e} epochs" for c, (n, e) in rows[0]["budget"].items())
    lines = [
        "### The difficulty ladder, learned: a small CNN (tests/test_learnability.py)",
        "",
        "Four conv blocks (16-64 channels) and a linear head on the flattened 4x4 map (62k parameters), AdamW "
        f"3e-3 one-cycle, batch 32, flips, trained on no_sub and the other class in turn with the learnability "
        f"test's budget ({sizes}), tested on {rows[0]['n_test']} new ones; images divided by their maximum; seed 0.",
        "",
        "| rung | cdm vs no_sub AUC | vortex vs no_sub AUC |",
        "|---|---|---|",
    ]
    cell = lambda r, c: f"{r[c]:.3f}" if c in r else "not run"  # noqa: E731
    lines += [f"| {r['rung']} | {cell(r, 'cdm')} | {cell(r, 'vortex')} |" for r in rows]
    ran = " ".join(c for c in ("cdm", "vortex") if any(c in r for r in rows))
    return [*lines, "", f"Command: `python benchmarks/science.py --small-ladder {ran}`", ""]


def halo_ceilings(data: str = "halo-euclid", n: int | None = None) -> dict:
    """The two ceilings of the realistic halo-mass task, fitted on the train split of the ``data`` set and
    scored on its test split (the same samples the trained models see; only parameters are drawn):

    (a) the best function of the true Einstein radius alone: a cubic in log theta_E, or gradient-boosted
        trees on it, whichever scores better on the validation split;
    (b) the best function of the true observables: gradient-boosted trees on theta_E, the lens galaxy's
        magnitude and its effective radius.

    (b) - (a) is the headroom that the lens light adds over the ring size."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingRegressor

    from shards.simulate import physics as P
    from shards.simulate.cli import plan, split_plan

    spec = DATA[data]
    n = n or spec.n
    args = dict(zip(spec.args[::2], spec.args[1::2], strict=True))
    config = plan(args["--task"], n, preset=args["--preset"], seed=int(args["--seed"]))
    params = [P.draw_params(config, i) for i in range(n)]
    split = np.asarray(split_plan(config, n, val=0.1, test=0.1)[0])
    mass = np.asarray([p["halo_mass"] for p in params])
    theta = np.log10([p["einstein_radius"] for p in params])
    observables = np.c_[theta, [p["lens_mag"] for p in params], np.log10([p["lens_reff"] for p in params])]

    def r2(pred: np.ndarray, part: str) -> float:
        held = mass[split == part]
        return float(1 - np.mean((pred - held) ** 2) / np.var(held))

    train, val, test = (split == part for part in ("train", "val", "test"))
    cubic = np.polyfit(theta[train], mass[train], 3)
    trees_theta = HistGradientBoostingRegressor(random_state=0).fit(theta[train, None], mass[train])
    trees_all = HistGradientBoostingRegressor(random_state=0).fit(observables[train], mass[train])
    a_cubic = {part: r2(np.polyval(cubic, theta[split == part]), part) for part in ("val", "test")}
    a_trees = {part: r2(trees_theta.predict(theta[split == part, None]), part) for part in ("val", "test")}
    a = a_cubic if a_cubic["val"] >= a_trees["val"] else a_trees
    b = {part: r2(trees_all.predict(observables[split == part]), part) for part in ("val", "test")}
    return {
        "data": data,
        "n": n,
        "test_samples": int(test.sum()),
        "val_samples": int(val.sum()),
        "a_theta_e": a["test"],
        "a_method": "cubic in log theta_E" if a is a_cubic else "gradient-boosted trees on theta_E",
        "a_cubic_test": a_cubic["test"],
        "a_trees_test": a_trees["test"],
        "b_observables": b["test"],
        "headroom": b["test"] - a["test"],
        "corr2_theta_train": float(np.corrcoef(10 ** theta[train], mass[train])[0, 1] ** 2),
        "command": "python benchmarks/science.py --ceilings",
    }


def render_ceilings(c: dict | None) -> list[str]:
    if not c:
        return []
    return [
        "### Halo mass: the ceilings (no training)",
        "",
        f"Realistic `halo_mass` on `euclid` with lens light (`{c['data']}`: {c['n']} samples, the split the jobs "
        f"train on); fitted on the train split, scored on the test split ({c['test_samples']} samples).",
        "",
        "| ceiling | what it knows | test R² |",
        "|---|---|---|",
        f"| (a) | the true Einstein radius alone ({c['a_method']}, chosen on validation) | {c['a_theta_e']:.3f} |",
        f"| (b) | the true observables: theta_E, lens magnitude, lens effective radius (gradient-boosted "
        f"trees) | {c['b_observables']:.3f} |",
        f"| (b) - (a) | the headroom the lens light adds | {c['headroom']:.3f} |",
        "",
        f"Squared correlation of theta_E with the halo mass on the train split: {c['corr2_theta_train']:.3f}. "
        f"Command: `{c['command']}`.",
        "",
    ]


def render_oracle(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "### Oracle detectability by rung (no training)",
        "",
        f"AUC of the reduced chi^2 of each image against its own smooth lens (the true main lens and source, "
        f"no substructure), {rows[0]['per_class']} images per class, seed 7: what an ideal model could reach.",
        "",
        "| rung | cdm vs no_sub | vortex vs no_sub | median chi^2 no_sub / cdm / vortex |",
        "|---|---|---|---|",
    ]
    for r in (r for r in rows if "rung" in r):
        m = r["median_chi2"]
        lines.append(
            f"| {r['rung']} | {r['cdm']:.3f} | {r['vortex']:.3f} | {m['no_sub']:.3f} / {m['cdm']:.3f} / "
            f"{m['vortex']:.3f} |"
        )
    lines += ["", "Command: `python benchmarks/science.py --oracle`", ""]
    return lines


# ------------------------------------------------------------------------------------------ C8 vs ResNet-18
EQUIVARIANT_MODELS = {"escnn_c8": {"canvas": 65}, "resnet18": {}}  # canvas 65: the CPU size (129 on GPU)


def _sub_images(n: int, first: int, seed: int = 5):
    """``n`` deeplense2 images, no_sub and sub (cdm and vortex in turn) alternately, labels 0/1."""
    import numpy as np

    from shards.simulate import physics as P
    from shards.simulate.cli import plan

    config = plan("substructure", 3 * (first + n), preset="deeplense2", seed=seed)
    sim, cdm, vortex = P.Simulator(config), config.classes.index("cdm"), config.classes.index("vortex")
    idx = [3 * (first + k // 2) + (0 if k % 2 == 0 else cdm if k % 4 == 1 else vortex) for k in range(n)]
    x = np.stack([sim(i)[0] for i in idx]).astype(np.float32)
    x /= x.max(axis=(1, 2, 3), keepdims=True)  # as per_image_max
    return x, np.asarray([k % 2 for k in range(n)], dtype=np.float32)


def rotate_arbitrary(x, seed: int = 11, turn: bool = True):
    """Each image turned by its own uniform angle: upsampled 3x (bicubic), rotated (bilinear, corners
    zero), downsampled back (3x3 means), then divided by its maximum again. ``turn=False``: the same
    resampling at angle 0, which separates what interpolation costs from what the turn costs."""
    import math

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(len(x), generator=gen) * 2 * math.pi * turn
    big = F.interpolate(x, scale_factor=3, mode="bicubic", align_corners=False)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(big.shape), align_corners=False)
    out = F.avg_pool2d(F.grid_sample(big, grid, align_corners=False), 3).clamp_min(0)
    return out / out.amax(dim=(1, 2, 3), keepdim=True)


def _scores(model, x, batch: int = 64):
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).squeeze(1) for i in range(0, len(x), batch)]).numpy()


def _train_bce(model, x, y, steps: int, batch: int = 32) -> float:
    """Adam 5e-5, weight decay 1e-5, BCE, constant rate (the reference protocol); returns the wall time."""
    import torch

    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5, weight_decay=1e-5)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def equivariant_rotation(n_train: int, n_test: int, steps: int) -> list[dict]:
    """C8 steerable CNN against ResNet-18 on deeplense2 no_sub vs sub: test accuracy and AUC on the test
    images as simulated and turned by arbitrary angles (:func:`rotate_arbitrary`)."""
    import numpy as np
    import torch

    from lenstrain.models import create_model

    torch.set_num_threads(1)
    x, y = (torch.from_numpy(a) for a in _sub_images(n_train, 0))
    tx, ty = _sub_images(n_test, n_train)
    upright = torch.from_numpy(tx)
    tests = {"upright": upright, "resampled": rotate_arbitrary(upright, turn=False), "rotated": rotate_arbitrary(upright)}
    rows = []
    for name, kwargs in EQUIVARIANT_MODELS.items():
        torch.manual_seed(0)
        model = create_model(name, in_channels=1, num_outputs=1, image_size=64, **kwargs)
        row = {"model": name, "options": kwargs, "n_train": n_train, "n_test": n_test, "steps": steps,
               "parameters": sum(p.numel() for p in model.parameters())}
        row["train_wall_s"] = round(_train_bce(model, x, y, steps), 1)
        for test, images in tests.items():
            s = _scores(model, images)
            row[test] = {"auc": _auc(s[ty == 1], s[ty == 0]), "accuracy": float(np.mean((s > 0) == (ty == 1)))}
        print(f"[science] {name}: {row}", flush=True)
        rows.append(row)
    return rows


def render_equivariant(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = [
        "### C8-equivariant vs ResNet-18: no_sub vs sub on deeplense2, test images turned by arbitrary angles",
        "",
        f"BCE, Adam 5e-5 (weight decay 1e-5, constant), batch 32, {r0['steps']} steps on {r0['n_train']} training "
        f"images (no_sub, and cdm and vortex in turn), no augmentation; {r0['n_test']} test images as simulated "
        "and each turned by a uniform random angle (upsampled 3x, rotated, downsampled). `escnn_c8` on a 65 px "
        "canvas (129 on GPU) for CPU time. Resampled: the same pipeline at angle 0 (interpolation alone).",
        "",
        "| model | params | upright AUC / acc | resampled AUC / acc | rotated AUC / acc | train time |",
        "|---|---|---|---|---|---|",
    ]
    cell = lambda m: f"{m['auc']:.3f} / {m['accuracy']:.3f}" if m else "not run"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {cell(r['upright'])} | "
            f"{cell(r.get('resampled'))} | {cell(r['rotated'])} | {r['train_wall_s'] / 60:.1f} min |"
        )
    ran = f"--equivariant {r0['n_train']} {r0['n_test']} {r0['steps']}"
    return [*lines, "", f"Command: `python benchmarks/science.py {ran}`", ""]


# ------------------------------------------------------------------------------------------ report
def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


PRIMARY = {"auc": "AUC", "r2": "R²", "mae": "MAE"}


def _spread(values: list[float], digits: int = 3) -> str:
    """mean ± half the range over seeds, with each seed's value."""
    import statistics

    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    half = (max(values) - min(values)) / 2
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{mean:.{digits}f} ± {half:.{digits}f} ({each})"


def _score(rows: list[dict]) -> str:
    metrics = rows[0]["metrics"]
    names = ("auc", "accuracy") if "auc" in metrics else ("r2", "mae")
    label = {"auc": "AUC", "accuracy": "acc", "r2": "R²", "mae": "MAE"}
    return "; ".join(
        f"{label[m]} {_spread([r['metrics'][m] for r in rows])}" for m in names if m in metrics
    )


def _row(rows: list[dict]) -> str:
    r = rows[0]
    params = f"{r['parameters'] / 1e6:.1f} M" if r.get("parameters") else "-"
    cpu = sum(x["train_cpu_s"] for x in rows) / len(rows) / 60
    return (
        f"| `{r['experiment']}` | {r['model']} | {DATA_LABEL.get(r['data'], r['data'])} | {_score(rows)} "
        f"| {r['split']}, {r['samples']} | {params} | {r['steps']} | {cpu:.1f} CPU-min | {r['note'] or '-'} |"
    )


DATA_LABEL = {
    "deeplense2": "deeplense2",
    "euclid": "euclid (realistic)",
    "ladder-dl2": "deeplense2",
    "ladder-drawn": "deeplense2, lens drawn",
    "ladder-faint": "deeplense2, lens drawn, source 22.5-24.5 mag",
    "ladder-euclid": "euclid (realistic)",
    "halo-euclid": "euclid halo_mass, lens light",
    "axion-dl1": "deeplense1 replica",
    "axion-dl2": "deeplense2 replica",
    "axion-dl3": "deeplense3 replica",
    "fsub-euclid": "euclid subhalo_fraction",
    "replica-dl1": "deeplense1 replica",
    "replica-dl2": "deeplense2 replica",
    "replica-dl3": "deeplense3 replica",
}


def _halo_beside(c: dict) -> str:
    if not c:
        return "Beside: the mean predictor (R² 0); the ceilings were not computed."
    return (
        f"Beside, on the same test split: ceiling (a), the true θ_E alone, R² {c['a_theta_e']:.3f}; ceiling (b), "
        f"the true observables, R² {c['b_observables']:.3f}; the mean predictor, R² 0."
    )


BESIDE = {  # the baseline or ceiling each table is read against
    "halo": _halo_beside,
    "zoo": _halo_beside,
    "methods": _halo_beside,
    "axion": lambda c: "Beside: predicting the mean of the uniform 2-dex prior scores MAE 0.50 dex; DeepLense's "
    "published test MAE (ResNet-34 / best) is in each row's note.",
    "fsub": lambda c: "Beside: the mean predictor (R² 0; MAE 0.010 for a fraction uniform in 0.01-0.05).",
    "replica": lambda c: "Beside: chance is AUC 0.5 and accuracy 0.333; DeepLense's published figures are in "
    "each row's note (their budgets: tens of epochs on 30,000 images per class on GPUs).",
}


def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def render_report(results: list[dict]) -> str:
    by_experiment: dict[str, list[dict]] = {}
    for r in results:
        by_experiment.setdefault(r["experiment"], []).append(r)
    ceilings = _load("halo_ceilings.json") or {}
    lines = [
        BEGIN,
        "",
        *render_ceilings(ceilings),
        *render_oracle(_load("oracle.json") or []),
    ]
    fitted, true_rows = _load("oracle_fitted.json"), _load("oracle_true.json")
    if fitted and true_rows:
        from benchmarks.oracle_fit import render_fitted_oracle

        lines += render_fitted_oracle(fitted, true_rows)
    lines += [*render_small(_load("small_cnn_ladder.json") or []), *render_equivariant(_load("equivariant.json") or [])]
    not_run: list[str] = []
    for table, title in TABLES.items():
        names = [e.name for e in EXPERIMENTS if e.table == table or e.name == TABLE_BASELINE.get(table)]
        groups = [sorted(by_experiment[n], key=lambda r: r["seed"]) for n in names if n in by_experiment]
        if not groups or all(g[0]["experiment"] == TABLE_BASELINE.get(table) for g in groups):
            not_run.append(table)
            continue
        lines += [f"### {title}", ""]
        if table in BESIDE:
            lines += [BESIDE[table](ceilings), ""]
        lines += [
            "| experiment | model | data | test metrics: mean ± half-range (each seed) | split, images | params "
            "| steps | train CPU per seed | note |",
            "|---|---|---|---|---|---|---|---|---|",
            *(_row(g) for g in groups),
            "",
            "Commands (seed 0; the other seeds differ only in `--set seed=S`):",
            "",
            "```",
        ]
        for g in groups:
            lines += [f"# {g[0]['experiment']}", *(f"python {c}" for c in g[0]["commands"])]
        lines += ["```", ""]
        if table in ("zoo", "methods", "replica"):
            lines += [_separation(groups), ""]
    lines += render_full_protocol()
    if not_run:
        lines += [f"Defined in `benchmarks/science.py` but without committed results: {', '.join(not_run)}.", ""]
    lines.append(END)
    return "\n".join(lines)


def _separation(groups: list[list[dict]]) -> str:
    """Whether the best and the worst row of a table are apart by more than their seeds' spread."""
    metric = "r2" if "r2" in groups[0][0]["metrics"] else "auc"
    seeded = [g for g in groups if len(g) > 1]
    if len(seeded) < 2:
        return f"Fewer than two rows with 2 seeds: no separation to read ({PRIMARY[metric]})."
    def mean(g):
        return sum(r["metrics"][metric] for r in g) / len(g)
    best, worst = max(seeded, key=mean), min(seeded, key=mean)
    low_best = min(r["metrics"][metric] for r in best)
    high_worst = max(r["metrics"][metric] for r in worst)
    name = lambda g: f"`{g[0]['experiment']}` ({mean(g):.3f})"  # noqa: E731
    if low_best > high_worst:
        return (f"Best and worst (rows with 2 seeds, test {PRIMARY[metric]}): {name(best)} and {name(worst)}, "
                f"separated: every seed of the best ({low_best:.3f} at the lowest) is above every seed of the "
                f"worst ({high_worst:.3f} at the highest), a gap of {low_best - high_worst:.3f}.")
    return (f"Best and worst (rows with 2 seeds, test {PRIMARY[metric]}): {name(best)} and {name(worst)}, "
            f"NOT separated: their seeds overlap ({low_best:.3f} lowest of the best, {high_worst:.3f} highest of "
            f"the worst), so at this size the table's order is within the seed spread.")


def render_full_protocol() -> list[str]:
    """The GPU-size protocol (``--full``) of every experiment: its data size and the overrides it trains with."""
    lines = ["### The GPU-size protocol (`--full`)", "",
             "What `python benchmarks/science.py --full [--only NAME]` runs, for figures to set beside DeepLense's "
             "published ones: the data set at its full size and each job with these `--set` overrides "
             "(besides `data.shards` and `seed`). Not run on this machine; rows with results say `full: true` in "
             "their JSON.", "",
             "| experiment | job | data (images) | `--set` overrides |", "|---|---|---|---|"]
    for e in EXPERIMENTS:
        lines.append(f"| `{e.name}` | `{e.job}` | {e.data} ({DATA[e.data].n_full:,}) | "
                     f"{' '.join(f'`{x}`' for x in e.sets_full) or '-'} |")
    return [*lines, ""]


def write_report() -> Path:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*-s[0-9]*.json"))]
    text = REPORT.read_text() if REPORT.is_file() else f"# Science results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    REPORT.write_text(head + render_report(results) + tail)
    return REPORT


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="GPU sizes (more images and epochs)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=[e.name for e in EXPERIMENTS],
        help="run these experiments only, in this order",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="these seeds (default: each experiment's)")
    p.add_argument(
        "--ceilings", action="store_true", help="only compute the halo-mass ceilings, then rewrite SCIENCE.md"
    )
    p.add_argument("--data", type=Path, default=ROOT / "data" / "science", help="where the data sets go")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "science", help="where the runs go")
    p.add_argument("--workers", type=int, default=2, help="simulating processes (default 2)")
    p.add_argument(
        "--report", action="store_true", help="only rewrite SCIENCE.md from the results in benchmarks/results"
    )
    p.add_argument(
        "--oracle",
        type=int,
        nargs="?",
        const=60,
        default=None,
        metavar="PER_CLASS",
        help="only measure the oracle ladder (default 60 images per class), then rewrite SCIENCE.md",
    )
    p.add_argument(
        "--small-ladder",
        nargs="*",
        choices=("cdm", "vortex"),
        default=None,
        metavar="CLASS",
        help="only train the small CNN of the learnability test on each rung, CLASS (cdm, vortex; "
        "default both) against no_sub, then rewrite SCIENCE.md",
    )
    p.add_argument(
        "--equivariant",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="only train escnn_c8 and resnet18 on deeplense2 no_sub vs sub and test them upright and turned "
        "by arbitrary angles: [N_TRAIN [N_TEST [STEPS]]] (default 2000 400 400), then rewrite SCIENCE.md",
    )
    return p


def _save(name: str, rows) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.ceilings:
        _save("halo_ceilings.json", halo_ceilings())
    elif args.equivariant is not None:
        _save("equivariant.json", equivariant_rotation(*(args.equivariant + [2000, 400, 400][len(args.equivariant) :])))
    elif args.small_ladder is not None:
        _save("small_cnn_ladder.json", small_cnn_ladder(tuple(args.small_ladder) or ("cdm", "vortex")))
    elif args.oracle:
        _save("oracle.json", oracle_ladder(args.oracle))
    elif not args.report:
        by_name = {e.name: e for e in EXPERIMENTS}
        chosen = [by_name[n] for n in args.only] if args.only else [e for e in EXPERIMENTS if args.full or e.cpu]
        for exp in chosen:
            for seed in args.seeds or exp.seeds:
                print(f"[science] {exp.name} seed {seed}", flush=True)
                result = run_experiment(exp, seed, args)
                print(f"[science] {exp.name} seed {seed}: {result['metrics']}", flush=True)
                write_report()
    print(f"wrote {write_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
