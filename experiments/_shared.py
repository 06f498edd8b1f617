"""Shared helpers of the quality experiments (``experiments/<name>/run.py``): statistics, tables, READMEs.

Kept free of Lightning and of the training layer so that the experiments start quickly. Nothing here
is imported by the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RESULTS_SECTION", "add_run_arguments", "auroc", "fmt_mean_std", "markdown_table", "mean_std", "run_and_report", "run_seeds",
    "write_doc_section",
]

#: The section of each experiment's README.md that its script rewrites.
RESULTS_SECTION = "Results"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value); NaNs are dropped first."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"0.912 ± 0.004"`` (``"n/a"`` when every value is NaN)."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for detecting ``positive``; ties count one half.

    Computed from its definition, ``P(score_pos > score_neg) + 0.5 P(score_pos == score_neg)`` over
    all positive/negative pairs (``O(P·N)``, fine for a few thousand samples). NaN when one of the
    two classes is empty.

    Shapes:
        score ``(N,)`` float, positive ``(N,)`` bool -> float.
    """
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if score.shape != positive.shape:
        raise ValueError(f"score and positive must have the same length, got {score.shape} and {positive.shape}")
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()  # (P, N) pairs
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def write_doc_section(title: str, body: str, path: str | Path, *, header: str = "# Results\n") -> Path:
    """Put ``## {title}`` + ``body`` into the markdown file ``path``, replacing that section if present.

    The section runs from its ``## `` heading to the next ``## `` heading (or the end of the file);
    all other text is kept as it is. The file is created with ``header`` if absent.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else header
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every experiment script shares: ``--no-docs``, ``--json PATH``, ``--from-json PATH``."""
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite README / docs")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--from-json", default=None, help="write the report of a saved --json run (no training)")
    return parser


def run_and_report(
    args: argparse.Namespace,
    cfg: Any,
    run_experiment: Callable[[Any], Any],
    format_report: Callable[[Any, Any, str, float], str],
    *,
    command: str,
    argv: Sequence[str] | None = None,
    docs: Sequence[tuple[str, Path, str]],
) -> Any:
    """Run (or reload with ``--from-json``) an experiment, print its report and write it into its documents.

    Args:
        args: parsed options from a parser set up with :func:`add_run_arguments`.
        cfg: the experiment's config dataclass instance (rebuilt from the saved JSON with ``--from-json``).
        run_experiment: ``cfg -> results`` (JSON-serialisable).
        format_report: ``(results, cfg, command, seconds) -> markdown``.
        command: the script's command (``python -m experiments.<name>.run``); the options it ran with are appended.
        argv: the options passed to the script's ``main`` (``None``: ``sys.argv[1:]``).
        docs: ``(section title, path, header of a new file)`` for each document whose section is rewritten.
    Returns:
        The results.
    """
    extra = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([command, *extra])
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        cfg, results, command, seconds = type(cfg)(**saved["config"]), saved["results"], saved["command"], saved["seconds"]
    else:
        t0 = time.perf_counter()
        results = run_experiment(cfg)
        seconds = time.perf_counter() - t0
    report = format_report(results, cfg, command, seconds)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": dataclasses.asdict(cfg), "results": results, "command": command,
                                               "seconds": seconds}, indent=1))
    if not args.no_docs:
        for title, path, header in docs:
            write_doc_section(title, report, path, header=header)
    return results


def run_seeds(seeds: Sequence[int], run_seed: Callable[[int], Any], *, log: Callable[[str], Any] = print,
              label: str = "seed") -> list[Any]:
    """``[run_seed(s) for s in seeds]`` with torch single-threaded (restored afterwards), logging each seed's time."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for s in seeds:
            t0 = time.perf_counter()
            out.append(run_seed(s))
            log(f"{label} {s}: {time.perf_counter() - t0:.0f} s")
        return out
    finally:
        torch.set_num_threads(threads)
