"""Inject a fusion module into a (frozen) backbone at chosen sites, identity at initialisation.

Used by ADEM-VL (https://arxiv.org/abs/2410.17779; parameter-free cross-attention at every block,
query at the MLP input, added to the MLP output, ``alpha = 0.1``), VISOR (cross-attention sites)
and CCA (the last block). Status: a wiring utility; the zero-initialised gate of
``init="identity"`` is an attnfuse design choice (Flamingo-style gating), not from those papers.

ADEM-VL's learnable offsets ``E1`` / ``E2`` (added to the visual keys / values) are owned by ``Inject``
with ``context_tokens=M_v``: ``key_offset`` ``E1 ~ N(0, 0.02²)`` and ``value_offset`` ``E2 = 0``, each
``(1, M_v, D)``, passed to the fusion at every site as ``key_offset=`` / ``value_offset=`` (one pair shared
by every site, as the paper's single ``E1`` / ``E2``). The paper's block is then one ``Inject`` call::

    Inject(lm, ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.1), sites=mlp_sites,
           query="text", scale=0.1, init=None, context_tokens=320)

Mechanism: a forward hook on every site module. While :meth:`Inject.forward` runs with a
``context``, each hook takes the site's input (or output) ``t`` as the query source, calls the
fusion module with ``{query: TokenSet(t, query_mask), **context}`` and adds ``scale * gate * update``
to the site's output. The backbone's own modules and state-dict keys are not changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_block
from attnfuse.tokens import TokenSet

__all__ = ["Inject"]


def _key(site: str) -> str:
    return site.replace(".", "__") or "__root__"


@register_block("inject")
class Inject(nn.Module):
    """Wrap ``backbone`` so that ``fusion`` runs at ``sites``: ``out_site <- out_site + scale * gate * update``.

    Not a ``{name: TokenSet} -> FusionOutput`` module itself: it calls the backbone and returns the
    backbone's output, so it is a building block (``BLOCKS["inject"]``), not a fusion.
    ``symmetry = "ordered"`` (whatever the backbone does).

    Args:
        backbone: the model to extend (its parameters are frozen with ``freeze_backbone``).
        fusion: one fusion module shared by every site, or ``{site: module}``.
        sites: submodule names (``"layers.3.mlp"``) or a predicate ``(name, module) -> bool``.
        query: the source name under which the site's tensor is passed to ``fusion``.
        query_from: take the query from the site's first positional ``"input"`` or its ``"output"``.
        fusion_returns: ``"update"`` — ``fusion(...).fused.x`` is the term to add (e.g.
            :class:`ParameterFreeCrossAttention`); ``"tokens"`` — ``fusion(...).per_source[query].x``
            are updated query tokens (e.g. :class:`CrossAttentionFusion`) and the added term is
            their difference from the query.
        scale: ``alpha`` multiplying every update (ADEM-VL: 0.1).
        init: ``"identity"`` adds a learnable scalar gate per site, initialised to 0, so the
            wrapped model equals the backbone at initialisation; None: no gate (gate = 1).
        freeze_backbone: set ``requires_grad=False`` on every backbone parameter.
        context_tokens: ``M_v``, the number of context tokens, to own ADEM-VL's learnable offsets:
            ``key_offset`` (``E1``, ``N(0, offset_std²)``) and ``value_offset`` (``E2``, zeros), each
            ``(1, M_v, D)`` with ``D`` the fusion's ``out_dim``, passed to the fusion at every site as
            ``key_offset=`` / ``value_offset=`` keyword arguments (the fusion must take them, e.g.
            :class:`ParameterFreeCrossAttention`). None (default): no offsets.
        offset_std: standard deviation of the initial ``E1`` (ADEM-VL: 0.02).
        device, dtype: for the gates and offsets.

    Raises:
        ValueError: no site found, an unknown site, a missing per-site fusion, bad options, offsets for a
            fusion that does not take ``key_offset`` / ``value_offset``; at call time, an update whose shape
            differs from the site output (a context whose token count differs from ``context_tokens`` is
            rejected by the fusion).

    Shapes:
        the site tensor ``(B, *tokens, D)``; ``query_mask (B, *tokens)``; the update must have the
        site output's shape.

    Example:
        >>> model = Inject(lm, ParameterFreeCrossAttention(["text", "visual"], 4096), sites=lambda n, m: n.endswith("mlp"),
        ...                query="text", scale=0.1, init=None)  # doctest: +SKIP
        >>> logits = model(tokens, context={"visual": bank})  # doctest: +SKIP
    """

    symmetry: ClassVar[str] = "ordered"
    has_parameters: ClassVar[bool] = True

    def __init__(
        self,
        backbone: nn.Module,
        fusion: nn.Module | Mapping[str, nn.Module],
        *,
        sites: Sequence[str] | Callable[[str, nn.Module], bool],
        query: str = "query",
        query_from: Literal["input", "output"] = "input",
        fusion_returns: Literal["update", "tokens"] = "update",
        scale: float = 1.0,
        init: Literal["identity"] | None = "identity",
        freeze_backbone: bool = True,
        context_tokens: int | None = None,
        offset_std: float = 0.02,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if query_from not in ("input", "output"):
            raise ValueError(f"query_from must be 'input' or 'output', got {query_from!r}")
        if fusion_returns not in ("update", "tokens"):
            raise ValueError(f"fusion_returns must be 'update' or 'tokens', got {fusion_returns!r}")
        if init not in ("identity", None):
            raise ValueError(f"init must be 'identity' or None, got {init!r}")
        modules = dict(backbone.named_modules())
        if callable(sites) and not isinstance(sites, (str, Sequence)):
            names = [n for n, m in modules.items() if sites(n, m)]
        else:
            names = [sites] if isinstance(sites, str) else list(sites)
            unknown = [n for n in names if n not in modules]
            if unknown:
                raise ValueError(f"unknown site(s) {unknown}; the backbone's submodules include {sorted(modules)[:20]}")
        if not names:
            raise ValueError("no injection site selected; check sites=")
        self.backbone = backbone
        self.sites = tuple(names)
        self.query, self.query_from, self.fusion_returns, self.scale = query, query_from, fusion_returns, scale
        if isinstance(fusion, Mapping):
            missing = [n for n in names if n not in fusion]
            if missing:
                raise ValueError(f"fusion has no module for site(s) {missing}")
            self.fusion = nn.ModuleDict({_key(n): fusion[n] for n in names})
        else:
            self.fusion = fusion
        self.gates = (
            nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(1, device=device, dtype=dtype)) for n in names})
            if init == "identity" else None
        )
        if freeze_backbone:
            backbone.requires_grad_(False)
        self.key_offset = self.value_offset = None
        if context_tokens is not None:
            self._make_offsets(context_tokens, offset_std, device, dtype)
        self._context: Mapping[str, TokenSet] | None = None
        self._query_mask: Tensor | None = None
        self._handles = [modules[n].register_forward_hook(self._hook(n), with_kwargs=True) for n in names]

    def _fusions(self) -> list[nn.Module]:
        return list(self.fusion.values()) if isinstance(self.fusion, nn.ModuleDict) else [self.fusion]

    def _make_offsets(self, tokens: int, std: float, device, dtype) -> None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"context_tokens must be a positive int (M_v), got {tokens!r}")
        dims = set()
        for fusion in self._fusions():
            params = inspect.signature(fusion.forward).parameters
            if not {"key_offset", "value_offset"} <= set(params):
                raise ValueError(f"context_tokens= needs a fusion whose forward takes key_offset= and value_offset= "
                                 f"(e.g. ParameterFreeCrossAttention); {type(fusion).__name__} does not")
            dim = getattr(fusion, "out_dim", None)
            if not isinstance(dim, int):
                raise ValueError(f"context_tokens= needs the fusion's out_dim to size the offsets; {type(fusion).__name__} has none")
            dims.add(dim)
        if len(dims) != 1:
            raise ValueError(f"every site's fusion must have the same out_dim to share the offsets, got {sorted(dims)}")
        (dim,) = dims
        self.key_offset = nn.Parameter(torch.randn(1, tokens, dim, device=device, dtype=dtype) * std)  # E1
        self.value_offset = nn.Parameter(torch.zeros(1, tokens, dim, device=device, dtype=dtype))  # E2

    def _hook(self, site: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if self._context is None:  # called outside Inject.forward: the plain backbone
                return output
            out = output[0] if isinstance(output, (tuple, list)) else output
            source = args[0] if (self.query_from == "input" and args) else out
            if self.query_from == "input" and not args:
                raise ValueError(f"site {site!r} was called without a positional input to take the query from")
            update = self._update(site, source)
            if update.shape != out.shape:
                raise ValueError(f"the fusion at site {site!r} returned shape {tuple(update.shape)}, the site output is {tuple(out.shape)}")
            gate = self.gates[_key(site)].to(out.dtype) if self.gates is not None else 1.0
            new = out + self.scale * gate * update
            if isinstance(output, tuple):
                return (new, *output[1:])
            if isinstance(output, list):
                return [new, *output[1:]]
            return new

        return hook

    def _update(self, site: str, source: Tensor) -> Tensor:
        fusion = self.fusion[_key(site)] if isinstance(self.fusion, nn.ModuleDict) else self.fusion
        mask = self._query_mask
        if mask is not None and mask.shape != source.shape[:-1]:
            raise ValueError(f"query_mask has shape {tuple(mask.shape)}, the query at site {site!r} is {tuple(source.shape[:-1])}")
        axes = ("token",) if source.dim() == 3 else tuple(f"axis{i}" for i in range(source.dim() - 2))
        offsets = {}
        if self.key_offset is not None:
            offsets = {"key_offset": self.key_offset.to(source.dtype), "value_offset": self.value_offset.to(source.dtype)}
        result = fusion({self.query: TokenSet(source, mask, axes), **self._context}, **offsets)
        tokens = result.fused.x if self.fusion_returns == "update" else result.per_source[self.query].x
        if tokens.shape[:-1].numel() != source.shape[:-1].numel():
            raise ValueError(
                f"the fusion at site {site!r} returned shape {tuple(tokens.shape)}, the site tensor is {tuple(source.shape)}; "
                "with fusion tokens (e.g. CrossAttentionFusion) use fusion_returns='tokens'"
            )
        tokens = tokens.reshape(source.shape[:-1] + tokens.shape[-1:])
        return tokens if self.fusion_returns == "update" else tokens - source

    def forward(self, *args, context: Mapping[str, TokenSet] | None = None, query_mask: Tensor | None = None, **kwargs):
        """Run the backbone with the fusion active at every site (plain backbone when ``context`` is None)."""
        self._context, self._query_mask = (dict(context) if context is not None else None), query_mask
        try:
            return self.backbone(*args, **kwargs)
        finally:
            self._context, self._query_mask = None, None

    def remove(self) -> nn.Module:
        """Detach the hooks and return the backbone (its ``requires_grad`` flags stay as they are)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.backbone
