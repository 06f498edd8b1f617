"""Models assembled from ops / nn / fusion / encoders / heads."""

from attnfuse.models.fusion_model import ConcatMLP, FusionModel, build_fusion_model

__all__ = ["ConcatMLP", "FusionModel", "build_fusion_model"]
