"""Fusion of any number of named sources given as :class:`TokenSet` s.

Every registered fusion (``FUSIONS``) is built as ``cls(sources, dim, **options)`` with a default for
every option, takes ``{name: TokenSet}`` and returns a :class:`FusionOutput` whose ``fused`` width is
``module.out_dim``; a source that is absent or fully masked behaves exactly as if it were not passed.
Building blocks that are not fusions of named sources (``Inject``, ``BudgetRouter``,
``DempsterFusion``) are in ``BLOCKS``. See ``docs/fusion.md`` and ``docs/fusion-modules.md``.
"""

from attnfuse.fusion._registry import (
    BLOCKS,
    FUSIONS,
    OUTPUTS,
    SYMMETRIES,
    get_block,
    get_fusion,
    list_blocks,
    list_fusions,
    register_block,
    register_fusion,
)
from attnfuse.fusion.axis import AxisAttention, LayerAttention
from attnfuse.fusion.coattention import CoAttention
from attnfuse.fusion.conditional import ConditionalCrossAttention
from attnfuse.fusion.cross import CrossAttentionFusion
from attnfuse.fusion.evidential import DempsterFusion, EvidentialFusion, EvidentialOutput
from attnfuse.fusion.export import TensorFusion
from attnfuse.fusion.gated import GatedFusion
from attnfuse.fusion.inject import Inject
from attnfuse.fusion.latent import LatentBottleneck
from attnfuse.fusion.mutual import MutualAttention, feature_map, feature_map_tokens
from attnfuse.fusion.parameter_free import ParameterFreeCrossAttention, multiscale_bank
from attnfuse.fusion.router import BudgetRouter, RouteDecision, run_where
from attnfuse.fusion.sources import FusionOutput, PreparedSource, SourceEmbedding
from attnfuse.fusion.stacks import EarlyFusion, HierarchicalFusion, LateFusion
from attnfuse.ops.evidential import dempster_combine, opinion_from_evidence
from attnfuse.tokens import TokenSet

__all__ = [
    "BLOCKS",
    "FUSIONS",
    "OUTPUTS",
    "SYMMETRIES",
    "AxisAttention",
    "BudgetRouter",
    "CoAttention",
    "ConditionalCrossAttention",
    "CrossAttentionFusion",
    "DempsterFusion",
    "EarlyFusion",
    "EvidentialFusion",
    "EvidentialOutput",
    "FusionOutput",
    "GatedFusion",
    "HierarchicalFusion",
    "Inject",
    "LateFusion",
    "LatentBottleneck",
    "LayerAttention",
    "MutualAttention",
    "ParameterFreeCrossAttention",
    "PreparedSource",
    "RouteDecision",
    "SourceEmbedding",
    "TensorFusion",
    "TokenSet",
    "dempster_combine",
    "feature_map",
    "feature_map_tokens",
    "get_block",
    "get_fusion",
    "list_blocks",
    "list_fusions",
    "multiscale_bank",
    "opinion_from_evidence",
    "register_block",
    "register_fusion",
    "run_where",
]
