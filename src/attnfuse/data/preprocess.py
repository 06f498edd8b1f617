"""Turn a validated table into per-input model inputs: standardised numbers, category codes, masks.

:class:`TablePreprocessor` is fitted on the training rows only (category vocabularies, feature
means / standard deviations, target classes), saved with a run as JSON, and applied unchanged to
validation, test and prediction tables. :meth:`TablePreprocessor.transform` returns an
:class:`EncodedTable`: one array per input plus a per-row presence mask; absent rows hold zeros
(never NaN) and are marked absent, never silently zero-filled as if they were data.

Image inputs are standardised per channel: one mean and one standard deviation per channel over
all pixels of the training rows (a single pair for a one-channel image), so the pixel grid keeps
its relative contrast; a row with any non-finite pixel is absent (``nan_policy="missing"``).

Non-finite numbers are missing values. In numeric, vector and image inputs, a value that is not a
finite float32 (``inf``, ``-inf``, ``|x| > 3.4e38``), before or after standardisation, is treated
exactly like NaN, in :meth:`TablePreprocessor.fit` (excluded from the statistics) and in
:meth:`TablePreprocessor.transform` (the row's input is absent, or 0 with ``nan_policy="zero"``).
The encoded values are therefore always finite float32.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnfuse.data.table import FLOAT32_MAX, InputSpec, SchemaError, TableSchema, numeric_block, validate
from attnfuse.data.targets import encode_target, fit_classes, label_key, label_sort_key

__all__ = ["EncodedTable", "TablePreprocessor", "category_key", "embed_text_inputs", "text_values"]


#: canonical string of a category value (``3``, ``3.0`` and ``np.int64(3)`` are one category); shared with targets
category_key = label_key


def _is_blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or (isinstance(v, str) and not v.strip())


def text_values(df: pd.DataFrame, columns: Sequence[str], nan_policy: str = "missing") -> list[str | None]:
    """The text of each row: non-blank cells of ``columns`` joined by newlines; ``None`` if all are blank.

    With ``nan_policy="zero"`` a row with no text gets ``""`` instead of ``None``.
    """
    out: list[str | None] = []
    for row in df[list(columns)].itertuples(index=False, name=None):
        parts = [str(v).strip() for v in row if not _is_blank(v)]
        out.append("\n".join(parts) if parts else ("" if nan_policy == "zero" else None))
    return out


def embed_text_inputs(
    df: pd.DataFrame, schema: TableSchema, embed: Callable[[list[str]], np.ndarray]
) -> dict[str, np.ndarray]:
    """Precompute ``arrays=`` for every text input: ``{name: float32 (N, E)}``, NaN rows where the text is absent.

    Args:
        df: the table.
        schema: its schema.
        embed: ``list of N' strings -> array (N', E)``, e.g. ``attnfuse.encoders.embed_texts`` with
            its cache, or ``TextEncoder(...).embed``.
    """
    arrays: dict[str, np.ndarray] = {}
    for spec in schema.inputs:
        if spec.kind != "text" or not all(c in df.columns for c in spec.columns):
            continue
        texts = text_values(df, spec.columns, spec.nan_policy)
        rows = [i for i, t in enumerate(texts) if t is not None]
        emb = np.asarray(embed([texts[i] for i in rows]), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(rows):
            raise ValueError(f"embed returned shape {emb.shape} for {len(rows)} texts; expected (N, E)")
        full = np.full((len(df), emb.shape[1]), np.nan, dtype=np.float32)
        full[rows] = emb
        arrays[spec.name] = full
    return arrays


@dataclass
class EncodedTable:
    """Model-ready values of a table.

    Attributes:
        values: ``{input: array}``: float32 ``(N, F)`` for numeric / vector / text, int64 ``(N, C)``
            category codes (0 = unknown or missing) for categorical, float32 ``(N, C, H, W)`` for
            image, or a list of N float32 ``(L_i, F)`` arrays for variable-length inputs. Absent
            rows hold zeros / length 0.
        present: ``{input: bool (N,)}``, False where the input is absent for that row.
        target: the encoded target (see :mod:`attnfuse.data.targets`): int64 class indices ``(N,)``,
            float32 values ``(N,)`` / ``(N, T)``, or ``(N, 2)`` (time, event); None without a target.
    """

    values: dict[str, Any]
    present: dict[str, np.ndarray]
    target: np.ndarray | None
    num_rows: int


@dataclass
class TablePreprocessor:
    """Fitted per-input transformations of a table (see the module docstring).

    Attributes:
        schema: the table schema.
        classes: target classes (classification / retrieval), sorted; class index = position.
        vocabs: ``{categorical input: [[category keys of column 0], ...]}``; code = position + 1.
        stats: ``{numeric/vector input read from columns: (means, stds)}`` per feature, and
            ``{image input: (means, stds)}`` per channel (absent if not standardised).
        array_dims: ``{vector/text input given by arrays: feature width}``.
        sequences: inputs given as variable-length sequences ``(L_i, F)``.
        standardize: whether numeric/vector columns are standardised with ``stats``.
    """

    schema: TableSchema
    classes: list[Any] | None = None
    vocabs: dict[str, list[list[str]]] = field(default_factory=dict)
    stats: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    array_dims: dict[str, int] = field(default_factory=dict)
    sequences: list[str] = field(default_factory=list)
    standardize: bool = True

    @classmethod
    def fit(
        cls,
        df: pd.DataFrame,
        schema: TableSchema,
        *,
        arrays: Mapping[str, Any] | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        standardize: bool = True,
    ) -> TablePreprocessor:
        """Fit on ``df``: statistics and vocabularies on the positional ``rows`` only (e.g. the training
        split) if given; the target classes on every row (so a rare class missing from ``rows`` keeps its index).

        Raises:
            SchemaError: the table does not match the schema, or a text input has no arrays.
        """
        arrays = dict(arrays or {})
        validate(df, schema, arrays=arrays)
        sub = df if rows is None else df.iloc[np.asarray(rows)]
        pre = cls(schema=schema, standardize=standardize)
        pre.classes = fit_classes(df, schema)  # the class set comes from every row, statistics from ``rows``
        for spec in schema.inputs:
            if spec.kind == "image":
                images = _image_values(df, spec, arrays.get(spec.name))  # (N, C, H, W)
                if rows is not None:
                    images = images[np.asarray(rows)]
                stats = _fit_image_stats(spec, images, standardize)
                if stats is not None:
                    pre.stats[spec.name] = stats
            elif spec.name in arrays:
                arr = arrays[spec.name]
                if isinstance(arr, np.ndarray) and arr.ndim == 2:
                    pre.array_dims[spec.name] = int(arr.shape[1])
                else:
                    dims = {np.asarray(a).shape[-1] for a in arr if a is not None}
                    if len(dims) != 1 or any(a is not None and np.asarray(a).ndim != 2 for a in arr):
                        raise SchemaError(
                            f"arrays[{spec.name!r}]: a list needs arrays (L_i, F) with one width F, got widths {sorted(dims)}"
                        )
                    pre.array_dims[spec.name] = dims.pop()
                    pre.sequences.append(spec.name)
            elif spec.kind == "text":
                raise SchemaError(
                    f"text input {spec.name!r} needs precomputed embeddings: pass arrays={{{spec.name!r}: ...}}, "
                    "e.g. attnfuse.data.embed_text_inputs(df, schema, attnfuse.encoders.TextEncoder(...).embed)"
                )
            elif spec.kind == "categorical":
                pre.vocabs[spec.name] = [
                    sorted({category_key(v) for v in sub[c].dropna().unique()}, key=_sort_key) for c in spec.columns
                ]
            else:
                block = numeric_block(sub, spec.columns)  # NaN where null, inf or beyond float32
                ok = ~np.isnan(block).any(axis=1) if spec.nan_policy == "missing" else np.ones(len(block), bool)
                good = block[ok]
                if len(block) and not len(good):
                    bad = [c for j, c in enumerate(spec.columns) if np.isnan(block[:, j]).all()]
                    why = (f"column(s) {bad} hold no finite value there" if bad
                           else f"no row has every one of {list(spec.columns)} finite")
                    raise SchemaError(
                        f"input {spec.name!r} is missing in every training row ({why}; NaN, inf and values beyond float32 "
                        "count as missing): drop those columns from the input, or the input from the schema"
                    )
                if standardize and len(good):
                    mean = np.nanmean(good, axis=0)
                    std = np.nanstd(good, axis=0)
                    std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
                    mean = np.where(np.isfinite(mean), mean, 0.0)
                    pre.stats[spec.name] = (mean.tolist(), std.tolist())
        return pre

    def transform(
        self,
        df: pd.DataFrame,
        *,
        arrays: Mapping[str, Any] | None = None,
        require_target: bool = True,
        allow_missing_inputs: bool = False,
    ) -> EncodedTable:
        """Apply the fitted transformations to a table (the training table or a new one).

        Args:
            df: the table; its columns must match the schema.
            arrays: precomputed values for vector/text inputs (as in :meth:`fit`).
            require_target: False to transform a table without the target (prediction).
            allow_missing_inputs: inputs whose columns are all absent become absent for every row.

        Raises:
            SchemaError: mismatching table, an unseen target class, arrays of the wrong width.
        """
        arrays = dict(arrays or {})
        absent = validate(df, self.schema, arrays=arrays, require_target=require_target, allow_missing_inputs=allow_missing_inputs)
        n = len(df)
        values: dict[str, Any] = {}
        present: dict[str, np.ndarray] = {}
        for spec in self.schema.inputs:
            name = spec.name
            if spec.kind == "image":
                values[name], present[name] = self._image(spec, df, arrays.get(name), absent=name in absent)
                continue
            if name in self.array_dims:
                values[name], present[name] = self._from_array(name, arrays.get(name), n)
                if spec.kind == "text" and spec.columns and name not in absent:
                    present[name] &= np.array([t is not None for t in text_values(df, spec.columns, spec.nan_policy)])
                    values[name] = _zero_absent(values[name], present[name])
                continue
            if name in absent:
                width = len(spec.columns)
                dtype = np.int64 if spec.kind == "categorical" else np.float32
                values[name], present[name] = np.zeros((n, width), dtype), np.zeros(n, bool)
                continue
            if spec.kind == "categorical":
                codes = np.zeros((n, len(spec.columns)), np.int64)
                null = df[list(spec.columns)].isna().to_numpy()
                for j, (col, vocab) in enumerate(zip(spec.columns, self.vocabs[name])):
                    index = {k: i + 1 for i, k in enumerate(vocab)}
                    codes[:, j] = [0 if nul else index.get(category_key(v), 0) for v, nul in zip(df[col].tolist(), null[:, j])]
                ok = ~null.all(axis=1) if spec.nan_policy == "missing" else np.ones(n, bool)
                values[name], present[name] = np.where(ok[:, None], codes, 0), ok
            else:
                block = numeric_block(df, spec.columns)  # NaN where null, inf or beyond float32
                if name in self.stats:
                    mean, std = (np.asarray(a) for a in self.stats[name])
                    with np.errstate(over="ignore", invalid="ignore"):
                        block = _finite32((block - mean) / std)  # a huge value over a tiny std: missing too
                nan = np.isnan(block)
                ok = ~nan.any(axis=1) if spec.nan_policy == "missing" else np.ones(n, bool)
                block = np.where(nan, 0.0, block)
                values[name], present[name] = _zero_absent(block.astype(np.float32), ok), ok
        target = self._target(df) if require_target else None
        return EncodedTable(values=values, present=present, target=target, num_rows=n)

    def _image(self, spec: InputSpec, df: pd.DataFrame, arr: Any, *, absent: bool) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(N, C, H, W)`` standardised per channel, zeros where absent; presence ``(N,)``."""
        n = len(df)
        if absent:
            return np.zeros((n, *spec.shape), np.float32), np.zeros(n, bool)
        images = _image_values(df, spec, arr)  # (N, C, H, W) float64, NaN where missing
        if spec.name in self.stats:
            mean, std = (np.asarray(a, dtype=np.float64)[None, :, None, None] for a in self.stats[spec.name])  # (1, C, 1, 1)
            with np.errstate(over="ignore", invalid="ignore"):
                images = _finite32((images - mean) / std)
        bad = np.isnan(images)
        ok = ~bad.reshape(n, -1).any(axis=1) if spec.nan_policy == "missing" else np.ones(n, bool)
        images = np.where(bad | ~ok[:, None, None, None], 0.0, images)
        return images.astype(np.float32), ok

    def _from_array(self, name: str, arr: Any, n: int) -> tuple[Any, np.ndarray]:
        width = self.array_dims[name]
        if arr is None:
            if name in self.sequences:
                return [np.zeros((0, width), np.float32) for _ in range(n)], np.zeros(n, bool)
            return np.zeros((n, width), np.float32), np.zeros(n, bool)
        if name in self.sequences:
            seqs, ok = [], np.zeros(n, bool)
            for i, a in enumerate(arr):
                a = np.zeros((0, width), np.float32) if a is None else _as_float32(a)
                if a.ndim != 2 or a.shape[1] != width:
                    raise SchemaError(f"arrays[{name!r}][{i}] has shape {a.shape}, expected (L, {width})")
                good = len(a) > 0 and bool(np.isfinite(a).all())
                seqs.append(a if good else np.zeros((0, width), np.float32))
                ok[i] = good
            return seqs, ok
        a = _as_float32(arr)
        if a.ndim != 2 or a.shape[1] != width:
            raise SchemaError(f"arrays[{name!r}] has shape {a.shape}, expected (N, {width})")
        ok = np.isfinite(a).all(axis=1)
        return _zero_absent(a, ok), ok

    def _target(self, df: pd.DataFrame) -> np.ndarray:
        try:
            return encode_target(df, self.schema, self.classes)
        except ValueError as err:
            raise SchemaError(str(err)) from None

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def encoder_configs(self) -> dict[str, dict[str, Any]]:
        """Constructor arguments per input for :func:`attnfuse.encoders.create_encoder` (add ``dim=``).

        Example: ``{"vitals": {"kind": "numeric", "num_features": 3}, "site": {"kind": "categorical",
        "cardinalities": [4, 7]}, "notes": {"kind": "text", "embedding_dim": 384},
        "digit": {"kind": "image", "channels": 1, "height": 16, "width": 15}}``.
        """
        out: dict[str, dict[str, Any]] = {}
        for spec in self.schema.inputs:
            if spec.kind == "image":
                c, h, w = spec.shape
                out[spec.name] = {"kind": "image", "channels": c, "height": h, "width": w}
            elif spec.name in self.array_dims:
                key = "embedding_dim" if spec.kind == "text" else "in_features"
                out[spec.name] = {"kind": spec.kind, key: self.array_dims[spec.name]}
            elif spec.kind == "categorical":
                out[spec.name] = {"kind": "categorical", "cardinalities": [len(v) for v in self.vocabs[spec.name]]}
            elif spec.kind == "numeric":
                out[spec.name] = {"kind": "numeric", "num_features": len(spec.columns)}
            else:
                out[spec.name] = {"kind": "vector", "in_features": len(spec.columns)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema.to_dict(), "classes": self.classes, "vocabs": self.vocabs,
            "stats": {k: [list(m), list(s)] for k, (m, s) in self.stats.items()},
            "array_dims": self.array_dims, "sequences": list(self.sequences), "standardize": self.standardize,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TablePreprocessor:
        return cls(
            schema=TableSchema.from_dict(data["schema"]), classes=data.get("classes"), vocabs=dict(data.get("vocabs", {})),
            stats={k: (list(v[0]), list(v[1])) for k, v in data.get("stats", {}).items()},
            array_dims={k: int(v) for k, v in data.get("array_dims", {}).items()},
            sequences=list(data.get("sequences", [])), standardize=bool(data.get("standardize", True)),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (e.g. beside a run's checkpoints)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TablePreprocessor:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _image_values(df: pd.DataFrame, spec: InputSpec, arr: Any) -> np.ndarray:
    """The raw pixels of an image input as float64 ``(N, C, H, W)``: from ``arr`` if given, else its
    columns in row-major order (column ``c*H*W + i*W + j`` -> channel ``c``, row ``i``, column ``j``);
    NaN where a pixel is missing (null, NaN, inf or beyond float32).

    Raises:
        SchemaError: ``arr`` has neither shape ``(N, C, H, W)`` nor, for one channel, ``(N, H, W)``.
    """
    c, h, w = spec.shape
    if arr is None:
        block = numeric_block(df, spec.columns)  # (N, C*H*W)
        return block.reshape(len(df), c, h, w)
    a = np.asarray(arr, dtype=np.float64)
    if c == 1 and a.ndim == 3 and a.shape[1:] == (h, w):
        a = a[:, None]
    if a.ndim != 4 or a.shape[1:] != (c, h, w):
        raise SchemaError(f"arrays[{spec.name!r}] has shape {a.shape}, expected (N, {c}, {h}, {w})")
    return _finite32(a)


def _fit_image_stats(spec: InputSpec, images: np.ndarray, standardize: bool) -> tuple[list[float], list[float]] | None:
    """Per-channel (means, stds) over the pixels of the usable training images ``(n, C, H, W)``.

    Raises:
        SchemaError: no training row has a usable image.
    """
    n = len(images)
    finite = np.isfinite(images)
    if spec.nan_policy == "missing":  # only whole images count
        keep = finite.reshape(n, -1).all(axis=1)
        images, finite = images[keep], finite[keep]
    if n and not finite.any():
        raise SchemaError(f"image input {spec.name!r} is missing in every training row (a non-finite pixel makes a row's "
                          "image absent); check its columns / arrays, or drop the input from the schema")
    if not standardize or not n:
        return None
    count = finite.sum(axis=(0, 2, 3))  # (C,)
    pixels = np.where(finite, images, 0.0)
    mean = pixels.sum(axis=(0, 2, 3)) / np.maximum(count, 1)  # (C,)
    var = (np.where(finite, pixels - mean[None, :, None, None], 0.0) ** 2).sum(axis=(0, 2, 3)) / np.maximum(count, 1)
    std = np.sqrt(var)
    std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
    mean = np.where(np.isfinite(mean) & (count > 0), mean, 0.0)
    return mean.tolist(), std.tolist()


def _finite32(a: np.ndarray) -> np.ndarray:
    """``a`` with NaN wherever a value is not a finite float32 (inf, or ``|x| > FLOAT32_MAX``)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(a) <= FLOAT32_MAX, a, np.nan)


def _as_float32(a: Any) -> np.ndarray:
    """float32 array; values beyond float32's range become ``inf`` (then absent) without a warning."""
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=np.float32)


def _zero_absent(block: np.ndarray, ok: np.ndarray) -> np.ndarray:
    return np.where(ok[:, None], block, 0).astype(block.dtype)


def _sort_key(key: Any) -> tuple[int, float, str]:
    """Numbers sort numerically before strings, strings alphabetically."""
    return label_sort_key(category_key(key))
