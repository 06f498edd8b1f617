"""Evidential (Dempster–Shafer) fusion: per-source evidence heads + Dempster's rule, and the rule alone.

Papers: MEFN (Qi, Lin et al., "Multi-modal Evidential Fusion Network for Trusted PET/CT Tumor
Segmentation", https://arxiv.org/abs/2406.18327) — Dempster–Shafer trusted fusion (DTF); its lineage
TMC (Han et al., "Trusted Multi-View Classification", ICLR 2021, https://arxiv.org/abs/2102.02051).
Status: exact reduced Dempster rule (the algebra lives in :mod:`attnfuse.ops.evidential`).

* :class:`EvidentialFusion` (fusion ``"evidential"``) keeps the fusion protocol: it fuses TokenSets
  of width ``dim`` with its own per-source evidence heads (TMC-style, one opinion per sample);
* :class:`DempsterFusion` (building block ``"dempster"``) is the rule alone, zero parameters, over
  raw per-token evidence that the caller's heads produce (per sample, pixel or voxel: MEFN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.fusion._registry import register_block, register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
from attnfuse.ops.evidential import conflict, dempster_combine, dempster_combine_many, opinion_from_alpha
from attnfuse.tokens import TokenSet

__all__ = ["EVIDENCE", "DempsterFusion", "EvidentialFusion", "EvidentialOutput"]

#: Maps from a head's raw output to non-negative evidence.
EVIDENCE = ("softplus", "relu", "exp", "identity")


@register_block("dempster")
class DempsterFusion(nn.Module):
    """Combine per-source Dirichlet opinions from raw evidence with the reduced Dempster rule (no parameters).

    A building block, not a fusion of ``dim``-wide tokens: its inputs already are class evidence
    (one raw output per class). :class:`EvidentialFusion` is the registered fusion that owns the
    evidence heads and uses this rule.

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
        >>> fuse = DempsterFusion(["ct", "pet"], num_classes=2)
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
        inputs = self.embed.align(inputs)  # validated, one dtype
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


@dataclass
class EvidentialOutput(FusionOutput):
    """:class:`FusionOutput` of :class:`EvidentialFusion`, with every source's own opinion for the loss.

    Attributes:
        per_source_alpha: one ``alpha (B, K)`` per declared source, in sorted name order; the vacuous
            ``alpha = 1`` where the source is absent or fully masked (so absent and all-False give
            the same loss terms). TMC trains each of them with the evidential loss too.
    """

    per_source_alpha: tuple[Tensor, ...] = ()


@register_fusion("evidential")
class EvidentialFusion(nn.Module):
    """Per-source evidence heads, then Dempster's rule: one fused Dirichlet opinion per sample (TMC / MEFN DTF).

    For each present source ``m``: ``p_m`` = masked mean of its valid tokens ``(B, D)``,
    ``e_m = softplus(W_m p_m + c_m)`` (``evidence``), ``alpha_m = e_m + 1``; the present sources are
    folded with :class:`DempsterFusion` (exact: a missing source is the vacuous opinion and leaves the
    others unchanged). ``fused.x`` is the fused ``alpha (B, 1, K)``, valid where any source is present
    (``alpha = 1`` elsewhere): a task reads it directly (``output = "dirichlet"``; ``out_dim = K``), e.g.
    classification with the evidential loss. ``per_source[m]`` is ``alpha_m (B, 1, K)`` of each passed
    source and :attr:`EvidentialOutput.per_source_alpha` holds every declared source's ``alpha (B, K)``
    for the per-source loss terms. ``return_weights=True`` adds the opinion maps of
    :class:`DempsterFusion` (``"belief"``, ``"uncertainty"``, ``"conflict"``, ``"uncertainty.<m>"``).

    ``num_classes`` has no usable default: a model builder (``attnfuse.models.build_fusion_model``)
    fills it from the data's classes when the constructor has that parameter and it is None; built
    by hand, pass it.

    Args:
        sources: names of the sources.
        dim: token width ``D`` of every source.
        num_classes: ``K >= 2``.
        evidence: ``"softplus"`` (MEFN / TMC), ``"relu"``, ``"exp"`` or ``"identity"`` (see
            :class:`DempsterFusion`).
        device, dtype: for the parameters.

    Raises:
        ValueError: ``num_classes`` None or ``< 2``, unknown ``evidence``.

    Shapes:
        inputs ``{name: TokenSet (B, *axes_i, D)}`` -> ``fused (B, 1, K)`` (alpha),
        ``per_source[name] (B, 1, K)``, ``per_source_alpha`` ``n x (B, K)``.

    Example:
        >>> fuse = EvidentialFusion(["ct", "pet"], 16, num_classes=3)
        >>> out = fuse({"ct": TokenSet(torch.randn(2, 5, 16)), "pet": TokenSet(torch.randn(2, 7, 16))})
        >>> out.fused.x.shape, len(out.per_source_alpha)
        (torch.Size([2, 1, 3]), 2)
    """

    symmetry: ClassVar[str] = "invariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "dirichlet"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        num_classes: int | None = None,
        evidence: Literal["softplus", "relu", "exp", "identity"] = "softplus",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_classes is None:
            raise ValueError("EvidentialFusion needs num_classes=K (the number of classes); a model builder fills it from "
                             "the data, built by hand pass it")
        dd = {"device": device, "dtype": dtype}
        self.embed = SourceEmbedding(sources, dim, type_embedding=None, **dd)
        self.combine = DempsterFusion(self.embed.sources, num_classes=num_classes, evidence=evidence)
        self.heads = nn.ModuleDict({n: nn.Linear(dim, num_classes, **dd) for n in self.embed.sources})
        self.num_classes = self.out_dim = num_classes

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> EvidentialOutput:
        """Pool, evidence heads, Dempster's rule; see the class docstring."""
        prepared = {s.name: s for s in self.embed(inputs)}
        raw = {}
        for name, src in prepared.items():
            m = src.mask.unsqueeze(-1).to(src.x.dtype)  # (B, N, 1); invalid tokens are already zero
            pooled = src.x.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, D)
            raw[name] = TokenSet(self.heads[name](pooled), src.mask.any(dim=1, keepdim=True))  # (B, 1, K)
        out = self.combine(raw, return_weights=return_weights)
        ones = torch.ones_like(out.fused.x[:, 0])  # (B, K): the vacuous opinion
        per_source_alpha = tuple(out.per_source[n].x[:, 0] if n in out.per_source else ones for n in self.sources)
        return EvidentialOutput(out.fused, out.per_source, out.weights, {}, per_source_alpha)
