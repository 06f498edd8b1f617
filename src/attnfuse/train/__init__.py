"""Training and evaluation with Lightning: task types, the Lightning module and data module, the
Python predictor API, config runs, missing-input sweeps, reports.

The names below are imported on first use (PEP 562), so ``attnfuse.train.tasks`` or
``attnfuse.train.threads`` can be imported without loading Lightning, pandas and the data pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnfuse.train.datamodule import FusionDataModule, drop_inputs
    from attnfuse.train.module import FusionTask
    from attnfuse.train.predictor import FusionPredictor
    from attnfuse.train.runner import RunResult, evaluate, fit_and_test, mean_std, missing_input_sweep, run_config
    from attnfuse.train.tasks import TASKS, Classification, Multilabel, Regression, Retrieval, Survival, TargetInfo, Task

#: public name -> the module that defines it
_EXPORTS = {
    "FusionDataModule": "attnfuse.train.datamodule",
    "drop_inputs": "attnfuse.train.datamodule",
    "FusionTask": "attnfuse.train.module",
    "FusionPredictor": "attnfuse.train.predictor",
    **dict.fromkeys(["RunResult", "evaluate", "fit_and_test", "mean_std", "missing_input_sweep", "run_config"],
                    "attnfuse.train.runner"),
    **dict.fromkeys(["TASKS", "Classification", "Multilabel", "Regression", "Retrieval", "Survival", "TargetInfo", "Task"],
                    "attnfuse.train.tasks"),
}

__all__ = [
    "TASKS",
    "Classification",
    "FusionDataModule",
    "FusionPredictor",
    "FusionTask",
    "Multilabel",
    "Regression",
    "Retrieval",
    "RunResult",
    "Survival",
    "TargetInfo",
    "Task",
    "drop_inputs",
    "evaluate",
    "fit_and_test",
    "mean_std",
    "missing_input_sweep",
    "run_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
