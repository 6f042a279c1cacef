"""Image classifiers, built by name through a small registry."""

from iil_dist.models.registry import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "build_model"]
