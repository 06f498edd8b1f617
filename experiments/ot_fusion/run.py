"""Optimal-transport fusion of two small ViTs trained on mfeat digits with different seeds (issue 12).

Run: ``python -m experiments.ot_fusion.run`` from the repository root (minutes on one CPU core; prints the
table and rewrites the section "Results" of ``experiments/ot_fusion/README.md`` and of ``docs/merge.md``;
``--no-docs`` only prints). Spec ``shared/papers/ot-transformer-fusion.md`` ("Experiment on this project's machines").

Protocol (per seed pair ``s``):

1. mfeat ``pix`` view (2,000 handwritten digits as 16x15 images, padded to 16x16), stratified split
   ``make_split(val_fraction=0, test_fraction=0.3, seed=s)`` -> 1,400 train / 600 test, standardised with
   the train mean and std. Non-overlapping 4x4 patches -> 16 tokens of 16 pixels.
2. Two parents, a pre-norm ViT from attnfuse blocks (linear patch embedding, CLS token, learned position
   embedding, :class:`attnfuse.nn.Encoder` of ``depth`` blocks, linear head on CLS), identical except for the
   seed (initialisation and batch order): AdamW (lr 2e-3, weight decay 0.05), cosine, ``epochs`` epochs of batch 64.
3. Fusion, one-shot, into parent B (the anchor): vanilla averaging (VF); OT with activation costs on 200
   training samples: EMD (hard) and Sinkhorn with several ``reg``; OT with weight costs (Sinkhorn 0.06, the
   released default for wts); OT Sinkhorn with ``residual="acts"`` (an attnfuse option) and ``"weighted_scalar"``;
   head-aligned OT (``heads="aligned"``, an attnfuse option), EMD and Sinkhorn; the logit ensemble.
4. Fine-tuning: every fused model and, as controls, each parent, trained for ``finetune_frac`` (10 %) of a
   parent's steps (AdamW lr 1e-3, cosine).
5. Heterogeneous fusion: a d=64 parent (A) fused into a d=48 anchor trained with B's seed (OT EMD and
   Sinkhorn 0.08), compared with the d=48 model alone.

Mean ± sample std over the seed pairs; test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.data import load_mfeat, make_split
from attnfuse.merge import Ensemble, ot_fuse, vanilla_average
from attnfuse.nn import Encoder
from experiments._shared import RESULTS_SECTION, add_run_arguments, fmt_mean_std, markdown_table, run_and_report, run_seeds

__all__ = ["OTConfig", "PatchViT", "format_report", "load_patches", "main", "run_experiment", "run_seed", "train"]

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
DOC = HERE.parents[1] / "docs" / "merge.md"
DOC_SECTION = "Results: OT fusion on mfeat"
COMMAND = "python -m experiments.ot_fusion.run"


@dataclass
class OTConfig:
    """Settings of the experiment (defaults = the documented run)."""

    seeds: Sequence[int] = (0, 1, 2)
    dim: int = 64
    depth: int = 4
    heads: int = 4
    hetero_dim: int = 48
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    finetune_frac: float = 0.1
    finetune_lr: float = 1e-3
    samples: int = 200
    regs: Sequence[float] = (0.02, 0.05, 0.08)
    subsample: int | None = None  # rows of mfeat (smoke tests)
    hetero: bool = True


class PatchViT(nn.Module):
    """Patch tokens ``(B, N, P)`` -> linear embedding + CLS + position embedding -> Encoder -> head on CLS."""

    def __init__(self, patch_features: int, num_tokens: int, num_classes: int, *, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, num_tokens + 1, dim) * 0.02)
        self.embed = nn.Linear(patch_features, dim)
        self.encoder = Encoder(dim, depth=depth, heads=heads, mlp_ratio=2.0)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1) + self.pos  # (B, 1 + N, D)
        return self.head(self.encoder(t)[:, 0])


def load_patches(subsample: int | None = None, patch: int = 4) -> tuple[Tensor, Tensor]:
    """mfeat ``pix`` as patch tokens ``(N, 16, patch*patch)`` float32 (raw 0-6 values) and labels ``(N,)``."""
    data = load_mfeat(views=["pix"])
    img = torch.as_tensor(data.views["pix"]).reshape(-1, 16, 15)
    img = F.pad(img, (0, 1))  # (N, 16, 16)
    n = img.shape[0]
    tok = img.unfold(1, patch, patch).unfold(2, patch, patch)  # (N, 4, 4, p, p)
    tok = tok.reshape(n, -1, patch * patch)  # (N, 16, p*p)
    y = torch.as_tensor(data.labels)
    if subsample is not None:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:subsample]
        tok, y = tok[idx], y[idx]
    return tok.float(), y


def split_data(x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    split = make_split(len(y), val_fraction=0.0, test_fraction=0.3, seed=seed, stratify=y.numpy())
    tr, te = torch.as_tensor(split.train), torch.as_tensor(split.test)
    mean, std = x[tr].mean(), x[tr].std()
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def train(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
          aux_loss=None) -> nn.Module:
    """AdamW (weight decay 0.05) with cosine decay for ``steps`` steps over shuffled batches (seeded)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    order = torch.randperm(len(y), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(y):
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        out = model(x[idx])
        logits, extra = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits, y[idx])
        if aux_loss is not None and extra is not None:
            loss = loss + aux_loss(extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((_logits(model, x).argmax(-1) == y).float().mean())


def run_seed(cfg: OTConfig, seed: int, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
    """One seed pair: ``{method: {"oneshot", "finetuned", "fuse_s"}}``."""
    xtr, ytr, xte, yte = split_data(x, y, seed)
    steps = cfg.epochs * math.ceil(len(ytr) / cfg.batch_size)
    ft_steps = max(1, int(cfg.finetune_frac * steps))
    shape = (x.shape[2], x.shape[1], int(y.max()) + 1)

    def parent(s: int, dim: int) -> nn.Module:
        torch.manual_seed(s)
        m = PatchViT(*shape, dim=dim, depth=cfg.depth, heads=cfg.heads)
        return train(m, xtr, ytr, steps=steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=s)

    a, b = parent(1000 + 2 * seed, cfg.dim), parent(1001 + 2 * seed, cfg.dim)
    acts = xtr[: cfg.samples]
    res: dict[str, dict[str, float]] = {}

    def record(name: str, model: nn.Module, fuse_s: float = math.nan, finetune: bool = True) -> None:
        entry = {"oneshot": accuracy(model, xte, yte), "fuse_s": fuse_s, "finetuned": math.nan}
        if finetune:
            tuned = train(copy.deepcopy(model), xtr, ytr, steps=ft_steps, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
                          seed=7 + seed)
            entry["finetuned"] = accuracy(tuned, xte, yte)
        res[name] = entry

    record("parent A", a)
    record("parent B (anchor)", b)
    t0 = time.perf_counter()
    vf = vanilla_average([a, b])
    record("vanilla average (VF)", vf, time.perf_counter() - t0)
    fused, rep = ot_fuse([a, b], data=acts, solver="emd")
    record("OT acts, EMD", fused, rep.seconds)
    for reg in cfg.regs:
        fused, rep = ot_fuse([a, b], data=acts, solver="sinkhorn", reg=reg)
        record(f"OT acts, Sinkhorn {reg}", fused, rep.seconds)
    fused, rep = ot_fuse([a, b], mode="wts", solver="sinkhorn", reg=0.06)
    record("OT wts, Sinkhorn 0.06", fused, rep.seconds)
    fused, rep = ot_fuse([a, b], data=acts, solver="sinkhorn", reg=0.08, residual="acts")
    record("OT acts, Sinkhorn 0.08, residual=acts", fused, rep.seconds)
    fused, rep = ot_fuse([a, b], data=acts, solver="sinkhorn", reg=0.08, residual="weighted_scalar")
    record("OT acts, Sinkhorn 0.08, residual=weighted_scalar", fused, rep.seconds)
    for solver in ("emd", "sinkhorn"):
        fused, rep = ot_fuse([a, b], data=acts, solver=solver, reg=0.08, heads="aligned")
        record(f"OT acts, {'EMD' if solver == 'emd' else 'Sinkhorn 0.08'}, heads=aligned", fused, rep.seconds)
    record("logit ensemble", Ensemble([a, b]), finetune=False)
    if cfg.hetero:
        small = parent(1001 + 2 * seed, cfg.hetero_dim)
        record(f"d={cfg.hetero_dim} model alone", small)
        for solver in ("emd", "sinkhorn"):
            fused, rep = ot_fuse([a, small], data=acts, solver=solver, reg=0.08)
            record(f"OT {cfg.dim} -> {cfg.hetero_dim}, {'EMD' if solver == 'emd' else 'Sinkhorn 0.08'}", fused, rep.seconds)
    return res


def run_experiment(cfg: OTConfig, log=print) -> list[dict[str, dict[str, float]]]:
    x, y = load_patches(cfg.subsample)
    return run_seeds(cfg.seeds, lambda s: run_seed(cfg, s, x, y), log=log, label="seed pair")


def format_report(results: list[dict], cfg: OTConfig, command: str, seconds: float) -> str:
    methods = list(results[0])
    rows = []
    for m in methods:
        def col(k: str, m: str = m) -> list[float]:
            return [r[m][k] for r in results]

        ft = col("finetuned")
        fuse_s = [v for v in col("fuse_s") if not math.isnan(v)]
        rows.append([m, fmt_mean_std(col("oneshot")), "—" if all(math.isnan(v) for v in ft) else fmt_mean_std(ft),
                     f"{np.mean(fuse_s):.2f}" if fuse_s else "—"])
    steps_note = (f"parents: {cfg.epochs} epochs of batch {cfg.batch_size}; fine-tuning: {cfg.finetune_frac:.0%} of a "
                  f"parent's steps (lr {cfg.finetune_lr}, cosine) for every row, parents included (control)")
    return "\n\n".join([
        f"Command: `{command}` ({seconds:.0f} s on the shared 2-core CPU machine, torch single-threaded; torch "
        f"{torch.__version__}). Mean ± std over {len(results)} seed pairs {list(cfg.seeds)}; test accuracy on the "
        "stratified 30 % test split of mfeat (real data).",
        f"ViT d={cfg.dim}, {cfg.depth} pre-norm blocks, {cfg.heads} heads, MLP ratio 2, 4x4 patches of the 16x16 `pix` "
        f"image + CLS; {steps_note}. OT maps from {cfg.samples} training samples (acts) or the weights (wts); "
        "anchor = parent B; fusion time in seconds (one fusion, POT on one core).",
        markdown_table(["model", "one-shot acc", "acc after fine-tuning", "fusion s"], rows),
    ])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seed pairs (0..N-1)")
    parser.add_argument("--epochs", type=int, default=OTConfig.epochs)
    args = add_run_arguments(parser).parse_args(argv)
    cfg = OTConfig(seeds=tuple(range(args.seeds)), epochs=args.epochs)
    return run_and_report(args, cfg, run_experiment, format_report, command=COMMAND, argv=argv,
                          docs=[(RESULTS_SECTION, README, "# Results\n"),
                                (DOC_SECTION, DOC, "# Model merging: OT fusion and BAM upcycling\n")])


if __name__ == "__main__":
    main()
