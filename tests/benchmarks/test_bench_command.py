"""``attnfuse bench``: runs the checkout's ``python -m benchmarks.run`` as a subprocess, never imports it."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from attnfuse.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_checkout(tmp_path):
    """A folder shaped like a checkout whose runner prints its argv, folder and Python, and exits 3."""
    bench = tmp_path / "repo" / "benchmarks"
    bench.mkdir(parents=True)
    (bench / "__init__.py").write_text("")
    (bench / "run.py").write_text(textwrap.dedent("""
        import os, sys
        print("ARGV", sys.argv[1:])
        print("CWD", os.getcwd())
        print("PY", sys.executable)
        raise SystemExit(3)
    """))
    return tmp_path / "repo"


def test_runs_the_runner_of_the_enclosing_checkout(fake_checkout, monkeypatch, capfd):
    sub = fake_checkout / "docs" / "deep"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)  # found from a subfolder too
    assert main(["bench", "--quick", "--only", "dense"]) == 3  # the runner's exit status
    out = capfd.readouterr().out
    assert "ARGV ['--quick', '--only', 'dense']" in out
    assert f"CWD {fake_checkout}" in out and f"PY {sys.executable}" in out


@pytest.mark.parametrize("form", ["split", "equals"])
def test_repo_option_names_the_checkout_from_anywhere(fake_checkout, tmp_path, monkeypatch, capfd, form):
    monkeypatch.chdir(tmp_path)
    repo = ["--repo", str(fake_checkout)] if form == "split" else [f"--repo={fake_checkout}"]
    assert main(["bench", "--quick", *repo]) == 3
    out = capfd.readouterr().out
    assert "ARGV ['--quick']" in out and f"CWD {fake_checkout}" in out


def test_outside_a_checkout_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("attnfuse bench: error: ")
    assert "benchmarks/run.py" in err and "--repo PATH" in err and str(tmp_path) in err


@pytest.mark.parametrize("argv", [["--repo", "NOWHERE"], ["--repo"], ["--repo="]])
def test_bad_repo_option_is_a_one_line_error(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *[a.replace("NOWHERE", str(tmp_path)) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("attnfuse bench: error: --repo")


def test_runs_this_repository_runner(monkeypatch, capfd):
    monkeypatch.chdir(ROOT / "docs")
    assert main(["bench", "--help"]) == 0
    assert "python -m benchmarks.run" in capfd.readouterr().out
    assert main(["bench", "--only", "no_such_benchmark"]) == 2  # the runner's own usage error
    assert "unknown benchmark" in capfd.readouterr().err
