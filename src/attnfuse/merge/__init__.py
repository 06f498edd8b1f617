"""Model-level fusion: build one model out of several trained ones.

- :func:`ot_fuse`, :func:`vanilla_average`, :class:`Ensemble`, :func:`fuse`: optimal-transport fusion of
  Transformers (Imfeld et al., "Transformer Fusion with Optimal Transport", arXiv 2310.05719, ICLR 2024) and
  its baselines; maps from :func:`transport_map` over the flow graph :class:`TransportGraph`.
- :func:`bam_upcycle`, :func:`btx_upcycle`: dense specialists upcycled into a mixture of FFN experts and
  soft-routed attention experts (Zhang et al., "BAM! Just Like That", arXiv 2408.08274, NeurIPS 2024).

Optimal transport is solved by POT, the optional extra ``attnfuse[merge]`` (imported on first use).
See ``docs/merge.md``.
"""

from attnfuse.merge.fuse import Ensemble, FusionReport, fuse, ot_fuse, vanilla_average
from attnfuse.merge.graph import Axis, Site, TransportGraph
from attnfuse.merge.transport import RESIDUAL_POLICIES, combine_maps, transport_map, transport_plan
from attnfuse.merge.upcycle import bam_upcycle, btx_upcycle, moe_aux_loss

__all__ = [
    "RESIDUAL_POLICIES",
    "Axis",
    "Ensemble",
    "FusionReport",
    "Site",
    "TransportGraph",
    "bam_upcycle",
    "btx_upcycle",
    "combine_maps",
    "fuse",
    "moe_aux_loss",
    "ot_fuse",
    "transport_map",
    "transport_plan",
    "vanilla_average",
]
