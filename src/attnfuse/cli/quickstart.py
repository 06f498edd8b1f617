"""A small self-contained fusion demo on a labelled *synthetic* task (runs in seconds on a CPU).

Task (synthetic): two informative sources ``a`` and ``b`` (sets of 4 to 6 tokens, padded to 6) and
an uninformative ``noise`` source (4 tokens). Each informative source hides one bit; the label is
their XOR, so no single source predicts it above chance: only fusion can. The demo trains a single-source model, early,
late, hierarchical and latent-bottleneck fusion, then reports test accuracy with every source
present and with ``b`` missing (all-False mask), and how much of the fusion token's attention
goes to each source.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from attnfuse.fusion import EarlyFusion, HierarchicalFusion, LateFusion, LatentBottleneck, TokenSet
from attnfuse.heads import ClassificationHead
from attnfuse.train.threads import model_threads

__all__ = ["make_task", "run_quickstart"]

DIM, SOURCES = 32, ("a", "b", "noise")


def make_task(n: int, *, generator: torch.Generator) -> tuple[dict[str, TokenSet], torch.Tensor]:
    """Synthetic XOR-of-sources data: ``({name: TokenSet (n, N_i, 32)}, labels (n,))``.

    Each of ``a`` and ``b`` carries one hidden bit as a shift of +-1 along channel 0 of its valid
    tokens (4 to 6 of 6; the rest is padding); the label is ``bit_a XOR bit_b``.
    """
    bits = torch.randint(0, 2, (n, 2), generator=generator)
    tokens = {}
    for i, name in enumerate(("a", "b")):
        x = torch.randn(n, 6, DIM, generator=generator)
        x[..., 0] += (2.0 * bits[:, i : i + 1] - 1.0)  # (n, 6) shift of channel 0
        lengths = torch.randint(4, 7, (n,), generator=generator)
        tokens[name] = TokenSet(x, torch.arange(6).expand(n, 6) < lengths[:, None])
    tokens["noise"] = TokenSet(torch.randn(n, 4, DIM, generator=generator))
    return tokens, bits[:, 0] ^ bits[:, 1]


class _Model(nn.Module):
    def __init__(self, fusion: nn.Module, pooling: str) -> None:
        super().__init__()
        self.fusion = fusion
        self.head = ClassificationHead(DIM, 2, pooling=pooling, hidden=64)

    def forward(self, inputs: dict[str, TokenSet]) -> torch.Tensor:
        return self.head(self.fusion(inputs).fused)


def _select(inputs: dict[str, TokenSet], idx: torch.Tensor) -> dict[str, TokenSet]:
    return {k: TokenSet(v.x[idx], None if v.mask is None else v.mask[idx]) for k, v in inputs.items()}


def _accuracy(model: nn.Module, inputs: dict[str, TokenSet], y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(inputs).argmax(-1) == y).float().mean().item()


def run_quickstart(*, steps: int = 300, seed: int = 0, batch: int = 128) -> dict[str, dict[str, float]]:
    """Train the demo models and print a results table; returns ``{method: metrics}``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, y_train = make_task(4096, generator=gen)
    test, y_test = make_task(2048, generator=gen)
    test_missing_b = dict(test, b=test["b"].with_mask(torch.zeros_like(test["b"].valid())))
    common = {"heads": 4, "mlp_ratio": 2.0}
    methods = {
        "single source (a)": (EarlyFusion(["a"], DIM, depth=2, **common), "fusion"),
        "late fusion": (LateFusion(SOURCES, DIM, depth=2, **common), "mean"),
        "early fusion": (EarlyFusion(SOURCES, DIM, depth=2, **common), "fusion"),
        "hierarchical 1+1": (HierarchicalFusion(SOURCES, DIM, per_source_depth=1, cross_depth=1, **common), "fusion"),
        "latent bottleneck": (LatentBottleneck(SOURCES, DIM, num_latents=4, depth=1, **common), "mean"),
    }
    print("attnfuse quickstart: fusion on a labelled SYNTHETIC task (label = XOR of two sources; chance = 0.50)")
    print(f"train 4096 / test 2048 samples, {steps} steps of batch {batch}, seed {seed}\n")
    results: dict[str, dict[str, float]] = {}
    header = f"{'method':<20} {'params':>8} {'test acc':>9} {'acc, b missing':>15} {'train s':>8}"
    print(header)
    print("-" * len(header))
    for name, (fusion, pooling) in methods.items():
        model = _Model(fusion, pooling)
        with model_threads(model):  # these models are small: one intra-op thread (attnfuse.train.threads)
            results[name] = _train_and_test(name, model, steps, batch, gen, (train, y_train), (test, test_missing_b, y_test))
        r = results[name]
        print(f"{name:<20} {r['params']:>8} {r['accuracy']:>9.3f} {r['accuracy_b_missing']:>15.3f} {r['seconds']:>8.1f}")
        if name == "early fusion":
            with model_threads(model):
                share = _fusion_token_share(model, test)
    print("\nearly fusion: share of the fusion token's attention per source (last layer, mean over heads, test set)")
    print("  " + "   ".join(f"{k}: {v:.2f}" for k, v in share.items()))
    return results


def _train_and_test(name: str, model: _Model, steps: int, batch: int, gen: torch.Generator, train_data, test_data
                    ) -> dict[str, float]:
    (train, y_train), (test, test_missing_b, y_test) = train_data, test_data
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    only = None if name.startswith("single") else SOURCES
    start = time.perf_counter()
    for _ in range(steps):
        model.train()
        idx = torch.randint(0, len(y_train), (batch,), generator=gen)
        inputs = _select(train, idx)
        if only is None:
            inputs = {"a": inputs["a"]}
        loss = nn.functional.cross_entropy(model(inputs), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    full = test if only else {"a": test["a"]}
    missing = test_missing_b if only else full
    acc, acc_missing = _accuracy(model, full, y_test), _accuracy(model, missing, y_test)
    params = sum(p.numel() for p in model.parameters())
    return {"accuracy": acc, "accuracy_b_missing": acc_missing, "params": params, "seconds": seconds}


def _fusion_token_share(model: _Model, inputs: dict[str, TokenSet]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model.fusion(inputs, return_weights=True)
    last = out.weights[f"cross.{model.fusion.encoder.depth - 1}"]  # (B, H, N, N)
    row = last[:, :, 0].mean(dim=(0, 1))  # fusion token's attention over all tokens, (N,)
    return {name: row[a:b].sum().item() for name, (a, b) in out.layout.items()}
