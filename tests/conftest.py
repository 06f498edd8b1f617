"""Session-wide test settings."""

import os

# setuptools' distutils shim asserts when the stdlib distutils was imported first (some test-only
# dependencies do); torch.compile imports setuptools, so keep the stdlib distutils throughout the suite.
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
