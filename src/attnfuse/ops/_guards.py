"""Guards every operator applies before its backend runs: empty inputs and masked keys.

Two rules hold for every operator (``docs/ops.md``, "Empty inputs" and "Masked positions"):

* **Empty in, empty out.** A call with nothing to compute (``B = 0``, ``H = 0``, no queries, no keys,
  an empty grid) returns outputs of the documented shapes without running a backend: ``out`` and
  ``weights`` are zeros (a query with no key returns 0), ``lse`` is ``-inf``. They are connected to the
  autograd graph of the inputs, so backward runs and gives zero gradients.
* **Masked positions never influence the result.** Keys and values at positions no query may attend
  are replaced by zeros (``torch.where``, so NaN / inf there cannot leak through ``0 * NaN``) before
  any matmul, in every backend. Finite values at masked keys are excluded exactly by the masked
  softmax already, so on the CPU, where checking is free, the zeroing is skipped when every value is
  finite (:func:`drop_masked_keys`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["drop_masked", "drop_masked_keys", "empty_like_result", "is_empty"]


def is_empty(*sizes: int) -> bool:
    """Whether any of the given extents (batch, heads, token counts) is 0."""
    return any(s == 0 for s in sizes)


def _anchor(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """A zero scalar that depends on every tensor that requires grad (``None`` if none does).

    Built from empty slices (``narrow(-1, 0, 0).sum()``), so it is exactly 0 even where an input holds
    NaN, costs nothing, and gives every input a zero gradient.
    """
    anchor = None
    for t in tensors:
        if t is not None and t.requires_grad and t.dim() > 0:
            part = t.narrow(-1, 0, 0).sum()
            anchor = part if anchor is None else anchor + part
    return anchor


def empty_like_result(
    q: Tensor,
    out_shape: Sequence[int],
    *,
    inputs: Sequence[Tensor | None],
    weights_shape: Sequence[int] | None = None,
    lse_shape: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The result of a call with nothing to compute: ``(out, weights, lse)`` in ``q``'s dtype and device.

    Args:
        q: the queries (dtype and device of the results).
        out_shape: shape of ``out`` (zeros).
        inputs: every tensor input of the call; the results depend on them (zero gradients).
        weights_shape: shape of the weights (zeros), or None.
        lse_shape: shape of the log-sum-exp (``-inf``), or None.
    """
    anchor = _anchor(inputs)

    def tie(t: Tensor) -> Tensor:
        return t if anchor is None else t + anchor.to(t.dtype)

    out = tie(q.new_zeros(tuple(out_shape)))
    weights = None if weights_shape is None else tie(q.new_zeros(tuple(weights_shape)))
    lse = None if lse_shape is None else tie(q.new_full(tuple(lse_shape), float("-inf")))
    return out, weights, lse


def drop_masked(t: Tensor, keep: Tensor | None) -> Tensor:
    """``t`` with the positions where ``keep`` is False set to exactly 0 (NaN / inf included).

    Shapes: ``t (B, H, *keys, C)``, ``keep`` bool broadcastable to ``(B, H, *keys)`` (or None: ``t`` as is).
    """
    if keep is None:
        return t
    return torch.where(keep.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def drop_masked_keys(k: Tensor, v: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keys and values with the positions no query may attend set to 0, before attention.

    Only non-finite values there can change an attention result (a finite masked key gets weight
    exactly 0, and ``0 * finite = 0``), so on the CPU outside ``torch.compile`` the ``where`` (a full
    pass over ``k`` and ``v``, and another in backward) is skipped when ``k`` and ``v`` are all finite:
    checking costs one reduction each and no device sync there. Elsewhere the zeros are always written.

    Shapes: ``k (B, H, *keys, D)``, ``v (B, H, *keys, Dv)``, ``keep`` bool broadcastable to ``(B, H, *keys)``.
    """
    if keep is None:
        return k, v
    if k.device.type == "cpu" and not torch.compiler.is_compiling() and bool(torch.isfinite(k.detach().sum() + v.detach().sum())):
        return k, v  # a sum is finite only if every term is: nothing can leak
    return drop_masked(k, keep), drop_masked(v, keep)
