"""Named data sources for training: catalog data sets, user tables and labelled synthetic data.

Every source gives a table, its schema and optional precomputed arrays (text embeddings), which
:class:`attnfuse.train.FusionDataModule` splits, preprocesses and batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from attnfuse.data import (
    TableSchema,
    embed_text_inputs,
    load_mfeat,
    load_table,
    load_womens_clothing,
    make_synthetic_views,
    womens_clothing_schema,
)

__all__ = ["SOURCES", "Source", "load_source", "text_arrays"]


@dataclass
class Source:
    """A table with its schema and precomputed arrays for vector / text inputs (NaN rows = absent)."""

    frame: pd.DataFrame
    schema: TableSchema
    arrays: dict[str, np.ndarray] | None = None


def text_arrays(frame: pd.DataFrame, schema: TableSchema) -> dict[str, np.ndarray] | None:
    if not any(spec.kind == "text" for spec in schema.inputs):
        return None
    from attnfuse.encoders import embed_texts, load_minilm

    model = None

    def embed(texts: list[str]) -> np.ndarray:  # the model loads only if some text is not cached yet
        def lazy(batch: list[str]) -> np.ndarray:
            nonlocal model
            model = model or load_minilm()
            return model(batch)

        return embed_texts(texts, lazy)

    return embed_text_inputs(frame, schema, embed)


def _mfeat(table: Mapping[str, Any] | None) -> Source:
    data = load_mfeat()
    return Source(data.to_frame(), data.schema())


def _synthetic(table: Mapping[str, Any] | None) -> Source:
    data = make_synthetic_views(600, seed=int((table or {}).get("seed", 0)))
    return Source(data.to_frame(), data.schema())


def _womens_clothing(table: Mapping[str, Any] | None) -> Source:
    opts = dict(table or {})
    frame = load_womens_clothing()
    rows = opts.get("rows")
    if rows:  # a seeded subsample, for quicker runs
        frame = frame.sample(n=int(rows), random_state=int(opts.get("seed", 0))).reset_index(drop=True)
    schema = womens_clothing_schema(target=opts.get("target", "Recommended IND"), text=opts.get("text", "separate"))
    return Source(frame, schema, text_arrays(frame, schema))


def _table(table: Mapping[str, Any] | None) -> Source:
    if not table or "path" not in table or "schema" not in table:
        raise ValueError("dataset='table' needs table: {path: FILE.csv|.parquet, schema: {target, task, inputs}}")
    frame = load_table(table["path"])
    schema = TableSchema.from_dict(table["schema"])
    return Source(frame, schema, text_arrays(frame, schema))


SOURCES = {
    "mfeat": _mfeat,
    "womens_clothing": _womens_clothing,
    "table": _table,
    "synthetic_views": _synthetic,
}


def load_source(name: str, table: Mapping[str, Any] | None = None) -> Source:
    """Load a named source.

    Raises:
        KeyError: unknown name (listing the known ones).
    """
    if name not in SOURCES:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name](table)
