"""The ``attnfuse`` command."""

from attnfuse.cli.main import main

__all__ = ["main"]
