"""SYNTHETIC data generators for tests and examples. Results on them are not results on real data.

Every generator is seeded and designed so that fusion matters: the label depends on an interaction
of two inputs (an XOR of their signals) that neither input decides alone. Frames carry
``df.attrs["synthetic"] = True`` and names start with ``synthetic`` so that reports can label them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from attnfuse.data.datasets import MultiViewData
from attnfuse.data.table import InputSpec, TableSchema

__all__ = ["make_synthetic_table", "make_synthetic_views"]


def make_synthetic_table(
    num_rows: int = 400,
    *,
    seed: int = 0,
    task: str = "classification",
    missing_rate: float = 0.1,
    with_text: bool = False,
) -> tuple[pd.DataFrame, TableSchema]:
    """A SYNTHETIC table with numeric, categorical, vector (and optionally text) inputs.

    Columns: ``num_0..num_3`` (input ``num``), ``cat_color``, ``cat_size`` (input ``cat``), ``vec_0..vec_7``
    (input ``vec``), optionally ``note`` (input ``note``, text) and the target ``y``.

    Classification: ``y = [num_0 + num_1 > 0] XOR [vec_0 - vec_1 > 0]`` (2 classes): ``num`` or ``vec``
    alone is at chance, both together decide ``y``; ``cat_size`` agrees with ``y`` in about 75% of
    rows; ``cat_color`` is noise; ``note`` states the vector signal in words. Regression:
    ``y = num_0 * vec_0 + 0.5 * num_1 + noise``. Multilabel: targets ``y_xor`` (the XOR above),
    ``y_num`` (``num_0 + num_1 > 0``), ``y_vec`` (``vec_0 - vec_1 > 0``). Survival: exponential
    event times with log-hazard ``num_0 + num_1 + vec_0 - vec_1``, independent exponential
    censoring (about half the rows censored): columns ``time`` and ``event``. Retrieval: identity
    ``y = 2 [num_0 + num_1 > 0] + [vec_0 - vec_1 > 0]`` (4 identities). Each input is missing (all
    its cells null) in a ``missing_rate`` fraction of rows, independently per input.

    Returns:
        ``(df, schema)``.
    """
    tasks = ("classification", "regression", "multilabel", "survival", "retrieval")
    if task not in tasks:
        raise ValueError(f"task must be one of {tasks}, got {task!r}")
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate}")
    rng = np.random.Generator(np.random.PCG64(seed))
    num = rng.standard_normal((num_rows, 4))
    vec = rng.standard_normal((num_rows, 8))
    s_num = num[:, 0] + num[:, 1] > 0
    s_vec = vec[:, 0] - vec[:, 1] > 0
    targets: dict[str, np.ndarray] = {}
    if task in ("classification", "multilabel"):
        y = (s_num ^ s_vec).astype(np.int64)
        size_agrees = rng.random(num_rows) < 0.75
        size = np.where(size_agrees == (y == 1), "large", "small")
        targets = {"y": y} if task == "classification" else {
            "y_xor": y, "y_num": s_num.astype(np.int64), "y_vec": s_vec.astype(np.int64)}
    elif task == "regression":
        targets = {"y": num[:, 0] * vec[:, 0] + 0.5 * num[:, 1] + 0.1 * rng.standard_normal(num_rows)}
        size = rng.choice(["small", "large"], num_rows)
    elif task == "survival":
        log_hazard = num[:, 0] + num[:, 1] + vec[:, 0] - vec[:, 1]
        event_time = rng.exponential(1.0 / np.exp(log_hazard))
        censor_time = rng.exponential(2.0 * float(np.median(event_time)), num_rows)
        targets = {"time": np.minimum(event_time, censor_time), "event": (event_time <= censor_time).astype(np.int64)}
        size = rng.choice(["small", "large"], num_rows)
    else:
        targets = {"y": (2 * s_num + s_vec).astype(np.int64)}
        size = rng.choice(["small", "large"], num_rows)
    color = rng.choice(["red", "green", "blue", "black"], num_rows)
    df = pd.DataFrame(num, columns=[f"num_{j}" for j in range(4)])
    df["cat_color"] = pd.Series(color, dtype=object)
    df["cat_size"] = pd.Series(size, dtype=object)
    for j in range(8):
        df[f"vec_{j}"] = vec[:, j]
    inputs = [
        InputSpec("num", "numeric", [f"num_{j}" for j in range(4)]),
        InputSpec("cat", "categorical", ["cat_color", "cat_size"]),
        InputSpec("vec", "vector", [f"vec_{j}" for j in range(8)]),
    ]
    if with_text:
        df["note"] = pd.Series([f"row {i}: the trace looks {'bright' if s else 'dark'}" for i, s in enumerate(s_vec)], dtype=object)
        inputs.append(InputSpec("note", "text", ["note"]))
    for spec in inputs:
        drop = rng.random(num_rows) < missing_rate
        df.loc[drop, list(spec.columns)] = None if spec.kind in ("categorical", "text") else np.nan
    for col, values in targets.items():
        df[col] = values
    df.attrs["synthetic"] = True
    if task == "survival":
        return df, TableSchema(inputs=inputs, task=task, time="time", event="event")
    target = list(targets) if task == "multilabel" else "y"
    return df, TableSchema(inputs=inputs, target=target, task=task)


def make_synthetic_views(
    num_samples: int = 512, *, dims: Sequence[int] = (8, 8, 4), seed: int = 0, noise: float = 0.1
) -> MultiViewData:
    """SYNTHETIC multi-view classification: ``label = [view0 signal > 0] XOR [view1 signal > 0]``.

    Views ``view0``, ``view1`` each carry one random linear signal (plus ``noise``); further views
    are pure noise. No single view is better than chance; views 0 and 1 together decide the label.
    """
    if len(dims) < 2:
        raise ValueError(f"need at least 2 views, got dims={tuple(dims)}")
    rng = np.random.Generator(np.random.PCG64(seed))
    views: dict[str, np.ndarray] = {}
    signals = []
    for v, d in enumerate(dims):
        x = rng.standard_normal((num_samples, d))
        if v < 2:
            w = rng.standard_normal(d)
            signals.append(x @ w / np.linalg.norm(w) + noise * rng.standard_normal(num_samples) > 0)
        views[f"view{v}"] = x.astype(np.float32)
    labels = (signals[0] ^ signals[1]).astype(np.int64)
    return MultiViewData("synthetic-xor", views, labels, ("same", "different"))
