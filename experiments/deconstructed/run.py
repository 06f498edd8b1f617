"""Deconstructed attention on a small character LM over real review texts: standard vs each variant vs hybrids.

Run: ``python -m experiments.deconstructed.run`` from the repository root (CPU, tens of minutes on a shared machine;
prints the table and rewrites the section "Results" of ``experiments/deconstructed/README.md``; ``--no-docs`` only
prints). Issue 9; spec ``shared/papers/deconstructing-attention.md`` (Xue, Moosavi, Aletras 2025, arXiv 2510.11602),
"Experiment", with the Women's Clothing review texts instead of ``pydoc_data.topics``.

Protocol:

1. **Text** (real, offline): the ``Review Text`` column of the Women's Clothing E-Commerce Reviews (data catalog
   ``womens_clothing``, read from the attnfuse cache), non-empty reviews in file order joined with newlines; the
   first ``chars`` characters; split 90 / 10 by position; characters seen fewer than 5 times in the training part
   map to one unknown symbol.
2. **Model**: pre-LN character LM: token + learned absolute position embeddings, :class:`attnfuse.nn.DeconstructedEncoder`
   (causal), linear head; ``d = 64``, 4 layers, 4 heads, MLP 4x, context 64 (the spec: 128).
3. **Training**: AdamW lr 3e-3 one-cycle, weight decay 0.1, batch 16, 1,000 steps (the spec: lr 2e-3, batch 32;
   a quarter of the spec's tokens per step to fit the shared machine), gradient clip 1.0; random windows of the
   training part (seeded).
4. **Evaluation**: validation bits per character over 20 fixed random batches of 16 windows, averaged over all
   positions. Uniform = every layer the variant; hybrid = layers 1, 3 the variant, 2, 4 standard; skip = the
   trained hybrid evaluated with its layer-1/3 mixing sublayers removed (evaluation-time skip). FixedSeqQK's fixed
   text is the first ``context`` training characters (embedded by the model's own embeddings); RndEmbQK's ``eps ~ N(0, 1)``
   is frozen. References: unigram and add-0.1 bigram bits per character from the training counts.

Mean ± std over seeds 0, 1, 2 (the seed sets the initialisation, ``eps`` and the training
windows; validation batches fixed).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.nn import DeconstructedEncoder
from attnfuse.nn.deconstructed import VARIANTS
from experiments._shared import RESULTS_SECTION, fmt_mean_std, markdown_table, write_doc_section

__all__ = ["CharLM", "LMConfig", "evaluate", "load_text", "main", "ngram_bpc", "run_experiment", "train_lm"]

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
COMMAND = "python -m experiments.deconstructed.run"
LN2 = math.log(2)


@dataclass
class LMConfig:
    """Settings of the experiment (defaults = the documented run)."""

    seeds: Sequence[int] = (0, 1, 2)
    variants: Sequence[str] = VARIANTS
    chars: int = 2_000_000
    dim: int = 64
    depth: int = 4
    heads: int = 4
    context: int = 64
    steps: int = 1000
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_batches: int = 20
    min_count: int = 5


def load_text(chars: int, min_count: int = 5, text: str | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """``(train ids, validation ids, vocabulary)``; ``text`` overrides the review texts (tests)."""
    if text is None:
        from attnfuse.data.datasets import load_womens_clothing

        reviews = load_womens_clothing()["Review Text"].dropna()
        text = "\n".join(r for r in reviews.tolist() if r.strip())
    text = text[:chars]
    cut = int(0.9 * len(text))
    counts = Counter(text[:cut])
    vocab = ["\x00", *sorted(c for c, n in counts.items() if n >= min_count)]  # index 0: unknown
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)
    return ids[:cut], ids[cut:], vocab


def ngram_bpc(train: Tensor, val: Tensor, vocab_size: int) -> tuple[float, float]:
    """Unigram and add-0.1 bigram bits per character on ``val`` from the counts of ``train``."""
    uni = torch.bincount(train, minlength=vocab_size).double() + 0.1
    bpc_uni = -(uni / uni.sum()).log()[val].mean().item() / LN2
    big = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    big.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1, dtype=torch.float64), accumulate=True)
    big = (big + 0.1) / (big + 0.1).sum(1, keepdim=True)
    bpc_bi = -big[val[:-1], val[1:]].log().mean().item() / LN2
    return bpc_uni, bpc_bi


class CharLM(nn.Module):
    """Embeddings + :class:`DeconstructedEncoder` (causal) + linear head. ``forward(ids (B, T)) -> logits (B, T, V)``."""

    def __init__(self, vocab: int, cfg: LMConfig, variant: str, layout: str | Sequence[int], fixed_ids: Tensor | None,
                 seed: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)
        self.encoder = DeconstructedEncoder(cfg.dim, depth=cfg.depth, heads=cfg.heads, variant=variant, layout=layout,
                                            context=cfg.context, seed=seed)
        self.head = nn.Linear(cfg.dim, vocab)
        self.register_buffer("fixed_ids", fixed_ids if variant == "fixed_seq_qk" else None)

    def embed(self, ids: Tensor) -> Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[-1], device=ids.device))  # (B, T, d)

    def forward(self, ids: Tensor) -> Tensor:
        stream = None if self.fixed_ids is None else self.embed(self.fixed_ids[: ids.shape[1]].unsqueeze(0))  # (1, T, d)
        return self.head(self.encoder(self.embed(ids), is_causal=True, stream=stream))  # (B, T, V)


def _windows(ids: Tensor, starts: Tensor, length: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(length + 1)  # (B, T + 1)
    chunk = ids[idx]
    return chunk[:, :-1], chunk[:, 1:]


def evaluate(model: nn.Module, val: Tensor, cfg: LMConfig) -> float:
    """Validation bits per character over ``cfg.eval_batches`` fixed batches."""
    gen = torch.Generator().manual_seed(12345)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            starts = torch.randint(0, len(val) - cfg.context - 1, (cfg.batch,), generator=gen)
            x, y = _windows(val, starts, cfg.context)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
            total, count = total + loss.item(), count + y.numel()
    return total / count / LN2


def train_lm(train: Tensor, vocab: int, cfg: LMConfig, variant: str, layout: str | Sequence[int], seed: int) -> CharLM:
    torch.manual_seed(seed)
    model = CharLM(vocab, cfg, variant, layout, train[: cfg.context].clone(), seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok" not in n and "pos" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.steps):
        starts = torch.randint(0, len(train) - cfg.context - 1, (cfg.batch,), generator=gen)
        x, y = _windows(train, starts, cfg.context)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model


@functools.lru_cache(maxsize=2)
def _data(chars: int, min_count: int, text: str | None) -> tuple[Tensor, Tensor, list[str]]:
    return load_text(chars, min_count, text)


def _task(cfg: LMConfig, text: str | None, seed: int, variant: str, layout: str) -> tuple[int, str, str, float, float, float]:
    """Train one model and evaluate it: ``(seed, variant, layout, bpc, skip bpc (NaN for uniform), seconds)``."""
    torch.set_num_threads(1)
    train, val, vocab = _data(cfg.chars, cfg.min_count, text)
    t0 = time.perf_counter()
    model = train_lm(train, len(vocab), cfg, variant, layout, seed)
    secs = time.perf_counter() - t0
    bpc, skip = evaluate(model, val, cfg), math.nan
    if layout != "uniform":
        model.encoder.skip = tuple(i + 1 for i, v in enumerate(model.encoder.layer_variants) if v != "standard")
        skip = evaluate(model, val, cfg)
    return seed, variant, layout, bpc, skip, secs


def run_experiment(cfg: LMConfig, text: str | None = None, log=print, workers: int = 1) -> dict[str, object]:
    """Train uniform and hybrid models of every variant for every seed; evaluate uniform, hybrid and skip.

    ``workers > 1`` trains the models in that many spawned processes (the numbers do not change).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train, val, vocab = _data(cfg.chars, cfg.min_count, text)
    uni, bi = ngram_bpc(train, val, len(vocab))
    tasks = [(cfg, text, seed, variant, layout) for seed in cfg.seeds for variant in cfg.variants
             for layout in ("uniform", "hybrid_odd") if not (variant == "standard" and layout != "uniform")]
    done = []
    try:
        if workers > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for out in pool.imap_unordered(_star_task, tasks):
                    done.append(out)
                    log(f"seed {out[0]} {out[1]} {out[2]}: {out[3]:.3f} bpc ({out[5]:.0f} s)")
        else:
            for t in tasks:
                done.append(_task(*t))
                log(f"seed {done[-1][0]} {done[-1][1]} {done[-1][2]}: {done[-1][3]:.3f} bpc ({done[-1][5]:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    res: dict[str, dict[str, list[float]]] = {v: {"uniform": [], "hybrid": [], "skip": []} for v in cfg.variants}
    seconds: dict[str, list[float]] = {v: [] for v in cfg.variants}
    for _seed, variant, layout, bpc, skip, secs in sorted(done, key=lambda r: (r[0], r[1], r[2])):
        seconds[variant].append(secs)
        if layout == "uniform":
            res[variant]["uniform"].append(bpc)
        else:
            res[variant]["hybrid"].append(bpc)
            res[variant]["skip"].append(skip)
    return {"bpc": res, "unigram": uni, "bigram": bi, "vocab": len(vocab), "train_chars": len(train), "val_chars": len(val),
            "seconds": seconds}


def _star_task(args: tuple) -> tuple:
    return _task(*args)


NAMES = {"standard": "Standard", "mlp": "MLP (no mixing)", "approximate": "Approximate (Taylor)",
         "non_approximate": "Non-approximate (self-gated)", "rnd_emb_qk": "RndEmbQK", "fixed_seq_qk": "FixedSeqQK",
         "static_emb_qk": "StaticEmbQK"}


def format_report(res: dict, cfg: LMConfig, command: str, seconds: float) -> str:
    bpc = res["bpc"]
    std = sum(bpc["standard"]["uniform"]) / len(bpc["standard"]["uniform"]) if bpc.get("standard", {}).get("uniform") else math.nan
    rows = []
    for v in cfg.variants:
        r = bpc[v]
        mean = {k: (sum(x) / len(x) if x else math.nan) for k, x in r.items()}
        closed = (mean["uniform"] - mean["hybrid"]) / (mean["uniform"] - std) if v != "standard" and mean["uniform"] > std else math.nan
        rows.append([NAMES.get(v, v), fmt_mean_std(r["uniform"]), fmt_mean_std(r["hybrid"]) if r["hybrid"] else "—",
                     fmt_mean_std(r["skip"]) if r["skip"] else "—",
                     f"{mean['uniform'] - std:+.3f}" if v != "standard" else "—",
                     f"{mean['hybrid'] - std:+.3f}" if r["hybrid"] else "—",
                     f"{100 * closed:.0f} %" if not math.isnan(closed) else "—",
                     f"{sum(res['seconds'][v]) / len(res['seconds'][v]):.0f}"])
    table = markdown_table(["variant", "uniform", "hybrid (1, 3 variant)", "hybrid, skip 1, 3", "uniform − standard",
                            "hybrid − standard", "gap closed by hybrid", "s / model"], rows)
    return (
        f"Command: `{command}` ({seconds / 60:.0f} min on the shared 2-core CPU machine, torch single-threaded; torch "
        f"{torch.__version__}). Real text: Women's Clothing review texts, {res['train_chars']:,} / {res['val_chars']:,} "
        f"train / validation characters, {res['vocab']} symbols. Validation **bits per character** (lower is better), "
        f"mean ± std over seeds {list(cfg.seeds)}; d = {cfg.dim}, {cfg.depth} layers, {cfg.heads} heads, context "
        f"{cfg.context}, {cfg.steps} steps × {cfg.batch}. References: unigram {res['unigram']:.3f} bpc, add-0.1 bigram "
        f"{res['bigram']:.3f} bpc.\n\n{table}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="processes training the models (numbers do not change)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite the README's Results")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    cfg = LMConfig(seeds=tuple(args.seeds), steps=args.steps, variants=tuple(args.variants))
    command = COMMAND + ("" if list(args.seeds) == [0, 1, 2] else " --seeds " + " ".join(map(str, args.seeds)))
    command += "" if args.steps == 1000 else f" --steps {args.steps}"
    command += "" if args.workers == 1 else f" --workers {args.workers}"
    command += "" if list(args.variants) == list(VARIANTS) else " --variants " + " ".join(args.variants)
    t0 = time.perf_counter()
    res = run_experiment(cfg, log=lambda s: print(s, flush=True), workers=args.workers)
    report = format_report(res, cfg, command, time.perf_counter() - t0)
    print(f"## {RESULTS_SECTION}\n\n{report}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), **res}, f, indent=1)
    if not args.no_docs:
        print(f"\nwrote section {RESULTS_SECTION!r} of {write_doc_section(RESULTS_SECTION, report, README)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
