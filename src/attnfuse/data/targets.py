"""Targets of a table by task kind: which columns they use, how they are checked and encoded.

========================  =======================================  ==========================================
schema ``task``           target columns                           encoded target (per row)
========================  =======================================  ==========================================
``classification``        ``target``: one column of labels          int64 class index (position in ``classes``)
``retrieval``             ``target``: one column of identities      int64 class index (same item = same class)
``regression``            ``target``: one or more numeric columns   float32 ``()`` or ``(T,)``
``multilabel``            ``target``: two or more 0/1 columns       float32 ``(T,)`` in {0, 1}
``survival``              ``time`` and ``event`` columns            float32 ``(2,)``: (time, event in {0, 1})
========================  =======================================  ==========================================

Classes are the sorted distinct labels of every row (a rare class missing from the training
split keeps its index); predictions report these original label values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CLASS_TASKS", "TASKS", "check_target", "encode_target", "fit_classes", "label_key", "label_sort_key", "target_columns"]

TASKS = ("classification", "regression", "multilabel", "survival", "retrieval")
#: tasks whose target is one column of labels
CLASS_TASKS = ("classification", "retrieval")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def label_key(value: Any) -> str:
    """Canonical string of a label, so ``3``, ``3.0`` and ``np.int64(3)`` are one class."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def target_columns(schema: Any) -> list[str]:
    """The table columns a schema's target uses (``target`` columns, or ``time`` and ``event``)."""
    if schema.task == "survival":
        return [c for c in (schema.time, schema.event) if c]
    target = schema.target
    if target is None:
        return []
    return [target] if isinstance(target, str) else list(target)


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"{len(idx)} row(s) (positions {shown}{', ...' if len(idx) > limit else ''})"


def check_target(df: pd.DataFrame, schema: Any, problems: list[str]) -> None:
    """Append every problem of ``df``'s target columns under ``schema`` to ``problems``."""
    cols = target_columns(schema)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        problems.append(f"target column(s) missing from the table: {missing}; columns: {[str(c) for c in df.columns]}")
        return
    for col in cols:
        y = df[col]
        if y.isna().any():
            problems.append(f"target {col!r} has missing values in {_rows(y.isna().to_numpy())}; drop those rows first")
        numeric = pd.api.types.is_numeric_dtype(y.dtype) or pd.api.types.is_bool_dtype(y.dtype)
        if schema.task in ("regression", "multilabel", "survival") and not numeric:
            problems.append(f"target column {col!r} has dtype {y.dtype}; task {schema.task!r} needs numeric values")
            continue
        values = y.dropna().to_numpy(dtype=np.float64) if numeric else None
        if values is not None and not np.isfinite(values).all():
            inf = np.isinf(y.to_numpy(dtype=np.float64, na_value=np.nan))
            problems.append(f"target column {col!r} has non-finite values (inf) in {_rows(inf)}; drop or fix those rows")
        elif values is not None and schema.task not in CLASS_TASKS and (np.abs(values) > _FLOAT32_MAX).any():
            big = np.abs(y.to_numpy(dtype=np.float64, na_value=0.0)) > _FLOAT32_MAX
            problems.append(f"target column {col!r} has values beyond float32's range (|x| > {_FLOAT32_MAX:.4g}, they would "
                            f"train as inf) in {_rows(big)}; rescale the column")
        elif schema.task == "multilabel" and values is not None and not np.isin(values, (0.0, 1.0)).all():
            problems.append(f"multilabel target column {col!r} must hold 0/1 (or booleans), got values {sorted(set(values))[:5]}")
        elif schema.task == "survival" and col == schema.event and values is not None and not np.isin(values, (0.0, 1.0)).all():
            problems.append(f"event column {col!r} must hold 0/1 (1 = event observed), got values {sorted(set(values))[:5]}")
        elif schema.task == "survival" and col == schema.time and values is not None and (values < 0).any():
            problems.append(f"time column {col!r} has negative times in {_rows(y.to_numpy(dtype=np.float64, na_value=np.nan) < 0)}")


def fit_classes(df: pd.DataFrame, schema: Any) -> list[Any] | None:
    """Sorted distinct labels of a classification / retrieval target (plain Python values), else None."""
    if schema.task not in CLASS_TASKS:
        return None
    keys: dict[str, Any] = {}
    for v in df[schema.target].unique():
        keys.setdefault(label_key(v), v.item() if isinstance(v, np.generic) else v)
    return [keys[k] for k in sorted(keys, key=label_sort_key)]


def label_sort_key(key: str) -> tuple[int, float, str]:
    """Numeric keys sort numerically before the others, which sort alphabetically."""
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


def encode_target(df: pd.DataFrame, schema: Any, classes: Sequence[Any] | None) -> np.ndarray:
    """Encode ``df``'s target (see the module table).

    Raises:
        ValueError: a label not in ``classes`` (names the unseen labels and the known ones).
    """
    if schema.task in CLASS_TASKS:
        if classes is None:
            raise ValueError(f"task {schema.task!r} needs the fitted classes")
        index = {label_key(c): i for i, c in enumerate(classes)}
        keys = [label_key(v) for v in df[schema.target].tolist()]
        unseen = sorted({k for k in keys if k not in index})
        if unseen:
            raise ValueError(f"target {schema.target!r} has class(es) {unseen} not seen when fitting; known classes: {list(classes)}")
        return np.array([index[k] for k in keys], dtype=np.int64)
    cols = target_columns(schema)
    block = df[cols].to_numpy(dtype=np.float32)
    if schema.task == "regression" and isinstance(schema.target, str):
        return block[:, 0]
    return block
