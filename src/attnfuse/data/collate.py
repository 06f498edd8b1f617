"""Per-sample records of many inputs -> padded, masked batches.

A *record* (one sample, what :class:`TableDataset` yields)::

    {"inputs": {"vitals": tensor (F,), "notes": tensor (L, E) or None, "digit": tensor (C, H, W), ...},
     "present": {"vitals": True, "notes": False, ...},   # optional; default: value is not None
     "target": tensor (),                                 # optional
     "index": int}                                        # optional: row position in the table

A *batch* (what :func:`collate_fn` returns) holds only plain tensors in nested dicts, so
Lightning and ``DataLoader`` move it between devices as is::

    {"inputs": {name: {"x": (B, F) or (B, L, E) or (B, C, H, W), "mask": (B,) or (B, L) bool}},
     "target": (B,), "index": (B,)}

For a fixed-size input ``(F,)`` or an image ``(C, H, W)``, ``mask`` is the per-sample presence
``(B,)``; for a variable-length one ``(L, F)``, ``mask (B, L)`` is True for real (non-padding)
tokens of present samples (the shape of ``x`` without its last axis, the TokenSet convention).
A missing input has zeros in ``x`` and an all-False mask for that sample.
:func:`attnfuse.encoders.encode_inputs` turns ``batch["inputs"]`` into ``{name: TokenSet}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from attnfuse.data.preprocess import EncodedTable, TablePreprocessor
from attnfuse.data.table import TableSchema

__all__ = ["TableDataset", "collate_fn", "pad_sequences"]


def pad_sequences(seqs: Sequence[Tensor], present: Sequence[bool] | Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pad variable-length sequences ``(L_i, F)`` to ``(B, L_max, F)`` with zeros; return ``(x, mask)``.

    ``mask (B, L_max)`` is True for real tokens of present samples. ``L_max`` is at least 1, so a
    batch in which no sample has the input still has one (masked) token position.

    Shapes:
        seqs: B tensors ``(L_i, F)``; returns ``x (B, L_max, F)``, ``mask (B, L_max)``.
    """
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    width = {s.shape[-1] for s in seqs}
    if len(width) != 1 or any(s.dim() != 2 for s in seqs):
        raise ValueError(f"sequences must be 2-D (L_i, F) with one width F, got shapes {[tuple(s.shape) for s in seqs]}")
    lengths = torch.tensor([s.shape[0] for s in seqs])
    if present is not None:
        lengths = torch.where(torch.as_tensor(present, dtype=torch.bool), lengths, 0)
    big = max(int(lengths.max()), 1)
    x = seqs[0].new_zeros((len(seqs), big, width.pop()))
    for i, (s, n) in enumerate(zip(seqs, lengths.tolist())):
        x[i, :n] = s[:n]
    mask = torch.arange(big)[None, :] < lengths[:, None]  # (B, L_max)
    return x, mask


def _stack_input(name: str, values: list[Tensor | None], present: list[bool]) -> dict[str, Tensor]:
    example = next((v for v in values if v is not None), None)
    if example is None:
        raise ValueError(
            f"input {name!r} is None in every record of the batch; yield zeros of its usual shape with present=False instead"
        )
    if example.dim() == 2:  # variable length (L_i, F)
        seqs = [v if v is not None else example.new_zeros((0, example.shape[1])) for v in values]
        x, mask = pad_sequences(seqs, present)
        return {"x": x, "mask": mask}
    if example.dim() not in (1, 3):
        raise ValueError(f"input {name!r}: per-sample values must be (F,), (L, F) or an image (C, H, W), got {tuple(example.shape)}")
    rows = [v if v is not None else torch.zeros_like(example) for v in values]
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"input {name!r}: fixed-size values must share one shape across the batch, got {sorted(shapes)}")
    pres = torch.tensor(present, dtype=torch.bool)
    x = torch.stack(rows)  # (B, F) or (B, C, H, W)
    x = torch.where(pres.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros_like(x))
    return {"x": x, "mask": pres}


def collate_fn(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate records (see the module docstring) into a batch with padding and masks.

    Raises:
        ValueError: records with different input names, inconsistent shapes, or an input that is
            None in every record.
    """
    if not records:
        raise ValueError("collate_fn got an empty list of records")
    names = list(records[0]["inputs"])
    inputs: dict[str, dict[str, Tensor]] = {}
    for r in records:
        if list(r["inputs"]) != names:
            raise ValueError(f"every record must have the inputs {names}, got {list(r['inputs'])}")
    for name in names:
        values = [r["inputs"][name] for r in records]
        present = [bool(r.get("present", {}).get(name, v is not None)) and v is not None for r, v in zip(records, values)]
        inputs[name] = _stack_input(name, values, present)
    batch: dict[str, Any] = {"inputs": inputs}
    if all("target" in r for r in records):
        batch["target"] = torch.stack([torch.as_tensor(r["target"]) for r in records])
    if all("index" in r for r in records):
        batch["index"] = torch.tensor([int(r["index"]) for r in records], dtype=torch.long)
    return batch


class TableDataset(Dataset):
    """Rows of an :class:`EncodedTable` as records for :func:`collate_fn`.

    Args:
        encoded: the transformed table (:meth:`TablePreprocessor.transform`).
        indices: the row positions this dataset covers (e.g. one split); default all rows.

    Example:
        >>> pre = TablePreprocessor.fit(df, schema, rows=split.train)
        >>> enc = pre.transform(df)
        >>> train = TableDataset(enc, split.train)
        >>> loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate_fn)
    """

    def __init__(self, encoded: EncodedTable, indices: Sequence[int] | np.ndarray | None = None) -> None:
        self.encoded = encoded
        self.preprocessor: TablePreprocessor | None = None
        idx = np.arange(encoded.num_rows) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= encoded.num_rows)):
            raise ValueError(f"indices must be 1-D row positions in [0, {encoded.num_rows}), got shape {idx.shape}")
        self.indices = idx
        self._tensors = {
            name: (v if isinstance(v, list) else torch.from_numpy(np.ascontiguousarray(v))) for name, v in encoded.values.items()
        }
        self._target = None if encoded.target is None else torch.from_numpy(encoded.target)

    @classmethod
    def from_frame(
        cls,
        df: pd.DataFrame,
        schema: TableSchema,
        preprocessor: TablePreprocessor | None = None,
        *,
        arrays: Mapping[str, Any] | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        require_target: bool = True,
        allow_missing_inputs: bool = False,
    ) -> TableDataset:
        """Validate, (fit on ``indices`` if no ``preprocessor``,) transform and wrap ``df``."""
        pre = preprocessor or TablePreprocessor.fit(df, schema, arrays=arrays, rows=indices)
        enc = pre.transform(df, arrays=arrays, require_target=require_target, allow_missing_inputs=allow_missing_inputs)
        ds = cls(enc, indices)
        ds.preprocessor = pre
        return ds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        inputs: dict[str, Tensor] = {}
        for name, v in self._tensors.items():
            inputs[name] = torch.from_numpy(v[row]) if isinstance(v, list) else v[row]
        record: dict[str, Any] = {
            "inputs": inputs,
            "present": {name: bool(p[row]) for name, p in self.encoded.present.items()},
            "index": row,
        }
        if self._target is not None:
            record["target"] = self._target[row]
        return record
