"""Multi-seed runner with a missing-input robustness sweep, driven by a fit config (YAML mapping)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attnfuse.train.datamodule import FusionDataModule
from attnfuse.train.report import markdown_table
from attnfuse.train.runner import RunResult, fit_and_test, mean_std, missing_input_sweep

__all__ = ["run_seeds"]

_DATA_KEYS = {"dataset", "table", "inputs", "batch_size", "val_fraction", "test_fraction", "standardize", "num_workers"}
_MODEL_KEYS = {"fusion", "dim", "heads", "pooling", "dropout", "fusion_options", "encoder_options", "lr", "weight_decay"}


def _section(config: Mapping[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    section = dict(config.get(name) or {})
    unknown = sorted(set(section) - allowed - {"seed", "missing", "predict_path", "run_dir"})
    if unknown:
        raise ValueError(f"config section {name!r} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return {k: v for k, v in section.items() if k in allowed}


def run_seeds(
    config: Mapping[str, Any], seeds: Sequence[int], *, max_missing: int = 1, max_epochs: int | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit and test ``config`` once per seed (split and initialisation), then sweep missing inputs.

    Args:
        config: a fit config as a mapping with ``data``, ``model`` and optional ``trainer.max_epochs``.
        seeds: the seeds; each sets the split and everything random in training.
        max_missing: sweep every subset of up to this many inputs marked missing at test time.
        max_epochs: overrides ``trainer.max_epochs``.
        out_dir: where to write ``seeds.md``.

    Returns:
        ``{"metrics": {name: (mean, std)}, "sweep": {condition: (mean, std)}, "markdown": str}``.

    Raises:
        ValueError: unknown config keys, no seeds.
    """
    if not seeds:
        raise ValueError("run_seeds needs at least one seed")
    data_kw, model_kw = _section(config, "data", _DATA_KEYS), _section(config, "model", _MODEL_KEYS)
    epochs = max_epochs or int((config.get("trainer") or {}).get("max_epochs", 20))
    runs: list[RunResult] = []
    for seed in seeds:
        runs.append(fit_and_test(FusionDataModule(seed=seed, **data_kw), model_kw, seed=seed, max_epochs=epochs))
    test_keys = sorted(k for k in runs[0].metrics if k.startswith("test_"))
    metrics = {k: mean_std([r.metrics[k] for r in runs]) for k in test_keys}
    main_metric = "acc" if runs[0].data.task == "classification" else "rmse"
    sweep: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for run in runs:
        for rec in missing_input_sweep(run.task.model, run.data, max_missing=max_missing):
            sweep[rec["missing"]].append(rec[main_metric])
    sweep_stats = {k: mean_std(v) for k, v in sweep.items()}
    table = markdown_table(["metric", f"mean ± std over {len(seeds)} seeds"],
                           [[k, f"{m:.4f} ± {s:.4f}"] for k, (m, s) in metrics.items()])
    sweep_table = markdown_table(["missing inputs", f"test {main_metric}"],
                                 [[", ".join(k) or "(none)", f"{m:.4f} ± {s:.4f}"] for k, (m, s) in sweep_stats.items()])
    markdown = (f"# {data_kw.get('dataset', 'mfeat')}: {model_kw.get('fusion', 'early')} fusion, seeds {list(seeds)},"
                f" {epochs} epochs\n\n{table}\n\n## Missing inputs at test time\n\n{sweep_table}\n")
    if out_dir:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "seeds.md").write_text(markdown)
    return {"metrics": metrics, "sweep": sweep_stats, "markdown": markdown}
