"""Merged checkpoints: combine ``attnfuse fit`` checkpoints into one that ``attnfuse test`` / ``predict`` accept.

``attnfuse merge --models A.ckpt B.ckpt --method ot|average [--config fit.yaml] --output merged.ckpt``
(:func:`merge_checkpoints`). Every checkpoint is read through :func:`attnfuse.train.checkpoints.load_lightning_checkpoint`
(local, sha256-checked, ``weights_only=True``); the models are rebuilt from the checkpoints' own
hyperparameters, fused with :mod:`attnfuse.merge` (:func:`~attnfuse.merge.vanilla_average` or
:func:`~attnfuse.merge.ot_fuse`), and the anchor's checkpoint is written again (atomically, with its
``.sha256``) with the fused weights, without optimiser / scheduler / loop / callback states (a merged model
is evaluated or fine-tuned from its weights, not resumed) and with a ``"merge"`` record (method, options,
the sources' file names and sha256).

OT fusion with activation costs (``mode="acts"``, the default when a fit config is given) reads up to
``samples`` training samples of the config's data; without a config the weight-based cost (``"wts"``) is used.
Ensembling is not a checkpoint of one model, so the command offers ``ot`` and ``average`` only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from attnfuse.merge import ot_fuse, vanilla_average
from attnfuse.train.checkpoints import file_sha256, load_lightning_checkpoint, save_checked
from attnfuse.train.module import FusionTask

__all__ = ["merge_checkpoints"]

#: checkpoint entries that describe a training run's state, not the model: dropped from a merged checkpoint
RUN_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def _task(checkpoint: Mapping[str, Any], path: str) -> FusionTask:
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    try:
        task = FusionTask(**hparams)
        task.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"checkpoint {path!r}: cannot rebuild its model from its hyperparameters ({err})") from None
    return task.eval()


def _batches(config: Mapping[str, Any], samples: int) -> list[Any]:
    from attnfuse.train.datamodule import FusionDataModule

    data = dict(config.get("data") or {})
    dm = FusionDataModule(**data)
    dm.setup("fit")
    out, seen = [], 0
    for batch in dm.train_dataloader():
        out.append(batch["inputs"])
        seen += int(batch["target"].shape[0]) if hasattr(batch["target"], "shape") else len(batch["target"])
        if seen >= samples:
            break
    return out


def merge_checkpoints(
    models: Sequence[str | os.PathLike],
    *,
    output: str | os.PathLike,
    method: str = "average",
    config: Mapping[str, Any] | None = None,
    anchor: int = -1,
    mode: str | None = None,
    solver: str = "sinkhorn",
    reg: float = 0.08,
    residual: str = "mean",
    samples: int = 200,
    fixed: Sequence[str] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fuse the models of ``attnfuse fit`` checkpoints and write one checkpoint of the anchor's architecture.

    Args:
        models: two or more checkpoint files written by ``attnfuse fit``.
        output: the merged checkpoint (``<output>.sha256`` is written beside it).
        method: ``"average"`` (vanilla fusion: same architecture) or ``"ot"`` (optimal-transport fusion into
            the anchor's architecture; see :func:`attnfuse.merge.ot_fuse`).
        config: the fit config (the mapping of its YAML): its ``data`` section gives the activations of OT fusion.
        anchor: index of the anchor among ``models`` (its hyperparameters and neuron order are kept).
        mode: ``"acts"`` or ``"wts"`` OT cost (default: acts with a config, else wts).
        solver, reg, residual: as :func:`attnfuse.merge.ot_fuse`.
        samples: training samples used for activations.
        fixed: parameter-name prefixes of the model (``head.pool`` ...) averaged without alignment (OT only).
        overwrite: replace an existing ``output``.

    Returns:
        the ``"merge"`` record written into the checkpoint (plus ``"output"``).

    Raises:
        ValueError: fewer than two models, an unknown method, an existing output without ``overwrite``,
            a checkpoint whose model cannot be rebuilt, OT acts mode without a config.
        CheckpointError: a missing, damaged or foreign checkpoint.
    """
    paths = [os.fspath(p) for p in models]
    if len(paths) < 2:
        raise ValueError(f"--models needs two or more checkpoints, got {len(paths)}")
    if method not in ("ot", "average"):
        raise ValueError(f"--method must be 'ot' or 'average', got {method!r}")
    out_path = Path(output)
    if out_path.exists() and not overwrite:
        raise ValueError(f"--output {str(out_path)!r} exists; pass --overwrite to replace it")
    checkpoints = [load_lightning_checkpoint(p) for p in paths]
    anchor = anchor % len(paths)
    tasks = [_task(c, p) for c, p in zip(checkpoints, paths, strict=True)]
    record: dict[str, Any] = {"method": method, "anchor": anchor,
                              "sources": [{"file": Path(p).name, "sha256": file_sha256(p)} for p in paths]}
    if method == "average":
        order = [t.model for i, t in enumerate(tasks) if i != anchor] + [tasks[anchor].model]
        fused = vanilla_average(order)
    else:
        mode = mode or ("acts" if config else "wts")
        if mode == "acts" and not config:
            raise ValueError("--method ot with activation costs needs --config (its data gives the activations); "
                             "or use --mode wts")
        data = _batches(config, samples) if mode == "acts" else None
        with torch.no_grad():
            fused, report = ot_fuse([t.model for t in tasks], anchor=anchor, data=data, mode=mode, solver=solver,
                                    reg=reg, residual=residual, fixed=tuple(fixed))
        record.update({"mode": mode, "solver": solver, "reg": float(reg), "residual": residual, "fixed": list(fixed),
                       "ot_cost": {k: float(v) for k, v in report.costs[0 if anchor else 1].items()}})
    target = tasks[anchor]
    target.model = fused
    merged = {k: v for k, v in checkpoints[anchor].items() if k not in RUN_STATE}
    merged["state_dict"] = {k: v.detach().clone() for k, v in target.state_dict().items()}
    merged["merge"] = record
    save_checked(merged, out_path)
    return {**record, "output": str(out_path)}
