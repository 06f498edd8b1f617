"""Random-feature attention: learning a permutation-invariant target of the keys (labelled synthetic data).

Run: ``python -m experiments.random_feature.run`` from the repository root (a few minutes on one CPU core; prints
the tables, writes ``experiments/random_feature/output/*.png`` and rewrites the section "Results" of
``experiments/random_feature/README.md``; ``--no-docs`` only prints). Issue 9; spec
``shared/papers/random-feature-attention.md`` (Fu, Guo, Bai, Mei, NeurIPS 2023, arXiv 2307.11353), "Experiment".

Protocol (the spec's setup):

1. **Data** (synthetic): ``d = 8``, ``N = 8`` keys; ``x_0, x_1..x_N`` uniform on the sphere of radius ``sqrt(d)``;
   8,000 train / 2,000 validation / 4,000 test samples, drawn per seed. Targets, averages of a pairwise function
   over the keys (permutation invariant): ``exp``: ``(1/N) sum_i exp(2 cos(x_0, x_i))``; ``relu``:
   ``(1/N) sum_i relu(cos(x_0, x_i))``. Noiseless.
2. **Model**: :class:`attnfuse.nn.RandomFeatureAttention` with ``M = 128`` heads (the spec: 256, cut to fit the
   shared machine), ``W_m = c I + G_m`` frozen, count normalisation, value features ``[x_i; 1]`` (``M (d + 1) = 1,152``
   features). Arms: ``c = 0`` (zero mean)
   and ``c = 2`` ("2I + Gaussian"). The values are fitted in closed form (the model is linear in them): ridge on
   the features standardised with training statistics, float64, ``lambda`` picked on validation from
   ``{1e-9, 1e-8, ..., 1}`` (one Gram matrix, a Cholesky solve per ``lambda``).
3. **Metric**: relative test error ``mean((f - f*)^2) / var(f*)``.
4. **Sweeps** (exp target, same features): training samples ``n in {1k, 2k, 4k, 8k}`` (first n rows), heads
   ``M in {16, 32, 64, 128}`` (first M heads), and the mean ``c in {0, 0.5, 1, 2, 4}`` (new W per c).

Mean ± std over seeds 0, 1, 2 (the seed sets the data and W).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from attnfuse.nn import RandomFeatureAttention
from experiments._shared import RESULTS_SECTION, fmt_mean_std, markdown_table, write_doc_section

__all__ = ["TARGETS", "RFConfig", "features", "main", "ridge_path", "run_experiment", "sphere_data"]

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
OUTPUT = HERE / "output"
COMMAND = "python -m experiments.random_feature.run"


def _cos(x0: Tensor, xs: Tensor) -> Tensor:
    return torch.einsum("bd,bnd->bn", x0, xs) / (x0.norm(dim=-1, keepdim=True) * xs.norm(dim=-1))  # (B, N)


TARGETS = {
    "exp": lambda x0, xs: torch.exp(2 * _cos(x0, xs)).mean(-1),
    "relu": lambda x0, xs: torch.relu(_cos(x0, xs)).mean(-1),
}


@dataclass
class RFConfig:
    """Settings of the experiment (defaults = the documented run)."""

    seeds: Sequence[int] = (0, 1, 2)
    d: int = 8
    keys: int = 8
    heads: int = 128
    n_train: int = 8000
    n_val: int = 2000
    n_test: int = 4000
    means: Sequence[float] = (0.0, 2.0)
    sweep_n: Sequence[int] = (1000, 2000, 4000, 8000)
    sweep_heads: Sequence[int] = (16, 32, 64, 128)
    sweep_means: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0)
    lambdas: Sequence[float] = tuple(10.0**e for e in range(-9, 1))


def sphere_data(n: int, keys: int, d: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x_0 (n, d)``, ``xs (n, N, d)`` uniform on the sphere of radius ``sqrt(d)`` (float64, synthetic)."""
    x = torch.randn(n, keys + 1, d, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True) * math.sqrt(d)
    return x[:, 0], x[:, 1:]


def features(rfa: RandomFeatureAttention, x0: Tensor, xs: Tensor, chunk: int = 1000) -> Tensor:
    """``rfa.features`` in chunks ``(n, M (d + 1))``, ordered head by head."""
    with torch.no_grad():
        return torch.cat([rfa.features(x0[i:i + chunk], xs[i:i + chunk]) for i in range(0, len(x0), chunk)])


def ridge_path(ftr: Tensor, ytr: Tensor, fval: Tensor, yval: Tensor, fte: Tensor, yte: Tensor,
               lambdas: Sequence[float]) -> tuple[list[float], list[float]]:
    """Ridge on standardised features (train statistics) with an intercept; ``lambda`` chosen on validation.

    ``y*`` are ``(n, T)``: T targets share one Gram matrix. The penalty is ``n lambda |w|^2`` on the summed squared
    loss (a Cholesky solve per ``lambda``; a ``lambda`` whose system is numerically singular is skipped).
    Returns ``(relative test errors, chosen lambdas)``, one per target.
    """
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-12)
    z = lambda f: (f - mu) / sd  # noqa: E731
    ztr, y_mean = z(ftr), ytr.mean(0)
    zval, zte = z(fval), z(fte)
    gram, rhs = ztr.T @ ztr, ztr.T @ (ytr - y_mean)  # (p, p), (p, T)
    n, eye = len(ytr), torch.eye(gram.shape[0], dtype=gram.dtype)
    targets = ytr.shape[1]
    best = [(math.inf, math.nan, None)] * targets
    for lam in lambdas:
        chol, info = torch.linalg.cholesky_ex(gram + n * lam * eye)
        if int(info) != 0:
            continue
        w = torch.cholesky_solve(rhs, chol)  # (p, T)
        val = ((zval @ w + y_mean - yval) ** 2).mean(0)  # (T,)
        best = [(v, lam, w[:, t]) if v < b[0] else b for t, (v, b) in enumerate(zip(val.tolist(), best))]
    rel = [(((zte @ w + y_mean[t] - yte[:, t]) ** 2).mean() / yte[:, t].var()).item() for t, (_, _, w) in enumerate(best)]
    return rel, [lam for _, lam, _ in best]


def _split(cfg: RFConfig, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sizes = (cfg.n_train, cfg.n_val, cfg.n_test)
    return [sphere_data(n, cfg.keys, cfg.d, gen) for n in sizes]


def _cols(heads: int, d: int) -> slice:
    return slice(0, heads * (d + 1))


def run_experiment(cfg: RFConfig) -> dict[str, object]:
    """Main table, n / M / c sweeps for every seed. Returns raw results (JSON-able)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    main: dict[str, dict[float, list[float]]] = {t: {c: [] for c in cfg.means} for t in TARGETS}
    lams: dict[str, dict[float, list[float]]] = {t: {c: [] for c in cfg.means} for t in TARGETS}
    by_n = {c: {n: [] for n in cfg.sweep_n} for c in cfg.means}
    by_m = {c: {m: [] for m in cfg.sweep_heads} for c in cfg.means}
    by_c = {c: [] for c in cfg.sweep_means}
    try:
        for seed in cfg.seeds:
            (tr, va, te) = _split(cfg, seed)
            ys = [torch.stack([fn(*part) for fn in TARGETS.values()], -1) for part in (tr, va, te)]  # (n, T) each
            ye = [y[:, :1] for y in ys]  # the exp target
            for c in sorted(set(cfg.means) | set(cfg.sweep_means)):
                rfa = RandomFeatureAttention(cfg.d, cfg.heads, qk_mean=c, seed=1000 + seed, dtype=torch.float64)
                f = [features(rfa, *part) for part in (tr, va, te)]
                if c not in cfg.means:
                    by_c[c].append(ridge_path(f[0], ye[0], f[1], ye[1], f[2], ye[2], cfg.lambdas)[0][0])
                    continue
                rels, lam = ridge_path(f[0], ys[0], f[1], ys[1], f[2], ys[2], cfg.lambdas)
                for t, rel, la in zip(TARGETS, rels, lam):
                    main[t][c].append(rel)
                    lams[t][c].append(la)
                if c in cfg.sweep_means:
                    by_c[c].append(rels[0])
                for n in cfg.sweep_n:
                    by_n[c][n].append(rels[0] if n == len(f[0]) else
                                      ridge_path(f[0][:n], ye[0][:n], f[1], ye[1], f[2], ye[2], cfg.lambdas)[0][0])
                for m in cfg.sweep_heads:
                    cols = _cols(m, cfg.d)
                    by_m[c][m].append(rels[0] if m == cfg.heads else
                                      ridge_path(f[0][:, cols], ye[0], f[1][:, cols], ye[1], f[2][:, cols], ye[2], cfg.lambdas)[0][0])
    finally:
        torch.set_num_threads(threads)
    return {"main": main, "lambdas": lams, "by_n": by_n, "by_heads": by_m, "by_mean": by_c}


def _label(c: float) -> str:
    return "zero mean (c = 0)" if c == 0 else f"{c:g}I + Gaussian (c = {c:g})"


def _plots(res: dict, cfg: RFConfig, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    for c in cfg.means:
        axes[0].plot(list(cfg.sweep_n), [mean(res["by_n"][c][n]) for n in cfg.sweep_n], marker="o", label=_label(c))
        axes[1].plot(list(cfg.sweep_heads), [mean(res["by_heads"][c][m]) for m in cfg.sweep_heads], marker="o", label=_label(c))
    axes[2].plot(list(cfg.sweep_means), [mean(res["by_mean"][c]) for c in cfg.sweep_means], marker="o")
    for ax, xl in zip(axes, ("training samples n", "heads M", "mean c of W = cI + G")):
        ax.set_xlabel(xl)
        ax.set_ylabel("relative test error")
        ax.set_yscale("log")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    axes[0].set_title(f"exp target, M = {cfg.heads}")
    axes[1].set_title(f"exp target, n = {cfg.n_train}")
    axes[2].set_title(f"exp target, M = {cfg.heads}, n = {cfg.n_train}")
    fig.tight_layout()
    path = out / "excess_risk.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def format_report(res: dict, cfg: RFConfig, command: str, seconds: float) -> str:
    rows = []
    for t in TARGETS:
        vals = [fmt_mean_std(res["main"][t][c], 4) for c in cfg.means]
        m = [sum(res["main"][t][c]) / len(res["main"][t][c]) for c in cfg.means]
        rows.append([t, *vals, f"{m[0] / m[-1]:.1f}" if len(m) > 1 else "—"])
    table = markdown_table(["target"] + [_label(c) for c in cfg.means] + ["ratio first / last"], rows)
    n_rows = [[_label(c)] + [fmt_mean_std(res["by_n"][c][n], 4) for n in cfg.sweep_n] for c in cfg.means]
    m_rows = [[_label(c)] + [fmt_mean_std(res["by_heads"][c][m], 4) for m in cfg.sweep_heads] for c in cfg.means]
    c_rows = [["relative test error"] + [fmt_mean_std(res["by_mean"][c], 4) for c in cfg.sweep_means]]
    return (
        f"Command: `{command}` ({seconds:.0f} s on the shared 2-core CPU machine, torch single-threaded; torch "
        f"{torch.__version__}). Labelled synthetic. Mean ± std over seeds {list(cfg.seeds)}; d = {cfg.d}, N = {cfg.keys} keys, "
        f"M = {cfg.heads} heads, {cfg.n_train} / {cfg.n_val} / {cfg.n_test} train / validation / test, ridge λ chosen on "
        "validation. Relative test error `mean((f − f*)²) / var(f*)`.\n\n"
        f"### Zero-mean vs non-zero-mean query–key sampling\n\n{table}\n\n"
        f"### Exp target: excess risk vs training samples (M = {cfg.heads})\n\n"
        f"{markdown_table(['W'] + [f'n = {n}' for n in cfg.sweep_n], n_rows)}\n\n"
        f"### Exp target: excess risk vs heads (n = {cfg.n_train})\n\n"
        f"{markdown_table(['W'] + [f'M = {m}' for m in cfg.sweep_heads], m_rows)}\n\n"
        f"### Exp target: the mean c of W = cI + G\n\n{markdown_table([''] + [f'c = {c:g}' for c in cfg.sweep_means], c_rows)}\n\n"
        "![excess risk](output/excess_risk.png)\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite the README's Results or the plot")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    cfg = RFConfig(seeds=tuple(args.seeds))
    command = COMMAND + ("" if list(args.seeds) == [0, 1, 2] else " --seeds " + " ".join(map(str, args.seeds)))
    t0 = time.perf_counter()
    res = run_experiment(cfg)
    report = format_report(res, cfg, command, time.perf_counter() - t0)
    print(f"## {RESULTS_SECTION}\n\n{report}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), **res}, f, indent=1, default=str)
    if not args.no_docs:
        _plots(res, cfg, OUTPUT)
        print(f"\nwrote section {RESULTS_SECTION!r} of {write_doc_section(RESULTS_SECTION, report, README)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
