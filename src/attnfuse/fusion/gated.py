"""Gated fusion: learned per-source sigmoid gates over pooled source vectors.

Paper: the gated multimodal unit (Arevalo et al., "Gated Multimodal Units for Information Fusion",
ICLR workshop 2017, https://arxiv.org/abs/1702.01992), generalised to any number of sources with one
gate per source. Status: a baseline; exact as described below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
from attnfuse.tokens import TokenSet

__all__ = ["GatedFusion"]


@register_fusion("gated")
class GatedFusion(nn.Module):
    """``fused = sum_i g_i * h_i`` over the present sources, one vector per sample.

    ``p_i`` is the mean of source ``i``'s valid tokens (0 when it is missing), ``h_i = tanh(W_i p_i)``
    (``activation=None``: ``W_i p_i``), and the per-channel gate ``g_i = sigmoid(G_i z)`` reads
    ``z = [p_1; ...; p_n]`` (``gate_input="all"``, sorted source order, zeros for missing sources)
    or ``z = p_i`` (``"own"``). A missing source contributes nothing (its term is multiplied by 0),
    so absent ≡ all-False mask. The output does not depend on token order (mean pooling).

    Args:
        sources: names of the sources.
        dim: input token width ``D``.
        out_dim: width of ``h_i`` and of the output (default ``D``); exposed as ``self.out_dim``.
        gate_input: ``"all"`` (gates see every pooled source) or ``"own"``.
        activation: ``"tanh"`` (GMU) or None.
        device, dtype: for the parameters.

    Shapes:
        inputs ``{name: TokenSet (B, *axes_i, D)}`` -> ``fused (B, 1, out_dim)`` (valid where any
        source is present); ``per_source[name] (B, 1, out_dim)`` = ``g_i * h_i``; weights
        ``"gates" (B, n_sources, out_dim)`` (0 for missing sources).

    Example:
        >>> gate = GatedFusion(["a", "b"], 16)
        >>> gate({"a": TokenSet(torch.randn(2, 3, 16)), "b": TokenSet(torch.randn(2, 5, 16))}).fused.x.shape
        torch.Size([2, 1, 16])
    """

    symmetry: ClassVar[str] = "invariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "tokens"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        out_dim: int | None = None,
        gate_input: Literal["all", "own"] = "all",
        activation: Literal["tanh"] | None = "tanh",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if gate_input not in ("all", "own"):
            raise ValueError(f"gate_input must be 'all' or 'own', got {gate_input!r}")
        if activation not in ("tanh", None):
            raise ValueError(f"activation must be 'tanh' or None, got {activation!r}")
        dd = {"device": device, "dtype": dtype}
        out_dim = dim if out_dim is None else out_dim
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        self.out_dim = out_dim
        self.gate_input, self.activation = gate_input, activation
        self.embed = SourceEmbedding(sources, dim, type_embedding=None, **dd)
        n = len(self.embed.sources)
        gate_in = dim * n if gate_input == "all" else dim
        self.values = nn.ModuleList(nn.Linear(dim, out_dim, **dd) for _ in range(n))
        self.gates = nn.ModuleList(nn.Linear(gate_in, out_dim, **dd) for _ in range(n))

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Gate and sum the pooled sources; see the class docstring."""
        prepared = {s.name: s for s in self.embed(inputs)}
        ref = next(iter(prepared.values())).x
        batch, dim = ref.shape[0], ref.shape[-1]
        pooled, present = [], []
        for name in self.sources:
            if name in prepared:
                s = prepared[name]
                m = s.mask.unsqueeze(-1).to(s.x.dtype)  # (B, N, 1); invalid tokens are already zero
                pooled.append(s.x.sum(dim=1) / m.sum(dim=1).clamp_min(1.0))  # (B, D)
                present.append(s.mask.any(dim=1))  # (B,)
            else:
                pooled.append(ref.new_zeros(batch, dim))
                present.append(torch.zeros(batch, dtype=torch.bool, device=ref.device))
        z_all = torch.cat(pooled, dim=-1) if self.gate_input == "all" else None  # (B, n * D)
        terms, gates, per_source = [], [], {}
        for i, name in enumerate(self.sources):
            h = self.values[i](pooled[i])
            if self.activation == "tanh":
                h = torch.tanh(h)
            g = torch.sigmoid(self.gates[i](z_all if z_all is not None else pooled[i]))  # (B, out)
            g = g * present[i].to(g.dtype).unsqueeze(-1)
            term = g * h
            terms.append(term)
            gates.append(g)
            if name in prepared:
                per_source[name] = TokenSet(term.unsqueeze(1), present[i].unsqueeze(1))
        fused_x = torch.stack(terms, dim=0).sum(dim=0).unsqueeze(1)  # (B, 1, out)
        any_present = torch.stack(present, dim=0).any(dim=0).unsqueeze(1)  # (B, 1)
        weights: dict[str, Tensor] = {"gates": torch.stack(gates, dim=1)} if return_weights else {}
        return FusionOutput(TokenSet(fused_x, any_present), per_source, weights, {})
