"""`attnfuse merge` end to end: two tiny fits (2 steps each) -> merged checkpoint -> `attnfuse test` / `predict`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from attnfuse.cli import main
from attnfuse.data import make_synthetic_table
from attnfuse.train.checkpoints import load_lightning_checkpoint, sidecar_path

pytest.importorskip("ot")


@pytest.fixture(scope="module")
def two_fits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge_cli")
    df, schema = make_synthetic_table(120, seed=0, missing_rate=0.1)
    df.to_csv(tmp / "table.csv", index=False)
    ckpts = []
    for seed in (0, 1):
        cfg = {
            "seed_everything": seed,
            "data": {"dataset": "table", "batch_size": 32, "seed": 0,
                     "table": {"path": str(tmp / "table.csv"), "schema": schema.to_dict()}},
            "model": {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16},
            "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "default_root_dir": str(tmp / f"run{seed}"),
                        "enable_progress_bar": False, "enable_model_summary": False},
        }
        path = tmp / f"fit{seed}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["fit", "--config", str(path), "--test_after_fit", "false"]) == 0
        (ckpt,) = sorted((tmp / f"run{seed}").glob("lightning_logs/version_*/checkpoints/best-*.ckpt"))
        ckpts.append(ckpt)
    return {"tmp": tmp, "config": tmp / "fit0.yaml", "ckpts": ckpts, "df": df}


@pytest.mark.parametrize("method", ["average", "ot"])
def test_merge_writes_a_checkpoint_that_test_and_predict_accept(two_fits, method, capsys):
    tmp, cfg, (a, b) = two_fits["tmp"], two_fits["config"], two_fits["ckpts"]
    out = tmp / f"merged_{method}.ckpt"
    assert main(["merge", "--models", str(a), str(b), "--method", method, "--config", str(cfg), "--output", str(out),
                 "--samples", "64"]) == 0
    assert "wrote" in capsys.readouterr().out and sidecar_path(out).is_file()
    merged = load_lightning_checkpoint(out)
    assert merged["merge"]["method"] == method and len(merged["merge"]["sources"]) == 2
    assert "optimizer_states" not in merged
    sa, sb = load_lightning_checkpoint(a)["state_dict"], load_lightning_checkpoint(b)["state_dict"]
    name = next(k for k in sb if k.endswith("head.mlp.0.weight") or k.endswith("norm.weight"))
    if method == "average":
        torch.testing.assert_close(merged["state_dict"][name], (sa[name] + sb[name]) / 2)
    assert not torch.equal(merged["state_dict"][name], sb[name])
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(out)]) == 0
    new_path = tmp / "new.csv"
    two_fits["df"].drop(columns=["y"]).head(10).to_csv(new_path, index=False)
    pred = tmp / f"pred_{method}.csv"
    assert main(["predict", "--config", str(cfg), "--ckpt_path", str(out), "--data.predict_path", str(new_path),
                 "--output", str(pred)]) == 0
    assert len(pd.read_csv(pred)) == 10


def test_merge_errors_are_one_line(two_fits, capsys):
    tmp, (a, b) = two_fits["tmp"], two_fits["ckpts"]
    assert main(["merge", "--models", str(a), "--output", str(tmp / "x.ckpt")]) == 2
    assert "two or more" in capsys.readouterr().err
    assert main(["merge", "--models", str(a), str(tmp / "missing.ckpt"), "--output", str(tmp / "x.ckpt")]) == 2
    assert "no such file" in capsys.readouterr().err
    Path(tmp / "exists.ckpt").write_text("x")
    assert main(["merge", "--models", str(a), str(b), "--method", "average", "--output", str(tmp / "exists.ckpt")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", "--models", str(a), str(b), "--method", "ot", "--mode", "acts", "--output", str(tmp / "y.ckpt")]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_merge_ot_fixed_prefixes_are_averaged_without_alignment(two_fits):
    tmp, (a, b) = two_fits["tmp"], two_fits["ckpts"]
    out = tmp / "merged_fixed.ckpt"
    assert main(["merge", "--models", str(a), str(b), "--method", "ot", "--mode", "wts", "--fixed", "head",
                 "--output", str(out)]) == 0
    merged = load_lightning_checkpoint(out)
    assert merged["merge"]["fixed"] == ["head"] and merged["merge"]["mode"] == "wts"
    sa, sb = load_lightning_checkpoint(a)["state_dict"], load_lightning_checkpoint(b)["state_dict"]
    heads = [k for k in sb if k.startswith("model.head.")]
    assert heads
    for k in heads:  # averaged as they are
        torch.testing.assert_close(merged["state_dict"][k], (sa[k] + sb[k]) / 2)
