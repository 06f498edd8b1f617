"""dense_attention(backend="auto") against raw torch SDPA: the dispatch and zero-row overhead.

Shapes: B=1, H=8, D=64, L=S in {1024, 4096} (``--quick``: {256, 1024}), fp32; forward (no grad) and
forward+backward. Both run in the same process, interleaved, on the same tensors; ``ratio`` is
``ours / raw`` of the medians from that one run (``ratio_min``: of the fastest calls, which a
busy shared machine disturbs least). A ``key-padding`` variant passes a ``(B, 1, 1, S)`` bool mask to both.

Useful FLOPs (no recomputation, no softmax): forward ``4 B H L S D`` (``Q K^T`` and ``P V``),
backward ``8 B H L S D`` (``dV``, ``dP``, ``dQ``, ``dK``).

Log-sum-exp (issue 13, item 9): ``op = dense+lse`` rows time ``return_lse=True`` on the fused kernels
(``auto lse``) and on the reference backend that served it before (``reference lse (before)``, only at
L <= 1024: it materialises ``(B, H, L, S)``) against the same call without the log-sum-exp (``auto``);
the forward+backward loss uses both ``out`` and ``lse`` (as ring attention and merging do), and
``ratio`` is relative to ``auto``.

Run: ``python -m benchmarks.bench_dense [--quick]`` or ``python -m benchmarks.run``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnfuse.ops import dense_attention
from benchmarks.harness import pick_device, record, report, time_interleaved

__all__ = ["main"]


def _fwd(attn: Callable, q, k, v, mask) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return attn(q, k, v, mask)

    return run


def _fwd_bwd(attn: Callable, q, k, v, mask, grad_out) -> Callable[[], Any]:
    def run():
        out = attn(q, k, v, mask)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return run


def ours(q, k, v, mask):
    return dense_attention(q, k, v, mask=mask, backend="auto")


def raw(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time the configurations; returns one record per (length, variant, pass, implementation)."""
    dev = pick_device(device)
    b, h, d, dtype = 1, 8, 64, torch.float32
    lengths = (256, 1024) if quick else (1024, 4096)
    records = []
    for length in lengths:
        variants = ["none"] if length > 1024 else ["none", "key-padding"]
        for variant in variants:
            g = torch.Generator(device=dev).manual_seed(length)
            q, k, v = (torch.randn(b, h, length, d, device=dev, dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
            grad_out = torch.randn(b, h, length, d, device=dev, dtype=dtype, generator=g)
            mask = None
            if variant == "key-padding":
                mask = torch.ones(b, 1, 1, length, dtype=torch.bool, device=dev)
                mask[..., -length // 10 :] = False  # the last 10 % of the keys are padding
            for pass_name, flop_factor in (("fwd", 4), ("fwd+bwd", 12)):
                make = _fwd if pass_name == "fwd" else _fwd_bwd
                extra = () if pass_name == "fwd" else (grad_out,)
                fns = {"auto": make(ours, q, k, v, mask, *extra), "raw sdpa": make(raw, q, k, v, mask, *extra)}
                big = length >= 4096
                repeat = 7 if quick else (5 if big else 15)
                timings = time_interleaved(fns, device=dev, warmup=1 if big else 2, repeat=repeat)
                flops = flop_factor * b * h * length * length * d
                for name, t in timings.items():
                    records.append(record(
                        op="dense", backend=name, variant=variant, shape=(b, h, length, d), dtype=dtype, device=dev,
                        ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"], gflops=flops / (t["ms"] * 1e-3) / 1e9,
                        ratio=t["ms"] / timings["raw sdpa"]["ms"], ratio_min=t["min_ms"] / timings["raw sdpa"]["min_ms"],
                        **{"pass": pass_name},
                        **({"mem_mb": t["mem_mb"]} if "mem_mb" in t else {}),
                    ))
    records += _lse_records(dev, lengths, quick)
    return records


def _lse_call(tensors, backend: str, lse: bool, grad: bool) -> Callable[[], Any]:
    q, k, v, grad_out, grad_lse = tensors

    def run():
        with torch.set_grad_enabled(grad):
            res = dense_attention(q, k, v, return_lse=lse, backend=backend)
            if not grad:
                return res
            outs, grads = ((res[0], res[1]), (grad_out, grad_lse)) if lse else ((res,), (grad_out,))
            return torch.autograd.grad(outs, (q, k, v), grads)

    return run


def _lse_records(dev: torch.device, lengths: tuple[int, ...], quick: bool) -> list[dict]:
    b, h, d, dtype = 1, 8, 64, torch.float32
    records = []
    for length in lengths:
        g = torch.Generator(device=dev).manual_seed(length + 1)
        q, k, v = (torch.randn(b, h, length, d, device=dev, dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(b, h, length, d, device=dev, dtype=dtype, generator=g)
        grad_lse = torch.randn(b, h, length, device=dev, dtype=dtype, generator=g)

        for pass_name, grad in (("fwd", False), ("fwd+bwd", True)):
            tensors = (q, k, v, grad_out, grad_lse)
            fns = {"auto": _lse_call(tensors, "auto", False, grad), "auto lse": _lse_call(tensors, "auto", True, grad)}
            if length <= 1024:
                fns["reference lse (before)"] = _lse_call(tensors, "reference", True, grad)
            big = length >= 4096
            timings = time_interleaved(fns, device=dev, warmup=1 if big else 2, repeat=7 if quick else (5 if big else 15))
            for name, t in timings.items():
                records.append(record(
                    op="dense+lse", backend=name, variant="none", shape=(b, h, length, d), dtype=dtype, device=dev,
                    ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"],
                    ratio=t["ms"] / timings["auto"]["ms"], ratio_min=t["min_ms"] / timings["auto"]["min_ms"],
                    **{"pass": pass_name},
                ))
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller lengths and fewer repeats")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    args = parser.parse_args()
    report("dense", main(quick=args.quick, device=args.device))
