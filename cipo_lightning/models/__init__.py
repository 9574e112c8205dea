"""Model resolution: the embedded default model, local folders, hub ids, and tiny test models."""

from cipo_lightning.models.embedded import EMBEDDED_MODEL, resolve_model_path
from cipo_lightning.models.tiny import build_tiny_model

__all__ = ["EMBEDDED_MODEL", "build_tiny_model", "resolve_model_path"]
