"""MoH vs MHA on a small character language model (Women's Clothing review texts, real data).

Run: ``python -m experiments.moh.run`` from the repository root (about ten minutes on one busy CPU core;
prints the tables and rewrites the section "Results" of ``experiments/moh/README.md``; ``--no-docs``
only prints). Issue 9, experiment "MoH vs MHA"; spec ``shared/papers/moh.md``; docs ``docs/moh.md``.

Protocol (per seed; the seed sets the initialisation and the batches; the split is fixed):

1. **Data.** The ``Review Text`` column of the ``womens_clothing`` catalog data set (22,641 reviews,
   7.0 M characters), reviews joined with newlines; the reviews are shuffled once (seed 0) and the last
   10 % of them form the validation text. Characters seen fewer than 20 times in the training text map
   to one unknown symbol. Training windows of ``context`` characters are drawn at random positions.
2. **Model.** Embedding (``d = 64``) + learned positions, ``attnfuse.nn.Encoder(64, depth=2, heads=8)``
   (pre-norm blocks, MLP ×4, final LayerNorm), causal, tied nothing, linear read-out. 8 heads of width 8.
3. **Arms.** ``MHA-8`` (100 %); ``MHA-4`` (4 heads of width 8 — the active head count of MoH-50 %);
   ``MoH-50 / 75 / 88 %`` = :func:`attnfuse.nn.convert_to_moh` of the same encoder with 2 shared heads and top-2 / 4 / 5
   of 6 routed heads (zero-initialised linear router, ``gate_scale="code"``, load balance
   ``0.01 × mean over layers`` of the code-normalised loss, :func:`attnfuse.losses.moh_load_balance_total`);
   ``MoH-50 % β=0`` (no balance loss: does routing collapse?) and ``MoH-50 % query-norm`` (MoH-LLaMA3's
   parameter-free router, binary gates, no balance loss).
4. **Training.** AdamW (lr 3e-3, weight decay 0.01, betas 0.9/0.99), batch 32 windows of 64 characters,
   ``steps`` steps (linear warm-up 30 steps, cosine decay), gradient clip 1.0, single-threaded torch.
5. **Continue-tuning.** The trained ``MHA-8`` of each seed is converted (:meth:`MixtureOfHeadAttention.from_attention`
   through ``convert_to_moh``, zero router) to MoH-50 % and MoH-75 % and tuned ``tune_steps`` more steps (lr 1e-3,
   cosine), against ``MHA-8`` tuned the same steps; the validation loss right after the conversion (no tuning)
   is reported too.
6. **Metrics.** Validation loss in bits per character on 40 fixed windows batches (mean ± sample std over
   seeds); active-head fraction; routed-head load balance ``max_i f_i / mean_i f_i`` (1 = balanced) on the
   validation batches; wall time per training step (MoH trains with ``compute="dense"``, the reference that
   computes every head) and per evaluation forward with ``compute="sparse"`` vs ``"dense"``, timed interleaved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from attnfuse.losses import moh_load_balance_total
from attnfuse.nn import Attention, Encoder, MixtureOfHeadAttention, collect_routing, convert_to_moh
from experiments._shared import RESULTS_SECTION, fmt_mean_std, markdown_table, write_doc_section

__all__ = ["ARMS", "MoHConfig", "load_text", "main", "run_experiment"]

COMMAND = "python -m experiments.moh.run"
README = Path(__file__).resolve().parent / "README.md"
DOC = Path(__file__).resolve().parents[2] / "docs" / "moh.md"

#: arm name -> (kind, options): kind "mha" (heads of width 8) or "moh" (shared, top_k, router, beta)
ARMS: dict[str, tuple[str, dict]] = {
    "MHA-8 (100 %)": ("mha", {"heads": 8}),
    "MHA-4 (4 heads of 8; 50 % of the heads)": ("mha", {"heads": 4}),
    "MoH-50 % (2 shared + top-2 of 6)": ("moh", {"shared": 2, "top_k": 2, "router": "linear", "beta": 0.01}),
    "MoH-75 % (2 shared + top-4 of 6)": ("moh", {"shared": 2, "top_k": 4, "router": "linear", "beta": 0.01}),
    "MoH-88 % (2 shared + top-5 of 6)": ("moh", {"shared": 2, "top_k": 5, "router": "linear", "beta": 0.01}),
    "MoH-50 %, β = 0 (no balance loss)": ("moh", {"shared": 2, "top_k": 2, "router": "linear", "beta": 0.0}),
    "MoH-50 %, query-norm router (parameter-free)": ("moh", {"shared": 2, "top_k": 2, "router": "query_norm", "beta": 0.0}),
}


@dataclass(frozen=True)
class MoHConfig:
    """Settings of one run (defaults = the documented run)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    tune_steps: int = 120
    context: int = 64
    batch: int = 32
    dim: int = 64
    depth: int = 2
    lr: float = 3e-3
    tune_lr: float = 1e-3
    val_batches: int = 40
    max_chars: int | None = 2_000_000
    arms: tuple[str, ...] = field(default_factory=lambda: tuple(ARMS))


# ---------------------------------------------------------------- data

def load_text(max_chars: int | None = None, min_count: int = 20) -> tuple[Tensor, Tensor, list[str]]:
    """Train / validation character ids and the vocabulary (index 0 = unknown) from the review texts."""
    from attnfuse.data.datasets import load_womens_clothing

    reviews = load_womens_clothing()["Review Text"].dropna().astype(str).tolist()
    perm = torch.randperm(len(reviews), generator=torch.Generator().manual_seed(0)).tolist()
    reviews = [reviews[i] for i in perm]
    n_val = len(reviews) // 10
    train_text, val_text = "\n".join(reviews[:-n_val]), "\n".join(reviews[-n_val:])
    if max_chars is not None:
        train_text, val_text = train_text[:max_chars], val_text[: max(max_chars // 9, 10_000)]
    counts = Counter(train_text)
    vocab = ["\0", *sorted(c for c, n in counts.items() if n >= min_count)]
    index = {c: i for i, c in enumerate(vocab)}

    def encode(s: str) -> Tensor:
        return torch.tensor([index.get(c, 0) for c in s], dtype=torch.long)

    return encode(train_text), encode(val_text), vocab


def _windows(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    idx = starts.unsqueeze(1) + torch.arange(context + 1)  # (B, L+1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------- model

class CharLM(nn.Module):
    """Embedding + learned positions -> attnfuse.nn.Encoder (causal) -> read-out. Shapes: ``(B, L) -> (B, L, V)``."""

    def __init__(self, vocab: int, *, dim: int, depth: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.encoder = Encoder(dim, depth=depth, heads=8, mlp_ratio=4.0)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.head(self.encoder(x, is_causal=True))


def build(arm: str, vocab: int, cfg: MoHConfig) -> tuple[CharLM, float]:
    """The model of one arm and its balance-loss weight β."""
    kind, opts = ARMS[arm]
    model = CharLM(vocab, dim=cfg.dim, depth=cfg.depth, context=cfg.context)
    if kind == "mha":
        if opts["heads"] != 8:
            for block in model.encoder.blocks:
                block.attn = Attention(cfg.dim, opts["heads"], head_dim=cfg.dim // 8)
        return model, 0.0
    convert_to_moh(model.encoder, shared=opts["shared"], top_k=opts["top_k"], router=opts["router"])
    return model, opts["beta"]


def _moh_layers(model: nn.Module) -> list[MixtureOfHeadAttention]:
    return [m for m in model.modules() if isinstance(m, MixtureOfHeadAttention)]


def _loss(model: CharLM, x: Tensor, y: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    with collect_routing() as records:
        logits = model(x)
    task = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    aux = moh_load_balance_total(records, beta=beta) if beta > 0 else task.new_zeros(())
    return task, aux


def train(model: CharLM, beta: float, data: Tensor, cfg: MoHConfig, *, steps: int, lr: float, seed: int) -> float:
    """AdamW with warm-up + cosine; returns the mean wall time per step in ms."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = min(30, steps // 5)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - cfg.context - 1, (cfg.batch,), generator=gen)
        x, y = _windows(data, starts, cfg.context)
        task, aux = _loss(model, x, y, beta)
        opt.zero_grad(set_to_none=True)
        (task + aux).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return (time.perf_counter() - t0) / max(steps, 1) * 1e3


def _val_starts(val: Tensor, cfg: MoHConfig) -> Tensor:
    gen = torch.Generator().manual_seed(12345)
    return torch.randint(0, len(val) - cfg.context - 1, (cfg.val_batches, cfg.batch), generator=gen)


@torch.no_grad()
def evaluate(model: CharLM, val: Tensor, cfg: MoHConfig) -> dict[str, float]:
    """Validation bits per character, active-head fraction and routed-head balance (max f / mean f)."""
    model.eval()
    total, count, loads, active = 0.0, 0, [], []
    for starts in _val_starts(val, cfg):
        x, y = _windows(val, starts, cfg.context)
        with collect_routing() as records:
            logits = model(x)
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
        for r in records:
            active.append(r.active_fraction().mean().item())
            if r.probs.shape[-1] > 0:
                f = r.head_load()
                loads.append((f.max() / f.mean()).item())
    return {
        "bpc": total / count / math.log(2),
        "active": sum(active) / len(active) if active else 1.0,
        "imbalance": sum(loads) / len(loads) if loads else float("nan"),
    }


@torch.no_grad()
def time_forward(model: CharLM, val: Tensor, cfg: MoHConfig, repeat: int = 5) -> dict[str, float]:
    """Eval forward ms per batch: as trained (dense-gated) and, for MoH, with compute='sparse' (interleaved)."""
    model.eval()
    x, _ = _windows(val, _val_starts(val, cfg)[0], cfg.context)
    layers = _moh_layers(model)
    modes = ["dense", "sparse"] if layers else ["dense"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(repeat + 1):
        for mode in modes if i % 2 else reversed(modes):
            for layer in layers:
                layer.compute = mode
            t0 = time.perf_counter()
            model(x)
            if i:  # the first round warms up
                times[mode].append((time.perf_counter() - t0) * 1e3)
    for layer in layers:
        layer.compute = "dense"
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}


# ---------------------------------------------------------------- the experiment

def run_seed(cfg: MoHConfig, seed: int, train_ids: Tensor, val_ids: Tensor, vocab: int) -> dict:
    """Every arm of one seed, then continue-tuning from this seed's trained MHA-8."""
    res: dict[str, dict] = {}
    trained_mha = None
    for arm in cfg.arms:
        torch.manual_seed(seed)
        model, beta = build(arm, vocab, cfg)
        ms = train(model, beta, train_ids, cfg, steps=cfg.steps, lr=cfg.lr, seed=seed)
        res[arm] = {**evaluate(model, val_ids, cfg), "ms_step": ms, "fwd_ms": time_forward(model, val_ids, cfg),
                    "params": sum(p.numel() for p in model.parameters())}
        if arm == "MHA-8 (100 %)":
            trained_mha = model
        print(f"  seed {seed} {arm}: {res[arm]['bpc']:.4f} bpc, {ms:.0f} ms/step", flush=True)
    tuned: dict[str, dict] = {}
    if trained_mha is not None and cfg.tune_steps > 0:
        for name, moh in (("MHA-8, tuned further", None), ("→ MoH-50 %, tuned", (2, 2)), ("→ MoH-75 %, tuned", (2, 4))):
            model = copy.deepcopy(trained_mha)
            beta = 0.0
            if moh is not None:
                convert_to_moh(model.encoder, shared=moh[0], top_k=moh[1])
                beta = 0.01
            before = evaluate(model, val_ids, cfg)
            torch.manual_seed(seed)
            train(model, beta, train_ids, cfg, steps=cfg.tune_steps, lr=cfg.tune_lr, seed=seed + 100)
            tuned[name] = {"before": before, "after": evaluate(model, val_ids, cfg)}
            print(f"  seed {seed} {name}: {before['bpc']:.4f} -> {tuned[name]['after']['bpc']:.4f} bpc", flush=True)
    return {"seed": seed, "arms": res, "tuned": tuned}


def run_experiment(cfg: MoHConfig) -> list[dict]:
    """Every seed (single-threaded torch for the run, restored afterwards)."""
    train_ids, val_ids, vocab = load_text(cfg.max_chars)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [run_seed(cfg, s, train_ids, val_ids, len(vocab)) for s in cfg.seeds]
    finally:
        torch.set_num_threads(threads)


def format_report(results: list[dict], cfg: MoHConfig, command: str, seconds: float) -> str:
    """Markdown: the arms table, the continue-tuning table, notes."""
    arms = list(results[0]["arms"])
    base = [r["arms"][arms[0]]["bpc"] for r in results]
    rows = []
    for arm in arms:
        vals = [r["arms"][arm] for r in results]
        bpc = [v["bpc"] for v in vals]
        delta = [b - a for a, b in zip(base, bpc)]
        imb = [v["imbalance"] for v in vals]
        sparse = [v["fwd_ms"].get("sparse", math.nan) for v in vals]
        dense = [v["fwd_ms"]["dense"] for v in vals]
        rows.append([
            arm, fmt_mean_std(bpc), fmt_mean_std(delta), f"{vals[0]['active']:.2f}",
            "—" if math.isnan(imb[0]) else fmt_mean_std(imb, 2),
            f"{sum(dense) / len(dense):.1f}", "—" if math.isnan(sparse[0]) else f"{sum(sparse) / len(sparse):.1f}",
            f"{vals[0]['params']:,}",
        ])
    table = markdown_table(
        ["arm", "val bits / char", "Δ vs MHA-8 (paired)", "active heads", "routed load max/mean",
         "eval fwd ms (dense-gated)", "eval fwd ms (sparse)", "parameters"], rows)
    tuned_rows = []
    if results[0]["tuned"]:
        for name in results[0]["tuned"]:
            before = [r["tuned"][name]["before"]["bpc"] for r in results]
            after = [r["tuned"][name]["after"]["bpc"] for r in results]
            tuned_rows.append([name, fmt_mean_std(before), fmt_mean_std(after),
                               f"{results[0]['tuned'][name]['after']['active']:.2f}"])
    tuned = markdown_table(["from the trained MHA-8", "val bits / char right after conversion", "after tuning", "active heads"],
                           tuned_rows) if tuned_rows else "(no continue-tuning in this run)"
    return (
        f"Command: `{command}` ({seconds:.0f} s on the shared 2-core CPU machine, torch single-threaded; "
        f"torch {torch.__version__}). Mean ± sample std over seeds {list(cfg.seeds)}.\n\n"
        f"Character LM on the Women's Clothing review texts (real data; {cfg.max_chars or 'all':,} training characters, "
        f"reviews split 90/10), context {cfg.context}, batch {cfg.batch}, d = {cfg.dim}, {cfg.depth} blocks, 8 heads of 8, "
        f"{cfg.steps} AdamW steps. \"Δ\" is paired by seed. \"routed load max/mean\": the most-used routed head's "
        f"share of tokens over the mean share (1 = balanced, 3 = one of 6 heads takes everything at top-2). "
        f"\"eval fwd ms\": median forward time of one validation batch ({cfg.batch} × {cfg.context}), the same model with "
        f"compute=\"dense\" and \"sparse\" timed interleaved, mean over seeds; a busy shared machine, so compare within a row "
        f"only. MoH trains with the dense-gated reference (every head computed); training step times, measured one arm "
        f"after another while the machine's load changed, are in the JSON output only.\n\n{table}\n\n"
        f"### Continue-tuning from the trained MHA-8 ({cfg.tune_steps} steps, lr {cfg.tune_lr:g})\n\n{tuned}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=MoHConfig.steps)
    parser.add_argument("--tune-steps", type=int, default=MoHConfig.tune_steps)
    parser.add_argument("--no-docs", action="store_true", help="print only; do not rewrite the Results sections")
    parser.add_argument("--json", default=None, help="also write the raw per-seed results to this JSON file")
    parser.add_argument("--from-json", default=None, help="format the results of an earlier --json run (no training)")
    args = parser.parse_args(argv)
    cfg = MoHConfig(seeds=tuple(args.seeds), steps=args.steps, tune_steps=args.tune_steps)
    command = COMMAND
    defaults = MoHConfig()
    if cfg.seeds != defaults.seeds:
        command += " --seeds " + " ".join(map(str, cfg.seeds))
    if cfg.steps != defaults.steps:
        command += f" --steps {cfg.steps}"
    if cfg.tune_steps != defaults.tune_steps:
        command += f" --tune-steps {cfg.tune_steps}"
    t0 = time.perf_counter()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results, seconds = saved["results"], saved.get("seconds", math.nan)
        cfg = MoHConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
    else:
        results = run_experiment(cfg)
        seconds = time.perf_counter() - t0
    report = format_report(results, cfg, command, seconds)
    print(f"## {RESULTS_SECTION}\n\n{report}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(cfg), "results": results, "seconds": seconds}, indent=1))
    if not args.no_docs:
        print(f"\nwrote section {RESULTS_SECTION!r} of {write_doc_section(RESULTS_SECTION, report, README)}")
        write_doc_section("Experiment results", report, DOC, header="# Mixture-of-Head attention (MoH)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
