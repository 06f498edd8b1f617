"""Training and evaluation with Lightning: task types, the Lightning module and data module, the
Python predictor API, config runs, missing-input sweeps, reports."""

from attnfuse.train.datamodule import FusionDataModule, drop_inputs
from attnfuse.train.module import FusionTask
from attnfuse.train.predictor import FusionPredictor
from attnfuse.train.runner import RunResult, evaluate, fit_and_test, mean_std, missing_input_sweep, run_config
from attnfuse.train.tasks import TASKS, Classification, Multilabel, Regression, Retrieval, Survival, TargetInfo, Task

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
