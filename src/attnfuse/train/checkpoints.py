"""Checkpoint files: written atomically with a sha256 beside them, read back only as tensors and plain values.

Every checkpoint this project writes (Lightning's ``best-*.ckpt`` / ``last.ckpt`` / ``epoch=*.ckpt``
through :class:`CheckedCheckpointIO`, a saved predictor's ``model.pt``) is written to a temporary file in
the same folder and renamed into place (``os.replace``), then ``<file>.sha256`` is written beside it in
``sha256sum`` format (``sha256sum -c best-0-7.ckpt.sha256`` checks it by hand).

Every checkpoint read goes through :func:`load_checked`:

1. a URL is refused (download it, so it can be checked, and pass the local file);
2. a missing file or a folder is an error naming the path;
3. the sha256 sidecar is verified: a mismatch is an error (the file was changed or damaged after it was
   written); a file without one (written by plain Lightning or ``torch.save``) loads with an
   :class:`UncheckedCheckpointWarning`;
4. ``torch.load(weights_only=True)``: only tensors and plain values are unpickled, never code; anything
   ``torch.load`` cannot read (empty, truncated, not a checkpoint, foreign objects) is one
   :class:`CheckpointError` line naming the file.

Status: used by ``attnfuse fit | validate | test | predict``, :func:`attnfuse.train.run_config` and
:class:`attnfuse.train.FusionPredictor` (tested in ``tests/train/test_checkpoints.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only

__all__ = [
    "CheckedCheckpointIO", "CheckpointError", "UncheckedCheckpointWarning", "atomic_path", "check_checkpoint_path",
    "file_sha256", "is_url", "load_checked", "load_lightning_checkpoint", "save_checked", "sidecar_path",
    "use_checked_checkpoints", "verify_checksum",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOBAL = re.compile(r"GLOBAL ([\w.<>]+)")
#: unchecked files already warned about in this process: (resolved path, size, mtime) -> one warning per file,
#: although the CLI reads a checkpoint twice (its hyperparameters, then the trainer)
_WARNED: set[tuple[str, int, int]] = set()
#: Lightning's special ``ckpt_path`` values, resolved by the trainer (then read through :class:`CheckedCheckpointIO`)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a URL, missing, damaged, not a checkpoint, or holding code.

    The message is one line and names the file (the CLI prints it as ``error:`` and exits with 2).
    """


class UncheckedCheckpointWarning(UserWarning):
    """A checkpoint without a ``.sha256`` beside it was loaded without an integrity check."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``scheme://...``: http, https, s3, gs, file, ...)."""
    return bool(_URL.match(os.fspath(path)))


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<path>.sha256``: the checksum file beside a checkpoint."""
    return Path(os.fspath(path) + ".sha256")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is renamed onto ``path``.

    The temporary file has ``path``'s name, inside a hidden folder beside it (same file system, so
    ``os.replace`` is atomic: a reader sees the old file or the new one, never a partial one). Files the
    writer puts beside it in that folder (e.g. ONNX external data) are moved too. On an error nothing is
    replaced and the temporary folder is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    tmp_dir.mkdir()
    try:
        tmp = tmp_dir / target.name
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {str(target)!r}")
        for extra in tmp_dir.iterdir():
            if extra != tmp:
                os.replace(extra, target.parent / extra.name)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_sidecar(path: Path, digest: str) -> None:
    with atomic_path(sidecar_path(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")


def save_checked(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, then ``<path>.sha256`` beside it; returns ``path``.

    The old sidecar is removed before the new file replaces the old one, so a crash in between leaves a
    file without a sidecar (loaded with a warning), never a file with a stale checksum.
    """
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    sidecar_path(target).unlink(missing_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    _write_sidecar(target, hashlib.sha256(data).hexdigest())
    return target


def check_checkpoint_path(path: str | os.PathLike, *, what: str = "checkpoint") -> Path:
    """``path`` as a local file, or a :class:`CheckpointError` (a URL, no such file, a folder)."""
    text = os.fspath(path)
    if is_url(text):
        raise CheckpointError(f"{what} {text!r} is a URL: attnfuse does not load checkpoints from URLs; download it "
                              "(with its .sha256) and pass the local file")
    local = Path(text)
    if not local.exists():
        raise CheckpointError(f"{what} {text!r}: no such file")
    if not local.is_file():
        raise CheckpointError(f"{what} {text!r} is not a file")
    return local


def verify_checksum(path: str | os.PathLike, *, what: str = "checkpoint") -> bool:
    """Check ``path`` against ``<path>.sha256``: True when it matches, False (with a warning) without a sidecar.

    A symbolic link without its own sidecar is checked against its target's.

    Raises:
        CheckpointError: the checksum does not match, or the sidecar is unreadable.
    """
    local = Path(path)
    sidecar = sidecar_path(local)
    if not sidecar.is_file() and local.is_symlink():
        sidecar = sidecar_path(local.resolve())
    if not sidecar.is_file():
        stat = local.stat()
        key = (str(local.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _WARNED and getattr(rank_zero_only, "rank", 0) == 0:
            _WARNED.add(key)  # one line (the file as location, no source line), once per file and process
            warnings.warn_explicit(f"{what} {str(local)!r} has no {sidecar.name} beside it (not written by attnfuse): "
                                   "loading it without an integrity check", UncheckedCheckpointWarning,
                                   filename=str(local), lineno=0, module=__name__, registry={})
        return False
    try:
        expected = sidecar.read_text().split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        raise CheckpointError(f"{what} {str(local)!r}: cannot read its checksum file {str(sidecar)!r}") from None
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise CheckpointError(f"{what} {str(local)!r}: its checksum file {str(sidecar)!r} holds no sha256")
    actual = file_sha256(local)
    if actual != expected:
        raise CheckpointError(f"{what} {str(local)!r} does not match its checksum ({sidecar.name}: sha256 "
                              f"{expected[:12]}..., file: {actual[:12]}...): the file was changed or damaged after "
                              "it was written")
    return True


def _first_line(err: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an error (for torch's weights-only unpickler: its reason, not its advice)."""
    message = str(err)
    _, marker, reason = message.partition("WeightsUnpickler error:")
    text = next((line.strip() for line in (reason if marker else message).splitlines() if line.strip()), "")
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checked(path: str | os.PathLike, *, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """Read a checkpoint safely: local file, checksum verified, ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: a URL, a missing file, a checksum mismatch, or a file ``torch.load`` cannot read
            with ``weights_only=True`` (empty, truncated, not a checkpoint, objects that are not tensors or
            plain values); one line naming the file.
    """
    local = check_checkpoint_path(path, what=what)
    verify_checksum(local, what=what)
    try:
        return torch.load(local, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises EOFError, OSError, RuntimeError (zip), ValueError, UnpicklingError ...
        foreign = _GLOBAL.search(str(err))
        if foreign:  # the weights-only unpickler met a class or function: the file is not ours, and could run code
            raise CheckpointError(f"{what} {str(local)!r} holds {foreign.group(1)}, not only tensors and plain values; "
                                  "refused (loading it could run code)") from None
        raise CheckpointError(f"{what} {str(local)!r} cannot be read: empty, truncated or not a PyTorch checkpoint "
                              f"({_first_line(err)})") from None


def load_lightning_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """:func:`load_checked`, then check that the content is a Lightning checkpoint (``state_dict`` and version)."""
    checkpoint = load_checked(path, map_location=map_location)
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(checkpoint):
        found = sorted(map(str, checkpoint))[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is not a Lightning checkpoint written by `attnfuse fit` "
                              f"(no state_dict / pytorch-lightning_version; found {found})")
    return checkpoint


#: File name of the weights Lightning's multiprocessing launcher (ddp_spawn, ddp_fork) passes from rank 0 to the main process
LAUNCHER_WEIGHTS = ".temp.ckpt"


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`save_checked` / :func:`load_lightning_checkpoint`.

    Saves write the file atomically and its ``.sha256``; loads refuse URLs, verify the checksum and read with
    ``weights_only=True`` whatever the caller asks for; removing a checkpoint removes its sidecar.

    Args:
        keep_callback_states: False drops the callbacks' states on load (evaluation and prediction do not
            resume training, so the callbacks that wrote them are not needed and not warned about).
    """

    def __init__(self, *, keep_callback_states: bool = True) -> None:
        self.keep_callback_states = keep_callback_states

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"Trainer.save_checkpoint(..., storage_options=...) is not supported by {type(self).__name__}")
        save_checked(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        del weights_only  # always True: checkpoints of this project hold tensors and plain values only
        if Path(os.fspath(path)).name == LAUNCHER_WEIGHTS:
            # ddp_spawn / ddp_fork: rank 0 hands the trained weights (a bare state dict, saved through this IO with
            # its checksum) to the main process; checked like any file, but it is not a Lightning checkpoint
            return load_checked(path, map_location=map_location)
        checkpoint = load_lightning_checkpoint(path, map_location=map_location)
        if not self.keep_callback_states:
            checkpoint.pop("callbacks", None)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if not is_url(path):
            sidecar_path(path).unlink(missing_ok=True)


def use_checked_checkpoints(trainer: Any, *, keep_callback_states: bool = True) -> None:
    """Make ``trainer`` save and load checkpoints through :class:`CheckedCheckpointIO`.

    A checkpoint IO the user configured (a plugin other than Lightning's plain ``TorchCheckpointIO``) is kept.
    """
    current = trainer.strategy.checkpoint_io
    if type(current) is TorchCheckpointIO or isinstance(current, CheckedCheckpointIO):
        trainer.strategy.checkpoint_io = CheckedCheckpointIO(keep_callback_states=keep_callback_states)
