"""Helpers shared by the importers: image layout, sample order, the stratified split, source errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from shards.options import PackOptions
from shards.pack import BadSample, PackResult, SampleFn, TargetSpec, pack_shard_set
from shards.splits import stratified_split

CHANNELS = (1, 3)


class SourceError(ValueError):
    """A source that cannot be imported as a whole (missing, empty, inconsistent)."""


def to_chw(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as ``(C, H, W)``; accepts ``(H, W)``, ``(C, H, W)`` and ``(H, W, C)`` with C in {1, 3}.

    A leading axis of 1 or 3 is read as channels first, so ``(3, H, 3)`` is channels first.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "fiub":
        raise BadSample(f"image has dtype {image.dtype}, expected numbers")
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        if image.shape[0] in CHANNELS:
            return image
        if image.shape[2] in CHANNELS:
            return np.moveaxis(image, 2, 0)
    raise BadSample(f"image has shape {tuple(image.shape)}; expected (H,W), (C,H,W) or (H,W,C) with C in {{1,3}}")


def check_shape(image: np.ndarray, expected: tuple[int, ...] | None) -> np.ndarray:
    if expected is not None and tuple(image.shape) != tuple(expected):
        raise BadSample(f"image has shape {tuple(image.shape)} (as C,H,W); the data set's is {tuple(expected)}")
    return image


def sample_order(n: int, seed: int) -> np.ndarray:
    """The order in which source items are packed: a seeded permutation, so every shard mixes classes."""
    return np.random.default_rng([seed, 0x5EED]).permutation(n)


def pack_source(out: str | os.PathLike, sample_fn: SampleFn, strata: np.ndarray, *, targets: Sequence[TargetSpec],
                primary_target: str, source: dict, options: PackOptions, describe: Callable[[int], str],
                regression: bool = False) -> PackResult:
    """Split the samples stratified by ``strata`` (classes, or a regression target's quantile bins) as
    ``options`` asks, and pack them; the manifest's source records the split."""
    split_of = stratified_split(strata, val=options.val, test=options.test, seed=options.seed, regression=regression)
    return pack_shard_set(out, sample_fn=sample_fn, split_of=list(split_of), targets=targets,
                          primary_target=primary_target, source={**source, **options.split_record()},
                          options=options, describe=describe, desc="importing")
