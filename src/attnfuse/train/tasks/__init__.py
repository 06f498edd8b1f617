"""Task types (head + loss + metrics + prediction format), registered by name.

``classification`` (cross-entropy / focal / evidential), ``multilabel``, ``regression`` (optionally
heteroscedastic), ``survival`` (Cox), ``retrieval`` (triplet / InfoNCE). The default task of a
data set is its schema's ``task``. See ``docs/training.md``.
"""

from attnfuse.train.tasks.base import TASKS, TargetInfo, Task, get_task, list_tasks, register_task
from attnfuse.train.tasks.classification import Classification
from attnfuse.train.tasks.multilabel import Multilabel
from attnfuse.train.tasks.regression import Regression
from attnfuse.train.tasks.retrieval import Retrieval
from attnfuse.train.tasks.survival import Survival

__all__ = [
    "TASKS",
    "Classification",
    "Multilabel",
    "Regression",
    "Retrieval",
    "Survival",
    "TargetInfo",
    "Task",
    "get_task",
    "list_tasks",
    "register_task",
    "resolve_task",
]


def resolve_task(task: "Task | str | None", kind: str) -> Task:
    """A task object from an object, a registered name, or None (the default task of the schema's ``kind``)."""
    if task is None:
        return get_task(kind)()
    if isinstance(task, str):
        return get_task(task)()
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task, a registered task name {list_tasks()} or None, got {type(task).__name__}")
    return task
