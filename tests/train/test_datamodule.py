"""FusionDataModule: input subsets, text arrays, predict tables, saved runs."""

import json

import numpy as np
import pytest

from attnfuse.data import make_synthetic_table
from attnfuse.train import FusionDataModule, datamodule


@pytest.fixture
def text_table(tmp_path, monkeypatch):
    df, schema = make_synthetic_table(120, seed=1, with_text=True)
    path = tmp_path / "t.parquet"
    df.to_parquet(path)

    def fake_text_arrays(frame, schema):  # stands in for the MiniLM embedding (a labelled stub)
        rng = np.random.default_rng(0)
        out = rng.normal(size=(len(frame), 8)).astype(np.float32)
        out[frame["note"].isna().to_numpy()] = np.nan
        return {"note": out}

    monkeypatch.setattr(datamodule, "text_arrays", fake_text_arrays)
    monkeypatch.setattr("attnfuse.data.registry.text_arrays", fake_text_arrays)
    return {"path": str(path), "schema": schema.to_dict()}


def test_input_subset_drops_unselected_text_arrays(text_table):
    dm = FusionDataModule("table", table=text_table, inputs=["num", "vec"])
    assert dm.input_names == ["num", "vec"]
    assert set(dm.encoder_configs) == {"num", "vec"}
    full = FusionDataModule("table", table=text_table)
    assert full.encoder_configs["note"] == {"kind": "text", "embedding_dim": 8}


def test_unknown_input_subset_is_a_clear_error(text_table):
    with pytest.raises(ValueError, match="unknown input"):
        FusionDataModule("table", table=text_table, inputs=["num", "nope"]).setup()


def test_run_files_and_missing_at_test_time(text_table, tmp_path):
    dm = FusionDataModule("table", table=text_table, missing=["vec"], run_dir=str(tmp_path / "run"))
    dm.setup()
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sum(len(v) for k, v in split.items() if k in ("train", "val", "test")) == 120
    assert (tmp_path / "run" / "preprocessor.json").exists()
    test = dm.dataset("test")
    assert not any(test[i]["present"]["vec"] for i in range(len(test)))
    assert any(dm.dataset("val")[i]["present"]["vec"] for i in range(len(dm.dataset("val"))))
