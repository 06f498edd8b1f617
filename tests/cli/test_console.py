"""The console of the attnfuse command: lazy start-up, errors first, quiet runs, readable list / describe."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from attnfuse.cli import main

#: a tiny fit on the labelled synthetic table (no download)
TINY = {"data": {"dataset": "synthetic", "options": {"num_rows": 120}, "batch_size": 32},
        "model": {"dim": 8, "fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}}}

#: console lines nobody using attnfuse can act on (issue 14): adverts, notices and deprecations from inside the libraries
NOISE = ("💡 Tip", "litlogger", "litmodels", "tensorboardX", "LeafSpec", "log_every_n_steps", "v_num",
         "JsonargparseDeprecationWarning", "was deprecated in v4", "skip_none parameter", "Unable to serialize instance")


def _python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=240)


# ------------------------------------------------------------------ start-up


def test_help_imports_neither_torch_nor_lightning():
    code = ("import sys\nfrom attnfuse.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'lightning', 'pandas', 'jsonargparse') if m in sys.modules))")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_list_and_describe_do_not_import_lightning():
    for args in (["list"], ["describe", "dense"], ["describe", "classification"]):
        code = (f"import sys\nfrom attnfuse.cli import main\nassert main({args!r}) == 0\n"
                "print('LOADED', sorted(m for m in ('lightning', 'jsonargparse') if m in sys.modules))")
        result = _python(code)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "LOADED []" in result.stdout, args


def test_usage_line_names_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "fit,validate,test,predict,list,describe,demo,seeds,quickstart,bench" in "".join(usage.split())


# ------------------------------------------------------------------ errors first


def test_unknown_option_is_one_error_line_with_a_suggestion(capsys):
    assert main(["fit", "--trainer.max_epoch", "3"]) == 2  # an abbreviation is not accepted any more
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == ("attnfuse fit: error: unrecognized arguments: --trainer.max_epoch 3; did you mean "
                        "--trainer.max_epochs?")
    assert len(lines) == 2 and "attnfuse fit --help" in lines[1] and "usage:" not in err


def test_unknown_config_key_suggests_the_key(tmp_path, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model:\n  dmi: 3\n")
    assert main(["validate", "--config", str(cfg)]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert "'model.dmi'" in first and first.endswith("did you mean model.dim?")


def test_a_wrong_value_is_reported_without_usage(capsys):
    assert main(["test", "--trainer.max_epochs", "many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnfuse test: error:") and "usage:" not in err and "max_epochs" in err


# ------------------------------------------------------------------ quiet runs


@pytest.mark.slow
def test_fit_prints_no_noise_but_keeps_what_a_user_can_act_on(tmp_path):
    """A real ``attnfuse fit`` process, with every warning category shown (``-W default``)."""
    import yaml

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path / "runs")}}))
    result = subprocess.run([sys.executable, "-W", "default", "-m", "attnfuse.cli", "fit", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert [n for n in NOISE if n in out] == []
    assert "GPU available" in out and "Intra-op CPU threads: 1" in out and "attnfuse fit: test test_acc=" in out
    assert "Epoch" in out  # the progress bar is still there, without v_num


def _recorded(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


@pytest.mark.slow
def test_run_config_and_predictor_are_quiet_every_run(tmp_path, caplog):
    """``attnfuse demo`` / ``seeds`` run many fits through run_config: no warning a user cannot act on, no advert."""
    from attnfuse.data import make_synthetic_table
    from attnfuse.train import FusionPredictor, run_config

    caplog.set_level(logging.INFO)
    messages = _recorded(lambda: [run_config(TINY, max_epochs=1, progress=True) for _ in range(2)])
    df, schema = make_synthetic_table(120, seed=0)
    messages += _recorded(lambda: FusionPredictor(schema, dim=8, max_epochs=1, path=tmp_path, progress=True).fit(df))
    text = "\n".join(messages + [r.getMessage() for r in caplog.records])
    assert [n for n in NOISE if n in text] == []
    assert "GPU available" in text  # info lines a user can act on stay


def test_quiet_console_filters_only_noise_and_restores_everything(caplog):
    from lightning.pytorch.utilities import rank_zero_info

    from attnfuse.train.console import quiet_console

    filters = list(warnings.filters)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_console():
            warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed as a dependency", UserWarning, stacklevel=1)
            warnings.warn("The number of training batches (7) is smaller than the logging interval", UserWarning, stacklevel=1)
            warnings.warn("Checkpoint directory runs/x exists and is not empty.", UserWarning, stacklevel=1)
            rank_zero_info("💡 Tip: For seamless cloud logging ... litlogger")
            rank_zero_info("GPU available: False, used: False")
            rank_zero_info("TPU available: False, using: 0 TPU cores")
        warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed as a dependency", UserWarning, stacklevel=1)
        rank_zero_info("💡 Tip: after the block")
    assert [str(w.message)[:30] for w in caught] == ["Checkpoint directory runs/x ex", "Starting from v1.9.0, `tensorb"]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["GPU available: False, used: False", "💡 Tip: after the block"]
    assert warnings.filters == filters
    assert all(not lg.filters for lg in map(logging.getLogger, ("lightning.pytorch.utilities.rank_zero",
                                                                "lightning.fabric.utilities.rank_zero")))


# ------------------------------------------------------------------ list / describe


def test_list_cuts_descriptions_at_a_word_boundary(capsys, monkeypatch):
    import inspect
    import re

    from attnfuse.data import DATASETS
    from attnfuse.train.tasks import TASKS

    monkeypatch.setenv("COLUMNS", "90")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 90
    full = {name: re.sub(r"``([^`]*)``", r"\1", " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split()))
            for name, cls in TASKS.items()}
    full |= {name: " ".join(spec.summary.split()) for name, spec in DATASETS.items()}
    shortened = 0
    for line in lines:
        name = line.split()[0] if line.startswith("  ") else None
        if name not in full:
            continue
        text = line.split(": ", 1)[1] if name in TASKS else line[2:].split(None, 1)[1]
        if text.endswith(" …"):
            shortened += 1
            kept = text.removesuffix(" …")
            assert full[name].startswith(kept) and full[name][len(kept)] == " ", line  # whole words only
        else:
            assert text == full[name], line
    assert shortened >= 1


def test_describe_explains_baselines(capsys):
    assert main(["describe", "concat_mlp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("concat_mlp (baseline): a value of model.baseline, not a fusion")
    assert "--model.baseline concat_mlp" in out and "ConcatMLP" in out and "other baselines: linear" in out
    assert main(["describe", "linear"]) == 0
    assert "linear model" in capsys.readouterr().out
