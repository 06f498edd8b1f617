"""Registry-marked tests run only with ATTNFUSE_TEST_REGISTRY=1 or when their data sets are already cached.

Mark a test ``@pytest.mark.registry("mfeat", "womens_clothing")``; it is skipped unless the named
catalog data sets are in the attnfuse cache (``$ATTNFUSE_CACHE`` or the user cache dir) with the right
sha256, or ``ATTNFUSE_TEST_REGISTRY=1`` allows downloading them with pip.
"""

from __future__ import annotations

import os

import pytest

from attnfuse.data.catalog import is_cached


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("registry")
    if marker is None or os.environ.get("ATTNFUSE_TEST_REGISTRY") == "1":
        return
    names = marker.args
    if not names or not all(is_cached(n) for n in names):
        pytest.skip(f"needs the package registry for {list(names) or 'its data'}: set ATTNFUSE_TEST_REGISTRY=1 (or cache the files)")
