"""Speed benchmarks: ``python -m benchmarks.run`` (``make bench``) runs every ``bench_*.py`` module.

Each module exposes ``main(quick: bool = False, device: str | None = None) -> list[dict]`` returning
records built with :func:`benchmarks.harness.record`; the runner prints them as markdown tables and
writes ``benchmarks/results/<name>.json``.
"""

__all__: list[str] = []
