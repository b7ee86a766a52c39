"""``launcher sweep report SWEEP``: ``runs/SWEEP/report/`` with ``best.yaml`` (a job that retrains the best
trial), ``trials.csv`` and Optuna's matplotlib plots (optimization history, parallel coordinates, parameter
importances, intermediate values with the pruned curves)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import yaml
from optuna.trial import TrialState

from launcher import runs
from launcher.sweep.spec import with_params
from launcher.sweep.study import SweepDir, open_study, read_sweep_dir
from lenstrain.checkpointing.rundir import write_atomic
from shards.clikit import UsageError

PLOTS = {
    "optimization_history": "plot_optimization_history",
    "parallel_coordinate": "plot_parallel_coordinate",
    "param_importances": "plot_param_importances",
    "intermediate_values": "plot_intermediate_values",
}


def write_best(root: Path, study, job: dict, spec) -> Path | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    retrain = with_params(job, best.params)
    retrain["name"] = f"{root.name}-best"
    header = (
        f"# The best trial of sweep {root.name}: trial {best.number}, {spec.metric} {best.value:.6g}\n"
        f"# ({', '.join(f'{k}={v!r}' for k, v in best.params.items())}). Retrain it with:\n"
        f"#   python -m launcher submit {runs.display_path(SweepDir(root).report / 'best.yaml')}\n"
    )
    path = SweepDir(root).report / "best.yaml"
    write_atomic(path, header + yaml.safe_dump(retrain, sort_keys=False))
    return path


def write_csv(root: Path, study, spec) -> Path:
    path = SweepDir(root).report / "trials.csv"
    keys = list(spec.space)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(
            ["number", "state", *keys, spec.metric, "value_step", "last_step", "pruned_at", "duration_s", "run_dir"]
        )
        for t in study.get_trials(deepcopy=False):
            last = max(t.intermediate_values) if t.intermediate_values else ""
            took = (
                (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else ""
            )
            out.writerow(
                [
                    t.number,
                    t.state.name,
                    *[t.params.get(k, "") for k in keys],
                    "" if t.value is None else t.value,
                    t.user_attrs.get("value_step", ""),
                    last,
                    last if t.state == TrialState.PRUNED else "",
                    took,
                    runs.display_path(SweepDir(root).trial(t.number)),
                ]
            )
    return path


def write_plots(root: Path, study) -> tuple[list[Path], list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written, skipped = [], []
    for name, fn in PLOTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            try:
                ax = getattr(vis, fn)(study)
            except Exception as exc:  # noqa: BLE001 - e.g. importances need two complete trials
                skipped.append(f"{name}: {exc}")
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        path = SweepDir(root).report / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written, skipped


def report(root: Path) -> int:
    spec, job = read_sweep_dir(root)
    study = open_study(root, spec)
    if not study.get_trials(deepcopy=False):
        raise UsageError(f"sweep {root.name} has no trials yet; see `python -m launcher status {root.name}`")
    SweepDir(root).report.mkdir(exist_ok=True)
    best = write_best(root, study, job, spec)
    write_csv(root, study, spec)
    plots, skipped = write_plots(root, study)
    where = runs.display_path(SweepDir(root).report)
    print(f"report of sweep {root.name} in {where}/")
    print(
        f"  best.yaml   {'a job retraining trial ' + str(study.best_trial.number) if best else '(no complete trial yet)'}"
    )
    print(f"  trials.csv  {len(study.get_trials(deepcopy=False))} trials")
    for path in plots:
        print(f"  {path.name}")
    for line in skipped:
        print(f"  (skipped {line})")
    return 0
