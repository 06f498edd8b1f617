"""Generic multi-input models: encoders -> fusion -> head, and a concatenation baseline.

These are the models the CLI trains on tables (including the catalog data sets) and the demo
compares. Inputs are a collated batch's ``"inputs"``: ``{name: {"x": tensor, "mask": bool}}`` (see
:mod:`attnfuse.data.collate`); a sample whose input is missing has an all-False mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnfuse.encoders import create_encoder, encode_inputs
from attnfuse.fusion import FusionOutput, get_fusion
from attnfuse.heads import ClassificationHead, RegressionHead

__all__ = ["ConcatMLP", "FusionModel", "build_fusion_model"]

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
    """Baseline without attention: concatenate every input (missing ones as zeros) -> MLP.

    Numeric / vector / text inputs enter as their feature vectors, categorical inputs one-hot.
    A missing input is all zeros, which the MLP cannot tell from data: that is the baseline's
    weakness the missing-input sweep shows.

    Args:
        encoder_configs: ``{name: {"kind": ..., ...}}`` as :meth:`TablePreprocessor.encoder_configs`.
        num_outputs: output size.
        hidden: hidden width.
        dropout: dropout after the hidden layer.

    Shapes: ``{name: {"x": (B, F_i), "mask": (B,)}}`` -> ``(B, K)``.
    """

    def __init__(self, encoder_configs: Mapping[str, Mapping[str, Any]], num_outputs: int, *, hidden: int = 128,
                 dropout: float = 0.1, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.configs = {name: dict(cfg) for name, cfg in sorted(encoder_configs.items())}
        total = sum(self._width(cfg) for cfg in self.configs.values())
        self.mlp = nn.Sequential(
            nn.LayerNorm(total, **dd), nn.Linear(total, hidden, **dd), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_outputs, **dd),
        )

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
        raise ValueError(f"ConcatMLP does not support input kind {kind!r}")

    def forward(self, inputs: Batch, **_: bool) -> Tensor:
        unknown = sorted(set(inputs) - set(self.configs))
        if unknown:
            raise KeyError(f"unknown input(s) {unknown}; this model was trained on {sorted(self.configs)}")
        parts = []
        for name, cfg in self.configs.items():
            x, mask = inputs[name]["x"], inputs[name]["mask"]
            if x.dim() != 2:
                raise ValueError(f"ConcatMLP needs fixed-size inputs (B, F); {name!r} has shape {tuple(x.shape)}")
            if cfg["kind"] == "categorical":
                x = torch.cat([nn.functional.one_hot(x[:, j].long(), int(c) + 1) for j, c in enumerate(cfg["cardinalities"])], 1)
            x = x.float() * mask[:, None].to(torch.float32)
            parts.append(x)
        return self.mlp(torch.cat(parts, dim=1))


def build_fusion_model(
    encoder_configs: Mapping[str, Mapping[str, Any]],
    num_outputs: int,
    *,
    task: Literal["classification", "regression"] = "classification",
    fusion: str = "early",
    dim: int = 64,
    heads: int = 4,
    pooling: Literal["auto", "mean", "fusion", "cls", "attention"] = "auto",
    dropout: float = 0.1,
    fusion_options: Mapping[str, Any] | None = None,
    encoder_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> nn.Module:
    """Build encoders -> fusion -> head from per-input encoder configurations.

    Args:
        encoder_configs: ``{name: {"kind": ..., ...}}`` (from the data module's preprocessor).
        num_outputs: classes (classification) or targets (regression).
        task: ``"classification"`` or ``"regression"``.
        fusion: a registered fusion name (``attnfuse list``) or ``"concat_mlp"`` for the baseline.
        dim, heads: token width and attention heads.
        pooling: head pooling; ``"auto"`` reads the fusion token when the fusion module lets it
            attend to the inputs (``fusion_token_attends``), else averages the valid tokens.
        dropout: dropout in fusion and head.
        fusion_options: extra constructor arguments of the fusion class (e.g. ``{"depth": 2}``).
        encoder_options: extra encoder arguments by input kind, e.g. ``{"vector": {"num_tokens": 2}}``.

    Raises:
        KeyError: unknown fusion name (listing registered ones).
        ValueError: ``pooling="fusion"`` with a fusion whose fusion token sees no input (e.g. late
            fusion, where it is a learned constant and the model could only predict the prior).
    """
    if fusion == "concat_mlp":
        return ConcatMLP(encoder_configs, num_outputs, hidden=2 * dim, dropout=dropout)
    cls = get_fusion(fusion)
    extra = {k: dict(v) for k, v in (encoder_options or {}).items()}
    encoders = {}
    for name, cfg in encoder_configs.items():
        cfg = dict(cfg)
        kind = cfg.pop("kind")
        encoders[name] = create_encoder(kind, dim=dim, **cfg, **extra.get(kind, {}))
    options = {"heads": heads, "dropout": dropout, **dict(fusion_options or {})}
    fusion_module = cls(list(encoder_configs), dim, **options)
    attends = bool(getattr(fusion_module, "fusion_token_attends", False))
    if pooling == "auto":
        pooling = "fusion" if attends else "mean"
    elif pooling in ("fusion", "cls") and not attends:
        raise ValueError(
            f"pooling={pooling!r} reads the fusion token, but in fusion={fusion!r} it attends to no input "
            "(a learned constant): use pooling 'mean' or 'attention' (or 'auto')"
        )
    head_cls = ClassificationHead if task == "classification" else RegressionHead
    head = head_cls(dim, num_outputs, pooling=pooling, dropout=dropout)
    return FusionModel(encoders, fusion_module, head)
