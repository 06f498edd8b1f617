"""In-context linear regression with one multi-head softmax attention layer (labelled synthetic data).

Run: ``python -m experiments.icl_regression.run`` from the repository root (a few minutes on one CPU core; prints
the tables, writes the plots to ``experiments/icl_regression/output/`` and rewrites the section "Results" of
``experiments/icl_regression/README.md``; ``--no-docs`` only prints). Issue 9; spec
``shared/papers/icl-linear-regression.md`` (He, Pan, Chen, Yang 2025, arXiv 2503.12734), "Experiment".

Protocol (the spec's setup):

1. **Data** (synthetic): ``x_l ~ N(0, I_d)``, ``beta ~ N(0, I_d)`` per prompt, ``y_l = beta^T x_l + eps``,
   ``eps ~ N(0, sigma^2)``; ``d = 5``, ``sigma = 0.5``; ``L = 20`` context pairs in training; tokens
   ``z_l = [x_l; y_l]``, query ``z_q = [x_q; 0]``; target ``y_q``.
2. **Model** (merged parametrisation): ``y_hat = sum_h OV_h . sum_l z_l softmax_l(z_l^T KQ_h z_q)``, ``KQ_h``
   ``(d+1) x (d+1)``, ``OV_h`` ``(d+1)``, init ``N(0, 0.1^2)``; the query attends to the ``L`` context tokens
   only (not itself). The attention is :func:`attnfuse.ops.kernel_attention` (``q = KQ_h z_q``, ``k = v = z_l``,
   scale 1): ``similarity="softmax"`` and, as linear-attention arms, ``"linear"`` with ``normalize="none"``
   and ``"count"``. ``H in {1, 2, 4, 8}`` softmax heads, 4 heads for the linear arms.
3. **Training**: Adam lr 3e-3 with cosine decay, 3,000 steps of 256 fresh prompts (the spec: 6,000 x 512, a quarter
   of the compute, cut to fit the shared machine), squared loss.
4. **Test**: 20,000 fixed prompts at ``L in {5, 10, 20, 40, 80}`` (2x and 4x the training length included).
   Baselines on the same prompts: one-step GD ``eta (1/L) sum y_l x_l^T x_q`` and debiased GD (``x_l - x_bar``),
   each with the best ``eta`` for that L (least squares on the test prompts) and one-step GD with ``eta`` fixed at
   its L = 20 optimum; ridge with ``lambda = sigma^2`` (the Bayes posterior mean, the lower bound).
5. **Patterns** of the trained 4-head softmax model: per head the KQ diagonal mean ``omega_h`` over the top-left
   ``d x d`` block, off-diagonal max / diagonal, the label entry ``mu_h = OV_h[d]`` and its share of ``|OV_h|``,
   ``sum_h mu_h`` vs ``sum_h |mu_h|``, sign agreement of ``omega_h`` and ``mu_h``, ``eta = sum_h mu_h omega_h``
   vs the best debiased-GD step. The query-label column ``KQ[:, d]`` is dead (it multiplies the query's 0 label)
   and is left out.

Mean ± std over seeds 0, 1, 2 (the seed sets the initialisation and the training prompts; the test prompts are
fixed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from attnfuse.ops import kernel_attention
from experiments._shared import RESULTS_SECTION, fmt_mean_std, markdown_table, write_doc_section

__all__ = ["ICLConfig", "ICLRegression", "baselines", "main", "make_prompts", "pattern_report", "run_experiment"]

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
OUTPUT = HERE / "output"
COMMAND = "python -m experiments.icl_regression.run"


@dataclass
class ICLConfig:
    """Settings of the experiment (defaults = the documented run)."""

    seeds: Sequence[int] = (0, 1, 2)
    d: int = 5
    sigma: float = 0.5
    train_len: int = 20
    test_lens: Sequence[int] = (5, 10, 20, 40, 80)
    n_test: int = 20_000
    steps: int = 3_000
    batch: int = 256
    lr: float = 3e-3
    init_std: float = 0.1
    arms: dict[str, tuple[str, str, int]] = field(default_factory=lambda: {
        # name: (similarity, normalize, heads)
        "1 head": ("softmax", "sum", 1), "2 heads": ("softmax", "sum", 2), "4 heads": ("softmax", "sum", 4),
        "8 heads": ("softmax", "sum", 8), "linear, unnormalised (4 heads)": ("linear", "none", 4),
        "linear, 1/L (4 heads)": ("linear", "count", 4),
    })


def make_prompts(n: int, length: int, d: int, sigma: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x (n, L, d), y (n, L), x_q (n, d), y_q (n,))`` from random linear tasks (synthetic)."""
    beta = torch.randn(n, d, generator=gen)
    x = torch.randn(n, length + 1, d, generator=gen)
    y = torch.einsum("nld,nd->nl", x, beta) + sigma * torch.randn(n, length + 1, generator=gen)
    return x[:, :-1], y[:, :-1], x[:, -1], y[:, -1]


class ICLRegression(nn.Module):
    """One attention layer in the merged parametrisation: ``KQ (H, d+1, d+1)``, ``OV (H, d+1)``.

    Shapes: ``forward(x (B, L, d), y (B, L), x_q (B, d)) -> (B,)``.
    """

    def __init__(self, d: int, heads: int, *, similarity: str = "softmax", normalize: str = "sum", init_std: float = 0.1,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.similarity, self.normalize = similarity, normalize
        self.KQ = nn.Parameter(init_std * torch.randn(heads, d + 1, d + 1, generator=generator))
        self.OV = nn.Parameter(init_std * torch.randn(heads, d + 1, generator=generator))

    def forward(self, x: Tensor, y: Tensor, x_q: Tensor) -> Tensor:
        z = torch.cat([x, y.unsqueeze(-1)], -1)  # (B, L, d+1)
        z_q = torch.cat([x_q, x_q.new_zeros(x_q.shape[0], 1)], -1)  # (B, d+1)
        q = torch.einsum("hab,nb->nha", self.KQ, z_q).unsqueeze(2)  # (B, H, 1, d+1): KQ_h z_q
        kv = z.unsqueeze(1).expand(-1, self.KQ.shape[0], -1, -1)  # (B, H, L, d+1)
        out = kernel_attention(q, kv, kv, similarity=self.similarity, normalize=self.normalize, scale=1.0)  # (B, H, 1, d+1)
        return torch.einsum("nhc,hc->n", out[:, :, 0], self.OV)  # (B,)


def baselines(x: Tensor, y: Tensor, x_q: Tensor, y_q: Tensor, sigma: float, eta_gd_fixed: float | None = None) -> dict[str, float]:
    """Test MSE of the reference predictors on one prompt set (float64), and the best steps."""
    x, y, x_q, y_q = (t.double() for t in (x, y, x_q, y_q))
    length, d = x.shape[1], x.shape[2]
    gd1 = torch.einsum("nl,nld,nd->n", y, x, x_q) / length  # one-step GD from 0 with eta = 1
    deb1 = torch.einsum("nl,nld,nd->n", y, x - x.mean(1, keepdim=True), x_q) / length
    res = {}
    for name, pred in (("gd", gd1), ("debiased_gd", deb1)):
        eta = float((pred * y_q).sum() / (pred * pred).sum())  # least-squares best step
        res[f"{name}_eta"] = eta
        res[name] = float(((eta * pred - y_q) ** 2).mean())
    if eta_gd_fixed is not None:
        res["gd_fixed"] = float(((eta_gd_fixed * gd1 - y_q) ** 2).mean())
    gram = x.transpose(1, 2) @ x + sigma**2 * torch.eye(d, dtype=x.dtype)  # (n, d, d)
    beta = torch.linalg.solve(gram, torch.einsum("nld,nl->nd", x, y))  # Bayes posterior mean
    res["ridge"] = float((((beta * x_q).sum(-1)) - y_q).pow(2).mean())
    return res


def pattern_report(model: ICLRegression) -> dict[str, object]:
    """KQ / OV pattern metrics of a trained model (see the module docstring, step 5)."""
    kq, ov = model.KQ.detach().double(), model.OV.detach().double()
    d = kq.shape[-1] - 1
    block = kq[:, :d, :d]  # (H, d, d): x-x part (query-label column and label row left out)
    omega = block.diagonal(dim1=-2, dim2=-1).mean(-1)  # (H,)
    off = (block - torch.diag_embed(block.diagonal(dim1=-2, dim2=-1))).abs().amax((-2, -1))  # (H,)
    mu = ov[:, d]
    return {
        "omega": omega.tolist(), "mu": mu.tolist(),
        "offdiag_over_diag": float(off.max() / omega.abs().min()),
        "label_row_max": float(kq[:, d, :d].abs().max()),  # labels entering the scores (pattern: 0)
        "ov_x_max": float(ov[:, :d].abs().max()),
        "ov_last_share": float((mu.abs() / ov.abs().sum(-1)).min()),
        "sum_mu": float(mu.sum()), "sum_abs_mu": float(mu.abs().sum()),
        "signs_agree": bool(((omega > 0) == (mu > 0)).all()),
        "eta": float((mu * omega).sum()),
    }


def _train(cfg: ICLConfig, similarity: str, normalize: str, heads: int, seed: int) -> ICLRegression:
    gen = torch.Generator().manual_seed(seed)
    model = ICLRegression(cfg.d, heads, similarity=similarity, normalize=normalize, init_std=cfg.init_std, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    for _ in range(cfg.steps):
        x, y, x_q, y_q = make_prompts(cfg.batch, cfg.train_len, cfg.d, cfg.sigma, gen)
        loss = (model(x, y, x_q) - y_q).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def run_experiment(cfg: ICLConfig) -> dict[str, object]:
    """Train every arm for every seed; evaluate on fixed test prompts. Returns raw results (JSON-able)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        test = {length: make_prompts(cfg.n_test, length, cfg.d, cfg.sigma, torch.Generator().manual_seed(10_000 + length))
                for length in cfg.test_lens}
        ref_len = cfg.train_len if cfg.train_len in test else cfg.test_lens[0]
        eta_fixed = baselines(*test[ref_len], cfg.sigma)["gd_eta"]
        base = {length: baselines(*test[length], cfg.sigma, eta_fixed) for length in cfg.test_lens}
        errors: dict[str, dict[int, list[float]]] = {arm: {length: [] for length in cfg.test_lens} for arm in cfg.arms}
        patterns, models = [], {}
        for seed in cfg.seeds:
            for arm, (sim, norm, heads) in cfg.arms.items():
                model = _train(cfg, sim, norm, heads, seed)
                with torch.no_grad():
                    for length, (x, y, x_q, y_q) in test.items():
                        errors[arm][length].append(float((model(x, y, x_q) - y_q).square().mean()))
                if arm == "4 heads":
                    patterns.append(pattern_report(model))
                    models.setdefault(arm, model)
    finally:
        torch.set_num_threads(threads)
    return {"errors": errors, "baselines": base, "patterns": patterns, "eta_gd_fixed": eta_fixed, "models": models}


def _one_seed(cfg: ICLConfig, seed: int) -> dict:
    return run_experiment(dataclasses.replace(cfg, seeds=(seed,)))


def run_parallel(cfg: ICLConfig, workers: int) -> dict[str, object]:
    """:func:`run_experiment` with the seeds in ``workers`` spawned processes (the same numbers as one process)."""
    if workers <= 1 or len(cfg.seeds) <= 1:
        return run_experiment(cfg)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(cfg.seeds))) as pool:
        parts = pool.starmap(_one_seed, [(cfg, seed) for seed in cfg.seeds])
    merged = dict(parts[0])
    merged["errors"] = {a: {n: [x for p in parts for x in p["errors"][a][n]] for n in cfg.test_lens} for a in cfg.arms}
    merged["patterns"] = [x for p in parts for x in p["patterns"]]
    return merged


def _plots(res: dict, cfg: ICLConfig, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    model = res["models"].get("4 heads")
    if model is not None:
        kq, ov = model.KQ.detach(), model.OV.detach()
        heads = kq.shape[0]
        fig, axes = plt.subplots(1, heads + 1, figsize=(3 * (heads + 1), 3))
        lim = float(kq.abs().max())
        for h in range(heads):
            im = axes[h].imshow(kq[h], cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[h].set_title(f"KQ head {h + 1}")
            axes[h].set_xlabel("query entry (last: label, dead)")
            axes[h].set_ylabel("key entry (last: label)")
        fig.colorbar(im, ax=axes[heads - 1])
        ax = axes[heads]
        width = 0.8 / heads
        for h in range(heads):
            ax.bar(torch.arange(cfg.d + 1) + h * width, ov[h], width=width, label=f"head {h + 1}")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title("OV per head (last entry: label)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "patterns.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    lens = list(cfg.test_lens)
    for arm in res["errors"]:
        means = [sum(v) / len(v) for v in (res["errors"][arm][n] for n in lens)]
        ax.plot(lens, means, marker="o", label=arm)
    for key, label, style in (("gd", "best one-step GD", "--"), ("debiased_gd", "best debiased GD", "--"),
                              ("gd_fixed", "one-step GD, eta fixed at L=20", ":"), ("ridge", "ridge = Bayes", "-.")):
        ax.plot(lens, [res["baselines"][n][key] for n in lens], ls=style, color="k" if key == "ridge" else None, label=label)
    ax.axvline(cfg.train_len, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(lens, [str(n) for n in lens])
    ax.set_xlabel("in-context examples L (trained at 20)")
    ax.set_ylabel("test MSE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "error_vs_length.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def format_report(res: dict, cfg: ICLConfig, command: str, seconds: float) -> str:
    lens = list(cfg.test_lens)
    rows = [[arm] + [fmt_mean_std(res["errors"][arm][n]) for n in lens] for arm in cfg.arms]
    b = res["baselines"]
    rows += [
        ["best one-step GD (eta re-tuned per L: " + " / ".join(f"{b[n]['gd_eta']:.2f}" for n in lens) + ")"]
        + [f"{b[n]['gd']:.3f}" for n in lens],
        ["best debiased GD (eta: " + " / ".join(f"{b[n]['debiased_gd_eta']:.2f}" for n in lens) + ")"]
        + [f"{b[n]['debiased_gd']:.3f}" for n in lens],
        [f"one-step GD, eta fixed at the L = {cfg.train_len} optimum ({res['eta_gd_fixed']:.2f})"]
        + [f"{b[n]['gd_fixed']:.3f}" for n in lens],
        ["ridge, lambda = sigma^2 (Bayes)"] + [f"{b[n]['ridge']:.3f}" for n in lens],
    ]
    table = markdown_table(["predictor"] + [f"L = {n}" for n in lens], rows)

    def mean(arm, n):
        v = res["errors"][arm][n]
        return sum(v) / len(v)

    ratio_rows = []
    if "4 heads" in cfg.arms and "1 head" in cfg.arms:
        ratio_rows = [["4 heads / best one-step GD"] + [f"{mean('4 heads', n) / b[n]['gd']:.3f}" for n in lens],
                      ["1 head / 4 heads"] + [f"{mean('1 head', n) / mean('4 heads', n):.2f}" for n in lens]]
    ratios = markdown_table(["ratio"] + [f"L = {n}" for n in lens], ratio_rows) if ratio_rows else ""
    pat_rows = []
    for seed, p in zip(cfg.seeds, res["patterns"]):
        deb = b[cfg.train_len]["debiased_gd_eta"] if cfg.train_len in b else math.nan
        pat_rows.append([
            seed, ", ".join(f"{w:+.2f}" for w in p["omega"]), f"{p['offdiag_over_diag']:.2f}",
            ", ".join(f"{m:+.2f}" for m in p["mu"]), f"{p['sum_mu']:+.3f} / {p['sum_abs_mu']:.2f}",
            "yes" if p["signs_agree"] else "no", f"{p['eta']:.2f} / {deb:.2f}", f"{p['ov_x_max']:.2f}", f"{p['label_row_max']:.2f}",
        ])
    patterns = markdown_table(["seed", "KQ diagonal ω_h", "off-diag / diag", "OV label entry μ_h", "Σμ / Σ abs(μ)",
                               "sign ω = sign μ", "η = Σ μω / best debiased", "max OV x-entry", "max KQ label row"], pat_rows)
    return (
        f"Command: `{command}` ({seconds:.0f} s on the shared 2-core CPU machine, torch single-threaded; torch "
        f"{torch.__version__}). Labelled synthetic. Mean ± std over seeds {list(cfg.seeds)}; d = {cfg.d}, σ = {cfg.sigma}, "
        f"trained at L = {cfg.train_len} ({cfg.steps} steps × {cfg.batch} prompts), {cfg.n_test} fixed test prompts per L.\n\n"
        f"### Test MSE vs number of in-context examples\n\n{table}\n\n{ratios}\n\n"
        f"![error vs length](output/error_vs_length.png)\n\n"
        f"### Learned patterns (4 softmax heads, per seed)\n\n{patterns}\n\n![KQ and OV](output/patterns.png)\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=1, help="processes, one seed each (numbers do not change)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite the README's Results or the plots")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    cfg = ICLConfig(seeds=tuple(args.seeds), steps=args.steps)
    command = COMMAND + ("" if list(args.seeds) == [0, 1, 2] else " --seeds " + " ".join(map(str, args.seeds)))
    command += "" if args.steps == 3000 else f" --steps {args.steps}"
    command += "" if args.workers == 1 else f" --workers {args.workers}"
    t0 = time.perf_counter()
    res = run_parallel(cfg, args.workers)
    report = format_report(res, cfg, command, time.perf_counter() - t0)
    print(f"## {RESULTS_SECTION}\n\n{report}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), **{k: v for k, v in res.items() if k != "models"}}, f, indent=1, default=str)
    if not args.no_docs:
        _plots(res, cfg, OUTPUT)
        print(f"\nwrote section {RESULTS_SECTION!r} of {write_doc_section(RESULTS_SECTION, report, README)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
