"""Fusion of any number of named sources given as :class:`TokenSet` s.

Every fusion module takes ``{name: TokenSet}`` and returns a :class:`FusionOutput`; a source that
is absent or fully masked behaves exactly as if it were not passed. See ``docs/fusion.md``.
"""

from attnfuse.fusion._registry import FUSIONS, SYMMETRIES, get_fusion, list_fusions, register_fusion
from attnfuse.fusion.cross import CrossAttentionFusion
from attnfuse.fusion.export import TensorFusion
from attnfuse.fusion.latent import LatentBottleneck
from attnfuse.fusion.sources import FusionOutput, PreparedSource, SourceEmbedding
from attnfuse.fusion.stacks import EarlyFusion, HierarchicalFusion, LateFusion
from attnfuse.tokens import TokenSet

__all__ = [
    "FUSIONS",
    "SYMMETRIES",
    "CrossAttentionFusion",
    "EarlyFusion",
    "FusionOutput",
    "HierarchicalFusion",
    "LateFusion",
    "LatentBottleneck",
    "PreparedSource",
    "SourceEmbedding",
    "TensorFusion",
    "TokenSet",
    "get_fusion",
    "list_fusions",
    "register_fusion",
]
