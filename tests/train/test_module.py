"""FusionTask and the model builder: saved preprocessing at predict time, pooling choice, attention shares,
regression scale, baselines, CLI errors."""

from functools import partial

import pandas as pd
import pytest
import torch

from attnfuse.cli import main
from attnfuse.data import make_synthetic_table
from attnfuse.fusion import EarlyFusion, LateFusion, LatentBottleneck
from attnfuse.heads import ClassificationHead
from attnfuse.models import build_fusion_model
from attnfuse.train import FusionDataModule, FusionTask, fit_and_test

from .test_cli_end_to_end import _run_cli, _version_dirs


def test_predict_uses_the_saved_preprocessing_not_the_training_table(table_config):
    cfg = table_config(trainer__max_epochs=1)
    assert main(["fit", "--config", str(cfg)]) == 0
    (run,) = _version_dirs(table_config.tmp)
    (ckpt,) = (run / "checkpoints").glob("best-*.ckpt")
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


def _head(width, pooling):
    return ClassificationHead(width, 2, pooling=pooling)


def test_late_fusion_pooling_auto_and_explicit_error():
    configs = {"a": {"kind": "vector", "in_features": 3}, "b": {"kind": "vector", "in_features": 2}}
    late, early = partial(LateFusion, heads=2, depth=1), partial(EarlyFusion, heads=2, depth=1)
    assert build_fusion_model(configs, _head, fusion=late, dim=8).head.pool.kind == "mean"
    assert build_fusion_model(configs, _head, fusion=early, dim=8).head.pool.kind == "fusion"
    with pytest.raises(ValueError, match="attends to no input"):
        build_fusion_model(configs, _head, fusion=late, dim=8, pooling="fusion")
    with pytest.raises(KeyError, match="unknown fusion 'nope'"):
        build_fusion_model(configs, _head, fusion="nope", dim=8)


FUSIONS = [partial(EarlyFusion, heads=2, depth=1), partial(LatentBottleneck, heads=2, num_latents=3),
           partial(LateFusion, heads=2, depth=1)]


@pytest.mark.parametrize("fusion", FUSIONS, ids=["early", "latent", "late"])
def test_input_attention_shares(fusion):
    data = FusionDataModule("synthetic_views", seed=0)
    task = FusionTask(fusion, encoder_configs=data.encoder_configs, target_info=data.target_info, dim=8).eval()
    batch = next(iter(data.loader(data.dataset("test", missing=["view1"]))))
    names, share = task.input_attention(batch["inputs"])
    assert names == ["view0", "view1", "view2"] and share.shape == (len(batch["target"]), 3)
    assert torch.all(share[:, 1] == 0), "a missing input gets no attention"
    assert torch.all(share.sum(1) <= 1 + 1e-5)
    if fusion.func is not LateFusion:
        assert torch.all(share[:, 0] > 0)


def test_input_attention_is_a_clear_error_for_other_fusions():
    data = FusionDataModule("synthetic_views", seed=0)
    task = FusionTask(baseline="concat_mlp", encoder_configs=data.encoder_configs, target_info=data.target_info, dim=8)
    batch = next(iter(data.loader(data.dataset("test"))))
    with pytest.raises(ValueError, match="per-input attention"):
        task.input_attention(batch["inputs"])


def test_fusion_and_task_resolve_from_names_classes_and_saved_descriptions():
    data = FusionDataModule("synthetic_views", seed=0)
    kw = {"encoder_configs": data.encoder_configs, "target_info": data.target_info, "dim": 8}
    a = FusionTask(partial(EarlyFusion, heads=2, depth=1), "classification", **kw)
    saved = dict(a.hparams)
    assert saved["fusion"]["class_path"].endswith("EarlyFusion") and saved["fusion"]["init_args"]["depth"] == 1
    assert saved["task"]["init_args"]["loss"] == "cross_entropy"
    b = FusionTask(saved["fusion"], saved["task"], **kw)  # the plain-value description rebuilds the same model
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    with pytest.raises(ValueError, match="trains on schema task"):
        FusionTask(partial(EarlyFusion, heads=2, depth=1), "survival", **kw)
    with pytest.raises(KeyError, match="unknown task"):
        FusionTask(partial(EarlyFusion, heads=2, depth=1), "survivl", **kw)


def test_regression_learns_in_target_units(tmp_path):
    df, schema = make_synthetic_table(400, seed=0, task="regression", missing_rate=0.0)
    df["y"] = (df["num_0"] + df["num_1"] + df["vec_0"]) * 1000 + 5000  # learnable in a few epochs, in big units
    path = tmp_path / "reg.csv"
    df.to_csv(path, index=False)
    table = {"path": str(path), "schema": schema.to_dict()}
    (mean,), (std,) = FusionDataModule("table", table=table).target_scale
    assert 4000 < mean < 6000 and 500 < std < 2000
    model = {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16}
    run = fit_and_test({"dataset": "table", "table": table}, model, seed=0, max_epochs=8)
    assert run.metrics["test_r2"] > 0.5, run.metrics  # unscaled targets gave R² of about -14 before
    assert run.metrics["test_rmse"] < std


def test_corrupt_checkpoint_and_bad_demo_arguments_are_clear_errors(table_config):
    cfg = table_config()
    bad = table_config.tmp / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = _run_cli("test", "--config", str(cfg), "--ckpt_path", str(bad), cwd=table_config.tmp)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert main(["demo", "--seeds", "0"]) == 2
