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

Besides ``auto`` (the tiled backend; no-grad calls run its chunks on a pool of single-threaded
workers), ``tiled 1-call`` is the tiled backend as one call with the caller's intra-op threads (the
path before the worker pool), so before/after is measured in one run.

Load robustness (issue 13, item 8; section ``load``): 2-D 64x64, k=7, forward, timed without and
then with a competing process (``harness.competing_load``: a single-threaded matmul loop on one of
the cores); ``slowdown`` = loaded median / unloaded median per column, ``vs_dense`` = that slowdown /
dense SDPA's slowdown (target <= 1.5), ``flex_ratio`` = flex ms / tiled ms in that condition
(target >= 5). On a machine shared with other jobs "unloaded" means "without the extra process".

Waste at k=13 (issue 13, item 10; section ``k13``): useful rate share of dense SDPA for NA k=13
(stride 1) with the default tiles and smaller ones, and for the strided forms of Generalized
Neighborhood Attention, whose tiles can be exact (stride = kernel: sliding-tile / blocked attention).
``rate_share`` from the fastest calls, ``rate_share_med`` from the medians. ``gather`` rows are the
tiled backend's previous layout (``TiledOptions(layout="gather")``: key regions copied with
``index_select``); ``strided`` rows (now ``auto``) read key regions as overlapping strided views.
In the main table ``gather+pool`` is ``auto`` before the strided layout, ``tiled 1-call`` the
gather layout without the pool.

Run: ``python -m benchmarks.bench_neighborhood [--quick] [--section table|load|k13]`` or
``python -m benchmarks.run --only neighborhood``.
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
from attnfuse.ops.neighborhood import make_geometry
from attnfuse.ops.neighborhood.tiled import TiledOptions, tiled_neighborhood
from benchmarks.harness import pick_device, record, report, time_interleaved

try:
    from benchmarks.harness import competing_load
except ImportError:  # an older harness: the same helper, local
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def competing_load(processes: int = 1):
        code = (
            "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nprint('ready', flush=True)\n"
            "while True:\n    a = torch.tanh(a @ a)\n"
        )
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(processes)]
        try:
            for p in procs:
                p.stdout.readline()
            yield [p.pid for p in procs]
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=10)

__all__ = ["main"]

NAIVE_LIMIT_BYTES = 1.5e9


def _na(backend: str, kernel: int) -> Callable:
    def attn(q, k, v):
        return neighborhood_attention(q, k, v, kernel, backend=backend)

    return attn


def _tiled_one_call(kernel, workers: int | str = 1) -> Callable:
    """The tiled backend's gather layout: ``workers=1`` is one call with the caller's intra-op threads
    (the path before the worker pool), ``"auto"`` the pool (``auto`` before the strided layout)."""

    def attn(q, k, v):
        geom = make_geometry(q.shape[2:-1], kernel)
        opts = TiledOptions(workers=workers, layout="gather")
        return tiled_neighborhood(q, k, v, geom, scale=q.shape[-1] ** -0.5, options=opts)[0]

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


def main(quick: bool = False, device: str | None = None, sections: tuple[str, ...] = ("table", "load", "k13")) -> list[dict]:
    """Time every configuration; returns one record per (section, shape, pass, implementation)."""
    dev = pick_device(device)
    records: list[dict] = []
    if "table" in sections:
        records += _table(quick, dev)
    if "load" in sections:
        records += _load(quick, dev)
    if "k13" in sections:
        records += _k13(quick, dev)
    return records


def _table(quick: bool, dev: torch.device) -> list[dict]:
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
            if pass_name == "fwd":
                fns["tiled 1-call"] = make(_tiled_one_call(kernel), q, k, v)
                fns["gather+pool"] = make(_tiled_one_call(kernel, "auto"), q, k, v)
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


def _load(quick: bool, dev: torch.device) -> list[dict]:
    """k=7 forward with and without a competing process: slowdowns and the flex ratio per condition."""
    b, h, d, dtype = 1, 8, 64, torch.float32
    grid, kernel = ((32, 32), 7) if quick else ((64, 64), 7)
    g = torch.Generator(device=dev).manual_seed(7)
    q, k, v = (torch.randn(b, h, *grid, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
    fns = {
        "auto": _fwd(_na("auto", kernel), q, k, v),
        "tiled 1-call": _fwd(_tiled_one_call(kernel), q, k, v),
        "dense sdpa": _fwd(_dense, q, k, v),
        "flex": _fwd(_na("flex", kernel), q, k, v),
    }
    fns["flex"]()  # compile outside the timing
    repeat = 3 if quick else 9
    idle = time_interleaved(fns, device=dev, warmup=1, repeat=repeat)
    if dev.type == "cpu":
        with competing_load(1):
            busy = time_interleaved(fns, device=dev, warmup=1, repeat=repeat)
    else:
        busy = idle
    # training: forward+backward (the grad path runs as one call; no worker pool)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(qg.shape, device=dev, dtype=dtype, generator=g)
    train = {"auto": _fwd_bwd(_na("auto", kernel), qg, kg, vg, grad_out), "dense sdpa": _fwd_bwd(_dense, qg, kg, vg, grad_out)}
    train_idle = time_interleaved(train, device=dev, warmup=1, repeat=max(3, repeat // 2))
    if dev.type == "cpu":
        with competing_load(1):
            train_busy = time_interleaved(train, device=dev, warmup=1, repeat=max(3, repeat // 2))
    else:
        train_busy = train_idle
    records = []
    for cond, timings in (("no extra load", train_idle), ("+1 competing process", train_busy)):
        for name, t in timings.items():
            rec = record(op="neighborhood", backend=name, variant=f"k={kernel}, {cond}", shape=(b, h, *grid, d), dtype=dtype,
                         device=dev, ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"], **{"pass": "fwd+bwd"})
            if cond != "no extra load":
                slow = train_busy[name]["ms"] / train_idle[name]["ms"]
                rec["slowdown"] = slow
                rec["vs_dense"] = slow / (train_busy["dense sdpa"]["ms"] / train_idle["dense sdpa"]["ms"])
            records.append(rec)
    for cond, timings in (("no extra load", idle), ("+1 competing process", busy)):
        for name, t in timings.items():
            slow = busy[name]["ms"] / idle[name]["ms"]
            rec = record(
                op="neighborhood", backend=name, variant=f"k={kernel}, {cond}", shape=(b, h, *grid, d), dtype=dtype, device=dev,
                ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"], **{"pass": "fwd"},
                flex_ratio=timings["flex"]["ms"] / t["ms"], flex_ratio_min=timings["flex"]["min_ms"] / t["min_ms"],
            )
            if cond != "no extra load":
                rec["slowdown"] = slow
                rec["vs_dense"] = slow / (busy["dense sdpa"]["ms"] / idle["dense sdpa"]["ms"])
            records.append(rec)
    return records


def _k13(quick: bool, dev: torch.device) -> list[dict]:
    """Useful rate share of dense SDPA at k=13: NA with several tiles, and strided (GNA) forms."""
    b, h, d, dtype = 1, 8, 64, torch.float32
    grid = (32, 32) if quick else (64, 64)
    n = math.prod(grid)
    g = torch.Generator(device=dev).manual_seed(13)
    q, k, v = (torch.randn(b, h, *grid, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
    scale = d ** -0.5

    def tiled(kernel, stride=1, tile=None, workers="auto", layout="auto"):
        geom = make_geometry(grid, kernel, stride=stride)
        opts = TiledOptions(tile=tile, workers=workers, layout=layout)
        return lambda: tiled_neighborhood(q, k, v, geom, scale=scale, options=opts)[0]

    variants = {
        "NA k=13 gather, 1-call (before pool)": (tiled(13, workers=1, layout="gather"), 13, 1),
        "NA k=13 gather+pool 8x16 (before)": (tiled(13, layout="gather"), 13, 1),
        "NA k=13 gather+pool 8x8": (tiled(13, tile=(8, 8), layout="gather"), 13, 1),
        "NA k=13 (auto: strided 2x8)": (tiled(13), 13, 1),
        "NA k=13 strided 1x16": (tiled(13, tile=(1, 16)), 13, 1),
        "NA k=13 strided 4x8": (tiled(13, tile=(4, 8)), 13, 1),
        "NA k=13 strided 1-call": (tiled(13, workers=1), 13, 1),
        "GNA k=13 stride 4": (tiled(13, stride=4, tile=(8, 16)), 13, 4),
        "GNA k=13 stride 13 (sliding tile)": (tiled(13, stride=13, tile=(13, 13)), 13, 13),
    }
    fns = {name: _fwd(lambda q_, k_, v_, f=f: f(), q, k, v) for name, (f, _, _) in variants.items()}
    fns["dense sdpa"] = _fwd(_dense, q, k, v)
    timings = time_interleaved(fns, device=dev, warmup=1, repeat=3 if quick else 7)
    dense_rate = 4 * d * h * b * n * n / (timings["dense sdpa"]["min_ms"] * 1e-3) / 1e9
    dense_rate_med = 4 * d * h * b * n * n / (timings["dense sdpa"]["ms"] * 1e-3) / 1e9
    records = []
    for name, t in timings.items():
        pairs = n * n if name == "dense sdpa" else n * 13 ** len(grid)  # every query sees k^2 keys (shift border)
        rate = 4 * d * h * b * pairs / (t["min_ms"] * 1e-3) / 1e9
        rate_med = 4 * d * h * b * pairs / (t["ms"] * 1e-3) / 1e9
        records.append(record(
            op="neighborhood", backend=name, variant="k=13", shape=(b, h, *grid, d), dtype=dtype, device=dev, ms=t["ms"],
            min_ms=t["min_ms"], gflops=rate, rate_share=rate / dense_rate, rate_share_med=rate_med / dense_rate_med,
            **{"pass": "fwd"},
        ))
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--section", action="append", choices=("table", "load", "k13"), help="default: all")
    args = parser.parse_args()
    sections = tuple(args.section or ("table", "load", "k13"))
    report("neighborhood", main(quick=args.quick, device=args.device, sections=sections),
           columns=("backend", "variant", "pass", "shape", "ms", "min_ms", "gflops", "ratio", "ratio_min", "auto_rate_share",
                    "compile_s", "slowdown", "vs_dense", "flex_ratio", "flex_ratio_min", "rate_share", "rate_share_med"))
