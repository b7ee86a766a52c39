"""Evaluate a trained run on a split (``lenstrain eval``) and write predictions (``lenstrain predict``).

``eval RUN`` loads ``RUN/config.yaml`` and a checkpoint (the best one by ``checkpoint.best_metric``,
else the newest complete one), runs the model on one process, and writes to ``RUN/eval/{split}/``:

- ``metrics.json``: loss and metrics (MSE, MAE, R² in the target's units; accuracy and ROC AUC),
  with the checkpoint, shard set and test-time rotations they came from;
- ``pred_vs_true.png`` (regression) or ``roc_confusion.png`` (classification);
- ``predictions.csv``: the same columns as ``predict`` writes.

``predict RUN --shards DIR --out FILE`` writes one row per sample of a split: ``key`` (the shard
member key), ``index`` (position in the split), the prediction in the target's own units (for
classification the class name and one ``prob_<class>`` column per class), and ``true_<target>``
where the labels carry the target.

Images are normalised and targets decoded with the statistics of the shard set the run was trained
on, also when the samples come from another shard set.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lenstrain.checkpointing.checkpoint import (
    CheckpointReadError,
    best_checkpoint,
    complete_checkpoints,
    latest_complete,
    load_first,
    load_model_state,
    read_meta,
    recorded_metric,
)
from lenstrain.checkpointing.rundir import RunDir, write_atomic, write_json_atomic
from lenstrain.config.schema import LenstrainConfig, load_config
from lenstrain.data.loader import TargetTransform
from lenstrain.evaluation.inference import MAX_ROTATIONS, decode, evaluate, predict
from lenstrain.parallel import Backend
from lenstrain.run.build import (
    Task,
    build_eval_batches,
    build_loss,
    build_model,
    local_info,
    single_process,
    task_for,
)
from shards.clikit import UsageError, fail
from shards.manifest import Manifest, ManifestError, load_manifest


def log(message: str) -> None:
    print(f"[lenstrain] {message}", flush=True)


# ------------------------------------------------------------------------------------ checkpoints


def choose_checkpoint(run_dir: Path, which: str, best_metric: str | None, best_mode: str,
                      log=log) -> tuple[Path, str]:
    """The checkpoint to load and a phrase saying why: ``best`` by the recorded metric, else the newest.

    When every checkpoint is damaged, :class:`CheckpointReadError` names the newest one's problem."""
    root = RunDir(run_dir).checkpoints
    scored = which == "best" and bool(best_metric)  # then every checkpoint is verified, and unusable ones reported
    best = best_checkpoint(root, best_metric, best_mode, verify=True, log=log) if scored else None
    problems: list[str] = []

    def note(message: str) -> None:
        problems.append(message)
        if not scored:
            log(message)

    latest = latest_complete(root, log=note)
    if latest is None:
        if problems:
            raise CheckpointReadError(f"{root}: no usable checkpoint; the newest: {problems[0]}")
        raise UsageError(f"{run_dir}: no complete checkpoint under {root}; train the run first "
                         f"(`python -m lenstrain train CONFIG --run-dir {run_dir}`)")
    if which == "latest":
        return latest, f"the latest, step {read_meta(latest)['step']}"
    if best is None:
        return latest, (f"the latest, step {read_meta(latest)['step']}: no checkpoint records "
                        f"{best_metric or 'a best metric'}")
    value = recorded_metric(best, best_metric)
    return best, f"the best by {best_metric} ({best_mode}) = {value:.4g}, step {read_meta(best)['step']}"


def load_weights_into(model: nn.Module, checkpoint: Path, why: str, log=log) -> tuple[Path, str]:
    """Load ``checkpoint``'s weights into ``model``; one that cannot be read (any :class:`CheckpointReadError`, or
    weights that do not fit the model) is reported and the complete one before it is used instead."""
    root = checkpoint.parent

    def read(path: Path) -> None:
        state = load_model_state(path)
        try:
            model.load_state_dict(state)
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointReadError(f"{path}: its weights do not fit the run's model ({first})") from None

    older = complete_checkpoints(root, log=log, before=int(checkpoint.name.removeprefix("step-")))
    loaded, _ = load_first([checkpoint, *older], read, log=log, ckpt_root=root)
    if loaded != checkpoint:
        why = f"step {read_meta(loaded)['step']}, the one before {checkpoint.name} ({why}), which cannot be read"
    return loaded, why


# ------------------------------------------------------------------------------------ loading a run


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: LenstrainConfig  # as trained
    task: Task  # from the training shard set: normalisation, target decoding, output width
    data_cfg: LenstrainConfig  # data.shards points at the shard set to read
    data_task: Task  # reads that shard set with the training statistics
    model: nn.Module
    backend: Backend
    checkpoint: Path
    why: str

    @property
    def own_set(self) -> bool:
        return Path(self.data_cfg.data.shards).resolve() == Path(self.cfg.data.shards).resolve()


def read_run_config(run_dir: Path) -> LenstrainConfig:
    path = RunDir(run_dir).config
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {path.name}, so not a run directory (it is written when a run starts)")
    return load_config(path)  # an invalid config names the file


def training_task(cfg: LenstrainConfig, other_shards: bool) -> Task:
    """The task as trained; its shard set's statistics normalise images and decode predictions."""
    try:
        return task_for(cfg, load_manifest(cfg.data.shards))
    except ManifestError as exc:
        if not other_shards:
            raise UsageError(f"{exc} (the run's training set); pass --shards DIR to read another copy") from None
        raise UsageError(f"the run's training shard set is not readable ({exc}); its statistics are needed to "
                         f"normalise images and decode predictions: restore it, or point the run's "
                         f"config.yaml data.shards at a copy") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def step_checkpoint(run_dir: Path, step: int) -> tuple[Path, str]:
    """The complete checkpoint of ``step``; UsageError naming the steps there are."""
    from lenstrain.checkpointing.checkpoint import list_checkpoints, step_dir_name
    from lenstrain.checkpointing.stateio import verify_checkpoint

    root = RunDir(run_dir).checkpoints
    path = root / step_dir_name(step)
    problem = verify_checkpoint(path) if path.is_dir() else "no such checkpoint"
    if problem is not None:
        have = ", ".join(str(s) for s, p in list_checkpoints(root) if verify_checkpoint(p) is None) or "none"
        raise UsageError(f"{run_dir}: step {step}: {problem}; complete checkpoints at steps: {have}")
    return path, f"step {step}, as asked"


def load_run(run_dir: Path, which: str = "best", shards: Path | None = None, log=log,
             step: int | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if step is not None:
        checkpoint, why = step_checkpoint(run_dir, step)
    else:
        checkpoint, why = choose_checkpoint(run_dir, which, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode, log)
    data_dir = Path(shards) if shards is not None else Path(cfg.data.shards)
    other = data_dir.resolve() != Path(cfg.data.shards).resolve()
    try:
        data_manifest = load_manifest(data_dir) if other else None
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    task = training_task(cfg, other)
    data_task, data_cfg = _task_for(data_manifest, task, data_dir, cfg) if other else (task, cfg)
    model = build_model(cfg, task, local_info())
    checkpoint, why = load_weights_into(model, checkpoint, why, log)
    model.eval()
    return LoadedRun(run_dir, cfg, task, data_cfg, data_task, model, single_process(cfg, model), checkpoint, why)


def _task_for(manifest: Manifest, task: Task, data_dir: Path, cfg: LenstrainConfig) -> tuple[Task, LenstrainConfig]:
    """Read another shard set the way the training set was read: its pixel statistics and target coding."""
    trained = task.manifest.image
    if manifest.image.shape[0] != trained.shape[0]:
        raise UsageError(f"{data_dir}: images have {manifest.image.shape[0]} channels, the model was trained on "
                         f"{trained.shape[0]}")
    other = manifest.targets.get(task.target.name)
    if task.target.kind == "classification" and other is not None and tuple(other.classes or ()) != task.target.classes:
        raise UsageError(f"{data_dir}: target {task.target.name!r} has classes {other.classes}, the model was "
                         f"trained on {list(task.target.classes)}")
    image = manifest.image.model_copy(update={"stats": trained.stats})
    data_task = Task(manifest.model_copy(update={"image": image}), task.target, task.loss_name)
    data_cfg = cfg.model_copy(deep=True)
    data_cfg.data.shards = data_dir
    return data_task, data_cfg


def check_split(manifest: Manifest, split: str, where: Path) -> int:
    if split not in manifest.splits:
        have = ", ".join(f"{name} ({s.count})" for name, s in manifest.splits.items()) or "none"
        raise UsageError(f"split {split!r} is not in {where}; it has: {have}")
    count = sum(len(shard.members) for shard in manifest.splits[split].shards)
    if count == 0:
        raise UsageError(f"split {split!r} of {where} is empty")
    return count


def split_keys(manifest: Manifest, split: str) -> list[str]:
    """Member keys in the order a ``ShardReader`` indexes them."""
    return [m.key for shard in manifest.splits[split].shards for m in shard.members]


def tta_rotations(requested: int | None, cfg: LenstrainConfig) -> int:
    k = cfg.train.tta_rotations if requested is None else requested
    if not 1 <= k <= MAX_ROTATIONS:
        raise UsageError(f"--tta {k}: test-time rotation averaging takes 1 to {MAX_ROTATIONS} turns of 90 degrees")
    return k


# ------------------------------------------------------------------------------------ outputs


def _cell(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.8g}"


def write_predictions_csv(path: Path, target: TargetTransform, keys: list[str], index: torch.Tensor,
                          pred: torch.Tensor, true: torch.Tensor | None) -> None:
    """``pred``: values (N,) for regression, probabilities (N, K) for classification; ``true``: values or
    class indices, NaN or -1 where a sample has no label (None: no labels at all)."""
    name = target.name
    classes = list(target.classes)
    header = ["key", "index", name]
    if target.kind == "classification":
        header += [f"prob_{c}" for c in classes]
    if true is not None:
        header.append(f"true_{name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = io.StringIO(newline="")  # the whole file, then one atomic write
    writer = csv.writer(fh)
    writer.writerow(header)
    for row, i in enumerate(index.tolist()):
        if target.kind == "classification":
            probs = pred[row].tolist()
            cells = [classes[int(pred[row].argmax())], *(_cell(p) for p in probs)]
            if true is not None:
                t = int(true[row])
                cells.append(classes[t] if 0 <= t < len(classes) else "")
        else:
            cells = [_cell(float(pred[row]))]
            if true is not None:
                cells.append(_cell(float(true[row])))
        writer.writerow([keys[i], i, *cells])
    write_atomic(path, fh.getvalue())


def _finite_or_none(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------ eval


def main_eval(args) -> int:
    try:
        run = load_run(args.run, args.checkpoint, args.shards)
        n = check_split(run.data_task.manifest, args.split, Path(run.data_cfg.data.shards))
        rotations = tta_rotations(args.tta, run.cfg)
    except UsageError as exc:
        return fail(str(exc))
    task, split = run.data_task, args.split
    if task.target.name not in task.manifest.targets:
        return fail(f"{run.data_cfg.data.shards} has no {task.target.name!r} labels to evaluate against; "
                    f"`python -m lenstrain predict` writes predictions without them")
    log(f"{run.run_dir}: {run.cfg.model.name} from checkpoint {run.checkpoint.name} ({run.why}); "
        f"{split} split of {run.data_cfg.data.shards}, {n} samples; {rotations} rotation(s) averaged")
    metrics, result = evaluate(run.model, run.backend, run.data_cfg, task, build_loss(run.cfg.train, task), split,
                               rotations=rotations)
    metrics = {k.split("/", 1)[1]: v for k, v in metrics.items()}
    # Another shard set's results go beside the run's own, not over them.
    out = RunDir(run.run_dir).eval / (split if run.own_set else f"{Path(run.data_cfg.data.shards).name}-{split}")
    out.mkdir(parents=True, exist_ok=True)
    plot = save_plot(out, task, result)
    write_predictions_csv(out / "predictions.csv", task.target, split_keys(task.manifest, split), result["index"],
                          result["pred"], result["true"])
    write_json_atomic(out / "metrics.json", {
        "run": str(run.run_dir), "split": split, "shards": str(run.data_cfg.data.shards),
        "checkpoint": str(run.checkpoint), "checkpoint_choice": run.why, "step": read_meta(run.checkpoint)["step"],
        "model": run.cfg.model.name, "target": task.target.name, "kind": task.target.kind, "loss": task.loss_name,
        "samples": n, "tta_rotations": rotations, "metrics": _finite_or_none(metrics),
    })
    for key, value in metrics.items():
        log(f"  {split}/{key:<10} {value:.6g}")
    log(f"wrote {out / 'metrics.json'}, {plot}, {out / 'predictions.csv'}")
    return 0


def save_plot(out: Path, task: Task, result: dict) -> Path:
    """Predicted against true (regression), or ROC curves and the confusion matrix (classification)."""
    from lenstrain.evaluation import plots

    pred, true = result["pred"].numpy(), result["true"].numpy()
    if task.target.kind == "regression":
        path, fig = out / "pred_vs_true.png", plots.pred_vs_true(pred, true, task.target.name)
    else:
        path, fig = out / "roc_confusion.png", plots.roc_and_confusion(pred, true, list(task.target.classes))
    plots.save(fig, path)
    return path


# ------------------------------------------------------------------------------------ predict


def predict_split(run: LoadedRun, split: str, rotations: int) -> dict[str, torch.Tensor]:
    """Predictions for every sample of ``split``, in index order: ``pred`` (decoded values, or class
    probabilities), ``true`` (NaN or -1 where unlabelled) and ``index``."""
    batches = build_eval_batches(run.data_cfg, run.data_task, split, run.backend.info, optional_labels=True)
    return decode(run.data_task, predict(run.model, run.backend, batches, rotations, run.data_task.num_outputs))


def main_predict(args) -> int:
    from lenstrain.evaluation.export import check_outputs

    if getattr(args, "images", None) is not None:
        return main_predict_images(args)
    try:
        check_outputs([Path(args.out)], getattr(args, "force", False))
        run = load_run(args.run, args.checkpoint, args.shards, step=getattr(args, "step", None))
        n = check_split(run.data_task.manifest, args.split, Path(args.shards))
        rotations = tta_rotations(getattr(args, "tta", None), run.cfg)
    except UsageError as exc:
        return fail(str(exc))
    task = run.data_task
    log(f"{run.run_dir}: {run.cfg.model.name} from checkpoint {run.checkpoint.name} ({run.why}); "
        f"predicting {task.target.name!r} for the {args.split} split of {args.shards}, {n} samples; "
        f"{rotations} rotation(s) averaged")
    result = predict_split(run, args.split, rotations)
    true = result["true"]
    labelled = bool((~torch.isnan(true) if task.target.kind == "regression" else true >= 0).any())
    check_outputs([Path(args.out)], getattr(args, "force", False))  # nothing appeared meanwhile
    write_predictions_csv(Path(args.out), task.target, split_keys(task.manifest, args.split), result["index"],
                          result["pred"], true if labelled else None)
    log(f"wrote {len(result['index'])} rows to {args.out}"
        + ("" if labelled else f" (no {task.target.name!r} labels, so no true_ column)"))
    return 0


def main_predict_images(args) -> int:
    """``predict RUN --images PATH``: plain .npy or FITS files (:mod:`lenstrain.evaluation.predict_files`)."""
    from lenstrain.evaluation.export import check_outputs
    from lenstrain.evaluation.predict_files import predict_files

    try:
        check_outputs([Path(args.out)], getattr(args, "force", False))
        run = load_run(args.run, args.checkpoint, None, step=getattr(args, "step", None))
        rotations = tta_rotations(getattr(args, "tta", None), run.cfg)
        size = args.batch_size or run.cfg.data.val_batch_size or run.cfg.data.batch_size
        if size < 1:
            raise UsageError(f"--batch-size {size}: at least 1")
        return predict_files(run, args.images, args.out, rotations, size, log)
    except UsageError as exc:
        return fail(str(exc))

