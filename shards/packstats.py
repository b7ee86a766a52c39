"""The statistics a manifest records, gathered while packing: pixel and regression-target moments over the
train split, and class counts per split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shards.manifest import Target
from shards.moments import Moments


@dataclass(frozen=True)
class TargetSpec:
    """A target to pack: its label key, its kind, and a classification target's class names."""

    name: str
    kind: str  # "regression" | "classification"
    classes: list[str] | None = None


class PackStatistics:
    def __init__(self, targets: Sequence[TargetSpec], splits: Sequence[str]):
        self.targets = list(targets)
        self.pixels = Moments()
        self.values = {t.name: Moments() for t in targets if t.kind == "regression"}
        self.class_counts = {t.name: {s: dict.fromkeys(t.classes or [], 0) for s in splits}
                             for t in targets if t.kind == "classification"}
        self._class_names = {t.name: dict(enumerate(t.classes or [])) for t in targets}

    def add(self, split: str, labels: dict, pixels: Moments) -> None:
        """Count one packed sample: its labels, and the moments of its stored pixels."""
        if split == "train":
            self.pixels.merge(pixels)
            for name, moments in self.values.items():
                if labels.get(name) is not None:  # a target that only some samples carry
                    moments.add([labels[name]])
        for name, counts in self.class_counts.items():
            if labels.get(name) is not None:
                cls = self._class_names[name].get(labels[name], str(labels[name]))
                counts[split][cls] = counts[split].get(cls, 0) + 1

    def manifest_targets(self) -> dict[str, Target]:
        return {t.name: Target(kind=t.kind, classes=t.classes,
                               stats=self.values[t.name].stats() if t.name in self.values else None,
                               class_counts=self.class_counts.get(t.name))
                for t in self.targets}
