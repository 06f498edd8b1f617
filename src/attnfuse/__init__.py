"""attnfuse: attention operators and attention-based fusion of many inputs."""

from attnfuse import fusion, heads, nn, ops
from attnfuse.fusion import (
    CrossAttentionFusion,
    EarlyFusion,
    FusionOutput,
    HierarchicalFusion,
    LateFusion,
    LatentBottleneck,
)
from attnfuse.nn import Attention, Encoder, TransformerBlock
from attnfuse.ops import dense_attention, merge_attention
from attnfuse.tokens import TokenSet

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "CrossAttentionFusion",
    "EarlyFusion",
    "Encoder",
    "FusionOutput",
    "HierarchicalFusion",
    "LateFusion",
    "LatentBottleneck",
    "TokenSet",
    "TransformerBlock",
    "dense_attention",
    "fusion",
    "heads",
    "merge_attention",
    "nn",
    "ops",
]
