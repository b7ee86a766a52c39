"""The report hook: how something outside training (a sweep's trial) hears each validation and may stop the run.

Training never imports a tuner. Whoever calls :func:`lenstrain.run.train.run_training` may first
:func:`install` a function ``(step, metrics) -> prune?``; the loop calls it on the main rank after every
validation. When it answers True, the run writes a checkpoint, records its hyperparameters and ends with
:data:`EXIT_PRUNED`. ``hparams`` given to :func:`install` are added to the run's TensorBoard hparams
(a sweep passes the trial's parameters, so TensorBoard's HPARAMS tab compares its trials).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shards.exitcodes import EXIT_PRUNED as EXIT_PRUNED  # the table with its meaning: shards.exitcodes

ReportHook = Callable[[int, dict[str, float]], bool]

_hook: ReportHook | None = None
_hparams: dict[str, Any] = {}


def install(hook: ReportHook, hparams: dict[str, Any] | None = None) -> None:
    """Call ``hook(step, metrics)`` after each validation of the runs started from now on in this process."""
    global _hook, _hparams
    _hook, _hparams = hook, dict(hparams or {})


def uninstall() -> None:
    global _hook, _hparams
    _hook, _hparams = None, {}


def report(step: int, metrics: dict[str, float]) -> bool:
    """Tell the installed hook about a validation; True when it asks the run to stop (no hook: never)."""
    return bool(_hook(step, dict(metrics))) if _hook is not None else False


def extra_hparams() -> dict[str, Any]:
    """Hyperparameters the installer wants recorded with the run's own (e.g. a sweep trial's parameters)."""
    return dict(_hparams)
