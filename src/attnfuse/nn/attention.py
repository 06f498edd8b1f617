"""Multi-head attention module over any registered operator (self- or cross-attention).

The module owns projections and output dropout; the math is one call to an operator from
:mod:`attnfuse.ops`, chosen by name or by its typed options (:class:`attnfuse.ops.OpConfig`), so a
new operator works here without touching this file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import attnfuse.distributed  # noqa: F401  (registers "ring" / "ulysses" in attnfuse.ops.EXTENSIONS)
from attnfuse.nn._checks import resolve_head_dim
from attnfuse.ops import OpConfig, op_config

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head attention with a pluggable operator.

    Self-attention on ``x``, or cross-attention when ``context`` is given. Tokens are
    channels-last ``(B, *tokens, C)``; the module converts to the heads-first operator layout once
    (sequence operators see the tokens flattened to ``L`` / ``S``, grid operators the grid as is).
    Token validity (``mask`` / ``context_mask``) reaches every operator as its **key mask**
    (``(B, S)`` or ``(B, *grid)``); a **pair mask** (``pair_mask``) reaches only operators that take
    one. A query with no allowed key gets an exactly zero update (no output-projection bias either),
    so a fully missing context is the same as no context.

    Args:
        dim: channel width ``C`` of the queries (and output).
        heads: number of heads; ``dim`` must be divisible by it.
        op: the operator: its typed options (``attnfuse.ops.configs.Dense(backend="reference")``,
            ``Neighborhood(kernel_size=7)``; YAML ``{class_path: attnfuse.ops.configs.Neighborhood,
            init_args: {kernel_size: 7}}``) or a registered name (``"dense"``, or the class name
            ``"Dense"``) for its default options; see :func:`attnfuse.ops.list_operators`. The
            sequence-parallel ``"ring"`` / ``"ulysses"`` (``attnfuse.distributed.Ring`` / ``Ulysses``, resolved
            through ``attnfuse.ops.EXTENSIONS``) run on this rank's shard of a process group, locally without one.
        context_dim: channel width of ``context`` (default ``dim``).
        head_dim: per-head width (default ``dim // heads``).
        qkv_bias: bias in the q/k/v projections.
        dropout: dropout on the output.
        device, dtype: for the parameters.
        **op_kwargs: legacy form of the operator options (e.g. ``backend="reference"``); they
            override the fields of ``op``. Prefer ``op=<Config>(...)``.

    Raises:
        KeyError: unknown ``op`` name.
        TypeError: an unknown operator option, or a required one (no default, e.g. ``kernel_size``) missing.
        ValueError: bad sizes.

    Shapes:
        x ``(B, *tokens, C)``; mask ``(B, *tokens)``: which tokens exist (keys and queries of
        self-attention); context ``(B, *ctx_tokens, Cc)``; context_mask ``(B, *ctx_tokens)``: which
        context tokens exist; value (values taken from other tokens than the keys, e.g. Q = V = text,
        K = audio) ``(B, *ctx_tokens, Cc)``; pair_mask bool broadcastable to ``(B, H, L, S)`` over the
        flattened tokens (operators with pair masks only: ``dense``, ``silu_kernel``); bias in the
        operator's bias layout (``(B, H, L, S)`` for ``dense``, ``(B, H, NB, Bq, W)`` for ``halo``,
        ``(B, H, *grid, K)`` for ``neighborhood``; the others take none); out ``(B, *tokens, C)``;
        weights in the operator's layout (``(B, H, L, S)`` for sequence operators).

    Example:
        >>> from attnfuse.ops.configs import Dense
        >>> attn = Attention(64, 4, op=Dense(backend="reference"))
        >>> attn(torch.randn(2, 10, 64), mask=torch.ones(2, 10, dtype=torch.bool)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        op: str | OpConfig = "dense",
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
        self.op = op_config(op, **op_kwargs)
        self.spec = self.op.spec
        self.op_kwargs = dict(op_kwargs)  # the legacy keyword options as given
        self._options = self.op.options()
        self.heads, self.head_dim = heads, head_dim
        dd = {"device": device, "dtype": dtype}
        inner = heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias, **dd)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias, **dd)
        self.proj = nn.Linear(inner, dim, **dd)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"op={self.op!r}, heads={self.heads}, head_dim={self.head_dim}"

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
        pair_mask: Tensor | None = None,
        bias: Tensor | None = None,
        is_causal: bool = False,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend; see the class docstring for shapes. Returns ``out`` or ``(out, weights)``.

        Raises:
            ValueError: bad shapes, ``context`` with an operator that has no cross-attention.
            TypeError: ``pair_mask``, ``bias`` or ``is_causal`` with an operator that does not take it
                (the message names the operator and what it takes).
        """
        if x.dim() < 3:
            raise ValueError(f"x must be (B, *tokens, C), got x.shape={tuple(x.shape)}")
        spec = self.spec
        for keyword, given in (("mask", pair_mask is not None), ("bias", bias is not None), ("is_causal", is_causal)):
            if given and not spec.takes.takes(keyword):
                raise spec.unsupported(keyword)
        if context is None:
            kv, key_mask = x, mask
        else:
            if not spec.cross:
                raise ValueError(f"operator {spec.name!r} does not support cross-attention (context=)")
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
        call = dict(self._options)
        n_q, n_k = math.prod(x.shape[1:-1]), math.prod(kv.shape[1:-1])  # explicit: reshape cannot infer -1 when B = 0
        if key_mask is not None:
            # the key mask: (B, S) for sequence operators, (B, *grid) for grid operators
            call["key_mask"] = key_mask.reshape(key_mask.shape[0], n_k) if spec.layout == "sequence" else key_mask
        if pair_mask is not None:
            call["mask"] = pair_mask
        if bias is not None:
            call["bias"] = bias
        if is_causal:
            call["is_causal"] = True
        result = spec.fn(q, k, v, return_weights=return_weights, **call)
        out, weights = result if return_weights else (result, None)
        out = out.movedim(1, -2)  # (B, *tokens or L, H, Dh)
        out = out.reshape(*x.shape[:-1], self.heads * self.head_dim)  # (B, *tokens, H*Dh)
        out = self.dropout(self.proj(out))
        has_key = self._has_key(key_mask, pair_mask, call.get("is_causal") is True, x.shape[0], n_q, n_k)  # (B, L)
        if has_key is not None:
            out = out * has_key.reshape(*out.shape[:-1], 1).to(out.dtype)
        return (out, weights) if return_weights else out

    def _has_key(self, key_mask: Tensor | None, pair_mask: Tensor | None, causal: bool, b: int, n_q: int,
                 n_k: int) -> Tensor | None:
        """Which of the ``n_q`` queries have at least one allowed key, ``(B, n_q)``; None = all of them."""
        if key_mask is None and pair_mask is None:
            return None
        if self.spec.layout != "sequence":  # grid operators: zero only a sample without any key
            return key_mask.reshape(b, n_k).any(dim=1, keepdim=True).expand(b, n_q)
        device = pair_mask.device if key_mask is None else key_mask.device
        if pair_mask is not None:  # explicit (query, key) pairs: a query has a key if some head allows one
            allowed = pair_mask
            if key_mask is not None:
                allowed = allowed & key_mask.reshape(b, 1, 1, n_k)  # (B, 1, 1, S)
            if causal:
                allowed = allowed & torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()  # (L, S)
            allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))  # (B?, H?, L?, S?)
            return allowed.any(dim=-1).any(dim=1).expand(b, n_q)  # (B, L)
        flat = key_mask.reshape(b, n_k)  # (B, S)
        if not causal:
            return flat.any(dim=1, keepdim=True).expand(b, n_q)  # (B, L)
        # query i sees keys j <= i (top-left aligned): it has a key iff one of them is valid
        if n_k == 0:
            return torch.zeros(b, n_q, dtype=torch.bool, device=device)
        seen = flat.cumsum(dim=1) > 0  # (B, S)
        idx = torch.arange(n_q, device=device).clamp(max=n_k - 1)
        return seen[:, idx]  # (B, L)
