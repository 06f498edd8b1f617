"""The attnfuse command: list, describe, errors."""

from attnfuse.cli import main


def test_list_shows_operators_and_fusions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sdpa" in out and "early" in out and "latent" in out and "mfeat" in out


def test_describe_known_and_unknown(capsys):
    assert main(["describe", "dense"]) == 0
    assert "Shapes" in capsys.readouterr().out
    assert main(["describe", "nope"]) == 2
    assert "unknown name 'nope'" in capsys.readouterr().err


def test_quickstart_runs_and_prints_table(capsys):
    assert main(["quickstart", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "early fusion" in out and "acc, b missing" in out


def test_help_lists_lightning_subcommands(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fit, validate, test, predict" in capsys.readouterr().out

