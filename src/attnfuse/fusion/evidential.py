"""Evidential (Dempster–Shafer) fusion of per-source class evidence, per sample or per pixel / voxel.

Papers: MEFN (Qi, Lin et al., "Multi-modal Evidential Fusion Network for Trusted PET/CT Tumor
Segmentation", https://arxiv.org/abs/2406.18327) — Dempster–Shafer trusted fusion (DTF); its lineage
TMC (Han et al., "Trusted Multi-View Classification", ICLR 2021, https://arxiv.org/abs/2102.02051).
Status: exact reduced Dempster rule (the algebra lives in :mod:`attnfuse.ops.evidential`); zero
parameters (the evidence heads belong to the caller).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
from attnfuse.ops.evidential import conflict, dempster_combine, dempster_combine_many, opinion_from_alpha
from attnfuse.tokens import TokenSet

__all__ = ["EVIDENCE", "EvidentialFusion"]

#: Maps from a head's raw output to non-negative evidence.
EVIDENCE = ("softplus", "relu", "exp", "identity")


@register_fusion("evidential")
class EvidentialFusion(nn.Module):
    """Combine per-source Dirichlet opinions with the reduced Dempster rule.

    Each source gives one raw output per token and class, ``x (B, *axes, K)`` (a token is a sample,
    a pixel or a voxel); its evidence is ``e = softplus(x)`` (or another map, see ``evidence``),
    ``alpha = e + 1``. Per token, the present sources are folded with
    :func:`attnfuse.ops.evidential.dempster_combine` (commutative and associative). A source that is
    absent, or masked at a token, is the vacuous opinion there (``alpha = 1``) and leaves the
    others **exactly** unchanged; a token with no source gets ``alpha = 1`` (``u = 1``) and is
    invalid in the fused mask.

    ``fused.x`` holds the fused ``alpha``. With ``return_weights=True``, ``weights`` holds
    ``"alpha"`` ``(B, *axes, K)``, ``"belief"`` ``(B, *axes, K)``, ``"uncertainty"`` ``(B, *axes, 1)``,
    ``"conflict"`` ``(B, *axes, 1)`` and ``"uncertainty.<source>"``. The conflict is the total
    Dempster conflict ``1 - prod_m (1 - C_m)`` over the fold steps (``C_m`` = conflict between the
    running fusion and source ``m``), which does not depend on the order in exact arithmetic; it
    is 0 when fewer than two sources are present.

    Args:
        sources: names of the evidence sources.
        num_classes: ``K`` (every source's last axis).
        evidence: ``"softplus"`` (MEFN / TMC), ``"relu"``, ``"exp"`` (of the input clamped to
            [-10, 10], as in TBraTS) or ``"identity"`` (inputs already are evidence ``>= 0``).

    Raises:
        ValueError: unknown ``evidence``, ``num_classes < 2``; at call time, sources on different
            token grids.

    Shapes:
        inputs ``{name: TokenSet (B, *axes, K)}`` (same ``axes`` shape for all) -> ``fused (B, *axes, K)``
        (fused ``alpha``), ``per_source[name] (B, *axes, K)`` (that source's ``alpha``).

    Example:
        >>> fuse = EvidentialFusion(["ct", "pet"], num_classes=2)
        >>> ct = TokenSet(torch.randn(1, 4, 4, 2), axes=("h", "w"))
        >>> pet = TokenSet(torch.randn(1, 4, 4, 2), axes=("h", "w"))
        >>> out = fuse({"ct": ct, "pet": pet}, return_weights=True)
        >>> out.fused.x.shape, out.weights["uncertainty"].shape
        (torch.Size([1, 4, 4, 2]), torch.Size([1, 4, 4, 1]))
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = False

    def __init__(
        self,
        sources: Sequence[str],
        *,
        num_classes: int,
        evidence: Literal["softplus", "relu", "exp", "identity"] = "softplus",
    ) -> None:
        super().__init__()
        if evidence not in EVIDENCE:
            raise ValueError(f"evidence must be one of {EVIDENCE}, got {evidence!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.evidence, self.num_classes = evidence, num_classes
        self.embed = SourceEmbedding(sources, num_classes, type_embedding=None)  # validation only: no parameters

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def to_evidence(self, x: Tensor) -> Tensor:
        """Raw head output ``(..., K)`` -> evidence ``(..., K) >= 0``."""
        if self.evidence == "softplus":
            return F.softplus(x)
        if self.evidence == "relu":
            return F.relu(x)
        if self.evidence == "exp":
            return torch.exp(x.clamp(-10.0, 10.0))
        return x

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Fuse the sources' opinions token by token; see the class docstring."""
        self.embed.check(inputs)
        grids = {n: tuple(ts.x.shape[1:-1]) for n, ts in inputs.items()}
        if len(set(grids.values())) > 1:
            raise ValueError(f"evidential fusion combines token by token: all sources need one token grid, got {grids}")
        names = [n for n in self.sources if n in inputs]
        axes = inputs[names[0]].axes
        alphas, masks = [], []
        for n in names:
            ts = inputs[n]
            alphas.append(self.to_evidence(ts.x) + 1)  # (B, *axes, K)
            masks.append(ts.valid())  # (B, *axes)
        fused = dempster_combine_many(alphas, masks)  # (B, *axes, K)
        any_present = masks[0]
        for m in masks[1:]:
            any_present = any_present | m
        ones = torch.ones((), dtype=fused.dtype, device=fused.device)
        per_source = {n: TokenSet(torch.where(m.unsqueeze(-1), a, ones), m, axes) for n, a, m in zip(names, alphas, masks)}
        weights: dict[str, Tensor] = {}
        if return_weights:
            belief, unc = opinion_from_alpha(fused)
            weights = {"alpha": fused, "belief": belief, "uncertainty": unc,
                       "conflict": self.total_conflict(alphas, masks)}
            weights.update({f"uncertainty.{n}": opinion_from_alpha(per_source[n].x)[1] for n in names})
        return FusionOutput(TokenSet(fused, any_present, axes), per_source, weights, {})

    @staticmethod
    def total_conflict(alphas: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        """``1 - prod_m (1 - C_m)`` over the fold of present sources; ``(..., 1)`` in ``[0, 1]``."""
        running = torch.ones_like(alphas[0])  # vacuous: its conflict with anything is 0
        log_keep = torch.zeros_like(alphas[0][..., :1])  # (..., 1): sum of log(1 - C_m)
        tiny = torch.finfo(alphas[0].dtype).tiny
        for a, m in zip(alphas, masks):
            m_k = m.unsqueeze(-1)
            c = conflict(running, a)  # (..., 1)
            log_keep = log_keep + torch.where(m_k, torch.log((1 - c).clamp_min(tiny)), torch.zeros_like(c))
            running = torch.where(m_k, dempster_combine(running, a), running)
        return (1 - torch.exp(log_keep)).clamp(0.0, 1.0)
