"""Deterministic, seeded train / validation / test splits, stratified for classification, saved as JSON.

The same ``(n, labels, fractions, seed)`` gives the same split on every machine and numpy version
(a :class:`numpy.random.Generator` over PCG64, whose stream numpy keeps stable). Store the split with
a run (:func:`save_split`) so that evaluation and prediction use exactly the rows the run used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Split", "load_split", "make_split", "save_split"]

_PARTS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Split(Mapping[str, np.ndarray]):
    """Row positions of each part, sorted ascending; also a read-only mapping ``{"train", "val", "test"}``.

    Attributes:
        train, val, test: int64 index arrays, disjoint, together covering ``range(num_rows)``.
        num_rows: number of rows split.
        seed: the seed used.
        fractions: ``(train, val, test)`` fractions requested.
        stratified: whether class proportions were kept per part.
        labels_sha256: fingerprint of the labels used for stratification (``""`` if none); lets
            :func:`load_split` notice that a saved split is applied to another table.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    num_rows: int
    seed: int
    fractions: tuple[float, float, float]
    stratified: bool
    labels_sha256: str = ""

    def __post_init__(self) -> None:
        parts = [np.asarray(p, dtype=np.int64) for p in (self.train, self.val, self.test)]
        for key, p in zip(("train", "val", "test"), parts):
            object.__setattr__(self, key, p)
        allidx = np.concatenate(parts)
        if len(allidx) != self.num_rows or not np.array_equal(np.sort(allidx), np.arange(self.num_rows)):
            raise ValueError(f"split parts must be disjoint and cover range({self.num_rows}) exactly")

    def __getitem__(self, part: str) -> np.ndarray:
        if part not in _PARTS:
            raise KeyError(f"split parts are {_PARTS}, got {part!r}")
        return getattr(self, part)

    def __iter__(self) -> Iterator[str]:
        return iter(_PARTS)

    def __len__(self) -> int:
        return len(_PARTS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows, "seed": self.seed, "fractions": list(self.fractions), "stratified": self.stratified,
            "labels_sha256": self.labels_sha256,
            "train": self.train.tolist(), "val": self.val.tolist(), "test": self.test.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Split:
        return cls(
            train=np.asarray(data["train"], np.int64), val=np.asarray(data["val"], np.int64), test=np.asarray(data["test"], np.int64),
            num_rows=int(data["num_rows"]), seed=int(data["seed"]), fractions=tuple(float(f) for f in data["fractions"]),
            stratified=bool(data["stratified"]), labels_sha256=str(data.get("labels_sha256", "")),
        )


def _fingerprint(labels: np.ndarray) -> str:
    keys = "\x1f".join(str(v) for v in labels.tolist())
    return hashlib.sha256(keys.encode()).hexdigest()


def _cut(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Sizes of (val, test) for ``n`` items, rounded; train takes the rest."""
    n_test = round(n * fractions[2])
    n_val = round(n * fractions[1])
    if n_val + n_test > n:
        n_val = max(n - n_test, 0)
    return n_val, n_test


def make_split(
    num_rows: int | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    stratify: Sequence[Any] | np.ndarray | None = None,
) -> Split:
    """Split ``num_rows`` rows into train / val / test (train takes the rest).

    With ``stratify=labels`` (as in scikit-learn) each class is shuffled and cut separately, so every
    part keeps the class proportions (per-class counts are rounded; a class too small for a part
    gives its rows to train first).

    Args:
        num_rows: number of rows (optional when ``stratify`` is given).
        val_fraction, test_fraction: fractions of rows, ``>= 0``, summing to less than 1.
        seed: the random seed.
        stratify: class labels, one per row, to stratify by; None for a plain shuffled split.

    Returns:
        a :class:`Split` with sorted index arrays (``split.train`` or ``split["train"]``).

    Raises:
        ValueError: bad fractions, ``num_rows`` and ``stratify`` disagreeing, nothing to split.
    """
    fr = (1.0 - float(val_fraction) - float(test_fraction), float(val_fraction), float(test_fraction))
    if min(fr[1:]) < 0 or fr[0] <= 1e-9:
        raise ValueError(f"val_fraction and test_fraction must be >= 0 and sum to less than 1, got {val_fraction}, {test_fraction}")
    lab = None if stratify is None else np.asarray(stratify)
    if lab is not None and lab.ndim != 1:
        raise ValueError(f"stratify must be 1-D labels (one per row), got shape {lab.shape}")
    if num_rows is None:
        if lab is None:
            raise ValueError("give num_rows or stratify=labels")
        num_rows = len(lab)
    if lab is not None and len(lab) != num_rows:
        raise ValueError(f"num_rows={num_rows} but len(stratify)={len(lab)}")
    if num_rows <= 0:
        raise ValueError(f"nothing to split: num_rows={num_rows}")
    rng = np.random.Generator(np.random.PCG64(seed))
    if lab is not None:
        keys = np.array([str(v) for v in lab.tolist()])
        groups = [np.flatnonzero(keys == k) for k in sorted(set(keys.tolist()))]
    else:
        groups = [np.arange(num_rows)]
    parts: list[list[np.ndarray]] = [[], [], []]
    for g in groups:
        g = rng.permutation(g)
        n_val, n_test = _cut(len(g), fr)
        parts[2].append(g[:n_test])
        parts[1].append(g[n_test:n_test + n_val])
        parts[0].append(g[n_test + n_val:])
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return Split(
        train=train, val=val, test=test, num_rows=num_rows, seed=seed, fractions=fr, stratified=lab is not None,
        labels_sha256=_fingerprint(lab) if lab is not None else "",
    )


def save_split(split: Split, path: str | os.PathLike) -> None:
    """Write ``split`` as JSON to ``path`` (parent folders are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(split.to_dict()))


def load_split(path: str | os.PathLike, *, num_rows: int | None = None, labels: Sequence[Any] | np.ndarray | None = None) -> Split:
    """Read a split written by :func:`save_split`; optionally check it fits a table.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``num_rows`` or ``labels`` do not match the saved split.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"split file not found: {p}")
    split = Split.from_dict(json.loads(p.read_text()))
    if num_rows is not None and num_rows != split.num_rows:
        raise ValueError(f"split {p} was made for {split.num_rows} rows, the table has {num_rows}")
    if labels is not None and split.labels_sha256:
        lab = np.asarray(labels)
        if len(lab) != split.num_rows or _fingerprint(lab) != split.labels_sha256:
            raise ValueError(f"split {p} was made for a table with other labels; make a new split for this table")
    return split
