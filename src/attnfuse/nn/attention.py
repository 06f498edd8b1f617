"""Multi-head attention module over any registered operator (self- or cross-attention).

The module owns projections and output dropout; the math is one call to an operator from
:mod:`attnfuse.ops` resolved by name, so a new operator works here without touching this file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnfuse.nn._checks import resolve_head_dim
from attnfuse.ops import get_operator

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head attention with a pluggable operator.

    Self-attention on ``x``, or cross-attention when ``context`` is given. Tokens are
    channels-last ``(B, *tokens, C)``; the module converts to the heads-first operator layout once.
    A query with no allowed key gets an exactly zero update (no output-projection bias either),
    so a fully missing context is the same as no context.

    Args:
        dim: channel width ``C`` of the queries (and output).
        heads: number of heads; ``dim`` must be divisible by it.
        op: name of a registered operator (see :func:`attnfuse.ops.list_operators`).
        context_dim: channel width of ``context`` (default ``dim``).
        head_dim: per-head width (default ``dim // heads``).
        qkv_bias: bias in the q/k/v projections.
        dropout: dropout on the output.
        device, dtype: for the parameters.
        **op_kwargs: options of the operator (e.g. ``backend="reference"``, ``scale=1.0``),
            checked against its signature at construction.

    Raises:
        ValueError: bad sizes. KeyError: unknown ``op``. TypeError: unknown operator option.

    Shapes:
        x ``(B, *tokens, C)``; mask ``(B, *tokens)`` (query and key validity for self-attention);
        context ``(B, *ctx_tokens, Cc)``; context_mask ``(B, *ctx_tokens)``; value (values taken
        from other tokens than the keys, e.g. Q = V = text, K = audio) ``(B, *ctx_tokens, Cc)``;
        bias broadcastable to ``(B, H, L, S)``; out ``(B, *tokens, C)``; weights ``(B, H, L, S)``.

    Example:
        >>> attn = Attention(64, 4)
        >>> attn(torch.randn(2, 10, 64), mask=torch.ones(2, 10, dtype=torch.bool)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        op: str = "dense",
        context_dim: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        **op_kwargs,
    ) -> None:
        super().__init__()
        head_dim = resolve_head_dim(dim, heads, head_dim)
        self.spec = get_operator(op)
        self.spec.check_options(op_kwargs)
        self.op_kwargs = dict(op_kwargs)
        self.heads, self.head_dim = heads, head_dim
        dd = {"device": device, "dtype": dtype}
        inner = heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias, **dd)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias, **dd)
        self.proj = nn.Linear(inner, dim, **dd)
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        # (B, *tokens, H*Dh) -> (B, H, *tokens, Dh)
        t = t.unflatten(-1, (self.heads, self.head_dim))  # (B, *tokens, H, Dh)
        t = t.movedim(-2, 1)  # (B, H, *tokens, Dh)
        if self.spec.layout == "sequence":
            t = t.flatten(2, -2)  # (B, H, L, Dh)
        return t

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        value: Tensor | None = None,
        bias: Tensor | None = None,
        is_causal: bool = False,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend; see the class docstring for shapes. Returns ``out`` or ``(out, weights)``."""
        if x.dim() < 3:
            raise ValueError(f"x must be (B, *tokens, C), got x.shape={tuple(x.shape)}")
        if context is None:
            kv, key_mask = x, mask
        else:
            if not self.spec.cross:
                raise ValueError(f"operator {self.spec.name!r} does not support cross-attention (context=)")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context batch {context.shape[0]} differs from x batch {x.shape[0]}")
            kv, key_mask = context, context_mask
        for name, m, t in (("mask", mask, x), ("context_mask", key_mask, kv)):
            if m is not None and (m.dtype != torch.bool or m.shape != t.shape[:-1]):
                raise ValueError(f"{name} must be bool with shape {tuple(t.shape[:-1])}, got {m.dtype} {tuple(m.shape)}")
        q = self._split(self.to_q(x))
        k = self._split(self.to_k(kv))
        if value is not None:
            if context is None or value.shape[:-1] != context.shape[:-1]:
                raise ValueError(
                    "value must come with context= and have its token shape "
                    f"{None if context is None else tuple(context.shape[:-1])}, got value.shape={tuple(value.shape)}"
                )
        v = self._split(self.to_v(kv if value is None else value))
        op_mask = None
        if key_mask is not None:
            if self.spec.layout == "sequence":
                op_mask = key_mask.reshape(key_mask.shape[0], 1, 1, -1)  # (B, 1, 1, S)
            else:
                op_mask = key_mask.unsqueeze(1)  # (B, 1, *grid)
        call = {"mask": op_mask, **self.op_kwargs}
        if bias is not None:
            call["bias"] = bias
        if is_causal:
            call["is_causal"] = True
        result = self.spec.fn(q, k, v, return_weights=return_weights, **call)
        out, weights = result if return_weights else (result, None)
        out = out.movedim(1, -2)  # (B, *tokens or L, H, Dh)
        out = out.reshape(*x.shape[:-1], self.heads * self.head_dim)  # (B, *tokens, H*Dh)
        out = self.dropout(self.proj(out))
        if key_mask is not None:
            flat = key_mask.reshape(key_mask.shape[0], -1)  # (B, S)
            if is_causal and self.spec.layout == "sequence":
                # query i sees keys j <= i (top-left aligned): it has a key iff one of them is valid
                seen = flat.cumsum(dim=1) > 0  # (B, S)
                n_q = out.reshape(out.shape[0], -1, out.shape[-1]).shape[1]
                idx = torch.arange(n_q, device=out.device).clamp(max=flat.shape[1] - 1)
                if flat.shape[1] > 0:
                    has_key = seen[:, idx]  # (B, L)
                else:
                    has_key = torch.zeros(flat.shape[0], n_q, dtype=torch.bool, device=out.device)
                out = out * has_key.reshape(*out.shape[:-1], 1).to(out.dtype)
            else:
                has_key = flat.any(dim=1)  # (B,)
                out = out * has_key.reshape(-1, *([1] * (out.dim() - 1))).to(out.dtype)
        return (out, weights) if return_weights else out
