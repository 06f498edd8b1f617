"""Budget router: per-sample choice of which optional layers (sites) run under a compute budget.

Paper: Bulat et al., "VISion On Request" (VISOR, https://arxiv.org/abs/2603.23495): a few
self-attention layers over [visual ; text] are selected per sample; one universal network is
trained with random configurations ("universal_random"), then a light policy is trained on
pseudo-labels (the cheapest configuration that still answers correctly). Status: reconstruction
(no code released); costs are whatever the caller counts per site (e.g. FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_block
from attnfuse.fusion.sources import SourceEmbedding
from attnfuse.tokens import TokenSet

__all__ = ["BudgetRouter", "RouteDecision", "run_where"]


@dataclass
class RouteDecision:
    """A per-sample configuration choice.

    Attributes:
        config: ``(B,)`` long, index into ``BudgetRouter.configs``.
        site_mask: ``(B, K)`` bool, True = optional site ``k`` runs for that sample.
        cost: ``(B,)`` the counted cost of the executed configuration.
        logits: ``(B, C)`` policy logits (``mode="policy"``), else None.
    """

    config: Tensor
    site_mask: Tensor
    cost: Tensor
    logits: Tensor | None = None


def run_where(fn: Callable[[Tensor], Tensor], x: Tensor, run: Tensor, *, skip: bool = True) -> Tensor:
    """``fn(x)`` for the samples where ``run`` is True, ``x`` elsewhere.

    ``skip=True`` calls ``fn`` only on the selected samples (real savings; data-dependent shapes,
    so not for ``torch.export``); ``skip=False`` computes every sample and selects (exportable).

    Shapes: ``x (B, ...)``, ``run (B,)`` bool -> ``(B, ...)``; ``fn`` maps ``(b, ...)`` to the same shape.
    """
    if run.shape != x.shape[:1] or run.dtype != torch.bool:
        raise ValueError(f"run must be bool of shape ({x.shape[0]},), got {run.dtype} {tuple(run.shape)}")
    sel = run.reshape(-1, *([1] * (x.dim() - 1)))
    if not skip:
        return torch.where(sel, fn(x), x)
    idx = run.nonzero().squeeze(1)  # (b,)
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, fn(x.index_select(0, idx)))


@register_block("router")
class BudgetRouter(nn.Module):
    """Choose, per sample, which of ``K`` optional sites run.

    ``configs`` are sets of site indices, kept sorted by cost (ties in the given order); the cost of
    a configuration is ``base_cost + sum of site_costs`` over its sites. Modes of :meth:`forward`:

    * ``"random"`` (``universal_random`` training): a configuration drawn uniformly per sample among
      those within ``budget`` (all when None);
    * ``"fixed"``: the most expensive configuration within ``budget`` (the cheapest if none fits),
      so the executed cost is non-decreasing in the budget;
    * ``"policy"``: argmax of the policy's logits among the configurations within ``budget``. The
      policy is an MLP on the masked mean of the ``source`` tokens (e.g. a special token); train it
      with cross-entropy on :meth:`pseudo_labels`.

    The decision does not depend on token order (mean pooling): ``symmetry = "invariant"``. It
    returns a :class:`RouteDecision`, not a ``FusionOutput``: a building block (``BLOCKS["router"]``).

    Args:
        source: the source whose tokens the policy reads.
        dim: its width ``D``.
        num_sites: ``K``, the optional sites.
        configs: site-index sets (default: every subset of the ``K`` sites, ``K <= 10``).
        site_costs: cost of each site (default 1 each: cost = number of sites run).
        base_cost: cost of the always-run part.
        hidden: policy MLP width (default ``D``).
        device, dtype: for the parameters.

    Raises:
        ValueError: bad sites / configs / costs; at call time, an unknown mode or a missing budget.

    Shapes:
        inputs ``{source: TokenSet (B, *axes, D)}``, ``budget`` a float or ``(B,)`` -> :class:`RouteDecision`.

    Example:
        >>> router = BudgetRouter("special", 16, num_sites=2, site_costs=[3.0, 5.0])
        >>> [tuple(c) for c in router.configs], router.costs.tolist()
        ([(), (0,), (1,), (0, 1)], [0.0, 3.0, 5.0, 8.0])
        >>> router({"special": TokenSet(torch.randn(4, 1, 16))}, mode="fixed", budget=6.0).config.tolist()
        [2, 2, 2, 2]
    """

    symmetry: ClassVar[str] = "invariant"
    has_parameters: ClassVar[bool] = True

    def __init__(
        self,
        source: str,
        dim: int,
        *,
        num_sites: int,
        configs: Sequence[Sequence[int]] | None = None,
        site_costs: Sequence[float] | None = None,
        base_cost: float = 0.0,
        hidden: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        if configs is None:
            if num_sites > 10:
                raise ValueError(f"pass configs= explicitly for num_sites > 10 (2**{num_sites} subsets), got {num_sites}")
            configs = [c for r in range(num_sites + 1) for c in combinations(range(num_sites), r)]
        configs = [tuple(sorted(set(int(i) for i in c))) for c in configs]
        if not configs or len(set(configs)) != len(configs):
            raise ValueError(f"configs must be a non-empty list of distinct site sets, got {configs}")
        if any(i < 0 or i >= num_sites for c in configs for i in c):
            raise ValueError(f"config site indices must be in [0, {num_sites}), got {configs}")
        site_costs = [1.0] * num_sites if site_costs is None else [float(c) for c in site_costs]
        if len(site_costs) != num_sites or any(c < 0 for c in site_costs):
            raise ValueError(f"site_costs must give {num_sites} non-negative costs, got {site_costs}")
        cost = [base_cost + sum(site_costs[i] for i in c) for c in configs]
        order = sorted(range(len(configs)), key=lambda j: cost[j])  # stable: ties keep the given order
        self.configs = tuple(configs[j] for j in order)
        dd = {"device": device, "dtype": dtype}
        self.register_buffer("costs", torch.tensor([cost[j] for j in order], dtype=dtype or torch.get_default_dtype(), device=device))
        site_mask = torch.zeros(len(configs), num_sites, dtype=torch.bool, device=device)
        for row, c in enumerate(self.configs):
            site_mask[row, list(c)] = True
        self.register_buffer("site_masks", site_mask)
        self.source, self.num_sites = source, num_sites
        self.embed = SourceEmbedding([source], dim, type_embedding=None, **dd)
        hidden = dim if hidden is None else hidden
        self.policy = nn.Sequential(nn.LayerNorm(dim, **dd), nn.Linear(dim, hidden, **dd), nn.GELU(),
                                    nn.Linear(hidden, len(configs), **dd))

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def _affordable(self, budget, batch: int, device) -> Tensor:
        """``(B, C)`` bool: configuration ``c`` fits the budget of sample ``b``."""
        if budget is None:
            return torch.ones(batch, len(self.configs), dtype=torch.bool, device=device)
        b = torch.as_tensor(budget, dtype=self.costs.dtype, device=device).reshape(-1, 1).expand(batch, 1)  # (B, 1)
        return self.costs.unsqueeze(0) <= b  # (B, C)

    def decision(self, config: Tensor, logits: Tensor | None = None) -> RouteDecision:
        """The :class:`RouteDecision` of configuration indices ``(B,)``."""
        return RouteDecision(config, self.site_masks[config], self.costs[config], logits)

    def config_for_budget(self, budget, batch: int = 1) -> Tensor:
        """Index of the most expensive configuration within ``budget`` (the cheapest if none fits), ``(B,)``."""
        ok = self._affordable(budget, batch, self.costs.device)  # (B, C)
        idx = torch.arange(len(self.configs), device=ok.device).expand_as(ok)
        best = torch.where(ok, idx, torch.full_like(idx, -1)).amax(dim=1)  # (B,)
        return best.clamp_min(0)

    def policy_logits(self, inputs: Mapping[str, TokenSet]) -> Tensor:
        """Policy logits ``(B, C)`` from the masked mean of the source tokens."""
        prepared = {s.name: s for s in self.embed(inputs)}
        if self.source not in prepared:
            raise ValueError(f"the policy reads source {self.source!r}; pass it")
        s = prepared[self.source]
        m = s.mask.unsqueeze(-1).to(s.x.dtype)
        pooled = s.x.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, D)
        return self.policy(pooled)

    def forward(
        self,
        inputs: Mapping[str, TokenSet],
        *,
        mode: Literal["policy", "random", "fixed"] = "policy",
        budget: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> RouteDecision:
        """Choose a configuration per sample; see the class docstring."""
        batch = self.embed.check(inputs)
        device = self.costs.device
        if mode == "fixed":
            if budget is None:
                raise ValueError("mode='fixed' needs budget=")
            return self.decision(self.config_for_budget(budget, batch))
        ok = self._affordable(budget, batch, device)
        ok = ok | ~ok.any(dim=1, keepdim=True) & (torch.arange(ok.shape[1], device=device) == 0)  # nothing fits: the cheapest
        if mode == "random":
            probs = ok.to(self.costs.dtype)
            config = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
            return self.decision(config)
        if mode != "policy":
            raise ValueError(f"mode must be 'policy', 'random' or 'fixed', got {mode!r}")
        logits = self.policy_logits(inputs)
        masked = logits.masked_fill(~ok, float("-inf"))
        return self.decision(masked.argmax(dim=1), logits)

    def pseudo_labels(self, correct: Tensor, *, fallback: Literal["most_expensive", "ignore"] = "most_expensive") -> Tensor:
        """Policy targets: the cheapest configuration that was correct for each sample.

        Args:
            correct: ``(B, C)`` bool, configuration ``c`` (in ``self.configs`` order) answered
                sample ``b`` correctly.
            fallback: label when no configuration is correct: the most expensive one, or ``-100``
                (``ignore_index`` of :func:`torch.nn.functional.cross_entropy`).

        Returns:
            ``(B,)`` long labels.
        """
        if correct.dim() != 2 or correct.shape[1] != len(self.configs) or correct.dtype != torch.bool:
            raise ValueError(f"correct must be bool (B, {len(self.configs)}), got {correct.dtype} {tuple(correct.shape)}")
        first = correct.long().argmax(dim=1)  # first True (configs are sorted by cost)
        none = ~correct.any(dim=1)
        fill = len(self.configs) - 1 if fallback == "most_expensive" else -100
        return torch.where(none, torch.full_like(first, fill), first)
