"""Collation: padding, presence masks, missing inputs; TableDataset over a SYNTHETIC table; DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from attnfuse.data import TableDataset, TablePreprocessor, collate_fn, make_split, make_synthetic_table, make_synthetic_views, pad_sequences


def test_pad_sequences():
    seqs = [torch.ones(3, 2), torch.full((1, 2), 2.0), torch.zeros(0, 2)]
    x, mask = pad_sequences(seqs)
    assert x.shape == (3, 3, 2)
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert (x[1, 0] == 2).all() and (x[1, 1:] == 0).all()
    x, mask = pad_sequences(seqs, present=[True, False, True])
    assert mask[1].tolist() == [False, False, False] and (x[1] == 0).all()
    x, mask = pad_sequences([torch.zeros(0, 4)])
    assert x.shape == (1, 1, 4) and not mask.any()
    with pytest.raises(ValueError, match="one width"):
        pad_sequences([torch.ones(2, 3), torch.ones(2, 4)])


def test_collate_fixed_variable_and_missing():
    records = [
        {"inputs": {"num": torch.tensor([1.0, 2.0]), "seq": torch.ones(2, 3), "cat": torch.tensor([1, 2])},
         "present": {"num": True, "seq": True, "cat": True}, "target": torch.tensor(1), "index": 5},
        {"inputs": {"num": torch.tensor([float("nan"), 7.0]), "seq": None, "cat": torch.tensor([3, 0])},
         "present": {"num": False, "seq": False, "cat": True}, "target": torch.tensor(0), "index": 9},
        {"inputs": {"num": None, "seq": torch.ones(4, 3), "cat": torch.tensor([2, 2])}, "target": torch.tensor(1), "index": 2},
    ]
    batch = collate_fn(records)
    num, seq, cat = (batch["inputs"][k] for k in ("num", "seq", "cat"))
    assert num["x"].shape == (3, 2) and num["mask"].tolist() == [True, False, False]
    assert torch.isfinite(num["x"]).all() and (num["x"][1:] == 0).all()  # absent rows are zeros, never NaN
    assert seq["x"].shape == (3, 4, 3) and seq["mask"].sum(1).tolist() == [2, 0, 4]
    assert cat["x"].dtype == torch.int64 and cat["mask"].all()
    assert batch["target"].tolist() == [1, 0, 1] and batch["index"].tolist() == [5, 9, 2]


def test_collate_errors():
    with pytest.raises(ValueError, match="None in every record"):
        collate_fn([{"inputs": {"a": None}}, {"inputs": {"a": None}}])
    with pytest.raises(ValueError, match="must have the inputs"):
        collate_fn([{"inputs": {"a": torch.ones(2)}}, {"inputs": {"b": torch.ones(2)}}])
    with pytest.raises(ValueError, match="share one shape"):
        collate_fn([{"inputs": {"a": torch.ones(2)}}, {"inputs": {"a": torch.ones(3)}}])


def test_table_dataset_end_to_end():
    df, schema = make_synthetic_table(200, seed=1, missing_rate=0.2)
    assert df.attrs["synthetic"]
    split = make_split(stratify=df["y"].to_numpy(), seed=0)
    pre = TablePreprocessor.fit(df, schema, rows=split.train)
    enc = pre.transform(df)
    train = TableDataset(enc, split.train)
    assert len(train) == len(split.train)
    loader = DataLoader(train, batch_size=32, shuffle=False, collate_fn=collate_fn)
    batch = next(iter(loader))
    for name, spec in ((s.name, s) for s in schema.inputs):
        x, mask = batch["inputs"][name]["x"], batch["inputs"][name]["mask"]
        assert x.shape[0] == 32 and mask.shape == (32,)
        rows = batch["index"].numpy()
        expected = enc.present[name][rows]
        assert mask.numpy().tolist() == expected.tolist()
        if spec.kind == "numeric":
            null = df.loc[rows, list(spec.columns)].isna().any(axis=1).to_numpy()
            assert (~mask.numpy() == null).all()
    assert batch["target"].dtype == torch.int64
    assert sum((~batch["inputs"][n]["mask"]).sum().item() for n in schema.names) > 0  # some inputs missing


def test_table_dataset_from_frame_and_bad_indices():
    df, schema = make_synthetic_table(50, seed=0, task="regression")
    ds = TableDataset.from_frame(df, schema, indices=np.arange(10))
    assert ds.preprocessor is not None and len(ds) == 10
    assert ds[0]["target"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"row positions in \[0, 50\)"):
        TableDataset(ds.encoded, [0, 50])


def test_synthetic_generators_are_labelled_and_need_both_inputs():
    df, _ = make_synthetic_table(2000, seed=0, missing_rate=0.0)
    s_num = (df["num_0"] + df["num_1"] > 0).to_numpy()
    s_vec = (df["vec_0"] - df["vec_1"] > 0).to_numpy()
    y = df["y"].to_numpy()
    assert ((s_num ^ s_vec) == y).all()
    assert abs((s_num == y).mean() - 0.5) < 0.05 and abs((s_vec == y).mean() - 0.5) < 0.05  # each alone ~ chance
    views = make_synthetic_views(256, seed=0)
    assert views.name.startswith("synthetic") and views.view_dims == {"view0": 8, "view1": 8, "view2": 4}
