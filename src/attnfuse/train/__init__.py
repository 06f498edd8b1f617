"""Training and evaluation with Lightning: task, data module, runners, sweeps, reports."""

from attnfuse.train.datamodule import FusionDataModule, drop_inputs
from attnfuse.train.runner import RunResult, evaluate, fit_and_test, mean_std, missing_input_sweep
from attnfuse.train.task import FusionTask, make_metrics

__all__ = [
    "FusionDataModule",
    "FusionTask",
    "RunResult",
    "drop_inputs",
    "evaluate",
    "fit_and_test",
    "make_metrics",
    "mean_std",
    "missing_input_sweep",
]
