"""Mixture-of-Head attention: sparse head computation at 50 % / 75 % of heads vs full multi-head attention.

Two levels, each timed interleaved in one run with the anchor (``ratio = ours / anchor`` of the medians):

* **core**: the attention of ``H = 8`` heads, ``B = 4``, ``D = 64``, ``L = S`` in {512, 1024}
  (``--quick``: {256}), fp32. Anchor ``MHA (sdpa)``: ``torch.nn.functional.scaled_dot_product_attention``
  over all heads. ``MoH-50% sparse`` / ``MoH-75% sparse``: :func:`attnfuse.ops.mixture_of_heads` with
  ``compute="sparse"`` and the gates of 2 shared heads + top-2 / top-4 of 6 routed heads (random router
  logits: a balanced routing, each routed head used by about 1/3 or 2/3 of the tokens).
  ``MoH-50% dense-gated``: every head computed, then gated (the released code's cost). Non-causal and
  causal; forward (no grad) and forward + backward (gradients of q, k, v).
* **layer**: :class:`attnfuse.nn.MixtureOfHeadAttention` (``dim = 512``, 8 heads, sparse, routing
  included) vs :class:`attnfuse.nn.Attention` (dense operator, SDPA) at ``L = 1024``
  (``--quick``: 256): projections are computed for all heads in both, so the saving is smaller.

Every configuration is timed as the machine is ("no added load"), and the core at the largest ``L`` again with a competing process
(``benchmarks.harness.competing_load``: one busy single-threaded matmul loop).

Run: ``python -m benchmarks.bench_moh [--quick]`` or ``python -m benchmarks.run --only moh``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnfuse.nn import Attention, MixtureOfHeadAttention
from attnfuse.ops import mixture_of_heads, moh_route
from benchmarks.harness import competing_load, pick_device, record, report, time_interleaved

__all__ = ["main"]

H, SHARED, D, B = 8, 2, 64, 4
ARMS = {"MoH-50% sparse": 2, "MoH-75% sparse": 4}  # top-k of the 6 routed heads


def _gates(b: int, length: int, top_k: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(b, length, H - SHARED, generator=g)
    return moh_route(logits, top_k, shared=SHARED, mix_logits=torch.zeros(b, length, 2)).gates.to(device)  # (B, L, H)


def _timed(fn: Callable[[], Any], grad: bool, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    if not grad:
        def run_fwd():
            with torch.no_grad():
                return fn()
        return run_fwd

    def run_fwd_bwd():
        out = fn()
        return torch.autograd.grad(out.sum(), inputs)
    return run_fwd_bwd


def _core(dev: torch.device, length: int, causal: bool, grad: bool, repeat: int, load: str) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(length)
    q, k, v = (torch.randn(B, H, length, D, device=dev, generator=g, requires_grad=grad) for _ in range(3))
    gates = {name: _gates(B, length, top_k, dev, seed=top_k) for name, top_k in ARMS.items()}
    fns = {"MHA (sdpa)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    for name in ARMS:
        fns[name] = functools.partial(mixture_of_heads, q, k, v, gates[name], is_causal=causal, compute="sparse")
    fns["MoH-50% dense-gated"] = lambda: mixture_of_heads(q, k, v, gates["MoH-50% sparse"], is_causal=causal)
    timings = time_interleaved({n: _timed(f, grad, (q, k, v)) for n, f in fns.items()}, device=dev, warmup=1, repeat=repeat)
    base = timings["MHA (sdpa)"]
    return [
        record(op="moh core", backend=name, variant=("causal" if causal else "full") + f", {load}", shape=(B, H, length, D),
               dtype=torch.float32, device=dev, ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"],
               ratio=t["ms"] / base["ms"], ratio_min=t["min_ms"] / base["min_ms"], **{"pass": "fwd+bwd" if grad else "fwd"})
        for name, t in timings.items()
    ]


def _layer(dev: torch.device, length: int, causal: bool, grad: bool, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    dim = H * D
    mha = Attention(dim, H).to(dev)
    layers = {"MHA layer (sdpa)": mha}
    for name, top_k in ARMS.items():
        layers[name.replace("sparse", "layer, sparse")] = MixtureOfHeadAttention.from_attention(
            mha, shared=SHARED, top_k=top_k, compute="sparse").to(dev)
    for layer in layers.values():  # a trained-like, balanced router instead of the zero init
        if isinstance(layer, MixtureOfHeadAttention):
            with torch.no_grad():
                layer.w_routed.weight.normal_(0, 1.0)
    x = torch.randn(B, length, dim, device=dev, requires_grad=grad)
    fns = {n: _timed(functools.partial(m, x, is_causal=causal), grad, (x,)) for n, m in layers.items()}
    timings = time_interleaved(fns, device=dev, warmup=1, repeat=repeat)
    base = timings["MHA layer (sdpa)"]
    return [
        record(op="moh layer", backend=name, variant=("causal" if causal else "full") + ", no added load", shape=(B, length, dim),
               dtype=torch.float32, device=dev, ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"],
               ratio=t["ms"] / base["ms"], ratio_min=t["min_ms"] / base["min_ms"], **{"pass": "fwd+bwd" if grad else "fwd"})
        for name, t in timings.items()
    ]


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time the configurations; returns one record per (level, length, causal, pass, load, implementation)."""
    dev = pick_device(device)
    lengths = (256,) if quick else (512, 1024)
    repeat = 3 if quick else 7
    records: list[dict] = []
    for length in lengths:
        for causal in (False, True):
            for grad in (False, True):
                records += _core(dev, length, causal, grad, repeat, "no added load")
    with competing_load(1):
        for causal in (False, True):
            for grad in (False, True):
                records += _core(dev, lengths[-1], causal, grad, repeat, "1 competing process")
    for causal in (False, True):
        for grad in (False, True):
            records += _layer(dev, lengths[-1], causal, grad, repeat)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_moh", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report("moh", main(quick=args.quick, device=args.device))
