"""The model zoo. Build models with :func:`create_model`; list them with :func:`list_models`."""

from lenstrain.models.registry import (
    UnknownModelError,
    auxiliary_outputs,
    create_model,
    list_models,
    models_with_auxiliary,
    register_model,
)

__all__ = ["UnknownModelError", "auxiliary_outputs", "create_model", "list_models", "models_with_auxiliary",
           "register_model"]
