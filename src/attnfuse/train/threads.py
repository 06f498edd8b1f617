"""How many intra-op CPU threads a run uses: chosen from the model size, overridable in a scope.

PyTorch starts with one intra-op thread per core. For the small models this library usually trains
(the demo's, the quickstart's, a table model of ``dim`` 64: 4 K to 400 K parameters) every matrix
product is tiny, and the threads spend their time waiting for each other at the end of each op; when
other processes share the cores, a thread that is not scheduled stalls all the others. Measured on a
2-core machine with other jobs running (``docs/training.md``, "Threads"): ``attnfuse quickstart``
296 s with 2 threads, 68 s with 1; a training step of a 3 M-parameter model 1.6 s with 2 threads,
0.3 s with 1. Only much larger models gain from more threads, and only on idle cores.

The rule (:func:`choose_threads`): one thread per :data:`PARAMETERS_PER_THREAD` parameters, at
least 1 and at most ``torch.get_num_threads()`` (the cores, or ``OMP_NUM_THREADS`` when set). It
depends on the model and the machine only, never on the current load, so the same config on the same
machine always runs with the same thread count (the count changes floating-point summation order,
hence the last bits of the results).

Override it for a scope with :func:`use_threads` (the command line's ``--threads N`` /
``ATTNFUSE_THREADS``); the scope is a context variable restored on exit, and nothing here reads the
environment. :func:`model_threads` sets torch's thread count for a block and restores it afterwards.

Example:
    >>> from attnfuse.train.threads import use_threads
    >>> with use_threads(4):                       # doctest: +SKIP
    ...     FusionPredictor(schema).fit(train)     # 4 threads, whatever the model size
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

__all__ = ["PARAMETERS_PER_THREAD", "choose_threads", "model_threads", "thread_override", "use_threads"]

#: one intra-op thread per this many parameters (at least one): below 8 M parameters a model trains with one thread
PARAMETERS_PER_THREAD = 4_000_000

_OVERRIDE: ContextVar[int | None] = ContextVar("attnfuse_threads", default=None)


def _check(threads: int, what: str) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{what} must be a whole number of threads >= 1, got {threads!r}")
    return threads


@contextmanager
def use_threads(threads: int | None) -> Iterator[None]:
    """Within this scope every run uses ``threads`` intra-op threads (``None``: the automatic choice).

    Raises:
        ValueError: ``threads`` is not an integer >= 1.
    """
    token = _OVERRIDE.set(None if threads is None else _check(threads, "threads"))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def thread_override() -> int | None:
    """The thread count set by the innermost :func:`use_threads` scope, or None."""
    return _OVERRIDE.get()


def choose_threads(model: nn.Module | int, *, max_threads: int | None = None) -> int:
    """Intra-op threads for training or evaluating ``model`` (a module or its parameter count).

    The :func:`use_threads` override when one is set; otherwise ``parameters // PARAMETERS_PER_THREAD``,
    clipped to ``[1, max_threads]`` (default ``torch.get_num_threads()``).
    """
    override = _OVERRIDE.get()
    if override is not None:
        return override
    params = model if isinstance(model, int) else sum(p.numel() for p in model.parameters())
    limit = torch.get_num_threads() if max_threads is None else _check(max_threads, "max_threads")
    return max(1, min(limit, params // PARAMETERS_PER_THREAD))


@contextmanager
def model_threads(model: nn.Module | int) -> Iterator[int]:
    """Run the block with :func:`choose_threads` ``(model)`` torch threads; the previous count is restored."""
    before = torch.get_num_threads()
    threads = choose_threads(model)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
