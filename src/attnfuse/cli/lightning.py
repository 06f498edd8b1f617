"""``attnfuse fit | validate | test | predict``: the LightningCLI of :mod:`attnfuse.train.lightning_cli`."""

from attnfuse.train.lightning_cli import AttnfuseCLI, PredictionWriter, run_lightning

__all__ = ["AttnfuseCLI", "PredictionWriter", "run_lightning"]
