"""The model zoo. Build models with :func:`create_model`; list them with :func:`list_models`."""

from lenstrain.models.registry import UnknownModelError, create_model, list_models, register_model

__all__ = ["UnknownModelError", "create_model", "list_models", "register_model"]
