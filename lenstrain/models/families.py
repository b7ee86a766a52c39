"""Imports every model family module so that their variants register themselves."""

import importlib
import pkgutil

import lenstrain.models as _pkg

_NOT_FAMILIES = {"registry", "families", "blocks"}

for _info in pkgutil.iter_modules(_pkg.__path__):
    if _info.name not in _NOT_FAMILIES and not _info.name.startswith("_"):
        importlib.import_module(f"lenstrain.models.{_info.name}")
