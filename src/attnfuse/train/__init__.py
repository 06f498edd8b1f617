"""attnfuse.train (filled by later issues)."""

__all__: list[str] = []
