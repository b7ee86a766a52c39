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
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lenstrain.backends import Backend
from lenstrain.checkpoint import list_checkpoints, load_model_state, read_meta, verify_checkpoint
from lenstrain.config import ConfigError, LenstrainConfig, load_config
from lenstrain.data import TargetTransform, eval_batches
from lenstrain.distributed import DistInfo
from lenstrain.losses import build_loss
from lenstrain.metrics import predictions_from_output
from lenstrain.train import Task, build_builder, build_model, build_task, evaluate, resolve_precision
from shards.manifest import Manifest, ManifestError, load_manifest, write_json_atomic

MAX_TTA = 4  # 90-degree turns: a fifth would repeat the first


class UsageError(Exception):
    """A run, split or option that cannot be used; the message is for the user, verbatim."""


def log(message: str) -> None:
    print(f"[lenstrain] {message}", flush=True)


# ------------------------------------------------------------------------------------ checkpoints


def choose_checkpoint(run_dir: Path, which: str, best_metric: str | None, best_mode: str,
                      log=log) -> tuple[Path, str]:
    """The checkpoint to load and a phrase saying why: ``best`` by the recorded metric, else the newest."""
    root = run_dir / "checkpoints"
    complete = []
    for step, path in list_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            complete.append((step, path))
        else:
            log(f"checkpoint {path.name} is not usable ({problem}); passing it over")
    if not complete:
        raise UsageError(f"{run_dir}: no complete checkpoint under {root}; train the run first "
                         f"(`python -m lenstrain train CONFIG --run-dir {run_dir}`)")
    latest_step, latest = complete[-1]
    if which == "latest":
        return latest, f"the latest, step {latest_step}"
    scored = []
    for step, path in complete:
        value = read_meta(path).get("metrics", {}).get(best_metric) if best_metric else None
        if value is not None and math.isfinite(value):
            scored.append((value if best_mode == "min" else -value, -step, path))
    if not scored:
        return latest, f"the latest, step {latest_step}: no checkpoint records {best_metric or 'a best metric'}"
    value, neg_step, path = min(scored)
    value = value if best_mode == "min" else -value
    return path, f"the best by {best_metric} ({best_mode}) = {value:.4g}, step {-neg_step}"


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


def load_run(run_dir: Path, which: str = "best", shards: Path | None = None, log=log) -> LoadedRun:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UsageError(f"{run_dir}: no config.yaml, so not a run directory (training writes it when it starts)")
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise UsageError(f"{config_path}: {exc}") from None
    checkpoint, why = choose_checkpoint(run_dir, which, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode, log)

    data_dir = Path(shards) if shards is not None else Path(cfg.data.shards)
    try:
        data_manifest = load_manifest(data_dir)
    except ManifestError as exc:
        hint = "" if shards is not None else " (the run's training set); pass --shards DIR to read another copy"
        raise UsageError(f"{exc}{hint}") from None
    train_cfg = cfg
    if shards is not None and Path(shards).resolve() != Path(cfg.data.shards).resolve():
        try:
            load_manifest(cfg.data.shards)
        except ManifestError as exc:
            # Its statistics normalise the images and decode the predictions: another set's would be wrong.
            raise UsageError(f"the run's training shard set is not readable ({exc}); its statistics are needed to "
                             f"normalise images and decode predictions: restore it, or point the run's "
                             f"config.yaml data.shards at a copy") from None
    try:
        task = build_task(train_cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    data_task, data_cfg = task, train_cfg
    if Path(data_dir).resolve() != Path(train_cfg.data.shards).resolve():
        data_task, data_cfg = _task_for(data_manifest, task, data_dir, cfg)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    model = build_model(cfg, task, info)
    model.load_state_dict(load_model_state(checkpoint))
    model.eval()
    backend = Backend(model, None, info, precision=resolve_precision(cfg.train.precision, device), grad_clip=None)
    return LoadedRun(run_dir, cfg, task, data_cfg, data_task, model, backend, checkpoint, why)


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
    data_task = Task(manifest.model_copy(update={"image": image}), task.target, task.loss_name, task.num_classes,
                     task.num_outputs)
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
    if not 1 <= k <= MAX_TTA:
        raise UsageError(f"--tta {k}: test-time rotation averaging takes 1 to {MAX_TTA} turns of 90 degrees")
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
    with open(path, "w", newline="") as fh:
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


def _finite_or_none(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------ eval


def main_eval(args) -> int:
    try:
        run = load_run(args.run, args.checkpoint, args.shards)
        n = check_split(run.data_task.manifest, args.split, Path(run.data_cfg.data.shards))
        rotations = tta_rotations(args.tta, run.cfg)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    task, split = run.data_task, args.split
    if task.target.name not in task.manifest.targets:
        print(f"error: {run.data_cfg.data.shards} has no {task.target.name!r} labels to evaluate against; "
              f"`python -m lenstrain predict` writes predictions without them", file=sys.stderr)
        return 2
    log(f"{run.run_dir}: {run.cfg.model.name} from checkpoint {run.checkpoint.name} ({run.why}); "
        f"{split} split of {run.data_cfg.data.shards}, {n} samples; {rotations} rotation(s) averaged")
    loss_fn = build_loss(task.loss_name, task.target.kind, task.num_classes, huber_delta=run.cfg.train.huber_delta,
                         label_smoothing=run.cfg.train.label_smoothing)
    metrics, result = evaluate(run.model, run.backend, run.data_cfg, task, loss_fn, split, rotations=rotations)
    metrics = {k.split("/", 1)[1]: v for k, v in metrics.items()}

    own_set = Path(run.data_cfg.data.shards).resolve() == Path(run.cfg.data.shards).resolve()
    # Another shard set's results go beside the run's own, not over them.
    out = run.run_dir / "eval" / (split if own_set else f"{Path(run.data_cfg.data.shards).name}-{split}")
    out.mkdir(parents=True, exist_ok=True)
    from lenstrain import plots

    if task.target.kind == "regression":
        plot = out / "pred_vs_true.png"
        plots.save(plots.pred_vs_true(result["pred"].numpy(), result["true"].numpy(), task.target.name), plot)
    else:
        plot = out / "roc_confusion.png"
        plots.save(plots.roc_and_confusion(result["pred"].numpy(), result["true"].numpy(),
                                           list(task.target.classes)), plot)
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


# ------------------------------------------------------------------------------------ predict


class _OptionalLabel:
    """The run's target coding, with NaN (regression) or -1 (classification) where a label is absent."""

    def __init__(self, target: TargetTransform):
        self.target, self.kind, self.name = target, target.kind, target.name

    def encode(self, labels: dict) -> float:
        if labels.get(self.name) is None:
            return math.nan if self.kind == "regression" else -1.0
        return self.target.encode(labels)


@torch.no_grad()
def predict_split(run: LoadedRun, split: str, rotations: int) -> dict[str, torch.Tensor]:
    """Predictions for every sample of ``split``, in index order: ``pred`` (decoded values, or class
    probabilities), ``true`` (NaN or -1 where unlabelled) and ``index``."""
    task, backend = run.data_task, run.backend
    builder, n = build_builder(run.data_cfg, task, split, augment=False)
    builder.target = _OptionalLabel(task.target)
    batches = eval_batches(builder, n, rank=0, world=1, batch=run.cfg.data.val_batch_size or run.cfg.data.batch_size,
                           workers=min(run.cfg.data.workers, 2))
    run.model.eval()
    outputs, targets, indices = [], [], []
    for batch in batches:
        x = batch["image"].to(backend.info.device)
        with backend.autocast():
            out = sum(run.model(torch.rot90(x, k, dims=(-2, -1))).float() for k in range(rotations)) / rotations
        outputs.append(out.cpu())
        targets.append(batch["target"])
        indices.append(batch["index"])
    out, true, index = torch.cat(outputs), torch.cat(targets), torch.cat(indices)
    pred = predictions_from_output(out, task.target.kind, task.loss_name)
    if task.target.kind == "regression":
        pred, true = task.target.decode(pred), task.target.decode(true)
    return {"pred": pred, "true": true, "index": index}


def main_predict(args) -> int:
    try:
        run = load_run(args.run, args.checkpoint, args.shards)
        n = check_split(run.data_task.manifest, args.split, Path(args.shards))
        rotations = tta_rotations(getattr(args, "tta", None), run.cfg)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    task = run.data_task
    log(f"{run.run_dir}: {run.cfg.model.name} from checkpoint {run.checkpoint.name} ({run.why}); "
        f"predicting {task.target.name!r} for the {args.split} split of {args.shards}, {n} samples; "
        f"{rotations} rotation(s) averaged")
    result = predict_split(run, args.split, rotations)
    true = result["true"]
    labelled = ~torch.isnan(true) if task.target.kind == "regression" else true >= 0
    write_predictions_csv(Path(args.out), task.target, split_keys(task.manifest, args.split), result["index"],
                          result["pred"], true if bool(labelled.any()) else None)
    log(f"wrote {len(result['index'])} rows to {args.out}"
        + ("" if bool(labelled.any()) else f" (no {task.target.name!r} labels, so no true_ column)"))
    return 0
