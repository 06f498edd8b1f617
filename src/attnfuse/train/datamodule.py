"""Lightning data module over a catalog data set or a user table, with seeded splits saved with the run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from attnfuse.data import (
    EncodedTable,
    Source,
    Split,
    TableDataset,
    TablePreprocessor,
    collate_fn,
    get_dataset,
    load_dataset,
    load_table,
    make_split,
    save_split,
    text_arrays,
)

__all__ = ["EpochShuffleSampler", "FusionDataModule", "drop_inputs"]


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a permutation seeded by ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch, so the order of epoch ``e`` is the same
    whether training ran straight through or resumed from a checkpoint.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())


def drop_inputs(encoded: EncodedTable, names: list[str] | tuple[str, ...]) -> EncodedTable:
    """A copy of ``encoded`` where the inputs ``names`` are missing (absent) for every row.

    Raises:
        KeyError: a name that is not an input (listing the inputs).
    """
    unknown = [n for n in names if n not in encoded.present]
    if unknown:
        raise KeyError(f"cannot drop unknown input(s) {unknown}; inputs are {sorted(encoded.present)}")
    present = {k: (np.zeros_like(v) if k in names else v) for k, v in encoded.present.items()}
    return dataclasses.replace(encoded, present=present)


def _min_rows(val_fraction: float, test_fraction: float) -> int:
    """The fewest rows for which every part with a positive fraction gets at least one row."""
    for n in range(1, 1_000_001):
        val, test = round(n * val_fraction), round(n * test_fraction)
        if n - val - test >= 1 and (val >= 1 or val_fraction <= 0) and (test >= 1 or test_fraction <= 0):
            return n
    return 1_000_001


def _check_split_sizes(split: Split, strata: np.ndarray | None, *, val_fraction: float, test_fraction: float) -> None:
    """Raise when the split leaves train empty, or val / test empty although its fraction is positive.

    Raises:
        ValueError: naming the rows, fractions, split sizes and the fewest rows that would do.
    """
    sizes = {part: len(split[part]) for part in ("train", "val", "test")}
    fractions = {"val": val_fraction, "test": test_fraction}
    empty = [p for p in ("train", "val", "test") if sizes[p] == 0 and fractions.get(p, 1.0) > 0]
    if not empty:
        return
    need = f"at least {_min_rows(val_fraction, test_fraction)} rows"
    if strata is not None:
        counts = {str(k): int(c) for k, c in zip(*np.unique(np.asarray(strata).astype(str), return_counts=True))}
        largest = max(counts, key=counts.get)
        need += (f" in one class (the split is stratified, each class is cut separately: {len(counts)} class(es), the "
                 f"largest, {largest!r}, has {counts[largest]} row(s))")
    raise ValueError(
        f"the table has {split.num_rows} rows, too few for the split: val_fraction={val_fraction} and "
        f"test_fraction={test_fraction} give train {sizes['train']}, val {sizes['val']}, test {sizes['test']} rows "
        f"(empty: {', '.join(empty)}). These fractions need {need}; use a larger table or "
        "change data.val_fraction / data.test_fraction"
    )


class FusionDataModule(pl.LightningDataModule):
    """Multi-input table data for :class:`attnfuse.train.FusionTask`.

    Args:
        dataset: a registered data set (``attnfuse list``): ``mfeat`` (UCI Multiple Features, 6 views),
            ``nutrimouse``, ``womens_clothing`` (reviews: text + tabular), ``synthetic`` /
            ``synthetic_views`` (labelled synthetic), or ``table`` (your CSV/Parquet file, described by
            ``table``).
        options: the data set's own options, e.g. ``{"target": "genotype"}`` for nutrimouse or
            ``{"task": "survival"}`` for synthetic (``attnfuse describe NAME`` lists them; checked).
        table: for ``dataset="table"``: ``{"path": ..., "schema": {"target" | "time" + "event", "task",
            "inputs"}}`` (see docs/data.md).
        inputs: restrict to these inputs (views / column groups); default all.
        batch_size: batch size of every loader.
        seed: split seed (stratified by label for classification / retrieval, by event for survival).
        val_fraction, test_fraction: split sizes.
        standardize: per-feature standardisation fitted on the train rows.
        missing: inputs marked missing in the test / predict data, e.g. ``["fou"]``.
        predict_path: a new CSV/Parquet table to predict (same columns; the target and whole inputs
            may be absent); default the test split.
        preprocessor: a run's saved ``preprocessor.json`` to use instead of fitting one (the CLI sets it
            from the checkpoint's run folder for validate / test / predict), so predictions do not
            depend on the training table still being there or unchanged.
        run_dir: where to save ``split.json`` and ``preprocessor.json`` for the run.
        num_workers: DataLoader workers.
        predict_chunk_rows: stream ``predict_path`` in chunks of this many rows (Parquet record batches / CSV
            chunks, preprocessed chunk by chunk): memory bounded by one chunk whatever the table's size; the CLI
            then writes ``--output`` batch by batch (:mod:`attnfuse.train.streaming`). Default: read it whole.

    In Python, :meth:`from_source` wraps a DataFrame and its schema directly.
    """

    def __init__(
        self,
        dataset: str = "mfeat",
        *,
        options: dict[str, Any] | None = None,
        table: dict[str, Any] | None = None,
        inputs: list[str] | None = None,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        standardize: bool = True,
        missing: list[str] | None = None,
        predict_path: str | None = None,
        preprocessor: str | None = None,
        run_dir: str | None = None,
        num_workers: int = 0,
        predict_chunk_rows: int | None = None,
    ) -> None:
        super().__init__()
        get_dataset(dataset)  # unknown names fail here, listing the registered ones
        if table is not None and dataset != "table":
            raise ValueError(f"data.table describes your own file (dataset: table); for dataset {dataset!r} use data.options")
        if options and dataset == "table":
            raise ValueError(f"dataset 'table' takes its settings from data.table: {{path, schema}}, not data.options "
                             f"(got data.options {sorted(options)})")
        self.save_hyperparameters()
        self.source: Source | None = None
        self._given_source: Source | None = None
        self.encoded: EncodedTable | None = None
        self.preprocessor: TablePreprocessor | None = None
        self.split = None
        self.predict_frame = None

    @classmethod
    def from_source(cls, source: Source, **kwargs: Any) -> FusionDataModule:
        """A data module over an in-memory table (``Source(frame, schema, arrays)``); other arguments as the constructor."""
        dm = cls("table", **kwargs)
        dm._given_source = source
        return dm

    def _ensure_preprocessor(self) -> None:
        """The preprocessing: loaded from ``preprocessor`` when given (never re-fitted), else fitted."""
        if self.preprocessor is not None:
            return
        if self.hparams.preprocessor:
            path = Path(self.hparams.preprocessor)
            if not path.is_file():
                raise FileNotFoundError(f"data.preprocessor: no such file {str(path)!r} (a run's preprocessor.json)")
            self.preprocessor = TablePreprocessor.load(path)
            return
        self._load()

    def _source(self) -> Source:
        hp = self.hparams
        if self._given_source is not None:
            return self._given_source
        if hp.dataset == "table":
            if not hp.table:
                raise ValueError("dataset 'table' needs data.table: {path: FILE.csv|.parquet, schema: {target, task, inputs}}")
            return load_dataset("table", **dict(hp.table))
        return load_dataset(hp.dataset, **dict(hp.options or {}))

    def _load(self) -> None:
        if self.encoded is not None:
            return
        hp = self.hparams
        source = self._source()
        schema = source.schema
        if hp.inputs:
            names = {s.name for s in schema.inputs}
            unknown = sorted(set(hp.inputs) - names)
            if unknown:
                raise ValueError(f"data.inputs names unknown input(s) {unknown}; {hp.dataset} has {sorted(names)}")
            schema = dataclasses.replace(schema, inputs=tuple(s for s in schema.inputs if s.name in hp.inputs))
            arrays = {k: v for k, v in (source.arrays or {}).items() if k in hp.inputs} or None
            source = Source(source.frame, schema, arrays)
        frame = source.frame
        missing_cols = [c for c in schema.target_columns if c not in frame.columns]
        if missing_cols:
            raise ValueError(f"target column(s) {missing_cols} are not in the table; columns: {list(frame.columns)}")
        strata = None
        if schema.task in ("classification", "retrieval"):
            strata = frame[schema.target].to_numpy()
        elif schema.task == "survival":
            strata = frame[schema.event].to_numpy()
        self.split = make_split(len(frame), val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=hp.seed,
                                stratify=strata)
        _check_split_sizes(self.split, strata, val_fraction=hp.val_fraction, test_fraction=hp.test_fraction)
        if self.preprocessor is None and hp.preprocessor:
            self._ensure_preprocessor()
        if self.preprocessor is None:
            self.preprocessor = TablePreprocessor.fit(frame, schema, arrays=source.arrays, rows=self.split["train"],
                                                      standardize=hp.standardize)
        self.encoded = self.preprocessor.transform(frame, arrays=source.arrays)
        self.source = source
        if hp.run_dir:
            self.save_run(hp.run_dir)

    def save_run(self, run_dir: str | Path) -> None:
        """Write ``split.json`` and ``preprocessor.json`` (everything needed to redo the inputs) to ``run_dir``."""
        self._load()
        out = Path(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_split(self.split, out / "split.json")
        self.preprocessor.save(out / "preprocessor.json")

    # properties linked into the model by the CLI
    @property
    def encoder_configs(self) -> dict[str, dict[str, Any]]:
        self._ensure_preprocessor()
        return self.preprocessor.encoder_configs()

    @property
    def task(self) -> str:
        """The schema's task kind (``classification``, ``regression``, ``multilabel``, ``survival``, ``retrieval``)."""
        self._ensure_preprocessor()
        return self.preprocessor.schema.task

    @property
    def input_names(self) -> list[str]:
        self._ensure_preprocessor()
        return [s.name for s in self.preprocessor.schema.inputs]

    @property
    def target_info(self) -> dict[str, Any]:
        """What the task needs to know about the target (:class:`attnfuse.train.tasks.TargetInfo` as a dict)."""
        self._ensure_preprocessor()
        pre = self.preprocessor
        schema = pre.schema
        info: dict[str, Any] = {"kind": schema.task, "classes": pre.classes, "target_names": list(schema.target_columns)}
        if schema.task == "survival":
            info["target_names"] = []
        if schema.task == "regression":
            info["target_scale"] = self.target_scale
        counts = pre.stats.get("__counts__")
        if counts is None and self.encoded is not None:
            y = np.asarray(self.encoded.target)[self.split["train"]]
            if schema.task in ("classification", "retrieval"):
                counts = ([int(c) for c in np.bincount(y, minlength=len(pre.classes))], [float(len(y))])
            elif schema.task == "multilabel":
                counts = ([int(c) for c in y.sum(axis=0)], [float(len(y))])
            if counts is not None:
                pre.stats["__counts__"] = counts
        if counts is not None:
            info["class_counts"], info["num_train"] = counts[0], int(counts[1][0])
        return info

    @property
    def target_scale(self) -> tuple[list[float], list[float]] | None:
        """Regression: per-target ``(means, stds)`` over the train rows (the model learns the scaled target)."""
        self._ensure_preprocessor()
        if self.task != "regression":
            return None
        stats = self.preprocessor.stats.get("__target__")
        if stats is not None:  # a preprocessor saved by a run carries its target scale
            return [float(v) for v in stats[0]], [float(v) for v in stats[1]]
        self._load()
        y = np.asarray(self.encoded.target, dtype=np.float64)[self.split["train"]]
        y = y.reshape(len(y), -1)
        means, stds = [], []
        for col in y.T:
            col = col[np.isfinite(col)]
            mean, std = (float(col.mean()), float(col.std())) if len(col) else (0.0, 1.0)
            means.append(mean)
            stds.append(std if std > 1e-12 else 1.0)
        self.preprocessor.stats["__target__"] = (means, stds)
        return means, stds

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and (self.hparams.predict_path or self.predict_frame is not None):
            self._ensure_preprocessor()  # a new table: the training table is not needed
        else:
            self._load()

    def dataset(self, part: str, *, missing: list[str] | tuple[str, ...] | None = None) -> TableDataset:
        """The ``"train"``, ``"val"`` or ``"test"`` rows, optionally with inputs marked missing."""
        self._load()
        if part not in ("train", "val", "test"):
            raise ValueError(f"part must be 'train', 'val' or 'test', got {part!r}")
        drop = missing if missing is not None else (self.hparams.missing if part == "test" else None)
        encoded = drop_inputs(self.encoded, list(drop)) if drop else self.encoded
        return TableDataset(encoded, self.split[part])

    def predict_dataset(self) -> TableDataset:
        """Rows of ``predict_frame`` / ``predict_path`` (or the test split), preprocessed as the training rows were."""
        self._ensure_preprocessor()
        path = self.hparams.predict_path
        if self.predict_frame is None and not path:
            return self.dataset("test")
        frame = self.predict_frame if self.predict_frame is not None else load_table(path)
        arrays = text_arrays(frame, self.preprocessor.schema)
        encoded = self.preprocessor.transform(frame, arrays=arrays, require_target=False, allow_missing_inputs=True)
        if self.hparams.missing:
            encoded = drop_inputs(encoded, list(self.hparams.missing))
        return TableDataset(encoded)

    def loader(self, ds: TableDataset, *, shuffle: bool = False) -> DataLoader:
        sampler = EpochShuffleSampler(len(ds), self.hparams.seed) if shuffle else None
        return DataLoader(ds, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate_fn,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_chunk_rows and self.hparams.predict_path and self.predict_frame is None:
            from attnfuse.train.streaming import StreamingTableDataset

            self._ensure_preprocessor()
            rows = StreamingTableDataset(self.hparams.predict_path, self.preprocessor, self.hparams.predict_chunk_rows,
                                         self.hparams.missing or ())
            return DataLoader(rows, batch_size=self.hparams.batch_size, collate_fn=collate_fn,
                              num_workers=min(self.hparams.num_workers, 1))
        return self.loader(self.predict_dataset())

    def describe(self) -> str:
        self._load()
        sizes = {k: len(v) for k, v in self.split.items()}
        return json.dumps({"dataset": self.hparams.dataset, "inputs": self.input_names, "split": sizes})
