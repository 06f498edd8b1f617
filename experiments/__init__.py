"""Quality experiments on real data: one folder per paper / suite, ``python -m experiments.<name>.run``.

Each folder holds ``run.py`` (the script), a ``README.md`` with the command and the result table, and
a ``config.yaml`` where the script takes one; ``_shared.py`` has the statistics and table helpers.
Repository code: the installed ``attnfuse`` package never imports it. Speed benchmarks live in
``benchmarks/``.
"""

__all__: list[str] = []
