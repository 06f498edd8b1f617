"""neighborhood_attention on CPU: naive gather reference, compiled FlexAttention, attnfuse auto, dense SDPA.

Shapes (issue 5): B=1, H=8, D=64, fp32; 2-D 64x64 grid with k=7 and k=13; 1-D L=4096 and 16384
with a window of 257 (``--quick``: 2-D 32x32 and 1-D L=2048 only). Forward (no grad) and forward+backward.

Columns (``backend``):
    naive      ``backend="reference"``: gathers every query's window keys and values (``(B, H, N, K, D)``)
    flex       ``backend="flex"``: FlexAttention compiled with ``torch.compile``, block mask from the window
               rule over the tile-ordered grid; its first call (block mask + compilation) is reported
               separately as ``compile_s``; CPU: forward only (no backward in torch 2.13)
    natten     ``backend="natten"`` if the package is importable
    auto       ``backend="auto"`` (the tiled backend on CPU)
    dense sdpa ``scaled_dot_product_attention`` over all N tokens (the rate limit)

Useful FLOPs count only unmasked query-key pairs: forward ``4 D P`` per head, forward+backward
``12 D P`` (``P`` = pairs: ``N prod(k)`` for a window, ``N^2`` for dense SDPA); ``gflops`` uses the
median time. Ratios are taken within one run (same tensors, interleaved timing): ``ratio`` = this
column's time / auto's (medians), ``ratio_min`` the same from the fastest calls (least disturbed by
other jobs on a shared machine), ``auto_rate_share`` = auto's useful rate / dense SDPA's rate (fastest calls).
Naive runs are skipped when their gathered tensors would exceed 1.5 GB.

Run: ``python -m benchmarks.bench_neighborhood [--quick]`` or ``python -m benchmarks.run --only neighborhood``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnfuse.ops import neighborhood_attention
from benchmarks.harness import pick_device, record, report, time_interleaved

__all__ = ["main"]

NAIVE_LIMIT_BYTES = 1.5e9


def _na(backend: str, kernel: int) -> Callable:
    def attn(q, k, v):
        return neighborhood_attention(q, k, v, kernel, backend=backend)

    return attn


def _dense(q, k, v):
    b, h = q.shape[:2]
    flat = [t.reshape(b, h, -1, t.shape[-1]) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*flat)


def _fwd(fn: Callable, q, k, v) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return fn(q, k, v)

    return run


def _fwd_bwd(fn: Callable, q, k, v, grad_out) -> Callable[[], Any]:
    def run():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out.reshape(out.shape))

    return run


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time every configuration; returns one record per (shape, pass, implementation)."""
    dev = pick_device(device)
    b, h, d, dtype = 1, 8, 64, torch.float32
    configs = [((32, 32), 7), ((2048,), 257)] if quick else [((64, 64), 7), ((64, 64), 13), ((4096,), 257), ((16384,), 257)]
    have_natten = importlib.util.find_spec("natten") is not None
    records: list[dict] = []
    for grid, kernel in configs:
        n = math.prod(grid)
        window = kernel ** len(grid)
        g = torch.Generator(device=dev).manual_seed(n + kernel)
        q, k, v = (torch.randn(b, h, *grid, d, device=dev, dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(b, h, *grid, d, device=dev, dtype=dtype, generator=g)
        gathered = b * h * n * window * d * 4  # bytes of one gathered K (or V) in the naive reference
        long_seq = n >= 16384
        compile_s = None
        for pass_name, factor in (("fwd", 4), ("fwd+bwd", 12)):
            make = _fwd if pass_name == "fwd" else _fwd_bwd
            extra = () if pass_name == "fwd" else (grad_out,)
            fns = {"auto": make(_na("auto", kernel), q, k, v, *extra), "dense sdpa": make(_dense, q, k, v, *extra)}
            if gathered * (1 if pass_name == "fwd" else 2) <= NAIVE_LIMIT_BYTES:
                fns["naive"] = make(_na("reference", kernel), q, k, v, *extra)
            if pass_name == "fwd" or dev.type == "cuda":
                if compile_s is None:
                    t0 = time.perf_counter()
                    _fwd(_na("flex", kernel), q, k, v)()  # block mask + torch.compile, reported apart
                    compile_s = time.perf_counter() - t0
                fns["flex"] = make(_na("flex", kernel), q, k, v, *extra)
                if have_natten:
                    fns["natten"] = make(_na("natten", kernel), q, k, v, *extra)
            repeat = 3 if quick else (2 if long_seq and pass_name != "fwd" else 5)
            timings = time_interleaved(fns, device=dev, warmup=1, repeat=repeat)
            auto_ms, auto_min = timings["auto"]["ms"], timings["auto"]["min_ms"]
            auto_rate = factor * d * h * b * n * window / (auto_min * 1e-3) / 1e9
            for name, t in timings.items():
                pairs = n * n if name == "dense sdpa" else n * window
                rate = factor * d * h * b * pairs / (t["ms"] * 1e-3) / 1e9
                rec = record(
                    op="neighborhood", backend=name, variant=f"k={kernel}", shape=(b, h, *grid, d), dtype=dtype, device=dev,
                    ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"], gflops=rate, **{"pass": pass_name},
                    ratio=t["ms"] / auto_ms,  # this column / auto (medians): > 1 means auto is faster
                    ratio_min=t["min_ms"] / auto_min,  # the same from the fastest calls
                )
                if name == "dense sdpa":  # auto's useful rate / dense SDPA's rate, from the fastest calls
                    rec["auto_rate_share"] = auto_rate / (factor * d * h * b * pairs / (t["min_ms"] * 1e-3) / 1e9)
                if name == "flex":
                    rec["compile_s"] = compile_s
                records.append(rec)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    report("neighborhood", main(quick=args.quick, device=args.device),
           columns=("backend", "variant", "pass", "shape", "ms", "min_ms", "gflops", "ratio", "ratio_min", "auto_rate_share", "compile_s"))
