"""Neighborhood attention (NATTEN semantics) on 1-, 2- and 3-D token grids.

Paper: Hassani et al., "Neighborhood Attention Transformer" (https://arxiv.org/abs/2204.07143) and
"Faster Neighborhood Attention" (https://arxiv.org/abs/2403.04690); stride from "Generalized
Neighborhood Attention" (https://arxiv.org/abs/2504.16922), as in NATTEN 0.21.
Status: exact (any kernel size, even or odd; stride; ``border="shift"`` as NATTEN or ``"clip"`` as
HaloNet); backends ``"natten"`` (when installed), ``"flex"`` (compiled FlexAttention),
``"tiled"`` (pure PyTorch, CPU training path) and ``"reference"`` (gather, weights).

Files: ``_windows.py`` (the window rule), ``reference.py``, ``tiled.py``, ``flex.py``,
``_natten.py`` (backends), ``functional.py`` (checks, dispatch, extra-key merge).
"""

from attnfuse.ops.neighborhood._windows import Geometry, make_geometry, window_indices
from attnfuse.ops.neighborhood.functional import neighborhood_attention

__all__ = ["Geometry", "make_geometry", "neighborhood_attention", "window_indices"]
