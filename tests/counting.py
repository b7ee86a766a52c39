"""Fixtures that count how often the real parser, validators, manifest loader and model builder run: each is
wrapped (the real one still runs and its result is used), never replaced. Tests import the fixtures they use."""

from __future__ import annotations

from collections import Counter

import pytest

from lenstrain.config.schema import LenstrainConfig


@pytest.fixture
def validations(monkeypatch) -> list[str]:
    """The names of the models validated from now on (a job is a JobSpec, a training config a LenstrainConfig)."""
    seen: list[str] = []
    original = LenstrainConfig.model_validate.__func__

    def counting(cls, *args, **kwargs):
        seen.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LenstrainConfig, "model_validate", classmethod(counting))
    return seen


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """From now on, how often a job file is parsed, a manifest loaded, a model built (on the meta device, by the
    checks) and a checkpoint's size estimated from one."""
    import launcher.spec
    import lenstrain.checkpointing.space
    import lenstrain.models
    import lenstrain.run.preflight
    import shards.manifest

    seen: Counter = Counter()

    def count(module, name: str, label: str) -> None:
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[label] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    count(launcher.spec, "parse_yaml_text", "job parsed")
    count(shards.manifest, "load_manifest", "manifest loaded")
    count(lenstrain.run.preflight, "create_model", "model built")
    count(lenstrain.models, "create_model", "model built")
    count(lenstrain.checkpointing.space, "estimate_meta_checkpoint_bytes", "checkpoint size estimated")
    return seen
