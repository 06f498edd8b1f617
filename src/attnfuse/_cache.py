"""Where attnfuse keeps downloaded data files and computed text embeddings.

One rule, used by :mod:`attnfuse.data` (dataset files) and :mod:`attnfuse.encoders` (text
embedding cache): an explicit ``cache_dir=`` argument wins, then the ``ATTNFUSE_CACHE``
environment variable, then ``$XDG_CACHE_HOME/attnfuse``, then ``~/.cache/attnfuse``. The
environment is read when a function is called, never at import.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "resolve_cache_dir"]

#: Environment variable that moves the whole attnfuse cache.
CACHE_ENV_VAR = "ATTNFUSE_CACHE"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$ATTNFUSE_CACHE``, else the user cache dir.

    The directory is not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "attnfuse"
