"""Intra-op threads: chosen from the model size in every entry point, overridable, always restored."""

from __future__ import annotations

import pytest
import torch
import yaml

from attnfuse.cli import main
from attnfuse.train.threads import PARAMETERS_PER_THREAD, choose_threads, model_threads, thread_override, use_threads

TINY = {"data": {"dataset": "synthetic", "options": {"num_rows": 120}, "batch_size": 32},
        "model": {"dim": 8, "fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}}}


@pytest.fixture
def two_threads():
    """torch starts with 2 intra-op threads (as on a 2-core machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seen(monkeypatch):
    """The intra-op thread counts in effect whenever a fusion model runs (training, evaluation, prediction)."""
    from attnfuse.models.fusion_model import FusionModel

    counts: list[int] = []
    forward = FusionModel.forward

    def spy(self, *args, **kwargs):
        counts.append(torch.get_num_threads())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FusionModel, "forward", spy)
    return counts


def test_rule_from_the_model_size():
    assert choose_threads(torch.nn.Linear(8, 8), max_threads=16) == 1
    assert choose_threads(0, max_threads=16) == 1
    assert choose_threads(2 * PARAMETERS_PER_THREAD - 1, max_threads=16) == 1
    assert choose_threads(3 * PARAMETERS_PER_THREAD, max_threads=16) == 3
    assert choose_threads(10**10, max_threads=4) == 4
    with pytest.raises(ValueError, match="max_threads"):
        choose_threads(10, max_threads=0)


def test_override_scope_nests_and_restores():
    assert thread_override() is None
    with use_threads(3):
        assert choose_threads(10**10, max_threads=2) == 3 and thread_override() == 3
        with use_threads(None):
            assert choose_threads(1) == 1
        assert thread_override() == 3
    assert thread_override() is None
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"), use_threads(bad):
            pass


def test_model_threads_sets_and_restores(two_threads):
    with model_threads(torch.nn.Linear(4, 4)) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), model_threads(5):
        raise RuntimeError("restored on error too")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("flag", "env", "expected"), [([], None, 1), (["--threads", "2"], None, 2), ([], "2", 2),
                                                       (["--threads=1"], "2", 1)])
def test_cli_fit_threads(tmp_path, two_threads, seen, monkeypatch, flag, env, expected):
    if env is None:
        monkeypatch.delenv("ATTNFUSE_THREADS", raising=False)
    else:
        monkeypatch.setenv("ATTNFUSE_THREADS", env)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "trainer": {"max_epochs": 1, "default_root_dir": str(tmp_path),
                                                        "enable_progress_bar": False}}))
    assert main(["fit", "--config", str(cfg), *flag]) == 0
    assert seen and set(seen) == {expected}
    assert torch.get_num_threads() == 2


def test_cli_rejects_bad_thread_counts(monkeypatch, capsys):
    assert main(["fit", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    monkeypatch.setenv("ATTNFUSE_THREADS", "many")
    assert main(["quickstart", "--steps", "1"]) == 2
    assert "ATTNFUSE_THREADS" in capsys.readouterr().err


def test_run_config_and_seeds_choose_threads(two_threads, seen, tmp_path):
    from attnfuse.train import run_config

    run_config(TINY, max_epochs=1)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["seeds", "--config", str(cfg), "--seeds", "1", "--epochs", "1", "--threads", "2"]) == 0
    assert seen and set(seen) == {2} and torch.get_num_threads() == 2


def test_predictor_fit_and_predict_choose_threads(two_threads, seen, tmp_path):
    from attnfuse.data import make_synthetic_table
    from attnfuse.train import FusionPredictor

    df, schema = make_synthetic_table(120, seed=0)
    predictor = FusionPredictor(schema, dim=8, max_epochs=1, path=tmp_path).fit(df)
    predictor.predict(df.head(10))
    predictor.evaluate(df.head(20))
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    with use_threads(2):
        predictor.predict(df.head(10))
    assert set(seen) == {2}


@pytest.mark.slow
def test_demo_chooses_threads(two_threads, seen, tmp_path):
    from attnfuse.train.demo import run_demo

    run_demo(out_dir=tmp_path, seeds=(0,), max_epochs=1, dataset="synthetic_views")
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2


def test_quickstart_chooses_threads(two_threads, monkeypatch, capsys):
    from attnfuse.cli import quickstart

    counts: list[int] = []
    forward = quickstart._Model.forward
    monkeypatch.setattr(quickstart._Model, "forward", lambda self, x: counts.append(torch.get_num_threads()) or forward(self, x))
    assert main(["quickstart", "--steps", "2"]) == 0
    assert counts and set(counts) == {1}
    counts.clear()
    assert main(["quickstart", "--steps", "1", "--threads", "2"]) == 0
    assert set(counts) == {2} and torch.get_num_threads() == 2
