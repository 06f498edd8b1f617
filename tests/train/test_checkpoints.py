"""Checkpoints (issue 14, items 1, 3, 4): every checkpoint read is local, checksum-verified and weights-only;
every checkpoint written has a sha256 beside it; a bad --ckpt_path is one `error:` line, exit 2."""

import functools
import hashlib
import http.server
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from attnfuse.cli import main
from attnfuse.data import make_synthetic_table
from attnfuse.train import FusionPredictor
from attnfuse.train.checkpoints import (
    CheckedCheckpointIO,
    CheckpointError,
    UncheckedCheckpointWarning,
    load_checked,
    save_checked,
    sidecar_path,
)
from attnfuse.train.predictor import WEIGHTS_FILE

SUBCOMMANDS = ("test", "validate", "predict", "fit")


class _RunsCode:
    """Unpickling this runs ``Path(marker).touch()``: a stand-in for a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `attnfuse fit` of a small SYNTHETIC table (every epoch's checkpoint kept): config, run folder, best ckpt."""
    tmp = tmp_path_factory.mktemp("ckpt_run")
    df, schema = make_synthetic_table(300, seed=0, missing_rate=0.1)
    df.to_csv(tmp / "table.csv", index=False)
    every_epoch = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_top_k": -1}}]
    cfg = {
        "seed_everything": 0,
        "data": {"dataset": "table", "batch_size": 32, "table": {"path": str(tmp / "table.csv"), "schema": schema.to_dict()}},
        "model": {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp / "runs"), "enable_progress_bar": False,
                    "enable_model_summary": False},
    }
    (tmp / "fit.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "every.yaml").write_text(yaml.safe_dump({**cfg, "trainer": {**cfg["trainer"], "callbacks": every_epoch,
                                                                       "default_root_dir": str(tmp / "every")}}))
    assert main(["fit", "--config", str(tmp / "fit.yaml")]) == 0
    assert main(["fit", "--config", str(tmp / "every.yaml")]) == 0
    (folder,) = (tmp / "runs" / "lightning_logs").glob("version_*")
    (best,) = (folder / "checkpoints").glob("best-*.ckpt")
    return {"tmp": tmp, "config": tmp / "fit.yaml", "run": folder, "best": best, "df": df,
            "every": sorted((tmp / "every" / "lightning_logs").glob("version_*/checkpoints/*.ckpt"))}


def _copy(src: Path, dst: Path, *, sidecar: bool) -> Path:
    dst.write_bytes(src.read_bytes())
    if sidecar:
        sidecar_path(dst).write_text(sidecar_path(src).read_text().replace(src.name, dst.name))
    return dst


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor's data (the zip stays readable: only the values change)."""
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    offset = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + entry.file_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _cli(run, sub: str, ckpt: str, *extra: str) -> list[str]:
    args = [sub, "--config", str(run["config"]), "--ckpt_path", ckpt, *extra]
    return [*args, "--output", str(run["tmp"] / f"never_{sub}.csv")] if sub == "predict" else args


def _one_error_line(capsys, sub: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"attnfuse {sub}: error: "), err[-3000:]
    return lines[0]


# ---------------------------------------------------------------- item 3: a sha256 beside every checkpoint written
def test_every_checkpoint_fit_writes_has_a_matching_sha256_and_loads_weights_only(run):
    ckpts = [run["best"], run["run"] / "checkpoints" / "last.ckpt", *run["every"]]
    assert len(run["every"]) == 2  # epoch=0, epoch=1 (a ModelCheckpoint of the config, saving every epoch)
    for ckpt in ckpts:
        digest, name = sidecar_path(ckpt).read_text().split()
        assert name == ckpt.name and digest == hashlib.sha256(ckpt.read_bytes()).hexdigest(), ckpt
        content = torch.load(ckpt, map_location="cpu", weights_only=True)  # callbacks, hparams, our RNG state
        assert {"state_dict", "callbacks", "hyper_parameters", "attnfuse_rng", "optimizer_states", "loops"} <= set(content)
    assert not list(run["run"].rglob("*.tmp")), "no temporary files are left behind"


def test_a_flipped_byte_in_a_tensor_is_an_error_naming_the_file(run, capsys):
    flipped = _copy(run["best"], run["tmp"] / "flipped.ckpt", sidecar=True)
    _flip_tensor_byte(flipped)
    torch.load(flipped, weights_only=True)  # still a readable checkpoint: only the checksum catches it
    for sub in SUBCOMMANDS:
        assert main(_cli(run, sub, str(flipped))) == 2, sub
        line = _one_error_line(capsys, sub)
        assert "flipped.ckpt" in line and "checksum" in line, line


def test_a_checkpoint_without_a_sidecar_loads_with_a_warning(run, capsys):
    plain = _copy(run["best"], run["tmp"] / "plain_lightning.ckpt", sidecar=False)
    with pytest.warns(UncheckedCheckpointWarning, match="plain_lightning.ckpt"):
        assert main(["test", "--config", str(run["config"]), "--ckpt_path", str(plain)]) == 0
    assert "test_acc=" in capsys.readouterr().out


def test_save_checked_and_load_checked(tmp_path):
    path = save_checked({"w": torch.arange(4.0)}, tmp_path / "x.pt")
    assert sidecar_path(path).read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  x.pt\n"
    torch.testing.assert_close(load_checked(path)["w"], torch.arange(4.0))
    sidecar_path(path).write_text("0" * 64 + "  x.pt\n")
    with pytest.raises(CheckpointError, match=r"x\.pt.*does not match its checksum"):
        load_checked(path)
    sidecar_path(path).write_text("garbage\n")
    with pytest.raises(CheckpointError, match="holds no sha256"):
        load_checked(path)
    # a new save replaces the file and its checksum
    save_checked({"w": torch.ones(2)}, path)
    torch.testing.assert_close(load_checked(path)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt", "x.pt.sha256"]


def test_checkpoint_io_removes_sidecars_and_drops_callback_states_for_evaluation(run, tmp_path):
    ckpt = _copy(run["best"], tmp_path / "a.ckpt", sidecar=True)
    assert "callbacks" in CheckedCheckpointIO().load_checkpoint(ckpt, weights_only=False)
    assert "callbacks" not in CheckedCheckpointIO(keep_callback_states=False).load_checkpoint(ckpt)
    CheckedCheckpointIO().remove_checkpoint(ckpt)
    assert not ckpt.exists() and not sidecar_path(ckpt).exists()


# ---------------------------------------------------------------- item 4: unusable files are one error line
def _bad_files(run) -> dict[str, Path]:
    tmp = run["tmp"]
    good = run["best"].read_bytes()
    files = {"empty": b"", "truncated": good[: len(good) // 2], "truncated_head": good[:100], "junk": b"not a checkpoint",
             "zeros": bytes(4096)}
    out = {name: tmp / f"{name}.ckpt" for name in files}
    for name, data in files.items():
        out[name].write_bytes(data)
    torch.save(torch.zeros(3), tmp / "tensor.ckpt")
    torch.save({"a": 1}, tmp / "plain_dict.ckpt")
    (tmp / "folder.ckpt").mkdir(exist_ok=True)
    out.update(tensor=tmp / "tensor.ckpt", plain_dict=tmp / "plain_dict.ckpt", folder=tmp / "folder.ckpt",
               missing=tmp / "no_such.ckpt")
    return out


@pytest.mark.parametrize("case", ["empty", "truncated", "truncated_head", "junk", "zeros", "tensor", "plain_dict",
                                  "folder", "missing"])
def test_unusable_ckpt_path_is_one_error_line_exit_2(run, case, capsys):
    path = _bad_files(run)[case]
    subs = SUBCOMMANDS if case in ("truncated", "missing", "folder") else ("test",)
    runs = run["tmp"] / "runs"
    before = sorted(runs.rglob("*"))
    for sub in subs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedCheckpointWarning)
            assert main(_cli(run, sub, str(path))) == 2, (case, sub)
        line = _one_error_line(capsys, sub)
        assert path.name in line, line
        # refused before anything starts: no run folder, config or split written for a run that cannot start
        assert sorted(runs.rglob("*")) == before, (case, sub)


def test_subprocess_shows_no_traceback_for_a_truncated_checkpoint(run):
    import subprocess
    import sys

    path = _bad_files(run)["truncated"]
    result = subprocess.run([sys.executable, "-m", "attnfuse.cli", "test", "--config", str(run["config"]), "--ckpt_path",
                             str(path)], capture_output=True, text=True, cwd=run["tmp"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("attnfuse test: error: --ckpt_path: checkpoint")


# ---------------------------------------------------------------- item 1: no code runs from a checkpoint
@pytest.fixture
def crafted(run, tmp_path):
    """A Lightning checkpoint that also holds an object whose unpickling creates ``marker`` (with a valid sidecar)."""
    marker = tmp_path / "code_ran"
    content = torch.load(run["best"], weights_only=True)
    content["payload"] = _RunsCode(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(content, path)
    sidecar_path(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  crafted.ckpt\n")
    return path, marker


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path``: ``served(name) -> URL``."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield lambda name: f"http://127.0.0.1:{server.server_address[1]}/{name}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_a_url_ckpt_path_is_refused_and_runs_no_code(run, crafted, served, sub, capsys):
    path, marker = crafted
    url = served(path.name)
    assert main(_cli(run, sub, url)) == 2
    assert not marker.exists(), "the crafted checkpoint ran code"
    line = _one_error_line(capsys, sub)
    assert url in line and "URL" in line, line


def test_a_crafted_local_checkpoint_is_refused_and_runs_no_code(run, crafted, capsys):
    path, marker = crafted
    for sub in SUBCOMMANDS:
        assert main(_cli(run, sub, str(path))) == 2
        line = _one_error_line(capsys, sub)
        assert "crafted.ckpt" in line and "could run code" in line, line
    with pytest.raises(CheckpointError, match="could run code"):
        CheckedCheckpointIO().load_checkpoint(path, weights_only=False)  # whatever the caller asks for
    assert not marker.exists()


def test_weights_only_false_is_refused(run, capsys):
    assert main(["test", "--config", str(run["config"]), "--ckpt_path", str(run["best"]), "--weights_only", "false"]) == 2
    assert "weights_only" in _one_error_line(capsys, "test")


def test_fit_resumes_from_a_checked_checkpoint(run, capsys):
    epoch0 = next(p for p in run["every"] if p.name.startswith("epoch=0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedCheckpointWarning)  # it has its sidecar: no warning
        assert main(["fit", "--config", str(run["config"]), "--ckpt_path", str(epoch0), "--test_after_fit", "false"]) == 0


# ---------------------------------------------------------------- the predictor bundle's model.pt
def test_predictor_bundle_weights_are_checksummed(tmp_path):
    df, schema = make_synthetic_table(120, seed=0)
    predictor = FusionPredictor(schema, fusion={"class_path": "early", "init_args": {"heads": 2, "depth": 1}}, dim=16,
                                max_epochs=1, path=tmp_path / "run").fit(df)
    bundle = predictor.save(tmp_path / "bundle")
    weights = bundle / WEIGHTS_FILE
    assert sidecar_path(weights).read_text().split()[0] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sidecar_path(Path(predictor.best_checkpoint)).is_file()  # the predictor's Lightning checkpoints too
    FusionPredictor.load(bundle)
    _flip_tensor_byte(weights)
    with pytest.raises(CheckpointError, match=r"model\.pt.*does not match its checksum"):
        FusionPredictor.load(bundle)
    sidecar_path(weights).unlink()  # a bundle saved before checksums: loads, with a warning
    predictor.save(tmp_path / "again")
    sidecar_path(tmp_path / "again" / WEIGHTS_FILE).unlink()
    with pytest.warns(UncheckedCheckpointWarning, match="model.pt"):
        FusionPredictor.load(tmp_path / "again")
