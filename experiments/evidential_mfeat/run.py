"""Evidential (Dempster–Shafer) fusion on mfeat with one view corrupted on half of the test set.

Run: ``python -m experiments.evidential_mfeat.run`` from the repository root (one to two minutes on one
CPU core; prints the tables and rewrites the section "Results" of ``experiments/evidential_mfeat/README.md``;
``--no-docs`` only prints). Issue 6, experiment 1; spec ``shared/papers/mefn.md`` ("Experiment").

Protocol (per seed):

1. mfeat (2,000 digits, 6 views, 10 classes), stratified split ``make_split(val_fraction=0,
   test_fraction=0.3, seed)`` → 1,400 train / 600 test; each view standardised with train statistics.
2. **Evidential heads, TMC-style joint training.** One MLP per view (``F_v → 64 → 10``, ReLU,
   dropout 0.1), evidence ``softplus``, ``alpha_v = e_v + 1``; the six opinions are fused with
   :class:`attnfuse.fusion.DempsterFusion` (reduced Dempster rule) and the loss is
   ``sum_v L(alpha_v) + L(alpha_fused)`` with ``L = attnfuse.losses.evidential_loss`` (expected CE +
   KL on the misleading evidence, weight ``min(1, epoch / 50)``), as in TMC / MEFN.
3. **Baselines.** (a) six per-view MLPs of the same shape trained alone with cross-entropy, fused by
   averaging their softmax probabilities; (b) a concat-MLP (``699 → 128 → 10``) trained with
   cross-entropy on all views concatenated. Same optimiser for all: Adam, lr 3e-3, weight decay
   1e-5, batch 100, 100 epochs, no early stopping.
4. **Corruption.** A seeded random half of the test set gets Gaussian noise of std ``noise_std``
   (3 by default, in units of the train standard deviation) added to **one** view; this is done for
   each of the six views in turn, and the corrupted-half numbers are averaged over the six views.
   The clean half is identical in all six runs.
5. **Metrics.** Accuracy on the clean and corrupted halves; AUROC of each method's uncertainty for
   detecting its own misclassified samples (per half); AUROC of the uncertainty for telling
   corrupted from clean samples (whole test set). Uncertainty: fused ``u = K / S`` for Dempster,
   ``1 − max p`` for the probability averages and the concat-MLP (and, as a second row for the
   same Dempster predictions, ``1 − max`` of the fused expected probability ``alpha / S``).

Two settings: all six views, and two views only (``pix`` + ``fou``, the spec's stand-in for MEFN's
PET/CT pair), where one corrupted view is half of the evidence. Mean ± sample std over 3 seeds (the
seed sets the split, the initialisation, the batches, the corrupted half and the noise).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.data import load_mfeat, make_split
from attnfuse.fusion import DempsterFusion, TokenSet
from attnfuse.losses import evidential_loss, kl_annealing_coefficient
from experiments._shared import RESULTS_SECTION, auroc, fmt_mean_std, markdown_table, write_doc_section

__all__ = ["METHODS", "READING", "SETTINGS", "EvidentialConfig", "format_report", "format_table", "main", "run_experiment", "run_seed"]

README = Path(__file__).resolve().parent / "README.md"
COMMAND = "python -m experiments.evidential_mfeat.run"
METHODS = {
    "dempster": "Dempster fusion of evidential heads (u = K/S)",
    "dempster_maxp": "Dempster fusion of evidential heads (1 − max α/S)",
    "evid_mean": "mean of the evidential heads' probabilities α/S (1 − max p)",
    "softmax_mean": "mean of softmax of CE-trained per-view MLPs (1 − max p)",
    "concat": "concat-MLP, CE-trained (1 − max softmax)",
}
METRICS = ("acc_clean", "acc_corrupt", "auroc_err_clean", "auroc_err_corrupt", "auroc_corrupt_vs_clean")


@dataclass
class EvidentialConfig:
    """Settings of the experiment (defaults = the documented run)."""

    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 100
    anneal_epochs: int = 50
    hidden: int = 64
    concat_hidden: int = 128
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 100
    noise_std: float = 3.0
    test_fraction: float = 0.3
    views: Sequence[str] | None = None  # None: all six
    subsample: int | None = None  # use only this many samples (smoke tests)


def _mlp(d_in: int, hidden: int, k: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, k))


class PerViewHeads(nn.Module):
    """One MLP per view: ``{view: (B, F_v)} -> {view: (B, K)}`` raw outputs."""

    def __init__(self, dims: dict[str, int], hidden: int, k: int, dropout: float) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({v: _mlp(d, hidden, k, dropout) for v, d in dims.items()})

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        return {v: head(x[v]) for v, head in self.heads.items()}


def _fuse(fusion: DempsterFusion, raw: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Fused alpha ``(B, K)``, per-view alpha ``{v: (B, K)}`` and fused ``u`` ``(B,)``."""
    out = fusion({v: TokenSet(r[:, None, :]) for v, r in raw.items()}, return_weights=True)  # one token per sample
    per_view = {v: ts.x[:, 0] for v, ts in out.per_source.items()}
    return out.fused.x[:, 0], per_view, out.weights["uncertainty"][:, 0, 0]


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def _train(model: nn.Module, loss_fn, x: dict[str, Tensor], y: Tensor, cfg: EvidentialConfig, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(cfg.epochs):
        kl = kl_annealing_coefficient(epoch + 1, cfg.anneal_epochs)
        for idx in _batches(len(y), cfg.batch_size, gen):
            loss = loss_fn(model, {v: t[idx] for v, t in x.items()}, y[idx], kl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def _predict(probs_or_alpha: Tensor) -> Tensor:
    return probs_or_alpha.argmax(-1)


@functools.lru_cache(maxsize=2)
def _mfeat(views: tuple[str, ...] | None):
    return load_mfeat(views=views)


def _load(cfg: EvidentialConfig, seed: int):
    data = _mfeat(None if cfg.views is None else tuple(cfg.views))
    labels = data.labels
    keep = np.arange(len(labels))
    if cfg.subsample is not None and cfg.subsample < len(labels):  # a random subset (smoke tests)
        keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[: cfg.subsample])
    labels = labels[keep]
    split = make_split(val_fraction=0.0, test_fraction=cfg.test_fraction, seed=seed, stratify=labels)
    xs_train, xs_test = {}, {}
    for v, arr in data.views.items():
        arr = arr[keep].astype(np.float64)
        mu, sd = arr[split.train].mean(0), arr[split.train].std(0)
        sd = np.where(sd > 1e-8, sd, 1.0)  # constant features stay 0
        z = ((arr - mu) / sd).astype(np.float32)
        xs_train[v], xs_test[v] = torch.from_numpy(z[split.train]), torch.from_numpy(z[split.test])
    y_train, y_test = torch.from_numpy(labels[split.train]), torch.from_numpy(labels[split.test])
    return xs_train, y_train, xs_test, y_test, len(data.class_names)


def run_seed(cfg: EvidentialConfig, seed: int) -> dict:
    """Train every model for one seed and evaluate every corruption; returns nested metrics."""
    x_tr, y_tr, x_te, y_te, k = _load(cfg, seed)
    views = list(x_tr)
    dims = {v: t.shape[1] for v, t in x_tr.items()}
    fusion = DempsterFusion(views, num_classes=k)

    def evidential_objective(model, xb, yb, kl):
        alpha_f, per_view, _ = _fuse(fusion, model(xb))
        loss = evidential_loss(alpha_f, yb, kl_weight=kl)
        return loss + sum(evidential_loss(a, yb, kl_weight=kl) for a in per_view.values())

    def ce_per_view(model, xb, yb, kl):
        return sum(F.cross_entropy(o, yb) for o in model(xb).values())

    def ce_concat(model, xb, yb, kl):
        return F.cross_entropy(model(torch.cat([xb[v] for v in views], dim=1)), yb)

    torch.manual_seed(seed)
    evidential = PerViewHeads(dims, cfg.hidden, k, cfg.dropout)
    softmax_heads = PerViewHeads(dims, cfg.hidden, k, cfg.dropout)
    concat = _mlp(sum(dims.values()), cfg.concat_hidden, k, cfg.dropout)
    t0 = time.perf_counter()
    _train(evidential, evidential_objective, x_tr, y_tr, cfg, seed)
    _train(softmax_heads, ce_per_view, x_tr, y_tr, cfg, seed + 1000)
    _train(concat, ce_concat, x_tr, y_tr, cfg, seed + 2000)
    train_s = time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(x: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """{method: (prediction (N,), uncertainty (N,))}."""
        alpha_f, per_view, u = _fuse(fusion, evidential(x))
        p_evid = torch.stack([a / a.sum(-1, keepdim=True) for a in per_view.values()]).mean(0)
        p_soft = torch.stack([o.softmax(-1) for o in softmax_heads(x).values()]).mean(0)
        p_cat = concat(torch.cat([x[v] for v in views], dim=1)).softmax(-1)
        p_f = alpha_f / alpha_f.sum(-1, keepdim=True)
        out = {"dempster": (_predict(alpha_f), u), "dempster_maxp": (_predict(alpha_f), 1 - p_f.max(-1).values)}
        for name, p in (("evid_mean", p_evid), ("softmax_mean", p_soft), ("concat", p_cat)):
            out[name] = (_predict(p), 1 - p.max(-1).values)
        return out

    n_test = len(y_te)
    gen = np.random.default_rng(10_000 + seed)
    corrupt = np.zeros(n_test, dtype=bool)
    corrupt[gen.permutation(n_test)[: n_test // 2]] = True
    clean = ~corrupt
    y = y_te.numpy()

    def metrics(pred: Tensor, unc: Tensor) -> dict[str, float]:
        err, u = pred.numpy() != y, unc.numpy().astype(np.float64)
        return {
            "acc_clean": float(1 - err[clean].mean()), "acc_corrupt": float(1 - err[corrupt].mean()),
            "auroc_err_clean": auroc(u[clean], err[clean]), "auroc_err_corrupt": auroc(u[corrupt], err[corrupt]),
            "auroc_corrupt_vs_clean": auroc(u, corrupt),
            "errors_clean": int(err[clean].sum()), "errors_corrupt": int(err[corrupt].sum()),
        }

    per_view_result: dict[str, dict[str, dict[str, float]]] = {}
    for i, view in enumerate(views):
        noise = np.random.default_rng([seed, i]).standard_normal(x_te[view].shape).astype(np.float32)
        x_c = dict(x_te)
        x_c[view] = x_te[view] + torch.from_numpy(np.where(corrupt[:, None], cfg.noise_std * noise, 0.0).astype(np.float32))
        per_view_result[view] = {m: metrics(*pu) for m, pu in evaluate(x_c).items()}
    summary = {m: {key: float(np.mean([per_view_result[v][m][key] for v in views])) for key in METRICS} for m in METHODS}
    with torch.no_grad():  # clean test accuracy of each evidential head alone (context)
        single = {v: float((evidential(x_te)[v].argmax(-1) == y_te).float().mean()) for v in views}
    return {"seed": seed, "summary": summary, "per_view": per_view_result, "single_view_acc": single,
            "train_s": train_s, "n_train": len(y_tr), "n_test": n_test}


def run_experiment(cfg: EvidentialConfig) -> list[dict]:
    """Every seed of :func:`run_seed` (single-threaded torch for the run, restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and robust when cores are shared
    try:
        return [run_seed(cfg, s) for s in cfg.seeds]
    finally:
        torch.set_num_threads(threads)


def format_table(results: list[dict], cfg: EvidentialConfig) -> str:
    """Markdown for one setting (one set of views): main table, per-view table, notes."""
    rows = []
    for m, label in METHODS.items():
        rows.append([label] + [fmt_mean_std([r["summary"][m][key] for r in results]) for key in METRICS])
    header = ["method (uncertainty)", "acc clean half", "acc corrupted half", "AUROC err, clean", "AUROC err, corrupted",
              "AUROC corrupted vs clean"]
    views = list(results[0]["per_view"])
    per_view_rows = []
    distinct = [m for m in METHODS if m != "dempster_maxp"]  # same predictions as "dempster"
    for m in distinct:
        label = METHODS[m]
        per_view_rows.append([label.split(" (")[0]] + [
            f"{np.mean([r['per_view'][v][m]['acc_corrupt'] for r in results]):.3f}" for v in views])
    single = " · ".join(f"{v} {np.mean([r['single_view_acc'][v] for r in results]):.3f}" for v in views)
    errs = {m: (np.mean([np.mean([r["per_view"][v][m]["errors_clean"] for v in views]) for r in results]),
                np.mean([np.mean([r["per_view"][v][m]["errors_corrupt"] for v in views]) for r in results])) for m in distinct}
    n_test = results[0]["n_test"]
    return "\n".join([
        markdown_table(header, rows),
        "",
        "Accuracy on the corrupted half, by corrupted view (mean over seeds):",
        "",
        markdown_table(["method", *views], per_view_rows),
        "",
        f"Clean test accuracy of each evidential head alone: {single}. "
        f"Misclassified samples per half, averaged over seeds and corrupted views (clean / corrupted, of "
        f"{n_test - n_test // 2} / {n_test // 2}): "
        + "; ".join(f"{m} {c:.1f} / {k:.1f}" for m, (c, k) in errs.items()) + ".",
    ])


def format_report(settings: list[tuple[str, list[dict]]], cfg: EvidentialConfig, command: str, seconds: float, *,
                  default_run: bool = False) -> str:
    """The whole docs section: protocol, one table block per setting, training details (+ reading, default run)."""
    first = settings[0][1][0]
    parts = [
        f"Command: `{command}` ({seconds:.0f} s on the shared 2-core CPU machine, torch single-threaded; "
        f"torch {torch.__version__}). Issue 6, experiment 1. Mean ± std over seeds {list(cfg.seeds)}.",
        "",
        f"mfeat, stratified split {first['n_train']} train / {first['n_test']} test; standardised on train. "
        f"One view at a time gets Gaussian noise (std {cfg.noise_std:g} train-SDs) on a fixed random half of the "
        "test set; corrupted-half numbers are averaged over the choices of corrupted view (each view in turn). "
        "\"AUROC err\" = AUROC of the method's uncertainty for detecting its own misclassified samples within the "
        "half; \"AUROC corrupted vs clean\" = AUROC of the uncertainty for telling corrupted from clean test samples "
        "(whole test set). Few errors on the clean half make its AUROC column noisy.",
    ]
    for title, results in settings:
        parts += ["", f"### {title}", "", format_table(results, cfg)]
    if default_run:
        parts += ["", READING]
    parts += [
        "",
        "Training (all models, same optimiser, no early stopping): Adam lr "
        f"{cfg.lr:g}, weight decay {cfg.weight_decay:g}, batch {cfg.batch_size}, {cfg.epochs} epochs; per-view MLPs "
        f"F_v → {cfg.hidden} → 10 and a concat-MLP ΣF_v → {cfg.concat_hidden} → 10, ReLU, dropout {cfg.dropout:g}. "
        "Evidential heads are trained jointly, TMC-style: Σ_v L(α_v) + L(α_fused), L = expected CE + λ_t KL(Dir(α̃) ‖ Dir(1)), "
        f"λ_t = min(1, epoch / {cfg.anneal_epochs}), fused by the reduced Dempster rule "
        "(`attnfuse.fusion.DempsterFusion`). \"Mean of the evidential heads' probabilities\" uses the same heads "
        "as the Dempster row (expected probabilities α_v / S_v, averaged); the softmax average uses separately "
        "CE-trained per-view MLPs of the same shape. Source: `experiments/evidential_mfeat/run.py`.",
    ]
    return "\n".join(parts)


READING = """Reading it (the default run above; the numbers reproduce exactly with the command on this machine):

* **Six views: one corrupted view hardly matters.** The five clean views carry the prediction; every late fusion
  keeps 0.98 on the corrupted half, the concat-MLP loses about 0.01 (most when its widest inputs, pix and fac, are
  corrupted). Error detection is 0.96–0.98 AUROC for every method (from only ~6 errors per half); the fused
  Dempster `u` is not consistently better than `1 − max p` of the averages, and it is the second-worst at telling
  corrupted from clean samples.
* **Two views (pix + fou): robustness comes from the evidential heads, not from the Dempster rule.** On the
  corrupted half the Dempster fusion (0.871) ties with the average of the *same* heads' expected probabilities
  (0.873) and with the concat-MLP (0.873), and is well above the average of CE-trained softmax heads (0.799).
  The gap is all in the runs where `fou` is corrupted (0.756 vs 0.927 for the evidential heads), consistent with
  a CE-trained head staying confident on noise while an evidential head trained with the KL term gives it
  little evidence; when `pix` is corrupted the CE average is the better one (0.842 vs 0.814).
* **The fused `u` is a weak error detector under corruption.** On the corrupted half, `u = K/S` reaches AUROC
  0.786 for its own errors, below `1 − max α/S` of the very same fused opinion (0.883), the α/S average (0.892)
  and the concat-MLP (0.897). In the reduced rule the fused evidence is `e_a + e_b + e_a ⊙ e_b / K`, so
  `S_fused ≥ S_a + S_b − K`: `u` falls whenever either source is confident, whether or not the two agree
  (agreement only adds the product term), while disagreement does flatten the fused belief — plausibly why
  `1 − max α/S` of the same opinion does better. The spec's expectation
  that `u` separates corrupted and erroneous samples better than max-softmax of the averaged baseline is
  **not** confirmed here (corrupted vs clean: `u` 0.653 vs 0.732 for the CE softmax average)."""


SETTINGS: dict[str, tuple[str, ...] | None] = {
    "All six views": None,
    "Two views, pix + fou (the spec's PET/CT stand-in)": ("fou", "pix"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--noise-std", type=float, default=3.0)
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite the Results section of the README")
    parser.add_argument("--json", default=None, help="also write the raw per-seed results to this JSON file")
    args = parser.parse_args(argv)
    defaults = EvidentialConfig()
    command = COMMAND
    if list(args.seeds) != list(defaults.seeds):
        command += " --seeds " + " ".join(map(str, args.seeds))
    if args.epochs != defaults.epochs:
        command += f" --epochs {args.epochs}"
    if args.noise_std != defaults.noise_std:
        command += f" --noise-std {args.noise_std:g}"
    t0 = time.perf_counter()
    settings, raw = [], {}
    for title, views in SETTINGS.items():
        cfg = EvidentialConfig(seeds=tuple(args.seeds), epochs=args.epochs, noise_std=args.noise_std, views=views)
        results = run_experiment(cfg)
        settings.append((title, results))
        raw[title] = {"config": asdict(cfg), "results": results}
    seconds = time.perf_counter() - t0
    report = format_report(settings, cfg, command, seconds, default_run=command == COMMAND)
    print(f"## {RESULTS_SECTION}\n\n{report}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    if not args.no_docs:
        print(f"\nwrote section {RESULTS_SECTION!r} of {write_doc_section(RESULTS_SECTION, report, README)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
