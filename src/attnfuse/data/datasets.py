"""Loaders for the catalog data sets (files fetched and verified by :mod:`attnfuse.data.catalog`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from attnfuse.data.catalog import fetch
from attnfuse.data.table import InputSpec, TableSchema

__all__ = [
    "MFEAT_PIX_SHAPE",
    "MFEAT_VIEWS",
    "WOMENS_CLOTHING_CATEGORICAL",
    "WOMENS_CLOTHING_NUMERIC",
    "WOMENS_CLOTHING_TEXT",
    "MultiViewData",
    "load_mfeat",
    "load_nutrimouse",
    "load_womens_clothing",
    "womens_clothing_schema",
]

#: mfeat views and their widths, in the order :func:`load_mfeat` returns them.
MFEAT_VIEWS: dict[str, int] = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}

#: ``(C, H, W)`` of the mfeat ``pix`` view: 16 rows x 15 columns, one channel, stored row-major
#: (feature ``15 * i + j`` is row ``i`` from the top, column ``j`` from the left; grey levels 0..6).
MFEAT_PIX_SHAPE: tuple[int, int, int] = (1, 16, 15)

WOMENS_CLOTHING_TEXT = ("Title", "Review Text")
WOMENS_CLOTHING_NUMERIC = ("Age", "Positive Feedback Count")
WOMENS_CLOTHING_CATEGORICAL = ("Division Name", "Department Name", "Class Name")


@dataclass(frozen=True)
class MultiViewData:
    """Samples described by several feature views, with one class label per sample.

    Attributes:
        name: data set name.
        views: ``{view name: float32 array (N, F_view)}`` in a fixed order.
        labels: int64 ``(N,)``, values ``0..C-1``.
        class_names: names of the classes, indexed by label.
    """

    name: str
    views: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.labels)
        for view, arr in self.views.items():
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(f"view {view!r} must have shape (N={n}, F), got {arr.shape}")

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def view_dims(self) -> dict[str, int]:
        """``{view: number of features}``."""
        return {view: arr.shape[1] for view, arr in self.views.items()}

    def columns(self, view: str) -> list[str]:
        """The column names :meth:`to_frame` gives ``view``: ``"<view>_0" ... "<view>_{F-1}"``."""
        return [f"{view}_{j}" for j in range(self.views[view].shape[1])]

    def to_frame(self, label_column: str = "label") -> pd.DataFrame:
        """All views side by side as one table (columns ``<view>_<j>``) plus the label column."""
        parts = [pd.DataFrame(arr, columns=self.columns(view)) for view, arr in self.views.items()]
        frame = pd.concat(parts, axis=1)
        frame[label_column] = self.labels
        return frame

    def schema(
        self,
        views: Sequence[str] | None = None,
        *,
        label_column: str = "label",
        kind: str = "vector",
        image_views: Mapping[str, Sequence[int]] | None = None,
    ) -> TableSchema:
        """A :class:`TableSchema` for :meth:`to_frame`: one input per view.

        Args:
            views: the views to use as inputs (default all), in this order.
            label_column: the target column of :meth:`to_frame`.
            kind: the input kind of the views, ``"vector"`` or ``"numeric"``.
            image_views: views to declare as ``image`` inputs instead, ``{view: (C, H, W) or (H, W)}``;
                the view's features are the pixels in row-major order. For mfeat:
                ``image_views={"pix": MFEAT_PIX_SHAPE}`` (a 16x15 digit).

        Raises:
            ValueError: an unknown view, or an image view that is not among ``views``.
            SchemaError: an image shape whose size is not the view's width.

        Example:
            >>> data = load_mfeat()
            >>> data.schema(image_views={"pix": (1, 16, 15)})["pix"].kind
            'image'
        """
        chosen = list(self.views) if views is None else list(views)
        images = dict(image_views or {})
        unknown = [v for v in [*chosen, *images] if v not in self.views]
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; {self.name} has views {list(self.views)}")
        unused = [v for v in images if v not in chosen]
        if unused:
            raise ValueError(f"image_views {unused} are not among the chosen views {chosen}")
        inputs = [
            InputSpec(view, "image", self.columns(view), shape=tuple(images[view])) if view in images
            else InputSpec(view, kind, self.columns(view))
            for view in chosen
        ]
        return TableSchema(inputs=inputs, target=label_column, task="classification")


def _read_mfeat_view(path: os.PathLike, view: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    with open(path) as f:
        header = f.readline().strip().split(",")
    arr = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    if arr.shape != (2000, width + 1) or len(header) != width + 1:
        raise ValueError(f"{path}: expected 2000 rows x {width + 1} columns ({width} features + label), got {arr.shape}")
    labels = arr[:, -1]
    if not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{path}: the last column should hold integer labels 0-9")
    return arr[:, :-1].astype(np.float32), labels.astype(np.int64)


def load_mfeat(cache_dir: str | os.PathLike | None = None, *, views: Sequence[str] | None = None) -> MultiViewData:
    """UCI Multiple Features: 2,000 handwritten digits, 6 views, 10 classes (200 each).

    Views (in this order): ``fac`` 216, ``fou`` 76, ``kar`` 64, ``mor`` 6, ``pix`` 240 (a digit
    16 pixels high and 15 wide, row-major: :data:`MFEAT_PIX_SHAPE`; use it as an image input with
    ``data.schema(image_views={"pix": MFEAT_PIX_SHAPE})``), ``zer`` 47. Rows are sorted by class (0..9), so always split with a
    shuffled (e.g. stratified) split. Values are the raw features (not standardised).

    Args:
        cache_dir: cache root (see :func:`attnfuse.data.catalog.fetch`).
        views: subset of views to load (default all).

    Returns:
        :class:`MultiViewData` with float32 views and int64 labels ``0..9``.

    Raises:
        DatasetUnavailableError: the files cannot be fetched (message says how to place them by hand).
        ValueError: unknown view name, or a file with an unexpected layout.
    """
    chosen = list(MFEAT_VIEWS) if views is None else list(views)
    unknown = [v for v in chosen if v not in MFEAT_VIEWS]
    if unknown:
        raise ValueError(f"unknown mfeat view(s) {unknown}; views are {list(MFEAT_VIEWS)}")
    paths = fetch("mfeat", cache_dir)
    data: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    for view in chosen:
        x, y = _read_mfeat_view(paths[f"mfeat-{view}.csv"], view, MFEAT_VIEWS[view])
        if labels is not None and not np.array_equal(labels, y):
            raise ValueError(f"mfeat view {view!r} has labels that disagree with the other views")
        labels = y
        data[view] = x
    assert labels is not None
    return MultiViewData("mfeat", data, labels, tuple(str(c) for c in range(10)))


def load_nutrimouse(cache_dir: str | os.PathLike | None = None, *, target: str = "diet") -> MultiViewData:
    """Nutrimouse: 40 mice, views ``gene`` (120) and ``lipid`` (21); target ``"diet"`` (5) or ``"genotype"`` (2).

    Labels index the sorted class names (diet: coc, fish, lin, ref, sun; genotype: ppar, wt).

    Raises:
        DatasetUnavailableError: the files cannot be fetched.
        ValueError: unknown ``target``.
    """
    if target not in ("diet", "genotype"):
        raise ValueError(f"target must be 'diet' or 'genotype', got {target!r}")
    paths = fetch("nutrimouse", cache_dir)
    views = {v: pd.read_csv(paths[f"{v}.csv"]).to_numpy(dtype=np.float32) for v in ("gene", "lipid")}
    raw = pd.read_csv(paths[f"{target}.csv"])[target].astype(str).to_numpy()
    classes, labels = np.unique(raw, return_inverse=True)
    return MultiViewData("nutrimouse", views, labels.astype(np.int64), tuple(classes.tolist()))


def load_womens_clothing(cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Women's Clothing E-Commerce Reviews: 23,486 rows x 10 columns, as stored (no cleaning).

    Columns: ``Clothing ID`` (int64, 1,206 values), ``Age`` (int64), ``Title`` (str, 3,810 missing),
    ``Review Text`` (str, 845 missing), ``Rating`` (int64 1-5), ``Recommended IND`` (int64 0/1),
    ``Positive Feedback Count`` (int64), ``Division Name`` / ``Department Name`` / ``Class Name``
    (str, 14 missing each, 3 / 6 / 20 values). Read with pyarrow (brotli-compressed parquet).

    Raises:
        DatasetUnavailableError: the file cannot be fetched.
        ImportError: pyarrow is not installed.
    """
    paths = fetch("womens_clothing", cache_dir)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("reading womens_clothing needs pyarrow: `pip install pyarrow` (or `pip install attnfuse[train]`)") from None
    return pd.read_parquet(paths["WomensClothingE-CommerceReviews.parquet.brotli"], engine="pyarrow")


def womens_clothing_schema(target: str = "Rating", *, text: str = "separate") -> TableSchema:
    """A ready schema for :func:`load_womens_clothing`.

    Inputs: ``numeric`` (Age, Positive Feedback Count), ``categorical`` (Division/Department/Class
    Name) and text: ``text="separate"`` gives inputs ``title`` and ``review``; ``"joined"`` gives one
    input ``text`` over both columns; ``"none"`` leaves text out.

    Args:
        target: ``"Rating"`` (5 classes) or ``"Recommended IND"`` (2 classes); both classification.
        text: ``"separate"``, ``"joined"`` or ``"none"``.
    """
    if target not in ("Rating", "Recommended IND"):
        raise ValueError(f"target must be 'Rating' or 'Recommended IND', got {target!r}")
    inputs = [
        InputSpec("numeric", "numeric", list(WOMENS_CLOTHING_NUMERIC)),
        InputSpec("categorical", "categorical", list(WOMENS_CLOTHING_CATEGORICAL)),
    ]
    if text == "separate":
        inputs += [InputSpec("title", "text", ["Title"]), InputSpec("review", "text", ["Review Text"])]
    elif text == "joined":
        inputs.append(InputSpec("text", "text", list(WOMENS_CLOTHING_TEXT)))
    elif text != "none":
        raise ValueError(f"text must be 'separate', 'joined' or 'none', got {text!r}")
    return TableSchema(inputs=inputs, target=target, task="classification")
