"""Mixture-of-Head attention (MoH): multi-head attention whose heads are experts chosen per token.

Paper: Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv 2410.11842
(ICML 2025); released code ``SkyworkAI/MoH``. Spec and results: ``docs/moh.md``.

Status: complete (learned two-stage router and MoH-LLaMA3's parameter-free query-norm router, both gate
scalings, dense-gated and sparse head computation, conversion from :class:`attnfuse.nn.Attention`,
routing records for the load-balance loss). The parameter-free math is :mod:`attnfuse.ops.moh`.

::

    h heads = h_s shared (always on, first) + E = h - h_s routed (top-k per token)
    out_t = W_O · concat_i( g_i(x_t) · H_i(t) )          H_i = softmax(q_i k_i^T / sqrt(d)) v_i
    router="linear":     logits  W_r x (E), W_s x (h_s, only if h_s > 1), W_h x (2, only if h_s > 0 and k > 0)
    router="query_norm": logits  ||q_i|| / std_j ||q_j|| over the routed heads; binary gates

Deviations from the released code (documented in ``docs/moh.md``): the router may be zero-initialised
(``router_init="zeros"``, the default here; the released code uses PyTorch's default ``nn.Linear`` init),
which makes a fresh or converted layer exactly MHA with the unselected heads zeroed; routing records are
returned (``return_routing=True`` or :func:`collect_routing`) instead of a class-level loss list.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.nn._checks import resolve_head_dim
from attnfuse.nn._registry import register_module
from attnfuse.nn.attention import Attention
from attnfuse.ops.moh import MoHRouting, mixture_of_heads, moh_route, query_norm_logits

__all__ = ["MixtureOfHeadAttention", "MoHRouting", "collect_routing", "convert_to_moh"]

_SINK: contextvars.ContextVar[list[MoHRouting] | None] = contextvars.ContextVar("attnfuse_moh_routing", default=None)


@contextlib.contextmanager
def collect_routing() -> Iterator[list[MoHRouting]]:
    """Collect the :class:`MoHRouting` record of every MoH layer that runs inside the ``with`` block.

    For MoH layers nested in blocks that do not pass routing on (``nn.TransformerBlock``, ``nn.Encoder``).
    The list is local to the block (a context variable, restored on exit), so several models per process
    work; a layer run twice (activation checkpointing recomputes) records twice.

    Example:
        >>> with collect_routing() as records:
        ...     y = encoder(x)                                       # doctest: +SKIP
        >>> aux = moh_load_balance_total(records, beta=0.01)         # doctest: +SKIP
    """
    records: list[MoHRouting] = []
    token = _SINK.set(records)
    try:
        yield records
    finally:
        _SINK.reset(token)


def _tiny() -> tuple[nn.Module, tuple[Tensor, ...]]:
    module = MixtureOfHeadAttention(16, 6, shared=2, top_k=2, head_dim=4)  # 4 of 6 heads; W_r, W_s, W_h all present
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, -2:] = False
    return module, (x, mask)


@register_module("moh_attention", group="attention", example=_tiny)
class MixtureOfHeadAttention(nn.Module):
    """Self-attention with shared heads always on and routed heads chosen per token (MoH).

    Same projections as :class:`attnfuse.nn.Attention` (``to_q``, ``to_k``, ``to_v``, ``proj``), so a trained
    MHA converts with :meth:`from_attention`. Heads ``0..shared-1`` are shared, the others routed.

    Args:
        dim: channel width ``C``.
        heads: number of heads ``h``.
        shared: shared heads ``h_s`` (always on).
        top_k: routed heads per token ``k`` (``1 <= k <= E = h - h_s``; 0 only when ``shared == heads``).
            Active fraction ``(h_s + k) / h``.
        router: ``"linear"`` (learned two-stage router of MoH-ViT / MoH-DiT) or ``"query_norm"``
            (MoH-LLaMA3's parameter-free router, binary gates; needs ``E >= 2``).
        gate_scale: ``"code"`` (released code: top-k renormalised ``× k``, shared ``× h_s``, mix ``× 2``; a
            zero router gives gates exactly 1) or ``"paper"`` (the paper's formula, gates sum to <= 1).
            ``router="query_norm"`` always uses binary gates (``gate_scale`` must stay ``"code"``).
        router_init: ``"zeros"`` (every selected gate 1 at the start: MHA with the unselected heads zeroed) or
            ``"default"`` (PyTorch's ``nn.Linear`` init, as the released code).
        compute: ``"dense"`` (every head computed, then gated; the reference, exportable) or ``"sparse"``
            (only the selected (token, head) pairs; see :func:`attnfuse.ops.moh.mixture_of_heads`).
        head_dim: per-head width (default ``dim // heads``).
        qkv_bias: bias in the q/k/v projections.
        dropout: dropout on the output.
        device, dtype: for the parameters.

    Raises:
        ValueError: bad sizes or options.

    Warns:
        UserWarning: ``router="linear"``, ``gate_scale="code"`` and ``top_k == 1``: the renormalised routed gate
            is identically 1, so the task loss gives the routed router ``W_r`` no gradient (only the
            load-balance loss trains it).

    Shapes:
        x ``(B, N, C)``, mask ``(B, N)`` bool (True = token exists); out ``(B, N, C)``; weights (gated)
        ``(B, H, N, N)``; routing: :class:`attnfuse.ops.moh.MoHRouting` with ``probs (B, N, E)``,
        ``selected (B, N, k)``, ``gates (B, N, H)``, ``token_mask (B, N)``.

    Example:
        >>> moh = MixtureOfHeadAttention(64, 8, shared=2, top_k=2)       # 4 of 8 heads per token
        >>> out, routing = moh(torch.randn(2, 10, 64), return_routing=True)
        >>> out.shape, routing.active_fraction().mean().item()
        (torch.Size([2, 10, 64]), 0.5)
        >>> aux = 0.01 * routing.balance_loss()                          # add to the task loss
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        shared: int,
        top_k: int,
        router: Literal["linear", "query_norm"] = "linear",
        gate_scale: Literal["code", "paper"] = "code",
        router_init: Literal["zeros", "default"] = "zeros",
        compute: Literal["dense", "sparse"] = "dense",
        head_dim: int | None = None,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        head_dim = resolve_head_dim(dim, heads, head_dim)
        if not isinstance(shared, int) or not 0 <= shared <= heads:
            raise ValueError(f"shared must be an int in [0, heads={heads}], got {shared!r}")
        routed = heads - shared
        if not isinstance(top_k, int) or not 0 <= top_k <= routed or (routed > 0 and top_k == 0):
            raise ValueError(
                f"top_k must be an int in [1, heads - shared = {routed}] (0 only when shared == heads), got {top_k!r}"
            )
        if router not in ("linear", "query_norm"):
            raise ValueError(f"router must be 'linear' or 'query_norm', got {router!r}")
        if gate_scale not in ("code", "paper"):
            raise ValueError(f"gate_scale must be 'code' or 'paper', got {gate_scale!r}")
        if router == "query_norm" and gate_scale != "code":
            raise ValueError("router='query_norm' uses binary gates (MoH-LLaMA3); leave gate_scale='code'")
        if router == "query_norm" and routed < 2:
            raise ValueError(f"router='query_norm' needs at least 2 routed heads (heads - shared), got {routed}")
        if router_init not in ("zeros", "default"):
            raise ValueError(f"router_init must be 'zeros' or 'default', got {router_init!r}")
        if compute not in ("dense", "sparse"):
            raise ValueError(f"compute must be 'dense' or 'sparse', got {compute!r}")
        if router == "linear" and gate_scale == "code" and top_k == 1 and routed > 1:
            warnings.warn(
                "MixtureOfHeadAttention(top_k=1, gate_scale='code'): the renormalised routed gate is identically 1, so "
                "the task loss sends no gradient to the router W_r; only the load-balance loss trains it",
                UserWarning, stacklevel=2,
            )
        self.heads, self.head_dim, self.shared, self.routed, self.top_k = heads, head_dim, shared, routed, top_k
        self.router, self.gate_scale, self.compute = router, gate_scale, compute
        dd = {"device": device, "dtype": dtype}
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.proj = nn.Linear(inner, dim, **dd)
        self.dropout = nn.Dropout(dropout)
        linear = router == "linear"
        self.w_routed = nn.Linear(dim, routed, bias=False, **dd) if linear and routed > 0 else None  # W_r
        self.w_shared = nn.Linear(dim, shared, bias=False, **dd) if linear and shared > 1 else None  # W_s
        self.w_mix = nn.Linear(dim, 2, bias=False, **dd) if linear and shared > 0 and top_k > 0 else None  # W_h
        if router_init == "zeros":
            for w in (self.w_routed, self.w_shared, self.w_mix):
                if w is not None:
                    nn.init.zeros_(w.weight)

    @property
    def active_fraction(self) -> float:
        """Fraction of heads each token uses, ``(shared + top_k) / heads``."""
        return (self.shared + self.top_k) / self.heads

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, shared={self.shared}, top_k={self.top_k} of {self.routed}, "
                f"router={self.router!r}, gate_scale={self.gate_scale!r}, compute={self.compute!r}")

    def route(self, x: Tensor, q: Tensor, mask: Tensor | None = None) -> MoHRouting:
        """The routing of tokens ``x (B, N, C)`` with queries ``q (B, H, N, Dh)``; see :func:`attnfuse.ops.moh.moh_route`."""
        if self.router == "query_norm":
            return moh_route(query_norm_logits(q, self.shared), self.top_k, shared=self.shared, gate_scale="binary",
                             token_mask=mask)
        routed = None if self.w_routed is None else self.w_routed(x)  # (B, N, E)
        shared_logits = None if self.w_shared is None else self.w_shared(x)  # (B, N, h_s)
        mix = None if self.w_mix is None else self.w_mix(x)  # (B, N, 2)
        if routed is None and shared_logits is None:  # one shared head, nothing routed: a constant gate
            routed = x.new_zeros((*x.shape[:-1], 0))
        return moh_route(routed, self.top_k, shared=self.shared, shared_logits=shared_logits, mix_logits=mix,
                         gate_scale=self.gate_scale, token_mask=mask)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        return_weights: bool = False,
        return_routing: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Attend. Returns ``out``, then ``weights`` if ``return_weights``, then the routing if ``return_routing``.

        ``weights`` are the gated attention weights ``g_i · softmax(...)`` (so ``out = proj(concat(weights @ v))``),
        through the dense reference. A token with no allowed key gets a zero update, as in ``nn.Attention``.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, C), got x.shape={tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1]):
            raise ValueError(f"mask must be bool with shape {tuple(x.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}")
        b, n, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        routing = self.route(x, q, mask)
        compute = "dense" if return_weights else self.compute
        res = mixture_of_heads(q, k, v, routing.gates, key_mask=mask, is_causal=is_causal, compute=compute,
                               return_weights=return_weights)
        heads_out, weights = res if return_weights else (res, None)
        out = self.dropout(self.proj(heads_out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)))
        if mask is not None:  # a query with no allowed key: zero update (no projection bias), as nn.Attention
            if is_causal:
                has_key = mask.cumsum(dim=1) > 0  # (B, N)
            else:
                has_key = mask.any(dim=1, keepdim=True).expand(b, n)
            out = out * has_key.unsqueeze(-1).to(out.dtype)
        sink = _SINK.get()
        if sink is not None:
            sink.append(routing)
        result: tuple[Tensor, ...] = (out,)
        if return_weights:
            result += (weights,)
        if return_routing:
            result += (routing,)
        return result[0] if len(result) == 1 else result

    @classmethod
    def from_attention(
        cls,
        attn: Attention,
        *,
        shared: int,
        top_k: int,
        router: Literal["linear", "query_norm"] = "linear",
        compute: Literal["dense", "sparse"] = "dense",
        shared_heads: Sequence[int] | None = None,
    ) -> MixtureOfHeadAttention:
        """A MoH layer from a trained multi-head self-attention, for continue-tuning.

        The projections are copied; with ``shared_heads`` the heads are reordered so that those heads come
        first (the q/k/v row blocks and the ``proj`` column blocks move together, which leaves MHA unchanged).
        The router is zero (``router="linear"``, ``gate_scale="code"``) or parameter-free, so the new layer
        equals the dense one with each token's unselected routed heads zeroed; with ``top_k == heads - shared``
        it equals it exactly.

        Args:
            attn: a :class:`attnfuse.nn.Attention` with the ``dense`` operator, used as self-attention.
            shared, top_k, router, compute: as the constructor.
            shared_heads: which of ``attn``'s heads become the shared ones (default: the first ``shared``).

        Raises:
            TypeError: ``attn`` not an ``nn.Attention``.
            ValueError: ``attn`` uses another operator than ``dense``, has a ``context_dim`` other than its
                ``dim``, or ``shared_heads`` is not ``shared`` distinct head indices.
        """
        if not isinstance(attn, Attention):
            raise TypeError(f"attn must be an attnfuse.nn.Attention, got {type(attn).__name__}")
        if attn.spec.name != "dense":
            raise ValueError(f"from_attention needs an Attention with op='dense' (MoH computes dense heads), got {attn.spec.name!r}")
        dim = attn.to_q.in_features
        if attn.to_k.in_features != dim:
            raise ValueError(f"from_attention needs self-attention (context_dim == dim = {dim}), got context_dim={attn.to_k.in_features}")
        h, dh = attn.heads, attn.head_dim
        order = list(range(h))
        if shared_heads is not None:
            chosen = [int(i) for i in shared_heads]
            if len(chosen) != shared or len(set(chosen)) != shared or any(not 0 <= i < h for i in chosen):
                raise ValueError(f"shared_heads must be {shared} distinct head indices in [0, {h}), got {list(shared_heads)}")
            order = chosen + [i for i in range(h) if i not in chosen]
        w = attn.to_q.weight
        new = cls(dim, h, shared=shared, top_k=top_k, router=router, compute=compute, head_dim=dh,
                  qkv_bias=attn.to_q.bias is not None, dropout=attn.dropout.p, device=w.device, dtype=w.dtype)
        rows = torch.tensor(order, device=w.device).unsqueeze(1) * dh + torch.arange(dh, device=w.device)  # (h, dh)
        rows = rows.reshape(-1)
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v"):
                src, dst = getattr(attn, name), getattr(new, name)
                dst.weight.copy_(src.weight[rows])
                if src.bias is not None:
                    dst.bias.copy_(src.bias[rows])
            new.proj.weight.copy_(attn.proj.weight[:, rows])
            new.proj.bias.copy_(attn.proj.bias)
        return new


def convert_to_moh(
    model: nn.Module,
    *,
    shared: int,
    top_k: int,
    router: Literal["linear", "query_norm"] = "linear",
    compute: Literal["dense", "sparse"] = "dense",
    attribute: str = "attn",
) -> list[MixtureOfHeadAttention]:
    """Replace, in place, every self-attention ``<block>.attn`` (an ``nn.Attention``) of ``model`` by its MoH conversion.

    Works on :class:`attnfuse.nn.TransformerBlock` / :class:`attnfuse.nn.Encoder` (their ``attn`` sublayer is
    called as ``attn(x, mask=..., is_causal=..., return_weights=...)``, which the MoH layer takes). Use
    :func:`collect_routing` around the forward to get the routing records for the load-balance loss.

    Args:
        model: the model to convert (modified in place).
        shared, top_k, router, compute: as :meth:`MixtureOfHeadAttention.from_attention`.
        attribute: the attribute name of the self-attention sublayer.

    Returns:
        The new MoH layers, in module order.

    Raises:
        ValueError: no ``nn.Attention`` found under ``attribute``.
    """
    converted = []
    for module in list(model.modules()):
        attn = getattr(module, attribute, None)
        if isinstance(attn, Attention):
            moh = MixtureOfHeadAttention.from_attention(attn, shared=shared, top_k=top_k, router=router, compute=compute)
            setattr(module, attribute, moh)
            converted.append(moh)
    if not converted:
        raise ValueError(f"convert_to_moh found no nn.Attention at an attribute {attribute!r} of {type(model).__name__}")
    return converted
