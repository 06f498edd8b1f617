"""Modules with parameters built on :mod:`attnfuse.ops` operators."""

from attnfuse.nn import _builtin  # noqa: F401  (registry entries of the modules above)
from attnfuse.nn._registry import MODULES, get_module, list_modules, register_module
from attnfuse.nn.attention import Attention
from attnfuse.nn.deconstructed import DeconstructedEncoder, DecoupledAttention, GatedMLPMixer
from attnfuse.nn.edge import AdaptiveEdgeBlend, EdgeOperator
from attnfuse.nn.factorized import FactorizedEncoder
from attnfuse.nn.feature_map import FeatureMapAttention, pad_images, valid_mask
from attnfuse.nn.frequency import (
    AdaptiveLaplacianConv,
    AutocorrelationFFN,
    FrequencyCrossAttention,
    FrequencySpatialAttention,
    PhaseFusion,
    WaveletDirectionalAttention,
)
from attnfuse.nn.gates import CoordinateAttention, ResolutionAwareChannelAttention, SqueezeExcite
from attnfuse.nn.local import HaloAttention, RoutingAttention
from attnfuse.nn.moa import MixtureOfAttention
from attnfuse.nn.moe import MoEFeedForward, ParallelBlock
from attnfuse.nn.moh import MixtureOfHeadAttention, collect_routing, convert_to_moh
from attnfuse.nn.neighborhood import NeighborhoodAttention
from attnfuse.nn.random_feature import RandomFeatureAttention
from attnfuse.nn.transformer import MLP, Encoder, TransformerBlock

__all__ = [
    "MLP",
    "MODULES",
    "AdaptiveEdgeBlend",
    "AdaptiveLaplacianConv",
    "Attention",
    "AutocorrelationFFN",
    "CoordinateAttention",
    "DeconstructedEncoder",
    "DecoupledAttention",
    "EdgeOperator",
    "Encoder",
    "FactorizedEncoder",
    "FeatureMapAttention",
    "FrequencyCrossAttention",
    "FrequencySpatialAttention",
    "GatedMLPMixer",
    "HaloAttention",
    "MixtureOfAttention",
    "MixtureOfHeadAttention",
    "MoEFeedForward",
    "NeighborhoodAttention",
    "ParallelBlock",
    "PhaseFusion",
    "RandomFeatureAttention",
    "ResolutionAwareChannelAttention",
    "RoutingAttention",
    "SqueezeExcite",
    "TransformerBlock",
    "WaveletDirectionalAttention",
    "collect_routing",
    "convert_to_moh",
    "get_module",
    "list_modules",
    "pad_images",
    "register_module",
    "valid_mask",
]
