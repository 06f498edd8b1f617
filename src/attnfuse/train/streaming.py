"""Prediction on tables larger than memory: read in chunks, write batch by batch, rename into place at the end.

``attnfuse predict --data.predict_path big.parquet --data.predict_chunk_rows 50000 --output preds.parquet``
reads Parquet record batches (``pyarrow.parquet.ParquetFile.iter_batches``, row group by row group) or CSV
chunks (``pandas.read_csv(chunksize=)``), preprocesses each chunk with the run's saved preprocessing,
and yields its rows (:class:`StreamingTableDataset`); :class:`StreamingPredictionWriter` appends each
batch's predictions to a temporary file beside the output (CSV rows / Parquet row groups) and renames it
onto the output when the pass ends, so memory is bounded by one chunk plus one batch whatever the
table's size, and a reader never sees a partial file. Single process: the rows are predicted in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import IterableDataset

from attnfuse.data import TablePreprocessor, text_arrays
from attnfuse.data.collate import TableDataset
from attnfuse.train.checkpoints import atomic_path
from attnfuse.train.datamodule import drop_inputs

__all__ = ["StreamingPredictionWriter", "StreamingTableDataset", "iter_table_chunks"]


def _no_duplicates(path: Path, names: list[str]) -> None:
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"table file {path} has duplicate column name(s) {duplicated}; every column needs its own name")


def iter_table_chunks(path: str | Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of a CSV / TSV / Parquet table, ``chunk_rows`` at a time (the last chunk may be shorter).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``chunk_rows < 1``, an unsupported suffix, or duplicate column names.
    """
    if chunk_rows < 1:
        raise ValueError(f"data.predict_chunk_rows must be >= 1, got {chunk_rows}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table file not found: {p} (working directory {Path.cwd()})")
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")) or ".parquet." in name:
        import pyarrow.parquet as pq

        with pq.ParquetFile(p) as source:
            _no_duplicates(p, source.schema_arrow.names)
            for batch in source.iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
        return
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".tsv", ".tsv.gz")):
        sep = "\t" if name.endswith((".tsv", ".tsv.gz")) else ","
        header = pd.read_csv(p, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
        _no_duplicates(p, [h for h in header if h != ""])  # pandas would rename copies 'name.1'
        with pd.read_csv(p, sep=sep, chunksize=chunk_rows) as reader:
            yield from reader
        return
    raise ValueError(f"unsupported table format {p.name!r}: use .csv, .tsv or .parquet (optionally compressed)")


class StreamingTableDataset(IterableDataset):
    """Rows of a table file, read and preprocessed one chunk at a time (records as :class:`TableDataset` gives).

    Args:
        path: the CSV / TSV / Parquet table.
        preprocessor: the run's fitted preprocessing (never re-fitted).
        chunk_rows: rows per chunk read.
        missing: inputs to mark missing in every row.

    ``index`` of each record is its row position in the file.
    """

    def __init__(self, path: str | Path, preprocessor: TablePreprocessor, chunk_rows: int,
                 missing: Sequence[str] = ()) -> None:
        super().__init__()
        self.path, self.preprocessor, self.chunk_rows, self.missing = Path(path), preprocessor, chunk_rows, list(missing)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("streaming prediction reads the table in order: use data.num_workers 0 or 1")
        offset = 0
        for frame in iter_table_chunks(self.path, self.chunk_rows):
            frame = frame.reset_index(drop=True)
            arrays = text_arrays(frame, self.preprocessor.schema)
            encoded = self.preprocessor.transform(frame, arrays=arrays, require_target=False, allow_missing_inputs=True)
            if self.missing:
                encoded = drop_inputs(encoded, self.missing)
            rows = TableDataset(encoded)
            for i in range(len(rows)):
                record = rows[i]
                record["index"] = offset + record["index"]
                yield record
            offset += len(frame)


class StreamingPredictionWriter(BasePredictionWriter):
    """Append each batch's predictions to a temporary file; rename it onto ``path`` when the pass ends.

    Columns as :class:`attnfuse.train.lightning_cli.PredictionWriter`. CSV: rows appended; Parquet: one row
    group per batch (``pyarrow.parquet.ParquetWriter``, the first batch's schema). On an error the temporary
    file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: str | Path, *, attention: bool = False, overwrite: bool = False) -> None:
        from attnfuse.train.lightning_cli import check_output

        super().__init__(write_interval="batch")
        self.path, self.attention, self.overwrite = Path(path), attention, overwrite
        check_output(self.path, overwrite=overwrite)
        self._stack: contextlib.ExitStack | None = None
        self._tmp: Path | None = None
        self._parquet = None
        self.rows = 0

    def _open(self) -> None:
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        from attnfuse.train.lightning_cli import predictions_frame

        if trainer.world_size > 1:
            raise ValueError("streaming prediction (data.predict_chunk_rows) runs in one process: use --trainer.devices 1")
        if self._stack is None:
            self._open()
        frame = predictions_frame([prediction])
        if self.path.suffix == ".csv":
            frame.to_csv(self._tmp, mode="a", header=self.rows == 0, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self._tmp, table.schema)
            self._parquet.write_table(table.cast(self._parquet.schema))
        self.rows += len(frame)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        from attnfuse.train.lightning_cli import check_output

        if self._stack is None:  # no rows: an empty table of the output kind is still written
            self._open()
            if self.path.suffix == ".csv":
                pd.DataFrame({"row": []}).to_csv(self._tmp, index=False)
            else:
                pd.DataFrame({"row": []}).to_parquet(self._tmp, index=False)
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        check_output(self.path, overwrite=self.overwrite)  # again: the file may have appeared while predicting
        stack, self._stack = self._stack, None
        stack.close()  # renames the temporary file onto the output
        print(f"attnfuse predict: wrote {self.rows} rows to {self.path} (streamed)")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(type(exception), exception, exception.__traceback__)  # removes the temporary file
