"""Top-k mixture-of-experts feed-forward layer and BAM's parallel attention + FFN block.

Paper: Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of
Experts" (https://arxiv.org/abs/2408.08274, NeurIPS 2024), section 3; the gate is Switch-Transformer's
(Fedus et al., https://arxiv.org/abs/2101.03961), the block layout GPT-J / PaLM's. No official code.

Status: complete. ``MoEFeedForward``, per token ``t``::

    p(x_t)    = softmax(W_r x_t)                                   router W_r: Linear(dim, N, bias=False)
    out_t     = sum_{i in topk(p)} gate_i(x_t) * FFN_i(x_t)
    gate_i    = p_i                        gate="softmax_then_topk" (BAM / Switch: not renormalised)
              | p_i / sum_{j in topk} p_j  gate="renormalized" (Mixtral style; top-1 => weight 1)

With identical experts the output is ``FFN(x)`` only for ``"renormalized"`` (or ``k = N``); BAM's gate gives
``p_top(x) * FFN(x)``. The auxiliary losses (``attnfuse.losses.moh_load_balance_loss(probs, selected,
normalization="code")`` = ``N sum_i f_i P_i`` and ``attnfuse.losses.router_z_loss(logits)``) are computed
by the caller from the returned router logits and selections (layers do not compute losses).

``dispatch="sparse"`` runs each expert on its own tokens only; ``dispatch="dense"`` (the reference, and
the export-friendly form) runs every expert on every token and weights by zero where it is not selected;
they agree (tested).

``ParallelBlock``: ``h = LN(x); x + attn(h) + ffn(h)`` (one shared LayerNorm, as in PaLM: unverified for
BAM's own seed), with a dense :class:`~attnfuse.nn.Attention` / :class:`~attnfuse.nn.MLP` (seed and
specialists) or :class:`~attnfuse.nn.MixtureOfAttention` / :class:`MoEFeedForward` (the upcycled model).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.nn._registry import register_module
from attnfuse.nn.attention import Attention
from attnfuse.nn.moa import MixtureOfAttention
from attnfuse.nn.transformer import MLP
from attnfuse.ops import OpConfig

__all__ = ["MoEFeedForward", "ParallelBlock"]


def _tiny_moe() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return MoEFeedForward(8, 16, 3, k=2, dispatch="dense"), (torch.randn(2, 12, 8),)


@register_module("moe_feed_forward", group="experts", example=_tiny_moe)
class MoEFeedForward(nn.Module):
    """Top-``k`` routed mixture of ``n_experts`` two-layer MLP experts (Switch / BAM FFN MoE).

    Args:
        dim: channel width ``C``.
        hidden: hidden width of every expert.
        n_experts: number of experts ``N``.
        k: experts per token (BAM: 1).
        gate: ``"softmax_then_topk"`` (the selected experts' full-softmax probabilities, BAM / Switch) or
            ``"renormalized"`` (renormalised over the selected experts).
        dispatch: ``"sparse"`` (each expert on its tokens) or ``"dense"`` (every expert on every token; reference).
        dropout: dropout inside the experts, as :class:`~attnfuse.nn.MLP`.
        router_std: standard deviation of the router's normal initialisation.
        device, dtype: for the parameters.

    Raises:
        ValueError: ``n_experts < 1``, ``k`` outside ``[1, n_experts]``, unknown gate or dispatch.

    Shapes:
        x ``(B, *tokens, C)`` -> out ``(B, *tokens, C)``, router logits ``(B, *tokens, N)``, selected experts
        ``(B, *tokens, k)`` int64.

    Example:
        >>> moe = MoEFeedForward(16, 32, 4, k=1)
        >>> out, logits, selected = moe(torch.randn(2, 5, 16))
        >>> out.shape, logits.shape, selected.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 4]), torch.Size([2, 5, 1]))
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_experts: int,
        *,
        k: int = 1,
        gate: Literal["softmax_then_topk", "renormalized"] = "softmax_then_topk",
        dispatch: Literal["sparse", "dense"] = "sparse",
        dropout: float = 0.0,
        router_std: float = 0.02,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if n_experts < 1 or not 1 <= k <= n_experts:
            raise ValueError(f"need n_experts >= 1 and 1 <= k <= n_experts, got {n_experts=}, {k=}")
        if gate not in ("softmax_then_topk", "renormalized"):
            raise ValueError(f"gate must be 'softmax_then_topk' or 'renormalized', got {gate!r}")
        if dispatch not in ("sparse", "dense"):
            raise ValueError(f"dispatch must be 'sparse' or 'dense', got {dispatch!r}")
        dd = {"device": device, "dtype": dtype}
        self.n_experts, self.k, self.gate, self.dispatch = n_experts, k, gate, dispatch
        self.router = nn.Linear(dim, n_experts, bias=False, **dd)
        nn.init.normal_(self.router.weight, std=router_std)
        self.experts = nn.ModuleList(MLP(dim, hidden=hidden, dropout=dropout, **dd) for _ in range(n_experts))

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, k={self.k}, gate={self.gate!r}, dispatch={self.dispatch!r}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(out, router_logits, selected)``; see the class docstring."""
        logits = self.router(x)  # (B, *tokens, N)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).to(x.dtype)
        top_p, top_i = probs.topk(self.k, dim=-1)  # (B, *tokens, k)
        if self.gate == "renormalized":
            top_p = top_p / top_p.sum(-1, keepdim=True)
        flat = x.reshape(-1, x.shape[-1])  # (T, C)
        t_p, t_i = top_p.reshape(-1, self.k), top_i.reshape(-1, self.k)  # (T, k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            w = (t_p * (t_i == e).to(t_p.dtype)).sum(-1)  # (T,) the gate of expert e (0 where not selected)
            if self.dispatch == "dense":
                out = out + w[:, None] * expert(flat)
            else:
                rows = (t_i == e).any(-1).nonzero().squeeze(-1)  # (T_e,)
                if rows.numel():
                    out = out.index_add(0, rows, w[rows, None] * expert(flat[rows]))
        return out.reshape(x.shape), logits, top_i


def _tiny_parallel() -> tuple[nn.Module, tuple[Tensor, ...]]:
    block = ParallelBlock(16, 2, attn=MixtureOfAttention(16, 2, 2), ffn=MoEFeedForward(16, 32, 2, k=2, dispatch="dense"))
    return block, (torch.randn(2, 6, 16),)


@register_module("parallel_block", group="experts", example=_tiny_parallel)
class ParallelBlock(nn.Module):
    """Parallel attention + FFN block (GPT-J / PaLM; BAM's layout): ``x + attn(LN x) + ffn(LN x)``.

    Args:
        dim: channel width.
        heads: heads of the default dense attention.
        attn: the attention branch: an :class:`~attnfuse.nn.Attention` or
            :class:`~attnfuse.nn.MixtureOfAttention` (default: ``Attention(dim, heads, op=op)``).
        ffn: the FFN branch: an :class:`~attnfuse.nn.MLP` or :class:`MoEFeedForward` (default:
            ``MLP(dim, hidden=mlp_ratio * dim)``).
        mlp_ratio, op, dropout: for the default branches.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, *tokens, C)``, mask ``(B, *tokens)`` -> ``(x, aux)``; ``aux`` holds the router tensors of the
        expert branches: ``"attn_weights"`` ``(B, *tokens, N_a)``, ``"ffn_logits"`` ``(B, *tokens, N_f)``,
        ``"ffn_selected"`` ``(B, *tokens, k)`` (empty for dense branches).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        attn: nn.Module | None = None,
        ffn: nn.Module | None = None,
        mlp_ratio: float = 4.0,
        op: str | OpConfig = "dense",
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, **dd)
        self.attn = Attention(dim, heads, op=op, dropout=dropout, **dd) if attn is None else attn
        self.ffn = MLP(dim, hidden=int(dim * mlp_ratio), dropout=dropout, **dd) if ffn is None else ffn
        for name, branch, kinds in (("attn", self.attn, (Attention, MixtureOfAttention)),
                                    ("ffn", self.ffn, (MLP, MoEFeedForward))):
            if not isinstance(branch, kinds):
                raise ValueError(f"{name} must be one of {[k.__name__ for k in kinds]}, got {type(branch).__name__}")

    def forward(self, x: Tensor, *, mask: Tensor | None = None, is_causal: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Apply the block; returns ``(x, aux)`` (see the class docstring)."""
        h = self.norm(x)
        aux: dict[str, Tensor] = {}
        a = self.attn(h, mask=mask, is_causal=is_causal)
        if isinstance(a, tuple):
            a, aux["attn_weights"] = a
        f = self.ffn(h)
        if isinstance(f, tuple):
            f, aux["ffn_logits"], aux["ffn_selected"] = f
        if mask is not None:  # padded tokens: no FFN update either
            f = f * mask[..., None].to(f.dtype)
        return x + a + f, aux
