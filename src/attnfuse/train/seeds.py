"""Multi-seed runner with a missing-input robustness sweep, driven by a fit config (the YAML ``attnfuse fit`` takes)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attnfuse.train.report import markdown_table
from attnfuse.train.runner import RunResult, mean_std, missing_input_sweep, run_config

__all__ = ["run_seeds"]


def _describe(config: Mapping[str, Any]) -> str:
    data, model = config.get("data") or {}, config.get("model") or {}
    fusion = model.get("baseline") or model.get("fusion", "early")
    if isinstance(fusion, Mapping):
        fusion = str(fusion.get("class_path", "?")).rsplit(".", 1)[-1]
    task = model.get("task")
    task = str(task.get("class_path", "?")).rsplit(".", 1)[-1] if isinstance(task, Mapping) else (task or "schema task")
    return f"{data.get('dataset', 'mfeat')}: {fusion} fusion, {task}"


def run_seeds(
    config: Mapping[str, Any], seeds: Sequence[int], *, max_missing: int = 1, max_epochs: int | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit and test ``config`` once per seed (split and initialisation), then sweep missing inputs.

    Every run goes through :func:`attnfuse.train.run_config`, i.e. the same parser and objects as
    ``attnfuse fit --config``: any key ``fit`` accepts works, anything else is an error.

    Args:
        config: a fit config as a mapping (``data``, ``model``, ``trainer``, ...).
        seeds: the seeds; each sets the split and everything random in training.
        max_missing: sweep every subset of up to this many inputs marked missing at test time.
        max_epochs: overrides ``trainer.max_epochs``.
        out_dir: where to write ``seeds.md`` (and each seed's run folder).

    Returns:
        ``{"metrics": {name: (mean, std)}, "sweep": {condition: (mean, std)}, "markdown": str, "runs": [RunResult]}``.

    Raises:
        ValueError: no seeds; any config error ``attnfuse fit`` would report.
    """
    if not seeds:
        raise ValueError("run_seeds needs at least one seed")
    runs: list[RunResult] = []
    for seed in seeds:
        run_dir = Path(out_dir) / f"seed_{seed}" if out_dir else None
        runs.append(run_config(config, seed=seed, max_epochs=max_epochs, out_dir=run_dir))
    test_keys = sorted(k for k in runs[0].metrics if k.startswith("test_"))
    metrics = {k: mean_std([r.metrics[k] for r in runs]) for k in test_keys}
    main_metric = runs[0].task.task.monitor[0]
    sweep: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for run in runs:
        for rec in missing_input_sweep(run.task, run.data, max_missing=max_missing):
            sweep[rec["missing"]].append(rec[main_metric])
    sweep_stats = {k: mean_std(v) for k, v in sweep.items()}
    table = markdown_table(["metric", f"mean ± std over {len(seeds)} seeds"],
                           [[k, f"{m:.4f} ± {s:.4f}"] for k, (m, s) in metrics.items()])
    sweep_table = markdown_table(["missing inputs", f"test {main_metric}"],
                                 [[", ".join(k) or "(none)", f"{m:.4f} ± {s:.4f}"] for k, (m, s) in sweep_stats.items()])
    epochs = max_epochs or (config.get("trainer") or {}).get("max_epochs", 20)
    markdown = (f"# {_describe(config)}, seeds {list(seeds)}, up to {epochs} epochs\n\n{table}\n\n"
                f"## Missing inputs at test time\n\n{sweep_table}\n")
    if out_dir:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "seeds.md").write_text(markdown)
    return {"metrics": metrics, "sweep": sweep_stats, "markdown": markdown, "runs": runs}
