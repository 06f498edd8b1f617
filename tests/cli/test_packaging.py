"""The installed package: the core install (torch + numpy) and the ``train`` extra.

Fast tests run the ``attnfuse`` command with the ``train`` extra's modules made unimportable. The slow
test builds the wheel and installs it into fresh virtual environments, without extras and with
``[train]``, and runs the command from a folder outside the repository; it runs with
``ATTNFUSE_TEST_PACKAGING=1`` (``make package-check``, called by ``.ci/run`` after ``make test``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_HINT = 'pip install "attnfuse[train]"'
#: the top-level modules the ``train`` extra installs (and what they pull in), absent from a core install
TRAIN_MODULES = ("lightning", "pytorch_lightning", "lightning_utilities", "torchmetrics", "jsonargparse", "yaml", "pandas",
                 "pyarrow", "matplotlib", "rich", "scipy", "sklearn")
_CORE_ONLY = ("import sys\nfor name in {modules!r}:\n    sys.modules[name] = None  # as if not installed\n"
              "from attnfuse.cli import main\nraise SystemExit(main(sys.argv[1:]))")


def _core_only(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = _CORE_ONLY.format(modules=TRAIN_MODULES)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=240)


def test_extra_for_reads_the_package_metadata():
    from attnfuse.cli.main import _extra_for

    assert _extra_for("pandas") == "train" and _extra_for("yaml") == "train" and _extra_for("lightning.pytorch") == "train"
    assert _extra_for("sentence_transformers") == "text"
    assert _extra_for("torch") is None and _extra_for("no_such_module") is None and _extra_for(None) is None


def test_core_install_list_describe_and_quickstart_work(tmp_path):
    listed = _core_only("list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "early" in listed.stdout and "dense" in listed.stdout
    assert listed.stdout.splitlines()[-1] == f"tasks and datasets: not installed (no module 'pandas'): {TRAIN_HINT}"
    described = _core_only("describe", "latent", cwd=tmp_path)
    assert described.returncode == 0 and "LatentBottleneck" in described.stdout
    quick = _core_only("quickstart", "--steps", "2", cwd=tmp_path)
    assert quick.returncode == 0, quick.stderr[-2000:]
    assert "early fusion" in quick.stdout and "Traceback" not in quick.stderr


@pytest.mark.parametrize("args", [["fit", "--config", "x.yaml"], ["validate"], ["test", "--help"], ["predict"], ["demo"],
                                  ["seeds", "--config", "x.yaml"], ["describe", "mfeat"]])
def test_core_install_names_the_extra_in_one_line(tmp_path, args):
    result = _core_only(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and TRAIN_HINT in result.stderr.splitlines()[-1]
    assert len(result.stderr.strip().splitlines()) <= 2  # describe: the unknown name, then the extra


# ------------------------------------------------------------------ the real wheel in fresh virtual environments


def _run(cmd: list[str], cwd: Path, *, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == expect, f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _fresh_venv(path: Path, torch_req: str, wheel: Path, extra: str, cwd: Path) -> Path:
    """A clean virtual environment with ``torch_req`` (first: the CPU build) and the wheel (with ``extra``)."""
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, torch_req], cwd)  # pip's cache is kept: the second environment reuses the downloads
    _run([*pip, f"{wheel}{extra}"], cwd)
    return path / "bin" / "attnfuse"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.environ.get("ATTNFUSE_TEST_PACKAGING") != "1",
                    reason="builds the wheel and two virtual environments (~1.5 min): make package-check")
def test_wheel_in_fresh_environments(tmp_path):
    import torch

    start = time.perf_counter()
    torch_req = os.environ.get("ATTNFUSE_TEST_TORCH") or f"torch=={torch.__version__.split('+')[0]}"  # the Makefile's pin
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout (and no stale build/)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(source)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("attnfuse-*.whl")
    outside = tmp_path / "elsewhere"  # not the repository: nothing found through the current folder
    outside.mkdir()

    core = _fresh_venv(tmp_path / "core", torch_req, wheel, "", outside)
    assert "fit,validate,test,predict" in _run([str(core), "--help"], outside).stdout
    listed = _run([str(core), "list"], outside).stdout
    assert "early" in listed and TRAIN_HINT in listed.splitlines()[-1]
    for args in (["fit", "--config", "x.yaml"], ["demo"]):
        failed = _run([str(core), *args], outside, expect=2)
        assert failed.stderr.strip().splitlines() == [failed.stderr.strip()] and TRAIN_HINT in failed.stderr
    assert "early fusion" in _run([str(core), "quickstart", "--steps", "20"], outside).stdout

    train = _fresh_venv(tmp_path / "train", torch_req, wheel, "[train]", outside)
    _run([str(train), "--help"], outside)
    listed = _run([str(train), "list"], outside).stdout
    assert "mfeat" in listed and "survival" in listed and TRAIN_HINT not in listed
    assert "early fusion" in _run([str(train), "quickstart", "--steps", "20"], outside).stdout
    fit = _run([str(train), "fit", "--data.dataset", "synthetic", "--data.options.num_rows", "120", "--model.dim", "8",
                "--trainer.max_epochs", "1", "--trainer.default_root_dir", "runs"], outside)
    assert "attnfuse fit: test test_acc=" in fit.stdout
    print(f"package check: {time.perf_counter() - start:.0f} s")
