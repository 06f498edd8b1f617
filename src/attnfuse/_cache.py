"""Where attnfuse keeps downloaded data files and computed text embeddings.

One rule, used by :mod:`attnfuse.data` (dataset files) and :mod:`attnfuse.encoders` (text
embedding cache): an explicit ``cache_dir=`` argument wins, then the ``ATTNFUSE_CACHE``
environment variable, then ``$XDG_CACHE_HOME/attnfuse``, then ``~/.cache/attnfuse``. The
environment is read when a function is called, never at import.

A cache folder that cannot be created or written (read-only, owned by someone else, a file in the
way, a full disk) raises :class:`CacheDirError`, which names the folder and how to move the cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "CacheDirError", "cache_dir_error", "ensure_writable_dir", "resolve_cache_dir"]

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


class CacheDirError(OSError, ValueError):
    """The attnfuse cache folder cannot be created or written; the message names it and how to move the cache.

    An ``OSError`` (as the failure underneath) and a ``ValueError`` (a setting to fix, reported by the CLI
    as one ``error:`` line).
    """


def cache_dir_error(folder: str | os.PathLike, err: BaseException, *, what: str) -> CacheDirError:
    """A :class:`CacheDirError` for ``err`` (raised while writing ``what`` into ``folder``)."""
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    env = os.environ.get(CACHE_ENV_VAR)
    now = f" (now {CACHE_ENV_VAR}={env})" if env else ""
    return CacheDirError(
        f"cannot write {what} to the cache folder {folder}: {reason}. Make that folder writable, or point the "
        f"attnfuse cache at a writable folder: export {CACHE_ENV_VAR}=/path/to/writable/folder{now}"
    )


def ensure_writable_dir(folder: str | os.PathLike, *, what: str) -> Path:
    """Create ``folder`` (with parents) and check that a file can be written in it; return it.

    Raises:
        CacheDirError: the folder cannot be created or written (names it and :data:`CACHE_ENV_VAR`).
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise cache_dir_error(path, err, what=what) from err
    return path
