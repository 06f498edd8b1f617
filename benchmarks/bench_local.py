"""Halo, routing and Combiner attention against their reference backends and dense SDPA over all tokens.

Shapes (B=1, H=8, D=64, fp32; ``--quick`` halves every side):

* 2-D grid 64 x 64 (N = 4096 tokens): halo (block 8, halo 3) ``"blocked"`` vs ``"reference"``;
  routing (8 x 8 regions, top-4) ``"gather"`` vs ``"reference"`` and vs the official code's
  ``torch.gather`` of an expanded view (variant ``torch.gather``, defined here only for comparison);
  dense SDPA over the 4096 tokens.
* 2-D grid 64 x 64, ``nn.HaloAttention`` (dim 512, 8 heads): relative logits (``rel_pos="logits"``) as now,
  as before issue 13 item 11 (``rel logits (before)``: one full-window gather per axis, defined here only for
  comparison) and without relative positions (the anchor of these rows).
* 1-D sequence L = 4096 and (not ``--quick``) 16384: Combiner ``"blocked"`` (fixed, axial, logsparse;
  bidirectional and causal) vs dense SDPA, and the implementation before the fused axial / logsparse paths of
  issue 13 item 7 (``before``: commit 590f559's general paths, still in the module for masked / padded inputs);
  its ``"reference"`` (which materialises ``L x L`` plus region matrices) at L = 1024.

All candidates of one configuration run in the same process, interleaved (see ``harness``);
``ratio`` is ``ms / dense SDPA ms`` for the same tokens and pass (below 1 = faster than dense).
``gflops`` counts useful FLOPs only: ``4 D`` per attended (query, key) pair forward, ``12 D``
forward+backward (halo: pairs inside each window that lie in the grid; routing: ``topk`` regions of
keys per query; dense: all pairs); it is left out for Combiner, whose summaries are not key pairs.

Run: ``python -m benchmarks.bench_local [--quick]`` or ``python -m benchmarks.run --only local``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnfuse import nn, ops
from attnfuse.ops import combiner as _c
from attnfuse.ops.halo import halo_key_sets, halo_query_blocks, halo_relative_index
from attnfuse.ops.routing import _gathered
from benchmarks.harness import pick_device, record, report, time_interleaved

__all__ = ["main"]


def _official_gather(q, k, v, regions, topk):
    """Routing attention with the official code's gather: ``torch.gather`` on an expanded (B, H, R, R, T, C) view."""
    import attnfuse.ops.routing as routing

    original = routing._gather

    def gather(x, idx):
        b, h, r, t, c = x.shape
        index = idx.view(b, 1, r, -1, 1, 1).expand(b, h, r, idx.shape[-1], t, c)  # (B, H, R, k, T, C)
        out = torch.gather(x.unsqueeze(2).expand(b, h, r, r, t, c), 3, index)  # (B, H, R, k, T, C)
        return out.reshape(b, h, r, -1, c)

    routing._gather = gather
    try:
        idx = routing.route_regions(q, k, (regions, regions), topk)
        return _gathered(q, k, v, regions=(regions, regions), idx=idx, mask=None, scale=None, need_weights=False)[0]
    finally:
        routing._gather = original


# ---- Combiner "blocked" before the fused paths of issue 13 item 7 (commit 590f559) ---------------------------------
def _before_combiner(q, k, v, *, mode, is_causal):
    """Combiner ``blocked`` as of commit 590f559, unmasked, for the before/after ratio only.

    The general paths ``_fixed`` / ``_axial`` / ``_logsparse`` of :mod:`attnfuse.ops.combiner` are unchanged
    since that commit; only the dispatcher now sends unmasked axial (``L = n s``) and logsparse (``L = 2^k``)
    to the fused paths. Calling the general paths directly times the code of that commit.
    """
    length, scale = q.shape[2], q.shape[-1] ** -0.5
    valid = _c._key_valid(None, length, q.device)  # (1, 1, L)
    if mode == "logsparse":
        return _c._logsparse(q, k, v, valid, is_causal, scale, True, "mean", False)[0]
    block = max(1, math.ceil(math.sqrt(length)))
    if length % block:
        raise ValueError("the before path is timed for L divisible by ceil(sqrt(L)) only")
    fn = _c._fixed if mode == "fixed" else _c._axial
    return fn(q, k, v, valid, block, is_causal, scale, True, "mean", False)[0]


def _before_halo_logits(q, tables, block, halo):
    """HaloAttention's relative logits before issue 13 item 11: one full-window gather per axis, then their sum."""
    idx = halo_relative_index(block, halo)  # (k, Bq, W)
    q_blk = halo_query_blocks(q, block)  # (B, H, NB, Bq, Dh)
    bias = 0
    for a, table in enumerate(tables):
        logits = q_blk @ table.t()  # (B, H, NB, Bq, span_a)
        bias = bias + logits.gather(-1, idx[a].expand(*logits.shape[:3], -1, -1))  # (B, H, NB, Bq, W)
    return bias


def _make(fn: Callable[[], torch.Tensor], inputs, pass_name: str) -> Callable[[], Any]:
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return fn()
    else:
        def run():
            out = fn()
            return torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def _time(fns: dict[str, tuple[Callable[[], torch.Tensor], tuple]], pass_name: str, dev, repeat: int) -> dict[str, dict[str, float]]:
    """``fns``: name -> (zero-argument call, the inputs to differentiate)."""
    return time_interleaved({n: _make(f, x, pass_name) for n, (f, x) in fns.items()}, device=dev, warmup=1, repeat=repeat)


def _records(timings, *, op_of, variant_of, pairs_of, shape, dtype, dev, pass_name, d, anchor="dense sdpa") -> list[dict]:
    out = []
    base = timings[anchor]
    for name, t in timings.items():
        extra = {}
        pairs = pairs_of(name)
        if pairs is not None:
            extra["gflops"] = (4 if pass_name == "fwd" else 12) * d * pairs / (t["ms"] * 1e-3) / 1e9
        out.append(record(op=op_of(name), backend=name, variant=variant_of(name), shape=shape, dtype=dtype, device=dev,
                          ms=t["ms"], min_ms=t["min_ms"], iqr_ms=t["iqr_ms"], ratio=t["ms"] / base["ms"],
                          ratio_min=t["min_ms"] / base["min_ms"], **extra, **{"pass": pass_name}))
    return out


def _combiner_records(b, h, d, n, quick, dev, dtype, g, repeat) -> list[dict]:
    """1-D sequence: Combiner ``blocked`` (and ``before``, ``reference``) vs dense SDPA at L = n, n / 4, 4 n."""
    records: list[dict] = []
    # ---- 1-D sequence: Combiner ---------------------------------------------------------------------------------
    # (length, reference backend too, the pre-item-7 implementation too)
    sizes = [(n, False, True), (n // 4, True, False)] + ([] if quick else [(4 * n, False, True)])
    for length, with_reference, with_before in sizes:
        qs, ks, vs = (torch.randn(b, h, length, d, device=dev, dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
        for causal in (False, True):
            seq = (qs, ks, vs)
            fns = {"dense sdpa": (lambda x=seq, c=causal: F.scaled_dot_product_attention(*x, is_causal=c), seq)}
            for mode in ("fixed", "axial", "logsparse"):
                for backend in ("blocked", "reference") if with_reference else ("blocked",):
                    fns[f"combiner {mode} {backend}"] = (lambda x=seq, m=mode, c=causal, be=backend: ops.combiner_attention(
                        *x, mode=m, is_causal=c, backend=be), seq)
                if with_before:
                    fns[f"combiner {mode} before"] = (lambda x=seq, m=mode, c=causal: _before_combiner(*x, mode=m, is_causal=c), seq)
            for pass_name in ("fwd", "fwd+bwd"):
                timings = _time(fns, pass_name, dev, 2 if length > n else repeat)  # dense at 16384 takes seconds a call
                records += _records(
                    timings, op_of=lambda name: "dense" if name == "dense sdpa" else "combiner",
                    variant_of=lambda name, c=causal: ("causal" if c else "bidirectional") + (
                        "" if name == "dense sdpa" else f" {name.split()[1]}"),
                    pairs_of=lambda name, c=causal, ln=length: ((ln * (ln + 1) // 2 if c else ln * ln) * b * h
                                                                if name == "dense sdpa" else None),
                    shape=(b, h, length, d), dtype=dtype, dev=dev, pass_name=pass_name, d=d)
    return records


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time every configuration; one record per (configuration, pass, implementation)."""
    dev = pick_device(device)
    b, h, d, dtype = 1, 8, 64, torch.float32
    side = 32 if quick else 64
    repeat = 3 if quick else 5
    g = torch.Generator(device=dev).manual_seed(0)
    records: list[dict] = []

    # ---- 2-D grid: halo and routing -------------------------------------------------------------------------
    n = side * side
    qg, kg, vg = (torch.randn(b, h, side, side, d, device=dev, dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
    flat = [t.detach().reshape(b, h, n, d).requires_grad_() for t in (qg, kg, vg)]
    block, halo, regions, topk = 8, 3, 8, 4
    halo_pairs = int(halo_key_sets((side, side), (block, block), (halo, halo))[0].sum()) * b * h
    routing_pairs = n * topk * (n // regions**2) * b * h
    grid = (qg, kg, vg)
    grid_fns = {
        "dense sdpa": (lambda: F.scaled_dot_product_attention(*flat), flat),
        "halo blocked": (lambda: ops.halo_attention(qg, kg, vg, block, halo, backend="blocked"), grid),
        "halo reference": (lambda: ops.halo_attention(qg, kg, vg, block, halo, backend="reference"), grid),
        "routing gather": (lambda: ops.routing_attention(qg, kg, vg, regions, topk, backend="gather"), grid),
        "routing torch.gather": (lambda: _official_gather(qg, kg, vg, regions, topk), grid),
        "routing reference": (lambda: ops.routing_attention(qg, kg, vg, regions, topk, backend="reference"), grid),
    }
    variants = {"halo": f"block {block} halo {halo}", "routing": f"{regions}x{regions} regions top-{topk}", "dense": "all tokens"}
    pairs = {"dense": n * n * b * h, "halo": halo_pairs, "routing": routing_pairs}
    for pass_name in ("fwd", "fwd+bwd"):
        timings = _time(grid_fns, pass_name, dev, repeat)
        records += _records(
            timings, op_of=lambda name: name.split()[0], variant_of=lambda name: variants[name.split()[0]],
            pairs_of=lambda name: pairs[name.split()[0]], shape=(b, h, side, side, d), dtype=dtype, dev=dev,
            pass_name=pass_name, d=d)

    # ---- HaloAttention module: relative logits (issue 13 item 11) -------------------------------------------------
    x = torch.randn(b, side, side, h * d, device=dev, dtype=dtype, generator=g, requires_grad=True)
    halo_mod = nn.HaloAttention(h * d, h, block_size=block, halo_size=halo, rel_pos="logits").to(dev)
    plain_mod = nn.HaloAttention(h * d, h, block_size=block, halo_size=halo, rel_pos=None).to(dev)
    plain_mod.load_state_dict(halo_mod.state_dict(), strict=False)

    def before_module(x=x, m=halo_mod):
        q, k, v = m._qkv(x)
        bias = _before_halo_logits(q, list(m.rel), m.block_size, m.halo_size)
        return m._out(ops.halo_attention(q, k, v, m.block_size, m.halo_size, bias=bias))

    module_fns = {"no rel_pos": (lambda: plain_mod(x), (x,)), "rel logits": (lambda: halo_mod(x), (x,)),
                  "rel logits (before)": (before_module, (x,))}
    for pass_name in ("fwd", "fwd+bwd"):
        timings = _time(module_fns, pass_name, dev, repeat)
        records += _records(timings, op_of=lambda name: "HaloAttention", variant_of=lambda name: f"dim {h * d}, block {block} halo {halo}",
                            pairs_of=lambda name: None, shape=(b, side, side, h * d), dtype=dtype, dev=dev,
                            pass_name=pass_name, d=d, anchor="no rel_pos")

    records += _combiner_records(b, h, d, n, quick, dev, dtype, g, repeat)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the sizes and fewer repeats")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    args = parser.parse_args()
    report("local", main(quick=args.quick, device=args.device))
