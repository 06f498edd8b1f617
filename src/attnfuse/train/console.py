"""A quiet console for Lightning runs: what the entry points install around a run, and nothing at import.

Lightning, jsonargparse and torch print lines a user of ``attnfuse`` cannot act on: adverts for
Lightning's cloud products, a notice that ``tensorboardX`` is not a dependency, deprecation warnings
raised inside Lightning's own calls, and warnings about settings this package chose on purpose (it logs
per epoch, so ``log_every_n_steps`` does not matter). :func:`quiet_console` silences exactly those,
by message and module, for the duration of a ``with`` block; everything a user can act on (a GPU that
is not used, a checkpoint folder that is not empty, a metric without positive samples, their own
deprecated settings) still shows. The command line wraps every command in it; ``run_config`` and
``FusionPredictor`` wrap their runs. Importing this module changes nothing.

Also here, for the entry points: :class:`RichProgressBar` (Lightning's, without the ``v_num`` column),
:class:`ThreadsCallback` (the thread count of :mod:`attnfuse.train.threads` for the run) and
:class:`ArgumentParser` (full option names only; an unknown option's error says which one was meant).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_info

from attnfuse.train.threads import choose_threads, thread_override

__all__ = ["LOG_FILTERS", "WARNING_FILTERS", "ArgumentParser", "RichProgressBar", "ThreadsCallback", "did_you_mean",
           "quiet_console"]

#: ``warnings.filterwarnings("ignore", **entry)`` for each entry while :func:`quiet_console` is active
WARNING_FILTERS: tuple[dict[str, Any], ...] = (
    # Lightning's default logger notice: attnfuse logs CSV by default; `--tensorboard true` adds TensorBoard
    {"message": r"Starting from v1\.9\.0, `tensorboardX` has been removed"},
    # torch deprecation triggered inside Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py)
    {"message": r"`isinstance\(treespec, LeafSpec\)` is deprecated", "category": FutureWarning},
    # jsonargparse deprecations of calls Lightning's CLI makes (add_instantiator, instantiate_classes, skip_none)
    {"category": DeprecationWarning, "module": r"lightning\.pytorch\.cli"},
    {"message": r"\s*By default only one JsonargparseDeprecationWarning per type is shown"},
    # attnfuse logs the training loss per epoch, so the step logging interval does not matter
    {"message": r"The number of training batches \(\d+\) is smaller than the logging interval"},
    # validate / test / predict restore weights only: the training callbacks' states are not needed
    {"message": r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided"},
    # jsonargparse, on its way to reporting an unknown fusion / task name; attnfuse's error names the choices
    {"message": r"\s*Unable to serialize instance"},
)

#: messages of Lightning's rank-zero info logger dropped while :func:`quiet_console` is active
LOG_FILTERS: tuple[str, ...] = (
    r"^💡 Tip:",  # adverts for litlogger / litmodels
    r"^(TPU|HPU) available: False",  # hardware this machine does not have (the GPU line stays)
    r"^Loading `train_dataloader` to estimate number of stepping batches",  # the cosine schedule's step count
)

#: loggers Lightning's ``rank_zero_info`` writes to
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


@contextlib.contextmanager
def quiet_console(*, info: bool = True) -> Iterator[None]:
    """Within the block: :data:`WARNING_FILTERS` and :data:`LOG_FILTERS` apply; all restored on exit.

    Args:
        info: keep Lightning's remaining info lines (seed, GPU, checkpoint restored ...); ``False`` shows
            its warnings and errors only (for jobs that run many fits, such as ``demo`` and ``seeds``).
    """
    drop = _DropMessages(LOG_FILTERS)
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")] if not info else []
    levels = [lg.level for lg in quiet]
    with warnings.catch_warnings():
        for entry in WARNING_FILTERS:
            warnings.filterwarnings("ignore", **entry)
        for lg in loggers:
            lg.addFilter(drop)
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(drop)
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)


class RichProgressBar(_RichProgressBar):
    """Lightning's rich progress bar without the ``v_num`` column (the run folder is printed at the end of fit)."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ThreadsCallback(Callback):
    """Set torch's intra-op threads for each stage from the model size (:func:`~attnfuse.train.threads.choose_threads`).

    The count is chosen in ``setup`` (after the model is built) and the previous count is restored in
    ``teardown``; the first choice is reported on Lightning's info logger with how to override it.
    """

    def __init__(self) -> None:
        self._before: list[int] = []
        self._reported = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._before.append(torch.get_num_threads())
        threads = choose_threads(pl_module)
        torch.set_num_threads(threads)
        if not self._reported:
            self._reported = True
            how = ("set by --threads / ATTNFUSE_THREADS / use_threads" if thread_override() is not None else
                   "from the model size; --threads N or ATTNFUSE_THREADS=N to change")
            rank_zero_info(f"Intra-op CPU threads: {threads} ({how})")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._before:
            torch.set_num_threads(self._before.pop())


class ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with full option names only (no ``--trainer.max_epoch`` for ``max_epochs``) and a
    "did you mean" after an unknown option or config key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if "did you mean" not in message:
            message += did_you_mean(message, self)
        super().error(message, ex)


def _option_strings(parser: Any, seen: set[int] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if id(parser) in seen:
        return set()
    seen.add(id(parser))
    options: set[str] = set()
    for action in getattr(parser, "_actions", ()):
        options.update(s for s in action.option_strings if s.startswith("--"))
        for sub in getattr(action, "_name_parser_map", {}).values():  # subcommand parsers
            options |= _option_strings(sub, seen)
    return options


def did_you_mean(message: str, parser: Any) -> str:
    """``"; did you mean --trainer.max_epochs?"`` for the unknown options (``unrecognized arguments: ...``) and
    config keys (``... does not accept option 'trainer.max_epoch'``) named in a parser error, or ``""``."""
    unknown = re.findall(r"(--[\w.\-]+)", message.partition("unrecognized arguments:")[2])
    keys = re.findall(r"does not accept option '([\w.\-]+)'", message)  # a key in a config file
    options = sorted(_option_strings(parser))

    def closest(option: str) -> str | None:
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.75)
        return close[0] if close and close[0] != option else None

    hints = [hint for hint in map(closest, unknown) if hint]
    hints += [hint.removeprefix("--") for hint in (closest(f"--{key}") for key in keys) if hint]
    return f"; did you mean {' / '.join(dict.fromkeys(hints))}?" if hints else ""
