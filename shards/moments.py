"""Running count, sum, sum of squares, min and max of numbers: the manifest's statistics, gathered in one pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shards.manifest import Stats


@dataclass
class Moments:
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    @classmethod
    def of(cls, values) -> Moments:
        moments = cls()
        moments.add(values)
        return moments

    def add(self, values) -> None:
        v = np.asarray(values, dtype=np.float64)
        if v.size:
            self.merge(Moments(v.size, float(v.sum()), float(np.square(v).sum()), float(v.min()), float(v.max())))

    def merge(self, other: Moments) -> None:
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def stats(self) -> Stats | None:
        """Mean, population std, min and max; ``None`` when nothing was added."""
        if self.n == 0:
            return None
        mean = self.total / self.n
        std = math.sqrt(max(self.total_sq / self.n - mean * mean, 0.0))
        return Stats(mean=mean, std=std, min=self.lo, max=self.hi, count=self.n)
