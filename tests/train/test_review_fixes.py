"""Predict from the saved preprocessing, pooling choice, attention shares, regression scale, CLI errors."""

import pandas as pd
import pytest
import torch

from attnfuse.cli import main
from attnfuse.data import make_synthetic_table
from attnfuse.models import build_fusion_model
from attnfuse.train import FusionDataModule, FusionTask, fit_and_test

from .test_cli_end_to_end import _run_cli, _version_dirs


def test_predict_uses_the_saved_preprocessing_not_the_training_table(table_config):
    cfg = table_config(trainer__max_epochs=1)
    assert main(["fit", "--config", str(cfg)]) == 0
    (run,) = _version_dirs(table_config.tmp)
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    new = table_config.df.drop(columns=["y"]).head(10)
    new_path = table_config.tmp / "new.csv"
    new.to_csv(new_path, index=False)
    out_a, out_b = table_config.tmp / "a.csv", table_config.tmp / "b.csv"
    args = ["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.predict_path", str(new_path)]
    assert main([*args, "--output", str(out_a)]) == 0
    # the training table changes (new rows, a new category) and then disappears: predictions must not change
    changed = pd.concat([table_config.df, table_config.df.head(50).assign(cat_color="purple", num_0=9.0)])
    changed.to_csv(table_config.path, index=False)
    assert main([*args, "--output", str(out_b)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out_a), pd.read_csv(out_b))
    table_config.path.unlink()
    out_c = table_config.tmp / "c.csv"
    assert main([*args, "--output", str(out_c)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out_a), pd.read_csv(out_c))


def test_late_fusion_pooling_auto_and_explicit_error():
    configs = {"a": {"kind": "vector", "in_features": 3}, "b": {"kind": "vector", "in_features": 2}}
    model = build_fusion_model(configs, 2, fusion="late", dim=8, heads=2, fusion_options={"depth": 1})
    assert model.head.pool.kind == "mean"
    assert build_fusion_model(configs, 2, fusion="early", dim=8, heads=2, fusion_options={"depth": 1}).head.pool.kind == "fusion"
    with pytest.raises(ValueError, match="attends to no input"):
        build_fusion_model(configs, 2, fusion="late", dim=8, heads=2, pooling="fusion", fusion_options={"depth": 1})


@pytest.mark.parametrize(("fusion", "options"), [("early", {"depth": 1}), ("latent", {"num_latents": 3}), ("late", {"depth": 1})])
def test_input_attention_shares(fusion, options):
    data = FusionDataModule("synthetic_views", seed=0)
    task = FusionTask(encoder_configs=data.encoder_configs, num_outputs=2, fusion=fusion, dim=8, heads=2,
                      fusion_options=options).eval()
    batch = next(iter(data.loader(data.dataset("test", missing=["view1"]))))
    names, share = task.input_attention(batch["inputs"])
    assert names == ["view0", "view1", "view2"] and share.shape == (len(batch["target"]), 3)
    assert torch.all(share[:, 1] == 0), "a missing input gets no attention"
    assert torch.all(share.sum(1) <= 1 + 1e-5)
    if fusion != "late":
        assert torch.all(share[:, 0] > 0)


def test_input_attention_is_a_clear_error_for_other_fusions():
    data = FusionDataModule("synthetic_views", seed=0)
    task = FusionTask(encoder_configs=data.encoder_configs, num_outputs=2, fusion="concat_mlp", dim=8)
    batch = next(iter(data.loader(data.dataset("test"))))
    with pytest.raises(ValueError, match="per-input attention"):
        task.input_attention(batch["inputs"])


def test_regression_learns_in_target_units(tmp_path):
    df, schema = make_synthetic_table(400, seed=0, task="regression", missing_rate=0.0)
    df["y"] = df["y"] * 1000 + 5000
    path = tmp_path / "reg.csv"
    df.to_csv(path, index=False)
    data = FusionDataModule("table", table={"path": str(path), "schema": schema.to_dict()})
    mean, std = data.target_scale
    assert 4000 < mean < 6000 and 500 < std < 2000
    run = fit_and_test(data, {"fusion": "early", "dim": 16, "heads": 2, "fusion_options": {"depth": 1}}, seed=0, max_epochs=8)
    assert run.metrics["test_r2"] > 0.0, run.metrics  # unscaled targets gave R² of about -14 before
    assert run.metrics["test_rmse"] < std


def test_corrupt_checkpoint_and_bad_demo_arguments_are_clear_errors(table_config):
    cfg = table_config()
    bad = table_config.tmp / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = _run_cli("test", "--config", str(cfg), "--ckpt_path", str(bad), cwd=table_config.tmp)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert main(["demo", "--seeds", "0"]) == 2
