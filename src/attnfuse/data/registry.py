"""The one registry of data sets usable by name: ``attnfuse fit --data.dataset NAME``, ``attnfuse list``,
``FusionPredictor``, the demo.

Every entry is a loader ``load(**options) -> Source`` (a table, its schema and precomputed arrays)
with typed keyword options (``--data.options.NAME VALUE`` in the CLI, checked against the loader's
signature) and, when its files come from the offline catalog, the catalog entry that ships them
(:mod:`attnfuse.data.catalog`). ``table`` is the user's own CSV / Parquet file.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from attnfuse._lookup import lookup
from attnfuse.data import catalog
from attnfuse.data.datasets import load_mfeat, load_nutrimouse, load_womens_clothing, womens_clothing_schema
from attnfuse.data.preprocess import embed_text_inputs
from attnfuse.data.synthetic import make_synthetic_table, make_synthetic_views
from attnfuse.data.table import TableSchema, load_table

__all__ = ["DATASETS", "DatasetSpec", "Source", "describe_dataset", "get_dataset", "list_datasets", "load_dataset",
           "register_dataset", "text_arrays"]


@dataclass
class Source:
    """A table with its schema and precomputed arrays for vector / text inputs (NaN rows = absent)."""

    frame: pd.DataFrame
    schema: TableSchema
    arrays: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: ``load(**options) -> Source``, a one-line summary, the catalog entry of its files."""

    name: str
    load: Callable[..., Source]
    summary: str
    files: str | None = None
    synthetic: bool = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for an option the loader does not take (with a close match and the list)."""
        params = [p for p in inspect.signature(self.load).parameters.values() if p.kind == p.KEYWORD_ONLY]
        names = [p.name for p in params]
        # the user's own table is configured under data.table, every other data set under data.options
        where, word = ("data.table", "key") if self.name == "table" else (f"dataset {self.name!r}", "option")
        unknown = sorted(set(options) - set(names), key=str)
        if unknown:
            hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k in unknown
                              if (c := difflib.get_close_matches(str(k), names, n=1)))
            raise ValueError(f"{where} has no {word}(s) {unknown}{' (' + hints + ')' if hints else ''}; "
                             f"{word}s: {names or 'none'}")
        missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options]
        if missing:
            raise ValueError(f"{where} needs {word}(s) {missing}")


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, summary: str, files: str | None = None,
                     synthetic: bool = False) -> Callable[[Callable[..., Source]], Callable[..., Source]]:
    """Register a loader with keyword-only options. Raises ``ValueError`` on a duplicate name."""

    def decorator(fn: Callable[..., Source]) -> Callable[..., Source]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetSpec(name, fn, summary, files, synthetic)
        return fn

    return decorator


def get_dataset(name: str) -> DatasetSpec:
    """Look up a data set. Raises ``KeyError`` listing the registered names (with a close match)."""
    return lookup(DATASETS, name, "dataset", listing="datasets")


def list_datasets() -> list[str]:
    """Sorted names of the registered data sets."""
    return sorted(DATASETS)


def load_dataset(name: str, **options: Any) -> Source:
    """Load a registered data set with its options (checked against the loader's signature).

    Raises:
        KeyError: unknown name. ValueError: unknown or missing options.
        DatasetUnavailableError: the files cannot be fetched (offline, no cache).
    """
    spec = get_dataset(name)
    spec.check_options(options)
    return spec.load(**options)


def describe_dataset(name: str) -> str:
    """Summary, options with their defaults, and (for catalog data) files, origin, licence and cache state."""
    spec = get_dataset(name)
    params = [p for p in inspect.signature(spec.load).parameters.values() if p.kind == p.KEYWORD_ONLY]
    opts = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name for p in params)
    lines = [f"{name}: {spec.summary}{' (SYNTHETIC)' if spec.synthetic else ''}", f"  options:  {opts or 'none'}"
             f"  (attnfuse fit --data.dataset {name} --data.options.NAME VALUE)"]
    doc = inspect.getdoc(spec.load)
    if doc:
        lines.append("  " + doc.replace("\n", "\n  "))
    if spec.files:
        lines.append(catalog.describe_dataset(spec.files))
    return "\n".join(lines)


def text_arrays(frame: pd.DataFrame, schema: TableSchema) -> dict[str, np.ndarray] | None:
    """Frozen MiniLM embeddings of the schema's text inputs (disk-cached), or None without text inputs."""
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


@register_dataset("mfeat", files="mfeat", summary="UCI Multiple Features: 2,000 handwritten digits, 6 views, 10 classes")
def _mfeat(*, views: list[str] | None = None, pix_as_image: bool = False) -> Source:
    """views: subset of fac, fou, kar, mor, pix, zer (default all); pix_as_image: the pix view as a 16x15 image input."""
    data = load_mfeat(views=views)
    if pix_as_image and "pix" in data.views:
        return Source(data.to_frame(), data.schema(image_views={"pix": (1, 16, 15)}))
    return Source(data.to_frame(), data.schema())


@register_dataset("nutrimouse", files="nutrimouse", summary="40 mice: gene expression + hepatic fatty acids; diet or genotype")
def _nutrimouse(*, target: Literal["diet", "genotype"] = "diet") -> Source:
    """target: diet (5 classes) or genotype (2)."""
    data = load_nutrimouse(target=target)
    return Source(data.to_frame(), data.schema())


@register_dataset("womens_clothing", files="womens_clothing",
                  summary="23,486 clothing reviews: text + numeric + categorical; rating or recommendation")
def _womens_clothing(*, target: Literal["Rating", "Recommended IND"] = "Recommended IND", rows: int | None = None,
                     seed: int = 0, text: Literal["separate", "joined", "none"] = "separate") -> Source:
    """target: Rating (5) or Recommended IND (2); rows: a seeded subsample; text: separate, joined or none (text needs the text extra)."""
    frame = load_womens_clothing()
    if rows:  # a seeded subsample, for quicker runs
        frame = frame.sample(n=int(rows), random_state=int(seed)).reset_index(drop=True)
    schema = womens_clothing_schema(target=target, text=text)
    return Source(frame, schema, text_arrays(frame, schema))


@register_dataset("synthetic_views", synthetic=True, summary="SYNTHETIC 3-view XOR classification (no single view decides)")
def _synthetic_views(*, num_samples: int = 600, seed: int = 0) -> Source:
    """num_samples, seed: size and seed of the generator (attnfuse.data.make_synthetic_views)."""
    data = make_synthetic_views(num_samples, seed=seed)
    return Source(data.to_frame(), data.schema())


@register_dataset("synthetic", synthetic=True,
                  summary="SYNTHETIC numeric + categorical + vector table for every task type")
def _synthetic(*, task: Literal["classification", "regression", "multilabel", "survival", "retrieval"] = "classification",
               num_rows: int = 400, seed: int = 0, missing_rate: float = 0.1) -> Source:
    """task: classification, regression, multilabel, survival or retrieval (attnfuse.data.make_synthetic_table)."""
    frame, schema = make_synthetic_table(num_rows, seed=seed, task=task, missing_rate=missing_rate)
    return Source(frame, schema)


@register_dataset("table", summary="your own CSV / Parquet file described by a schema (data.table: {path, schema})")
def _table(*, path: str, schema: Mapping[str, Any] | TableSchema) -> Source:
    """path: .csv / .tsv / .parquet file; schema: {target | time + event, task, inputs} (docs/data.md)."""
    frame = load_table(path)
    schema = schema if isinstance(schema, TableSchema) else TableSchema.from_dict(schema)
    return Source(frame, schema, text_arrays(frame, schema))
