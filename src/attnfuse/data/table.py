"""Describe a table's inputs as named column groups, validate a table against it, load CSV / Parquet.

A *schema* says which columns of a table form which input, what kind of input each is, and what
the target is::

    schema = TableSchema(
        inputs=[
            InputSpec("vitals", "numeric", ["age", "bmi", "sbp"]),
            InputSpec("site", "categorical", ["hospital", "ward"]),
            InputSpec("notes", "text", ["note"]),
            InputSpec("scan", "vector", [f"emb_{i}" for i in range(64)]),
            InputSpec("digit", "image", [f"pix_{i}" for i in range(240)], shape=(1, 16, 15)),
        ],
        target="outcome",
        task="classification",
    )
    validate(df, schema)  # raises SchemaError listing every problem at once

Missing values never turn into silent zeros. With ``nan_policy="missing"`` (the default):

========================  ==========================================================================
kind                      a row's input is *absent* (mask all False for that sample) when
========================  ==========================================================================
numeric, vector, image    any of its cells is NaN / null
categorical               all of its cells are null (a single null cell gets the reserved code 0)
text                      all of its cells are null or blank (present cells are joined by newlines)
========================  ==========================================================================

``nan_policy="zero"`` keeps the input present and fills nulls (0.0, code 0, empty text);
``nan_policy="error"`` makes :func:`validate` reject any null in the group.

In numeric, vector and image inputs a value that is not a finite float32 (``inf``, ``-inf``, or
beyond ``±3.4e38`` such as ``1e39``) counts as missing, exactly like NaN: the model computes in
float32, where such a value is ``inf`` and turns every weight into NaN within one step.

An ``image`` input reads its pixels from its columns in row-major order: with ``shape=(C, H, W)``
column ``c*H*W + i*W + j`` is channel ``c``, row ``i`` (top to bottom), column ``j`` (left to
right); ``shape=(H, W)`` means one channel and is stored as ``(1, H, W)``. Its values may instead
come from ``arrays=`` as ``(N, C, H, W)`` (or ``(N, H, W)`` for one channel).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnfuse.data.targets import TASKS, check_target, target_columns

__all__ = ["ARRAY_KINDS", "FLOAT32_MAX", "KINDS", "NAN_POLICIES", "TASKS", "InputSpec", "SchemaError", "TableSchema",
           "load_table", "numeric_block", "validate"]

KINDS = ("numeric", "categorical", "text", "vector", "image")
#: kinds whose values may come from precomputed ``arrays=`` instead of columns.
ARRAY_KINDS = ("vector", "text", "image")
NAN_POLICIES = ("missing", "error", "zero")
#: The largest float32. A numeric input value beyond it (or non-finite) is missing, like NaN.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class SchemaError(ValueError):
    """A table does not match its schema, or a schema is malformed; the message lists every problem."""


@dataclass(frozen=True)
class InputSpec:
    """One named input: a group of columns of one kind.

    Args:
        name: input name (the key of this input's tokens in the model).
        kind: ``"numeric"``, ``"categorical"``, ``"text"``, ``"vector"`` or ``"image"``.
        columns: the table columns of this input. A ``vector``, ``text`` or ``image`` input whose
            values come from precomputed arrays (``arrays=`` of :func:`validate`) may list none.
        nan_policy: ``"missing"``, ``"error"`` or ``"zero"`` (see the module docstring).
        shape: ``image`` only (required there): ``(C, H, W)`` or ``(H, W)`` (= ``(1, H, W)``);
            stored as ``(C, H, W)``. With columns, ``C * H * W`` must equal their number; pixels
            are read from the columns in row-major order (see the module docstring).

    Raises:
        SchemaError: bad name, kind, policy, columns or shape.

    Example:
        >>> InputSpec("digit", "image", [f"pix_{i}" for i in range(240)], shape=(16, 15)).shape
        (1, 16, 15)
    """

    name: str
    kind: str
    columns: tuple[str, ...] = field(default=())
    nan_policy: str = "missing"
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"InputSpec name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"input {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise SchemaError(f"input {self.name!r}: nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        cols = self.columns
        if isinstance(cols, str) or not isinstance(cols, Iterable):
            raise SchemaError(f"input {self.name!r}: columns must be a list of column names, got {cols!r}")
        cols = tuple(cols)
        bad = [c for c in cols if not isinstance(c, str)]
        if bad:
            raise SchemaError(f"input {self.name!r}: column names must be strings, got {bad}")
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise SchemaError(f"input {self.name!r}: column(s) listed twice: {dup}")
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "shape", self._check_shape())

    def _check_shape(self) -> tuple[int, int, int] | None:
        where = f"input {self.name!r} ({self.kind})"
        if self.kind != "image":
            if self.shape is not None:
                raise SchemaError(f"{where}: shape is only for image inputs; remove shape={self.shape!r}")
            return None
        shape = self.shape
        if shape is None:
            raise SchemaError(f"{where}: an image input needs shape=(C, H, W) or (H, W), e.g. shape=(1, 16, 15)")
        if isinstance(shape, str) or not isinstance(shape, Iterable):
            raise SchemaError(f"{where}: shape must be (C, H, W) or (H, W), got {shape!r}")
        shape = tuple(shape)
        if len(shape) not in (2, 3) or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s > 0 for s in shape):
            raise SchemaError(f"{where}: shape must be (C, H, W) or (H, W) of positive integers, got {shape!r}")
        chw = tuple(int(s) for s in ((1, *shape) if len(shape) == 2 else shape))
        size = math.prod(chw)
        if self.columns and size != len(self.columns):
            raise SchemaError(
                f"{where}: shape {shape} holds {size} pixels but {len(self.columns)} columns are listed; "
                "C * H * W must equal the number of columns (pixels are read from them in row-major order)"
            )
        return chw

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "columns": list(self.columns), "nan_policy": self.nan_policy}
        if self.shape is not None:
            out["shape"] = list(self.shape)
        return out


@dataclass(frozen=True)
class TableSchema:
    """Inputs, target and task of a table.

    Args:
        inputs: the inputs (distinct names).
        target: the target column; a list of columns for ``multilabel`` (0/1 columns) and
            multi-output ``regression``; unused (None) for ``survival``.
        task: ``"classification"``, ``"regression"``, ``"multilabel"``, ``"survival"`` or
            ``"retrieval"`` (see :mod:`attnfuse.data.targets`).
        time, event: ``survival`` only: the observed-time column and the event column (1 = event
            observed, 0 = censored).

    Raises:
        SchemaError: no inputs, duplicate input names, unknown task, a target that does not fit the task.
    """

    inputs: tuple[InputSpec, ...]
    target: str | tuple[str, ...] | None = None
    task: str = "classification"
    time: str | None = None
    event: str | None = None

    def __post_init__(self) -> None:
        inputs = tuple(self.inputs)
        if not inputs:
            raise SchemaError("TableSchema needs at least one input")
        bad = [type(i).__name__ for i in inputs if not isinstance(i, InputSpec)]
        if bad:
            raise SchemaError(f"TableSchema inputs must be InputSpec objects, got {bad}")
        names = [i.name for i in inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SchemaError(f"duplicate input name(s) {dup}; every input needs its own name")
        if self.task not in TASKS:
            raise SchemaError(f"task must be one of {TASKS}, got {self.task!r}")
        target = self.target
        if isinstance(target, list | tuple):
            target = tuple(target)
            if not target or not all(isinstance(t, str) and t for t in target) or len(set(target)) != len(target):
                raise SchemaError(f"target must be a column name or a list of distinct column names, got {self.target!r}")
            if len(target) == 1:
                target = target[0]
        if self.task == "survival":
            if not (isinstance(self.time, str) and self.time and isinstance(self.event, str) and self.event):
                raise SchemaError(f"task 'survival' needs time and event columns (e.g. time: months, event: died), got "
                                  f"time={self.time!r}, event={self.event!r}")
            if target is not None:
                raise SchemaError("task 'survival' takes its target from time and event; remove target")
        else:
            if self.time is not None or self.event is not None:
                raise SchemaError(f"time / event are for task 'survival', not {self.task!r}")
            if not (isinstance(target, str) and target) and not isinstance(target, tuple):
                raise SchemaError(f"target must be a column name (non-empty string), got {self.target!r}")
            if self.task in ("classification", "retrieval") and not isinstance(target, str):
                raise SchemaError(f"task {self.task!r} needs one target column of labels, got {list(target)}")
            if self.task == "multilabel" and not isinstance(target, tuple):
                raise SchemaError(f"task 'multilabel' needs a list of 0/1 target columns, got {target!r}")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "target", target)

    @property
    def target_columns(self) -> list[str]:
        """The columns the target uses (``target`` columns, or ``time`` and ``event`` for survival)."""
        return target_columns(self)

    @property
    def names(self) -> list[str]:
        """Input names in declaration order."""
        return [i.name for i in self.inputs]

    def __getitem__(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"no input {name!r}; inputs: {self.names}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for YAML / JSON), inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {"target": list(self.target) if isinstance(self.target, tuple) else self.target, "task": self.task}
        if self.task == "survival":
            out = {"task": self.task, "time": self.time, "event": self.event}
        return {**out, "inputs": [i.to_dict() for i in self.inputs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableSchema:
        """Build from ``{"target", "task", "inputs"}`` (survival: ``time`` and ``event`` instead of
        ``target``); ``inputs`` is a list of dicts or ``{name: {kind, columns, ...}}``.

        Raises:
            SchemaError: missing or unknown keys.
        """
        if not isinstance(data, Mapping):
            raise SchemaError(f"schema must be a mapping with keys target, task, inputs; got {type(data).__name__}")
        keys = {"target", "task", "inputs", "time", "event"}
        unknown = sorted(set(data) - keys)
        if unknown:
            close = {k: difflib.get_close_matches(k, sorted(keys), n=1) for k in unknown}
            hint = "; ".join(f"{k!r} (did you mean {c[0]!r}?)" for k, c in close.items() if c)
            raise SchemaError(f"schema has unknown key(s) {unknown}{'; ' + hint if hint else ''}; keys are {sorted(keys)}")
        if "inputs" not in data or ("target" not in data and data.get("task") != "survival"):
            raise SchemaError(f"schema needs inputs and target (survival: time and event); got {sorted(data)}")
        raw = data["inputs"]
        items = [{"name": k, **dict(v)} for k, v in raw.items()] if isinstance(raw, Mapping) else [dict(v) for v in raw]
        inputs = []
        input_keys = ["name", "kind", "columns", "nan_policy", "shape"]
        for item in items:
            extra = sorted(set(item) - set(input_keys), key=str)
            if extra or "kind" not in item:
                close = {k: difflib.get_close_matches(str(k), input_keys, n=1) for k in extra}
                hint = "".join(f"; {k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
                raise SchemaError(f"input {item.get('name')!r}: keys are name, kind, columns, nan_policy, shape (image); "
                                  f"got {sorted(item, key=str)}{hint}")
            inputs.append(InputSpec(**item))
        return cls(inputs=tuple(inputs), target=data.get("target"), task=data.get("task", "classification"),
                   time=data.get("time"), event=data.get("event"))


def _unknown_column(col: str, available: Sequence[str], what: str = "unknown column") -> str:
    close = difflib.get_close_matches(col, [str(a) for a in available], n=3)
    hint = f" (did you mean {close}?)" if close else ""
    return f"{what} {col!r}{hint}; available columns: {[str(a) for a in available]}"


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"{len(idx)} row(s) (positions {shown}{', ...' if len(idx) > limit else ''})"


def numeric_block(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """float64 ``(N, F)`` values of numeric ``columns``: NaN where a cell is null, NaN, ``±inf`` or beyond
    float32's range (``|x| > FLOAT32_MAX``), i.e. wherever it is not a finite float32 (= missing)."""
    block = frame[list(columns)].to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(np.abs(block) <= FLOAT32_MAX, block, np.nan)


def _is_numeric(dtype: Any) -> bool:
    """Booleans, integers and real floats (numpy or pandas nullable); not complex, timedelta, text."""
    return bool(pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_float_dtype(dtype))


def _is_text(s: pd.Series) -> bool:
    if isinstance(s.dtype, pd.CategoricalDtype):
        return bool(all(isinstance(c, str) for c in s.dtype.categories))
    if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
        return True
    if pd.api.types.is_object_dtype(s.dtype):
        vals = s.dropna()
        return bool(vals.map(lambda v: isinstance(v, str)).all())
    return False


def _check_input(df: pd.DataFrame, spec: InputSpec, array: Any, problems: list[str]) -> None:
    where = f"input {spec.name!r} ({spec.kind})"
    if not spec.columns and array is None:
        problems.append(f"{where}: empty column group; list its columns, or pass its values in arrays= ({'/'.join(ARRAY_KINDS)} only)")
        return
    if array is not None and spec.kind not in ARRAY_KINDS:
        problems.append(f"{where}: arrays= is only for {', '.join(ARRAY_KINDS)} inputs")
    if array is not None and len(array) != len(df):
        problems.append(f"{where}: arrays[{spec.name!r}] has {len(array)} rows but the table has {len(df)}")
    if array is not None and spec.kind == "image" and spec.shape is not None:
        try:
            got = tuple(np.shape(array))
        except ValueError:  # ragged nested lists
            got = ("ragged",)
        ok = (spec.shape, spec.shape[1:]) if spec.shape[0] == 1 else (spec.shape,)
        if got[1:] not in ok:
            want = " or ".join(f"(N, {', '.join(map(str, s))})" for s in ok)
            problems.append(f"{where}: arrays[{spec.name!r}] has shape {got}, expected {want}")
    if not len(df):  # an empty column has no values to judge its dtype by (pandas reads it as object)
        return
    wrong_dtype = False
    for col in spec.columns:
        s = df[col]
        if spec.kind in ("numeric", "vector", "image") and not _is_numeric(s.dtype):
            wrong_dtype = True
            problems.append(
                f"{where}: column {col!r} has dtype {s.dtype}, expected a numeric dtype "
                "(convert with pd.to_numeric, or declare the input as categorical/text)"
            )
        if spec.kind == "text" and not _is_text(s):
            problems.append(f"{where}: column {col!r} has dtype {s.dtype}, expected strings")
    if spec.nan_policy == "error" and spec.columns:
        block = df[list(spec.columns)]
        null = block.isna().to_numpy().any(axis=1)
        if spec.kind == "text":
            null |= block.apply(lambda c: c.map(lambda v: isinstance(v, str) and not v.strip())).to_numpy().any(axis=1)
        elif spec.kind != "categorical" and not wrong_dtype:
            null |= np.isnan(numeric_block(df, spec.columns)).any(axis=1)
        if null.any():
            problems.append(f"{where}: nan_policy='error' but {_rows(null)} have missing values (null, NaN, inf or beyond "
                            f"float32) in {list(spec.columns)}")


def validate(
    df: pd.DataFrame,
    schema: TableSchema,
    *,
    arrays: Mapping[str, Any] | None = None,
    require_target: bool = True,
    allow_missing_inputs: bool = False,
) -> set[str]:
    """Check that ``df`` matches ``schema``; raise one :class:`SchemaError` listing every problem.

    Checks: column names are unique; the table has rows; every column exists (unknown ones are
    listed with the available columns and close matches); numeric/vector/image columns are
    numeric (bool, int or float); text columns hold strings; the target exists, has no nulls and
    (regression) is numeric and finite in float32; a target column is not also an input; groups
    are not empty; ``nan_policy="error"`` groups have no nulls (numeric: no NaN, inf or value
    beyond float32); ``arrays`` belong to vector/text inputs and have one row per table row
    (image arrays: the input's shape).

    Args:
        df: the table.
        schema: its schema.
        arrays: precomputed values ``{input name: array (N, F) or list of N arrays (L_i, F) / None}``;
            for an image input an array ``(N, C, H, W)`` (or ``(N, H, W)`` with one channel).
        require_target: check the target column (False when predicting on a table without it).
        allow_missing_inputs: an input none of whose columns is in the table is absent for every
            row (e.g. predicting without that input) instead of an error.

    Returns:
        Names of the inputs absent from the table (empty unless ``allow_missing_inputs``).

    Raises:
        TypeError: ``df`` is not a DataFrame or ``schema`` not a TableSchema.
        SchemaError: the table does not match (duplicate column names: raised alone, naming them).
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if not isinstance(schema, TableSchema):
        raise TypeError(f"schema must be a TableSchema, got {type(schema).__name__}")
    arrays = dict(arrays or {})
    problems: list[str] = []
    available = list(df.columns)
    duplicated = _duplicates(available)
    if duplicated:  # df[name] would be a DataFrame, not a column: nothing below is well defined
        raise SchemaError(f"the table has duplicate column name(s) {duplicated}; every column needs its own name "
                          "(rename or drop the copies)")
    if len(df) == 0:
        problems.append("the table has no rows")
    unknown_arrays = sorted(set(arrays) - set(schema.names))
    if unknown_arrays:
        problems.append(f"arrays given for unknown input(s) {unknown_arrays}; inputs: {schema.names}")
    if require_target:
        missing_target = [c for c in schema.target_columns if c not in df.columns]
        if missing_target:
            problems += [_unknown_column(c, available, "target column is missing:") for c in missing_target]
        else:
            check_target(df, schema, problems)
    absent: set[str] = set()
    for spec in schema.inputs:
        for col in sorted(set(schema.target_columns) & set(spec.columns)):
            problems.append(f"input {spec.name!r} uses the target column {col!r} as a feature")
        missing = [c for c in spec.columns if c not in df.columns]
        if missing and allow_missing_inputs and len(missing) == len(spec.columns) and spec.name not in arrays:
            absent.add(spec.name)
            continue
        if missing:
            problems += [f"input {spec.name!r}: " + _unknown_column(c, available) for c in missing]
            continue
        _check_input(df, spec, arrays.get(spec.name), problems)
    if problems:
        raise SchemaError("the table does not match the schema:\n  - " + "\n  - ".join(problems))
    return absent


def _duplicates(names: Sequence[Any]) -> list[Any]:
    seen: set[Any] = set()
    dup: list[Any] = []
    for n in names:
        if n in seen and n not in dup:
            dup.append(n)
        seen.add(n)
    return dup


def _read_delimited(p: Path, sep: str) -> pd.DataFrame:
    """Read a CSV / TSV, rejecting duplicate header names (pandas would rename the copies ``age.1``)."""
    try:  # the header row as written: header=None keeps duplicates and "NA"-like names as they are
        header = pd.read_csv(p, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()
    except pd.errors.EmptyDataError:
        raise SchemaError(f"table file {p} is empty ({p.stat().st_size} bytes): expected a header row of column names, "
                          "then one row per sample") from None
    duplicated = _duplicates([h for h in header if h != ""])
    if duplicated:
        raise SchemaError(f"table file {p} has duplicate column name(s) {duplicated} in its header; every column "
                          "needs its own name (pandas would silently rename the copies 'name.1')")
    return pd.read_csv(p, sep=sep)


def _read_parquet(p: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    duplicated = _duplicates(pq.read_schema(p).names)
    if duplicated:
        raise SchemaError(f"table file {p} has duplicate column name(s) {duplicated}; every column needs its own name")
    return pd.read_parquet(p)


def load_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``.csv`` (also ``.csv.gz``, ``.tsv``) or ``.parquet`` (also ``.pq``, ``.parquet.<codec>``) table.

    Raises:
        FileNotFoundError: no such file.
        SchemaError: an empty file, a header without data rows, or duplicate column names (each names the file).
        ValueError: unsupported suffix, or a file the reader cannot parse (names the file and the reader's reason).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table file not found: {p} (working directory {Path.cwd()})")
    name = p.name.lower()
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz")):
        read = functools.partial(_read_delimited, p, ",")
    elif name.endswith((".tsv", ".tsv.gz")):
        read = functools.partial(_read_delimited, p, "\t")
    elif name.endswith((".parquet", ".pq")) or ".parquet." in name:
        read = functools.partial(_read_parquet, p)
    else:
        raise ValueError(f"unsupported table format {p.name!r}: use .csv, .tsv or .parquet (optionally compressed)")
    if p.stat().st_size == 0:
        raise SchemaError(f"table file {p} is empty (0 bytes): expected a header row of column names, then one row per sample")
    try:
        frame = read()
    except SchemaError:
        raise
    except (ValueError, OSError) as err:  # pandas ParserError, pyarrow ArrowInvalid, bad compression or encoding ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot read table file {p}: {first}") from None
    if len(frame) == 0:
        raise SchemaError(f"table file {p} has no data rows (a header of {len(frame.columns)} column(s) only)")
    return frame
