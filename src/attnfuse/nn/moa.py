"""Mixture of attention experts (MoA) with soft routing, as upcycled by BAM.

Paper: Zhang, Gritsch, Gnaneshwar, Guo, Cairuz, Venkitesh, Foerster, Blunsom, Ruder, Üstün, Locatelli,
"BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"
(https://arxiv.org/abs/2408.08274, NeurIPS 2024), section 3 (soft mixture of attention); the original MoA
is Zhang et al. 2022 (https://arxiv.org/abs/2210.05144, top-k routing, shared K/V). No official code.

Status: complete (soft and top-k routing; K/V per expert or shared). Per token ``t`` and ``N`` experts::

    g(x_t)   = softmax(W_r x_t)                         (N,), router W_r: Linear(dim, N, bias=False)
    MoA(x)_t = sum_j g_j(x_t) * MHA_j(x)_t             soft: every token uses every expert
    MHA_j    = attnfuse.nn.Attention with its own to_q / proj and its own to_k / to_v ("KV experts"),
               or one to_k / to_v shared by all experts (``shared_kv=True``: one KV cache)
    topk     : g restricted to the k largest and renormalised over them (the original MoA)

Every expert is an :class:`attnfuse.nn.Attention` calling the registered operator (``op=``), so masks,
``is_causal`` and every local operator work unchanged, and a query with no allowed key gets a zero update;
unlike ``Attention``, a padded query (``mask`` False) also gets a zero update and zero routing weights.
Cost on one device: ``N`` attentions per call (the paper hides it with expert parallelism); with
``shared_kv`` the shared K/V projections are still evaluated once per expert here (parameters and the KV
cache are shared, not the compute).

Equivalent dense formulation (one expert, any router): ``MixtureOfAttention(d, h, 1)(x)[0] ==
experts[0](x)``; identical experts give the expert's output for any router (the weights sum to 1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.nn._registry import register_module
from attnfuse.nn.attention import Attention
from attnfuse.ops import OpConfig

__all__ = ["MixtureOfAttention"]


def _tiny_moa() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return MixtureOfAttention(16, 2, 3, shared_kv=True), (torch.randn(2, 5, 16),)


@register_module("mixture_of_attention", group="experts", example=_tiny_moa)
class MixtureOfAttention(nn.Module):
    """Soft- (or top-k-) routed mixture of ``n_experts`` multi-head attention experts.

    Args:
        dim: channel width ``C``.
        heads: heads per expert.
        n_experts: number of attention experts ``N``.
        routing: ``"soft"`` (BAM: every expert, softmax weights) or ``"topk"`` (the ``k`` best experts per
            token, weights renormalised over them).
        k: experts per token for ``routing="topk"`` (required there).
        shared_kv: one ``to_k`` / ``to_v`` for all experts (BAM's "shared KV" variant).
        op: the attention operator of every expert (name or typed options), as :class:`Attention`.
        head_dim, qkv_bias, dropout: as :class:`Attention`.
        router_std: standard deviation of the router's normal initialisation (BAM: random routers).
        device, dtype: for the parameters.

    Raises:
        ValueError: ``n_experts < 1``, an unknown routing, ``k`` missing or outside ``[1, n_experts]``.

    Shapes:
        x ``(B, *tokens, C)``, mask ``(B, *tokens)`` -> out ``(B, *tokens, C)``, router probabilities
        ``(B, *tokens, N)`` (the weights used: soft, or top-k renormalised with zeros elsewhere).

    Example:
        >>> moa = MixtureOfAttention(32, 4, 3)
        >>> out, probs = moa(torch.randn(2, 7, 32))
        >>> out.shape, probs.shape
        (torch.Size([2, 7, 32]), torch.Size([2, 7, 3]))
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        n_experts: int,
        *,
        routing: Literal["soft", "topk"] = "soft",
        k: int | None = None,
        shared_kv: bool = False,
        op: str | OpConfig = "dense",
        head_dim: int | None = None,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        router_std: float = 0.02,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if routing not in ("soft", "topk"):
            raise ValueError(f"routing must be 'soft' or 'topk', got {routing!r}")
        if routing == "topk" and (k is None or not 1 <= k <= n_experts):
            raise ValueError(f"routing='topk' needs 1 <= k <= n_experts={n_experts}, got {k=}")
        dd = {"device": device, "dtype": dtype}
        self.n_experts, self.routing, self.k, self.shared_kv = n_experts, routing, k, shared_kv
        self.router = nn.Linear(dim, n_experts, bias=False, **dd)
        nn.init.normal_(self.router.weight, std=router_std)
        self.experts = nn.ModuleList(
            Attention(dim, heads, op=op, head_dim=head_dim, qkv_bias=qkv_bias, dropout=dropout, **dd)
            for _ in range(n_experts)
        )
        if shared_kv:  # one K/V projection, the same module in every expert
            self.to_k, self.to_v = self.experts[0].to_k, self.experts[0].to_v
            for expert in self.experts[1:]:
                expert.to_k, expert.to_v = self.to_k, self.to_v

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, routing={self.routing!r}, k={self.k}, shared_kv={self.shared_kv}"

    def route(self, x: Tensor) -> Tensor:
        """The per-token expert weights ``(B, *tokens, N)``: softmax, or top-k renormalised (zeros elsewhere)."""
        logits = self.router(x)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).to(x.dtype)  # (B, *tokens, N)
        if self.routing == "soft":
            return probs
        top_p, top_i = probs.topk(self.k, dim=-1)  # (B, *tokens, k)
        return torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))

    def forward(self, x: Tensor, *, mask: Tensor | None = None, is_causal: bool = False) -> tuple[Tensor, Tensor]:
        """Returns ``(out (B, *tokens, C), weights (B, *tokens, N))``; see the class docstring."""
        weights = self.route(x)  # (B, *tokens, N)
        out = torch.zeros_like(x)
        for j, expert in enumerate(self.experts):
            out = out + weights[..., j : j + 1] * expert(x, mask=mask, is_causal=is_causal)  # (B, *tokens, C)
        if mask is not None:  # a padded query gets a zero update and no routing weight
            out = out * mask[..., None].to(out.dtype)
            weights = weights * mask[..., None].to(weights.dtype)
        return out, weights
