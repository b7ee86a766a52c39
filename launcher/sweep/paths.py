"""The sweep directory's names (imported by the launcher's commands without loading Optuna).

``runs/SWEEP/`` holds ``sweep.yaml`` (the resolved sweep and base job), ``study.journal`` (the Optuna
study), ``jobs.json`` (the array jobs or local worker groups that served it), ``submitit/``, ``logs/``,
``report/`` and one ordinary run directory per trial, ``trial-NNNN/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SWEEP_FILE = "sweep.yaml"
JOURNAL_FILE = "study.journal"
REPORT_DIR = "report"
DEFAULT_RUNS_DIR = Path("runs")


@dataclass(frozen=True)
class SweepDir:
    root: Path

    @property
    def spec_file(self) -> Path:
        return self.root / SWEEP_FILE

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    def trial(self, number: int) -> Path:
        return self.root / f"trial-{number:04d}"


def is_sweep(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def find_sweep(ref: str, runs_dir: Path | None = None) -> Path | None:
    """The sweep directory named ``ref`` (under ``runs_dir``) or at path ``ref``; None if it is not a sweep."""
    for path in (Path(runs_dir or DEFAULT_RUNS_DIR) / ref, Path(ref)):
        if is_sweep(path):
            return path.resolve()
    return None
