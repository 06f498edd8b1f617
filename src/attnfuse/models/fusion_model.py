"""Generic multi-input models: encoders -> fusion -> head, and a concatenation baseline.

These are the models the CLI trains on tables (including the catalog data sets) and the demo
compares. Inputs are a collated batch's ``"inputs"``: ``{name: {"x": tensor, "mask": bool}}`` (see
:mod:`attnfuse.data.collate`); a sample whose input is missing has an all-False mask.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnfuse.encoders import create_encoder, encode_inputs, get_encoder, list_encoders
from attnfuse.fusion import FusionOutput, get_fusion
from attnfuse.tokens import TokenSet

__all__ = [
    "ConcatMLP", "FusedReadout", "FusionFactory", "FusionModel", "build_fusion_model", "describe_factory", "factory_class",
    "resolve_fusion",
]

Batch = Mapping[str, Mapping[str, Tensor]]


class FusionModel(nn.Module):
    """``encoders`` (raw input -> TokenSet of width ``dim``), then ``fusion``, then ``head``.

    Args:
        encoders: one module per input name, ``encoder(x, mask) -> TokenSet``.
        fusion: a fusion module over the encoded inputs (``{name: TokenSet} -> FusionOutput``).
        head: a head over the fused TokenSet.

    Shapes: ``{name: {"x": (B, ...), "mask": (B, ...)}}`` -> head output ``(B, K)``.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion, self.head = fusion, head

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(sorted(self.encoders))

    def forward(self, inputs: Batch, *, return_fusion: bool = False,
                return_weights: bool = False) -> Tensor | tuple[Tensor, FusionOutput]:
        tokens = encode_inputs(self.encoders, inputs)
        out = self.fusion(tokens, return_weights=return_weights)
        pred = self.head(out.fused)
        return (pred, out) if (return_fusion or return_weights) else pred


class ConcatMLP(nn.Module):
    """Baseline without attention: concatenate every input (missing ones as zeros) -> MLP, or -> linear.

    Numeric / vector / text inputs enter as their feature vectors, categorical inputs one-hot.
    A missing input is all zeros, which the model cannot tell from data: that is the baseline's
    weakness the missing-input sweep shows.

    Args:
        encoder_configs: ``{name: {"kind": ..., ...}}`` as :meth:`TablePreprocessor.encoder_configs`.
        num_outputs: output size.
        hidden: hidden width; ``None`` (or 0) makes the model linear in the (standardised) inputs,
            e.g. a linear Cox model for survival.
        dropout: dropout after the hidden layer.

    Shapes: ``{name: {"x": (B, F_i), "mask": (B,)}}`` -> ``(B, K)``.
    """

    def __init__(self, encoder_configs: Mapping[str, Mapping[str, Any]], num_outputs: int, *, hidden: int | None = 128,
                 dropout: float = 0.1, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.configs = {name: dict(cfg) for name, cfg in sorted(encoder_configs.items())}
        total = sum(self._width(cfg) for cfg in self.configs.values())
        if hidden:
            self.mlp = nn.Sequential(
                nn.LayerNorm(total, **dd), nn.Linear(total, hidden, **dd), nn.GELU(), nn.Dropout(dropout),
                nn.Linear(hidden, num_outputs, **dd),
            )
        else:
            self.mlp = nn.Linear(total, num_outputs, **dd)

    @staticmethod
    def _width(cfg: Mapping[str, Any]) -> int:
        kind = cfg["kind"]
        if kind == "categorical":
            return sum(int(c) + 1 for c in cfg["cardinalities"])
        if kind == "numeric":
            return int(cfg["num_features"])
        if kind == "text":
            return int(cfg["embedding_dim"])
        if kind == "vector":
            return int(cfg["in_features"])
        if kind == "image":
            return int(cfg.get("channels", 1)) * int(cfg["height"]) * int(cfg["width"])
        raise ValueError(f"ConcatMLP does not support input kind {kind!r}")

    def forward(self, inputs: Batch, **_: bool) -> Tensor:
        unknown = sorted(set(inputs) - set(self.configs))
        if unknown:
            raise KeyError(f"unknown input(s) {unknown}; this model was trained on {sorted(self.configs)}")
        parts = []
        for name, cfg in self.configs.items():
            x, mask = inputs[name]["x"], inputs[name]["mask"]
            if cfg["kind"] == "image":
                x = x.reshape(x.shape[0], -1)
            if x.dim() != 2:
                raise ValueError(f"ConcatMLP needs fixed-size inputs (B, F); {name!r} has shape {tuple(x.shape)}")
            if cfg["kind"] == "categorical":
                x = torch.cat([nn.functional.one_hot(x[:, j].long(), int(c) + 1) for j, c in enumerate(cfg["cardinalities"])], 1)
            x = x.float() * mask.reshape(mask.shape[0], -1)[:, :1].to(torch.float32)
            parts.append(x)
        return self.mlp(torch.cat(parts, dim=1))


FusionFactory = Callable[[Sequence[str], int], nn.Module]
"""A fusion class (or a ``functools.partial`` of one with its options bound): ``factory(sources, dim) -> module``."""


def factory_class(factory: Any) -> type | None:
    """The class a fusion factory builds: the class itself, or the class inside a (jsonargparse) partial."""
    if isinstance(factory, type):
        return factory
    if isinstance(factory, functools.partial):
        if isinstance(factory.func, type):
            return factory.func
        return next((a for a in factory.args if isinstance(a, type)), None)
    return None


def describe_factory(factory: Any) -> dict[str, Any] | str:
    """``{"class_path", "init_args"}`` of a fusion factory with plain values (for logs and saved runs)."""
    cls = factory_class(factory)
    if cls is None:
        return repr(factory)
    kw = dict(factory.keywords) if isinstance(factory, functools.partial) else {}
    plain = {k: v for k, v in kw.items() if isinstance(v, str | int | float | bool | type(None) | list | tuple | dict)}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": plain}


def resolve_fusion(fusion: FusionFactory | str) -> FusionFactory:
    """A fusion factory from a registered name (``attnfuse list``), a class or a partial.

    Raises:
        KeyError: unknown name (listing the registered fusions).
        TypeError: not a name or a callable.
    """
    if isinstance(fusion, str):
        return get_fusion(fusion)
    if not callable(fusion):
        raise TypeError(f"fusion must be a registered name, a fusion class or a partial of one, got {type(fusion).__name__}")
    return fusion


def build_fusion_model(
    encoder_configs: Mapping[str, Mapping[str, Any]],
    make_head: Callable[[int, str], nn.Module],
    *,
    fusion: FusionFactory | str = "early",
    dim: int = 64,
    pooling: Literal["auto", "mean", "fusion", "cls", "attention"] = "auto",
    encoder_options: Mapping[str, Mapping[str, Any]] | None = None,
    num_classes: int | None = None,
    reads_output: Callable[[str], bool] | None = None,
) -> FusionModel:
    """Build encoders -> fusion -> head from per-input encoder configurations.

    Args:
        encoder_configs: ``{name: {"kind": ..., ...}}`` (from the data module's preprocessor).
        make_head: ``make_head(width, pooling) -> head`` over the fused tokens (the task's head).
        fusion: a fusion factory ``factory(sources, dim)``: a registered name (``attnfuse list``), a
            fusion class, or a partial with its options bound (what a config's ``class_path`` /
            ``init_args`` gives). Every option of a registered fusion has a default.
        dim: token width of the encoders and the fusion.
        pooling: head pooling; ``"auto"`` reads the fusion token when the fusion module lets it
            attend to the inputs (``fusion_token_attends``), else averages the valid tokens.
        encoder_options: extra encoder arguments by input kind, e.g. ``{"vector": {"num_tokens": 2}}``.
        num_classes: passed to fusions that take ``num_classes`` (e.g. evidential fusion) when their
            config leaves it unset.
        reads_output: ``reads_output(kind)``: whether the task reads a fusion output of ``kind``
            (e.g. ``"dirichlet"``) directly; then the head is a read-out of the fused token.

    Raises:
        KeyError: unknown fusion name (listing registered ones).
        ValueError: ``pooling="fusion"`` with a fusion whose fusion token sees no input (e.g. late
            fusion, where it is a learned constant and the model could only predict the prior), or
            a fusion output the task cannot use.
    """
    factory = resolve_fusion(fusion)
    extra = {k: dict(v) for k, v in (encoder_options or {}).items()}
    _check_encoder_options(extra)
    encoders = {}
    for name, cfg in encoder_configs.items():
        cfg = dict(cfg)
        kind = cfg.pop("kind")
        encoders[name] = create_encoder(kind, dim=dim, **cfg, **extra.get(kind, {}))
    cls = factory_class(factory)
    fill = {}
    if cls is not None and "num_classes" in inspect.signature(cls).parameters:
        bound = factory.keywords.get("num_classes") if isinstance(factory, functools.partial) else None
        if bound is None and num_classes is not None:
            fill["num_classes"] = num_classes
    fusion_module = factory(list(encoder_configs), dim, **fill)
    name = getattr(cls, "__name__", repr(fusion))
    output = getattr(fusion_module, "output", "tokens")
    if output != "tokens":
        if reads_output is None or not reads_output(output):
            raise ValueError(f"fusion {name} outputs {output!r}, which this task cannot read; e.g. an evidential fusion "
                             "needs task classification with loss: evidential")
        return FusionModel(encoders, fusion_module, FusedReadout())
    attends = bool(getattr(fusion_module, "fusion_token_attends", False))
    if pooling == "auto":
        pooling = "fusion" if attends else "mean"
    elif pooling in ("fusion", "cls") and not attends:
        raise ValueError(
            f"pooling={pooling!r} reads the fusion token, but in fusion {name} it attends to no input "
            "(a learned constant): use pooling 'mean' or 'attention' (or 'auto')"
        )
    width = int(getattr(fusion_module, "out_dim", dim))
    return FusionModel(encoders, fusion_module, make_head(width, pooling))


def _check_encoder_options(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Encoder options are keyed by input kind and must be keyword options of that kind's encoder."""
    for kind, opts in options.items():
        try:
            cls = get_encoder(kind)
        except KeyError:
            raise ValueError(f"encoder_options key {kind!r} is not an input kind; kinds: {list_encoders()}") from None
        params = inspect.signature(cls).parameters
        allowed = sorted(n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in ("device", "dtype"))
        unknown = sorted(set(opts) - set(allowed))
        if unknown:
            raise ValueError(f"encoder_options[{kind!r}] has unknown option(s) {unknown}; the {cls.__name__} takes {allowed}")


class FusedReadout(nn.Module):
    """The first fused token's features as the prediction (for fusions that output predictions, e.g. Dirichlet alpha).

    Shapes: ``TokenSet (B, N, K)`` -> ``(B, K)``.
    """

    def forward(self, tokens: TokenSet) -> Tensor:
        return tokens.x.reshape(tokens.x.shape[0], -1, tokens.x.shape[-1])[:, 0]
