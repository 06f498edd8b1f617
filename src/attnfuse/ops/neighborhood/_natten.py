"""Backend that calls the ``natten`` package (NATTEN >= 0.20 functional API) when it is importable.

NATTEN is heads-last ``(B, *grid, H, D)``; this backend transposes at its edges. NATTEN >= 0.20 has
no relative-position bias and no key mask, NATTEN only shifts windows inward (no ``border="clip"``)
and needs kernel sizes >= 2, so calls with any of these go to another backend. Even kernels and
``stride`` are passed through (NATTEN >= 0.20). The
package is looked up when a call is dispatched, never at import.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from attnfuse.ops.neighborhood._windows import Geometry

__all__ = ["natten_neighborhood", "natten_unavailable"]


def natten_unavailable() -> str | None:
    """``"natten not installed"`` if the package cannot be imported, else ``None``."""
    return None if importlib.util.find_spec("natten") is not None else "natten not installed"


def natten_neighborhood(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    geom: Geometry,
    *,
    scale: float,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    need_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Neighborhood attention through ``natten.na{1,2,3}d``; inputs are assumed validated.

    Returns:
        ``(out (B, H, *grid, Dv), lse (B, H, *grid) or None)``.
    """
    import natten

    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[geom.rank]
    q_l, k_l, v_l = (t.movedim(1, -2).contiguous() for t in (q, k, v))  # (B, *grid, H, D); NATTEN wants contiguous
    extra = {}
    if extra_k is not None:
        extra = {  # (B, S, H, D)
            "additional_keys": extra_k.transpose(1, 2).contiguous(),
            "additional_values": extra_v.transpose(1, 2).contiguous(),
        }
    result = fn(
        q_l, k_l, v_l, kernel_size=geom.kernel, stride=geom.stride, dilation=geom.dilation, is_causal=geom.causal,
        scale=scale, return_lse=need_lse, **extra,
    )
    out, lse = result if need_lse else (result, None)
    out = out.movedim(-2, 1)  # (B, H, *grid, Dv)
    if lse is not None:
        lse = lse.movedim(-1, 1).to(out.dtype)  # (B, H, *grid)
    return out, lse
