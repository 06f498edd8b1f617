"""What a task is: head + loss + metrics + prediction format, chosen in the config and the table schema.

A :class:`Task` is a small typed object (its constructor arguments are the task's options, so a
YAML config says ``task: {class_path: Survival, init_args: {ties: efron}}`` or just ``task: survival``).
:class:`attnfuse.train.FusionTask` binds it to the data's :class:`TargetInfo`, asks it for a head
over the fused tokens, and calls it for the loss, the metrics and the prediction columns. Adding a
task = one file with a ``@register_task`` subclass, plus its test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torchmetrics
from torch import Tensor, nn

from attnfuse._lookup import lookup

__all__ = ["TASKS", "TargetInfo", "Task", "get_task", "list_tasks", "register_task"]

Pooling = Literal["mean", "fusion", "cls", "attention"]


@dataclass
class TargetInfo:
    """What a task needs to know about the data's target (set by the data module).

    Attributes:
        kind: the schema's task (``classification``, ``regression``, ``multilabel``, ``survival``, ``retrieval``).
        classes: label values (classification / retrieval), in class-index order.
        target_names: the target columns (multilabel labels, regression outputs).
        target_scale: regression: per-output ``(means, stds)`` of the training targets.
        class_counts: classification / multilabel: positives per class over the training rows.
        num_train: number of training rows.
    """

    kind: str = "classification"
    classes: list[Any] | None = None
    target_names: list[str] = field(default_factory=list)
    target_scale: tuple[list[float], list[float]] | None = None
    class_counts: list[int] | None = None
    num_train: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | TargetInfo | None) -> TargetInfo:
        if data is None:
            return cls()
        if isinstance(data, TargetInfo):
            return data
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes or ())


class Task:
    """Base class of the task types; subclasses are registered with :func:`register_task`.

    Subclass contract:
        ``name``: registry name; ``accepts``: the schema task kinds it trains on; ``monitor``:
        ``(metric, "max" | "min")`` used for early stopping and the best checkpoint;
        :meth:`output_size`, :meth:`make_head` (optional), :meth:`loss`, :meth:`make_metrics`,
        :meth:`update_metrics`, :meth:`predict`.

    Shapes: ``output`` is whatever the head returns for a batch of ``B`` samples (``(B, K)`` logits,
    ``(B,)`` risks, ...); ``target`` is the collated target (see :mod:`attnfuse.data.targets`).
    """

    name: ClassVar[str] = ""
    accepts: ClassVar[tuple[str, ...]] = ()
    monitor: ClassVar[tuple[str, Literal["max", "min"]]] = ("loss", "min")
    info: TargetInfo

    def bind(self, info: TargetInfo) -> None:
        """Attach the data's target description; raises ``ValueError`` if the task cannot train on it."""
        if info.kind not in self.accepts:
            raise ValueError(
                f"task {self.name!r} trains on schema task(s) {list(self.accepts)}, but the data's task is {info.kind!r}; "
                f"choose model.task to match data (e.g. task: {info.kind})"
            )
        self.info = info

    def reads_fusion_output(self, kind: str) -> bool:
        """Whether the task reads a fusion's output of this kind directly, without a head (e.g. the
        evidential loss reads an evidential fusion's ``"dirichlet"`` output); ``"tokens"`` never."""
        return False

    def output_size(self) -> int:
        """Width of the head's output ``(B, output_size)``."""
        raise NotImplementedError

    def make_head(self, dim: int, *, pooling: Pooling, dropout: float) -> nn.Module:
        """The head over the fused tokens (default: a linear head of :meth:`output_size` outputs)."""
        from attnfuse.heads import RegressionHead

        return RegressionHead(dim, self.output_size(), pooling=pooling, dropout=dropout)

    def from_raw(self, output: Tensor) -> Tensor:
        """Map the raw ``(B, output_size)`` output of a head-less baseline (``ConcatMLP``) to what
        :meth:`loss` expects (identity unless the task's head constrains its output)."""
        return output

    def loss(self, output: Tensor, target: Tensor, *, epoch: int = 0, extra: Mapping[str, Tensor] | None = None) -> Tensor:
        """Training loss of a batch. ``extra``: additional model outputs (e.g. per-source Dirichlet parameters)."""
        raise NotImplementedError

    def make_metrics(self) -> torchmetrics.MetricCollection:
        raise NotImplementedError

    def update_metrics(self, metrics: torchmetrics.MetricCollection, output: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def predict(self, output: Tensor) -> dict[str, np.ndarray | list]:
        """Prediction columns of a batch: ``{column name: (B,) values}`` (labels as the original values)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` of this task (plain values, for logs and saved runs)."""
        args = {k: v for k, v in vars(self).items() if k != "info" and not k.startswith("_")}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe()["init_args"].items())
        return f"{type(self).__name__}({args})"


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Register a :class:`Task` subclass under ``name``. Raises ``ValueError`` on a duplicate name."""

    def decorator(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered (by {TASKS[name].__module__})")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"task {name!r} must be a Task subclass, got {cls!r}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorator


def get_task(name: str) -> type[Task]:
    """Look up a task class. Raises ``KeyError`` listing the registered names (with a close match)."""
    return lookup(TASKS, name, "task", listing="registered tasks")


def list_tasks() -> list[str]:
    """Sorted names of the registered tasks."""
    return sorted(TASKS)
