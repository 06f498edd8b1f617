"""Task types: losses, metrics and prediction columns; every task trained end to end through `attnfuse fit`
on labelled SYNTHETIC data; survival on a real table (lifelines' Rossi recidivism data) against lifelines' CoxPH."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from attnfuse.cli import main
from attnfuse.losses import cox_partial_likelihood, evidential_loss
from attnfuse.train.tasks import (
    TASKS,
    Classification,
    Multilabel,
    Regression,
    Retrieval,
    Survival,
    TargetInfo,
    get_task,
    list_tasks,
)


def _bound(task, **info):
    task.bind(TargetInfo(**info))
    return task


def test_registry_lists_every_task_and_rejects_unknown_names():
    assert list_tasks() == ["classification", "multilabel", "regression", "retrieval", "survival"]
    assert all(TASKS[name].name == name for name in TASKS)
    with pytest.raises(KeyError, match="did you mean 'survival'"):
        get_task("survivl")


def test_classification_losses():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    info = {"kind": "classification", "classes": ["a", "b", "c"], "class_counts": [10, 5, 1]}
    ce = _bound(Classification(), **info)
    torch.testing.assert_close(ce.loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
    focal0 = _bound(Classification(loss="focal", focal_gamma=0.0), **info)
    torch.testing.assert_close(focal0.loss(logits, y), ce.loss(logits, y))
    assert _bound(Classification(loss="focal"), **info).loss(logits, y) < ce.loss(logits, y)
    balanced = _bound(Classification(class_weights="balanced"), **info)
    w = torch.tensor([16 / 30, 16 / 15, 16 / 3])
    torch.testing.assert_close(balanced.loss(logits, y), torch.nn.functional.cross_entropy(logits, y, weight=w))
    with pytest.raises(ValueError, match="3 classes"):
        _bound(Classification(class_weights=[1.0, 2.0]), **info)
    alpha = torch.nn.functional.softplus(logits) + 1
    evid = _bound(Classification(loss="evidential", kl_anneal_epochs=4), **info)
    torch.testing.assert_close(evid.loss(alpha, y, epoch=2), evidential_loss(alpha, y, kl_weight=0.5))
    per_source = [alpha + 1, alpha * 2]
    expected = sum(evidential_loss(a, y, kl_weight=0.5) for a in [alpha, *per_source])
    torch.testing.assert_close(evid.loss(alpha, y, epoch=2, extra={"per_source_alpha": per_source}), expected)


def test_classification_predictions_use_original_labels_in_class_order():
    task = _bound(Classification(), kind="classification", classes=["no", "yes"])
    cols = task.predict(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    assert cols["prediction"] == ["no", "yes"] and list(cols) == ["prediction", "prob_no", "prob_yes"]
    np.testing.assert_allclose(cols["prob_no"] + cols["prob_yes"], 1.0, rtol=1e-6)
    evid = _bound(Classification(loss="evidential"), kind="classification", classes=[3, 7])
    cols = evid.predict(torch.tensor([[1.0, 1.0], [9.0, 1.0]]))
    np.testing.assert_allclose(cols["uncertainty"], [1.0, 0.2], rtol=1e-6)  # K / sum(alpha)
    assert cols["prediction"][1] == 3


def test_multilabel_regression_survival_retrieval_losses_and_predictions():
    g = torch.Generator().manual_seed(1)
    ml = _bound(Multilabel(pos_weight="balanced"), kind="multilabel", target_names=["a", "b"], class_counts=[10, 30],
                num_train=40)
    out, y = torch.randn(8, 2, generator=g), (torch.rand(8, 2, generator=g) > 0.5).float()
    pw = torch.tensor([3.0, 1 / 3])
    torch.testing.assert_close(ml.loss(out, y), torch.nn.functional.binary_cross_entropy_with_logits(out, y, pos_weight=pw))
    assert list(ml.predict(out)) == ["pred_a", "pred_b", "prob_a", "prob_b"]

    reg = _bound(Regression(), kind="regression", target_names=["y"], target_scale=([10.0], [2.0]))
    pred, target = torch.randn(8, 1, generator=g), torch.randn(8, generator=g) * 2 + 10
    torch.testing.assert_close(reg.loss(pred, target), torch.nn.functional.mse_loss(pred[:, 0], (target - 10) / 2))
    np.testing.assert_allclose(reg.predict(pred)["prediction"], (pred[:, 0] * 2 + 10).numpy(), rtol=1e-6)
    het = _bound(Regression(heteroscedastic=True), kind="regression", target_names=["u", "v"],
                 target_scale=([0.0, 0.0], [1.0, 1.0]))
    assert het.output_size() == 4 and set(het.predict(torch.zeros(3, 4))) == {"pred_u", "pred_v", "std_u", "std_v"}

    surv = _bound(Survival(ties="efron", event_weight=5.0), kind="survival")
    risk, times = torch.randn(8, 1, generator=g), torch.rand(8, generator=g)
    event = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1])
    weights = torch.where(event.bool(), 5.0, 1.0)
    expected = cox_partial_likelihood(risk[:, 0], times, event, weights, ties="efron")
    torch.testing.assert_close(surv.loss(risk, torch.stack([times, event], 1)), expected)
    assert list(surv.predict(risk)) == ["risk"]

    for loss in ("triplet", "info_nce"):
        ret = _bound(Retrieval(loss=loss, embedding_dim=4), kind="retrieval", classes=[0, 1, 2])
        z = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=-1).requires_grad_()
        labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
        value = ret.loss(z, labels)
        assert value > 0 and math.isfinite(float(value))
        value.backward()
        assert z.grad.abs().sum() > 0
        assert ret.loss(z, torch.arange(9)) == 0, "no positive pair in the batch: no loss (and no NaN)"
    assert list(ret.predict(torch.zeros(2, 4))) == ["emb_0", "emb_1", "emb_2", "emb_3"]


def test_task_must_match_the_data():
    with pytest.raises(ValueError, match="trains on schema task"):
        _bound(Survival(), kind="classification", classes=[0, 1])
    _bound(Retrieval(), kind="classification", classes=[0, 1])  # identities from class labels


# --- end to end through `attnfuse fit` / `predict` -------------------------------------------------------------------

CASES = {  # task -> (model.task, the metric fit must log, prediction columns)
    "classification": ({"class_path": "classification", "init_args": {"loss": "focal", "class_weights": "balanced"}},
                       "test_acc", {"prediction", "prob_0", "prob_1"}),
    "evidential": ({"class_path": "classification", "init_args": {"loss": "evidential"}}, "test_acc",
                   {"prediction", "prob_0", "prob_1", "uncertainty"}),
    "multilabel": ("multilabel", "test_f1", {"pred_y_xor", "prob_y_num"}),
    "regression": ({"class_path": "regression", "init_args": {"heteroscedastic": True}}, "test_rmse", {"prediction", "std"}),
    "survival": ({"class_path": "Survival", "init_args": {"ties": "efron"}}, "test_cindex", {"risk"}),
    "retrieval": ({"class_path": "retrieval", "init_args": {"loss": "info_nce", "embedding_dim": 8}}, "test_recall@1",
                  {"emb_0", "emb_7"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_task_trains_through_fit_and_predicts(case, tmp_path, capsys):
    task, metric, columns = CASES[case]
    kind = "classification" if case == "evidential" else case
    cfg = {
        "seed_everything": 0,
        "data": {"dataset": "synthetic", "options": {"task": kind, "num_rows": 240}, "batch_size": 48},
        "model": {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16, "task": task},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "enable_model_summary": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "attnfuse fit: best checkpoint" in out and metric + "=" in out, out[-2000:]
    value = float(out.split(metric + "=")[1].split(",")[0].split()[0])
    assert math.isfinite(value)
    ckpt = next((tmp_path / "lightning_logs").glob("version_0/checkpoints/best-*.ckpt"))
    pred = tmp_path / "pred.csv"
    assert main(["predict", "--config", str(path), "--ckpt_path", str(ckpt), "--output", str(pred)]) == 0
    frame = pd.read_csv(pred)
    assert columns <= set(frame.columns) and frame["row"].is_monotonic_increasing


def test_string_labels_come_back_as_labels(table_config, capsys):
    df = table_config.df.assign(y=table_config.df["y"].map({0: "no", 1: "yes"}))
    df.to_csv(table_config.path, index=False)
    cfg = table_config(trainer__max_epochs=1)
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = next(table_config.tmp.glob("runs/lightning_logs/version_0/checkpoints/best-*.ckpt"))
    out = table_config.tmp / "p.csv"
    assert main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output", str(out)]) == 0
    pred = pd.read_csv(out)
    assert set(pred["prediction"]) <= {"no", "yes"} and list(pred.columns[2:4]) == ["prob_no", "prob_yes"]


def test_test_and_predict_without_a_checkpoint_are_errors(table_config, capsys):
    cfg = table_config()
    for sub in ("test", "predict", "validate"):
        assert main([sub, "--config", str(cfg)]) == 2
        assert "needs --ckpt_path" in capsys.readouterr().err


def test_survival_linear_model_matches_lifelines_coxph_on_real_data(tmp_path):
    lifelines = pytest.importorskip("lifelines")
    from lifelines.utils import concordance_index

    from attnfuse.train import run_config

    df = lifelines.datasets.load_rossi()  # 432 released prisoners: weeks to re-arrest (real data, bundled)
    df.to_csv(tmp_path / "rossi.csv", index=False)
    cols = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
    schema = {"task": "survival", "time": "week", "event": "arrest", "inputs": [{"name": "x", "kind": "numeric", "columns": cols}]}
    cfg = {"data": {"dataset": "table", "table": {"path": str(tmp_path / "rossi.csv"), "schema": schema}, "batch_size": 1024,
                    "test_fraction": 0.3},
           "model": {"baseline": "linear", "lr": 0.05, "weight_decay": 0.0, "task": {"class_path": "survival",
                                                                                     "init_args": {"ties": "efron"}}},
           "patience": 0}
    run = run_config(cfg, seed=0, max_epochs=150)
    split = run.data.split
    cph = lifelines.CoxPHFitter().fit(df.iloc[split["train"]], "week", "arrest")
    test = df.iloc[split["test"]]
    reference = concordance_index(test["week"], -cph.predict_partial_hazard(test), test["arrest"])
    assert abs(run.metrics["test_cindex"] - reference) < 0.02, (run.metrics["test_cindex"], reference)
