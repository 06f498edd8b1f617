"""BAM upcycling on mfeat digits with three class-group domains (issue 12; spec ``shared/papers/bam.md``).

Run: ``python -m experiments.bam.run`` from the repository root (minutes on one CPU core; prints the tables and
rewrites the section "Results" of ``experiments/bam/README.md`` and of ``docs/merge.md``; ``--no-docs`` only
prints). This is the spec's "label-only variant" (digit groups as domains, a tiny ViT classifier) on mfeat's
``pix`` view instead of scikit-learn digits; the character-LM variant is not run here.

Protocol (per seed):

1. Data: mfeat ``pix`` as 16 patch tokens (as ``experiments/ot_fusion``), stratified 70/30 split. Domains:
   digit groups {0–3}, {4–6}, {7–9}; every model predicts all 10 classes.
2. **Seed**: a ViT of BAM's parallel blocks (``x + attn(LN x) + ffn(LN x)``, :class:`attnfuse.nn.ParallelBlock`)
   trained on the pooled training set.
3. **Specialists**: three copies of the seed, each trained further on one domain with 10 % pooled data mixed
   in (the paper adds 10 % Common Crawl).
4. **Mixture phase**, every model trained for the same number of steps on an equal mix of the three domains
   (data-matched): the dense seed continued; **BTX** (FFN experts, attention averaged); **BAM** (FFN experts +
   soft-routed attention experts, K/V per expert); **BAM shared K/V**; **BAM with top-1 attention routing**.
   Upcycled models have 4 experts (seed + 3 specialists), top-1 FFN routing with BAM's gate, random routers
   (std 0.02), everything else averaged; loss = CE + 0.01 load balance + 0.001 z-loss per MoE layer.
5. Metrics: test accuracy per domain and their mean; milliseconds per training step relative to the dense
   seed's (same run); FFN expert usage per domain (last block, BAM).

Mean ± sample std over seeds.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.merge import bam_upcycle, btx_upcycle, moe_aux_loss
from attnfuse.nn import ParallelBlock
from experiments._shared import RESULTS_SECTION, add_run_arguments, fmt_mean_std, markdown_table, run_and_report, run_seeds
from experiments.ot_fusion.run import load_patches, split_data

__all__ = ["DOMAINS", "BAMConfig", "ParallelViT", "format_report", "main", "run_experiment", "run_seed"]

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
DOC = HERE.parents[1] / "docs" / "merge.md"
DOC_SECTION = "Results: BAM upcycling on mfeat"
COMMAND = "python -m experiments.bam.run"
DOMAINS = {"digits 0-3": (0, 1, 2, 3), "digits 4-6": (4, 5, 6), "digits 7-9": (7, 8, 9)}


@dataclass
class BAMConfig:
    """Settings of the experiment (defaults = the documented run)."""

    seeds: Sequence[int] = (0, 1, 2)
    dim: int = 32
    depth: int = 2
    heads: int = 4
    seed_steps: int = 300
    specialist_steps: int = 150
    mix_steps: int = 150
    batch_size: int = 60
    lr: float = 2e-3
    mix_lr: float = 1e-3
    pooled_fraction: float = 0.1
    alpha: float = 0.01
    beta: float = 0.001
    subsample: int | None = None


class ParallelViT(nn.Module):
    """Patch tokens ``(B, N, P)`` -> embedding + CLS + positions -> ParallelBlocks -> LN -> head on CLS.

    Returns ``(logits (B, K), [aux dict per block])``.
    """

    def __init__(self, patch_features: int, num_tokens: int, num_classes: int, *, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, num_tokens + 1, dim) * 0.02)
        self.embed = nn.Linear(patch_features, dim)
        self.blocks = nn.ModuleList(ParallelBlock(dim, heads, mlp_ratio=2.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1) + self.pos  # (B, 1 + N, D)
        auxes = []
        for blk in self.blocks:
            t, aux = blk(t)
            auxes.append(aux)
        return self.head(self.norm(t)[:, 0]), auxes


def _train(model: nn.Module, pools: list[tuple[Tensor, Tensor]], shares: list[float], *, steps: int, lr: float,
           batch_size: int, seed: int, cfg: BAMConfig) -> tuple[nn.Module, float]:
    """AdamW + cosine; each batch draws ``shares[i] * batch_size`` samples from pool ``i``. Returns ms / step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    counts = [max(1, round(s * batch_size)) for s in shares]
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        xs, ys = [], []
        for (px, py), c in zip(pools, counts, strict=True):
            idx = torch.randint(0, len(py), (c,), generator=g)
            xs.append(px[idx])
            ys.append(py[idx])
        logits, auxes = model(torch.cat(xs))
        loss = F.cross_entropy(logits, torch.cat(ys)) + moe_aux_loss(auxes, alpha=cfg.alpha, beta=cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), 1000 * (time.perf_counter() - t0) / max(steps, 1)


@torch.no_grad()
def _domain_acc(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    pred = model(x)[0].argmax(-1)
    out = {}
    for name, classes in DOMAINS.items():
        keep = torch.isin(y, torch.tensor(classes))
        out[name] = float((pred[keep] == y[keep]).float().mean())
    out["mean"] = float(np.mean([out[n] for n in DOMAINS]))
    return out


@torch.no_grad()
def _usage(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, list[float]]:
    """Fraction of each domain's tokens routed (top-1) to each FFN expert in the last block."""
    _, auxes = model(x)
    sel = auxes[-1]["ffn_selected"][..., 0]  # (B, 1 + N)
    n = auxes[-1]["ffn_logits"].shape[-1]
    out = {}
    for name, classes in DOMAINS.items():
        keep = torch.isin(y, torch.tensor(classes))
        out[name] = torch.bincount(sel[keep].reshape(-1), minlength=n).float().div(sel[keep].numel()).tolist()
    return out


def run_seed(cfg: BAMConfig, seed: int, x: Tensor, y: Tensor) -> dict:
    xtr, ytr, xte, yte = split_data(x, y, seed)
    shape = (x.shape[2], x.shape[1], int(y.max()) + 1)
    torch.manual_seed(seed)
    seed_model = ParallelViT(*shape, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)
    pooled = (xtr, ytr)
    seed_model, _ = _train(seed_model, [pooled], [1.0], steps=cfg.seed_steps, lr=cfg.lr, batch_size=cfg.batch_size,
                           seed=seed, cfg=cfg)
    domains = []
    for classes in DOMAINS.values():
        keep = torch.isin(ytr, torch.tensor(classes))
        domains.append((xtr[keep], ytr[keep]))
    specialists = []
    for i, dom in enumerate(domains):
        spec, _ = _train(copy.deepcopy(seed_model), [dom, pooled], [1 - cfg.pooled_fraction, cfg.pooled_fraction],
                         steps=cfg.specialist_steps, lr=cfg.lr / 2, batch_size=cfg.batch_size, seed=100 * seed + i, cfg=cfg)
        specialists.append(spec)
    res: dict = {"acc": {}, "ms_per_step": {}, "params": {}}
    res["acc"]["seed (before the mixture phase)"] = _domain_acc(seed_model, xte, yte)
    for name, spec in zip(DOMAINS, specialists, strict=True):
        res["acc"][f"specialist {name}"] = _domain_acc(spec, xte, yte)
    gen = torch.Generator().manual_seed(seed)
    mixtures = {
        "dense seed, continued": copy.deepcopy(seed_model),
        "BTX (FFN experts, attention averaged)": btx_upcycle(seed_model, specialists, generator=gen),
        "BAM (FFN + attention experts, K/V per expert)": bam_upcycle(seed_model, specialists, generator=gen),
        "BAM, shared K/V": bam_upcycle(seed_model, specialists, attention="shared_kv", generator=gen),
        "BAM, top-1 attention routing": bam_upcycle(seed_model, specialists, attention_routing="topk", attention_k=1,
                                                    generator=gen),
    }
    thirds = [1 / 3] * 3
    for name, model in mixtures.items():
        model, ms = _train(model, domains, thirds, steps=cfg.mix_steps, lr=cfg.mix_lr, batch_size=cfg.batch_size,
                           seed=1000 + seed, cfg=cfg)
        res["acc"][name] = _domain_acc(model, xte, yte)
        res["ms_per_step"][name] = ms
        res["params"][name] = sum(p.numel() for p in model.parameters())
        if name.startswith("BAM (FFN"):
            res["usage"] = _usage(model, xte, yte)
    return res


def run_experiment(cfg: BAMConfig, log=print) -> list[dict]:
    x, y = load_patches(cfg.subsample)
    return run_seeds(cfg.seeds, lambda s: run_seed(cfg, s, x, y), log=log, label="seed")


def format_report(results: list[dict], cfg: BAMConfig, command: str, seconds: float) -> str:
    names = list(results[0]["acc"])
    cols = [*DOMAINS, "mean"]
    dense = "dense seed, continued"
    rows = []
    for m in names:
        row = [m] + [fmt_mean_std([r["acc"][m][c] for r in results]) for c in cols]
        if m in results[0]["ms_per_step"]:
            ratio = [r["ms_per_step"][m] / r["ms_per_step"][dense] for r in results]
            row += [f"{np.mean(ratio):.2f}x", f"{results[0]['params'][m] / 1e3:.0f}k"]
        else:
            row += ["—", "—"]
        rows.append(row)
    usage = results[0].get("usage", {})
    n_exp = len(next(iter(usage.values()))) if usage else 0
    experts = ["seed"] + [f"spec. {n}" for n in DOMAINS]
    usage_rows = [[name] + [f"{u:.2f}" for u in usage[name]] for name in usage] if n_exp else []
    return "\n\n".join([
        f"Command: `{command}` ({seconds:.0f} s on the shared 2-core CPU machine, torch single-threaded; torch "
        f"{torch.__version__}). Mean ± std over seeds {list(cfg.seeds)}. mfeat `pix` digits (real data), 16 patch "
        "tokens; domains = digit groups; test accuracy (10-way) on each domain's test digits.",
        f"Parallel-block ViT d={cfg.dim}, {cfg.depth} blocks, {cfg.heads} heads. Seed: {cfg.seed_steps} steps on all "
        f"digits; specialists: +{cfg.specialist_steps} steps on their domain ({1 - cfg.pooled_fraction:.0%}) and pooled "
        f"data ({cfg.pooled_fraction:.0%}); mixture phase: {cfg.mix_steps} steps (batch {cfg.batch_size}, equal domain "
        "mix) for every row that has a step time (data-matched). Step time relative to the dense seed's in the same "
        "run; parameters of the model trained.",
        markdown_table(["model", *cols, "ms/step vs dense", "params"], rows),
        "FFN expert usage per domain (top-1, last block, BAM with K/V experts, seed 0; rows sum to 1):",
        markdown_table(["test digits", *experts], usage_rows) if usage_rows else "",
    ])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--mix-steps", type=int, default=BAMConfig.mix_steps)
    args = add_run_arguments(parser).parse_args(argv)
    cfg = BAMConfig(seeds=tuple(range(args.seeds)), mix_steps=args.mix_steps)
    return run_and_report(args, cfg, run_experiment, format_report, command=COMMAND, argv=argv,
                          docs=[(RESULTS_SECTION, README, "# Results\n"),
                                (DOC_SECTION, DOC, "# Model merging: OT fusion and BAM upcycling\n")])


if __name__ == "__main__":
    main()
