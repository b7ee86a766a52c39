"""lenstrain: sharded, mixed-precision training of lensing models.

The package is grouped by concern: ``config``, ``data``, ``models``, ``optimization``, ``run`` (the training
loop), ``checkpointing``, ``parallel`` and ``evaluation``. The flat module paths of earlier releases (for
example ``lenstrain.checkpoint``) still import, as aliases of the modules' new homes listed in
:data:`MOVED`, so notebooks and pickled objects that name them keep working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {  # old module path -> its home
    f"lenstrain.{old}": f"lenstrain.{new}"
    for old, new in {
        "augment": "data.augment", "batches": "data.batches", "normalize": "data.normalize",
        "stream": "data.stream", "config_docs": "config.docs", "inherit": "config.inherit",
        "checkpoint": "checkpointing.checkpoint", "checkpoint_space": "checkpointing.space",
        "stateio": "checkpointing.stateio", "safepickle": "checkpointing.safepickle",
        "rundir": "checkpointing.rundir", "finetune": "checkpointing.finetune", "build": "run.build",
        "train": "run.train", "hooks": "run.hooks", "preemption": "run.preemption", "preflight": "run.preflight",
        "profiling": "run.profiling", "flops": "run.flops", "tb": "run.tb", "losses": "optimization.losses",
        "optim": "optimization.optimizers", "lr_find": "optimization.lr_find", "metrics": "evaluation.metrics",
        "evaluate": "evaluation.evaluate", "inference": "evaluation.inference", "export": "evaluation.export",
        "predict_files": "evaluation.predict_files", "plots": "evaluation.plots",
        "distributed": "parallel.distributed", "spawn": "parallel.spawn",
    }.items()
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the very module at its new home (one module object, not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    home_specs: dict = {}

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self.home_specs[module.__name__] = module.__spec__  # the import system sets the alias's spec next
        return module

    def exec_module(self, module):
        module.__spec__ = self.home_specs.pop(module.__name__, module.__spec__)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
