"""Plots and markdown tables for experiment reports (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["markdown_table", "plot_attention_heatmap", "plot_missing_curve"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_missing_curve(curves: Mapping[str, Sequence[tuple[int, float, float]]], path: str | Path, *,
                       ylabel: str = "test accuracy", title: str = "") -> Path:
    """Metric vs number of missing inputs, one line per method; points are ``(m, mean, std)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in curves.items():
        m, mean, std = (np.array(v) for v in zip(*pts))
        ax.errorbar(m, mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xlabel("number of missing inputs (averaged over every subset of that size)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attention_heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | Path, *,
                           title: str = "", xlabel: str = "input", ylabel: str = "class") -> Path:
    """A heatmap with the value printed in every cell."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cols), 1.0 + 0.4 * len(rows)))
    im = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
