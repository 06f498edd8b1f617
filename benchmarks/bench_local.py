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
  bidirectional and causal) vs dense SDPA; at 4096 also the implementation before issue 13 item 7
  (``before``: commit 86355bd, copied here only for comparison); its ``"reference"`` (which materialises
  ``L x L`` plus region matrices) at L = 1024.

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
from attnfuse.ops._blocks import ceil_div
from attnfuse.ops._guards import drop_masked
from attnfuse.ops.halo import halo_key_sets, halo_query_blocks, halo_relative_index
from attnfuse.ops.reference import masked_softmax
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


# ---- Combiner "blocked" before issue 13 item 7 (commit 86355bd), kept here only to time before / after in one run ----
def _before_summaries(qb, kb, vb, vm, scale, correction):
    """Per-block mean key, count term and attention-pooled value.

    ``qb, kb (B, H, n, t, D)``, ``vb (B, H, n, t, Dv)``, ``vm (B', H', n, t)`` valid keys ->
    ``k_bar (B, H, n, D)``, ``log_count (B', H', n)`` (``-inf`` for an empty block), ``v_bar (B, H, n, Dv)``.
    """
    w = vm.to(qb.dtype)
    count = w.sum(-1)  # (B', H', n)
    avg = (w / count.clamp(min=1).unsqueeze(-1)).unsqueeze(-1)  # (B', H', n, t, 1)
    k_bar, q_bar = (kb * avg).sum(-2), (drop_masked(qb, vm) * avg).sum(-2)  # (B, H, n, D); masked queries never reach a mean
    s = torch.einsum("bhnd,bhntd->bhnt", q_bar, kb) * scale  # (B, H, n, t)
    pool, _ = masked_softmax(s.masked_fill(~vm, float("-inf")))
    v_bar = torch.einsum("bhnt,bhntv->bhnv", pool, vb)  # (B, H, n, Dv)
    log_count = count.clamp(min=1).log() if correction else torch.zeros_like(count)
    return k_bar, log_count.masked_fill(count == 0, float("-inf")), v_bar


def _before_fixed(q, k, v, valid, s, is_causal, scale, correction):
    b, h, length, _ = q.shape
    n = q.shape[2] // s
    qb, kb, vb = (t.reshape(b, h, n, s, t.shape[-1]) for t in (q, k, v))  # (B, H, n, s, *)
    vm = valid.reshape(valid.shape[0], valid.shape[1], n, s)  # (B', H', n, s)
    k_bar, log_count, v_bar = _before_summaries(qb, kb, vb, vm, scale, correction)
    s_direct = (qb @ kb.transpose(-2, -1) * scale).masked_fill(~vm.unsqueeze(-2), float("-inf"))  # (B, H, n, s, s)
    if is_causal:
        s_direct = s_direct.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    s_sum = torch.einsum("bhnsd,bhmd->bhnsm", qb, k_bar) * scale + log_count.unsqueeze(-2).unsqueeze(-2)  # (B, H, n, s, n)
    r = torch.arange(n, device=q.device)
    other = (r.view(1, -1) < r.view(-1, 1)) if is_causal else (r.view(1, -1) != r.view(-1, 1))  # (n, n) own row, other row
    s_sum = s_sum.masked_fill(~other.view(n, 1, n), float("-inf"))
    w, lse = masked_softmax(torch.cat([s_direct, s_sum], dim=-1))  # (B, H, n, s, s + n)
    out = w[..., :s] @ vb + w[..., s:] @ v_bar.unsqueeze(2)  # (B, H, n, s, Dv)
    return out.reshape(b, h, length, -1), lse.reshape(b, h, length)


def _before_prefix_summaries(qc, kc, vc, vmc, scale, correction, reverse):
    """Summaries of the earlier (or, ``reverse``, later) rows of every column.

    ``qc, kc (B, H, s, n, D)``, ``vc (B, H, s, n, Dv)``, ``vmc (B', H', s, n)`` by (column, row) ->
    ``k_bar (B, H, s, n, D)``, ``log_count (B', H', s, n)``, ``v_bar (B, H, s, n, Dv)`` for region (column, row).
    """
    w = vmc.to(qc.dtype)
    qc = drop_masked(qc, vmc)  # a masked query never reaches a mean (NaN there included)
    if reverse:
        qc, kc, w = qc.flip(-2), kc.flip(-2), w.flip(-1)
    count = w.cumsum(-1) - w  # (B', H', s, n) exclusive: rows strictly before
    k_bar = ((kc * w.unsqueeze(-1)).cumsum(-2) - kc * w.unsqueeze(-1)) / count.clamp(min=1).unsqueeze(-1)  # (B, H, s, n, D)
    q_bar = ((qc * w.unsqueeze(-1)).cumsum(-2) - qc * w.unsqueeze(-1)) / count.clamp(min=1).unsqueeze(-1)
    if reverse:
        k_bar, q_bar, count = k_bar.flip(-2), q_bar.flip(-2), count.flip(-1)
        kc = kc.flip(-2)
    n = kc.shape[-2]
    r = torch.arange(n, device=kc.device)
    rows = (r.view(1, -1) > r.view(-1, 1)) if reverse else (r.view(1, -1) < r.view(-1, 1))  # (n, n) region row -> key row
    s = (q_bar @ kc.transpose(-2, -1) * scale).masked_fill(~(rows & vmc.unsqueeze(-2)), float("-inf"))  # (B, H, s, n, n)
    pool, _ = masked_softmax(s)
    v_bar = pool @ vc  # (B, H, s, n, Dv)
    log_count = count.clamp(min=1).log() if correction else torch.zeros_like(count)
    return k_bar, log_count.masked_fill(count == 0, float("-inf")), v_bar


def _before_axial(q, k, v, valid, s, is_causal, scale, correction):
    b, h, length, _ = q.shape
    n = length // s
    qg, kg, vg = (t.reshape(b, h, n, s, t.shape[-1]) for t in (q, k, v))  # (B, H, n rows, s cols, *)
    vm = valid.reshape(valid.shape[0], valid.shape[1], n, s)  # (B', H', n, s)
    qc, kc, vc, vmc = qg.transpose(2, 3), kg.transpose(2, 3), vg.transpose(2, 3), vm.transpose(2, 3)  # by (col, row)
    neg = float("-inf")
    eye_s = torch.eye(s, dtype=torch.bool, device=q.device)
    eye_n = torch.eye(n, dtype=torch.bool, device=q.device)
    s_row = (qg @ kg.transpose(-2, -1) * scale).masked_fill(~vm.unsqueeze(-2), neg)  # (B, H, n, s, s) [r, c, c']
    s_col = (qc @ kc.transpose(-2, -1) * scale).masked_fill(~vmc.unsqueeze(-2), neg)  # (B, H, s, n, n) [c, r, r']
    s_col = s_col.masked_fill(eye_n, neg)  # the query itself is already in its row
    if is_causal:
        s_row = s_row.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=q.device).tril(), neg)  # keep c' <= c
        s_col = s_col.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1), neg)  # keep r' < r
    parts, values = [s_row, s_col.transpose(2, 3)], []  # (B, H, n, s, s), (B, H, n, s, n)
    directions = (False,) if is_causal else (False, True)
    for reverse in directions:
        k_bar, log_count, v_bar = _before_prefix_summaries(qc, kc, vc, vmc, scale, correction, reverse)  # by (col c', row r)
        s_sum = torch.einsum("bhrcd,bhxrd->bhrcx", qg, k_bar) * scale  # (B, H, n, s, s) [r, c, c']
        s_sum = s_sum + log_count.transpose(2, 3).unsqueeze(-2)  # count of region (c', r)
        parts.append(s_sum.masked_fill(eye_s, neg))  # other columns only
        values.append(v_bar)
    w, lse = masked_softmax(torch.cat(parts, dim=-1))  # (B, H, n, s, s + n + s [+ s])
    out = w[..., :s] @ vg  # own row
    out = out + (w[..., s:s + n].transpose(2, 3) @ vc).transpose(2, 3)  # own column
    for i, v_bar in enumerate(values):
        ws = w[..., s + n + i * s: s + n + (i + 1) * s]  # (B, H, n, s, s) [r, c, c']
        out = out + torch.einsum("bhrcx,bhxrv->bhrcv", ws, v_bar)
    return out.reshape(b, h, length, -1), lse.reshape(b, h, length)


def _before_partner(t: torch.Tensor) -> torch.Tensor:
    """Swap adjacent blocks along axis 2 (block ``u`` -> block ``u ^ 1``); the axis length is even."""
    return t.unflatten(2, (t.shape[2] // 2, 2)).flip(3).flatten(2, 3)


def _before_logsparse(q, k, v, valid, is_causal, scale, correction):
    # At level l a query in block u = i >> l (blocks of 2^l) uses block u - 1 when u is odd (its earlier
    # dyadic block) and, bidirectional, block u + 1 when u is even: always the partner block u ^ 1.
    length = q.shape[2]
    levels = _c._levels(length)
    padded = 2**levels
    pad = padded - length
    qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, P, *)
    vmp = torch.nn.functional.pad(valid, (0, pad), value=False)  # (B', H', P)
    scores = [((q * k).sum(-1) * scale).masked_fill(~valid, float("-inf")).unsqueeze(-1)]  # (B, H, L, 1): self
    v_bars = []
    for level in range(levels):
        size = 2**level
        n_pairs = ceil_div(length, 2 * size)  # blocks come in (even, odd) pairs
        used = 2 * n_pairs * size  # a prefix of the padded sequence that holds every query
        qb, kb, vb = (t[:, :, :used].unflatten(2, (2 * n_pairs, size)) for t in (qp, kp, vp))  # (B, H, nl, size, *)
        vm = vmp[:, :, :used].unflatten(2, (2 * n_pairs, size))  # (B', H', nl, size)
        k_bar, log_count, v_bar = (_before_partner(t) for t in _before_summaries(qb, kb, vb, vm, scale, correction))
        s = torch.einsum("bhnsd,bhnd->bhns", qb, k_bar) * scale + log_count.unsqueeze(-1)  # (B, H, nl, size)
        if is_causal:  # only odd blocks look back
            odd = (torch.arange(2 * n_pairs, device=q.device) % 2 == 1).view(-1, 1)
            s = s.masked_fill(~odd, float("-inf"))
        scores.append(s.flatten(2)[:, :, :length].unsqueeze(-1))  # (B, H, L, 1)
        v_bars.append(v_bar)
    w, lse = masked_softmax(torch.cat(scores, dim=-1))  # (B, H, L, 1 + levels)
    out = w[..., :1] * v
    for level, v_bar in enumerate(v_bars):
        size = 2**level
        wl = torch.nn.functional.pad(w[..., level + 1], (0, v_bar.shape[2] * size - length))  # (B, H, nl * size)
        contrib = wl.unflatten(2, (v_bar.shape[2], size)).unsqueeze(-1) * v_bar.unsqueeze(3)  # (B, H, nl, size, Dv)
        out = out + contrib.flatten(2, 3)[:, :, :length]
    return out, lse


def _before_combiner(q, k, v, *, mode, is_causal):
    """Combiner ``blocked`` as of commit 86355bd (before issue 13, item 7); for the before/after ratio only."""
    block = None if mode == "logsparse" else max(1, math.ceil(math.sqrt(q.shape[2])))
    key_mask, scale, correction = None, q.shape[-1] ** -0.5, True
    dtype, compute = q.dtype, _c._compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    length = q.shape[2]
    valid = _c._key_valid(key_mask, length, q.device)  # (B', H', L)
    if mode == "logsparse":
        out, lse = _before_logsparse(q, k, v, valid, is_causal, scale, correction)
    else:
        pad = ceil_div(length, block) * block - length
        if pad:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, Lp, *)
            valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        fn = _before_fixed if mode == "fixed" else _before_axial
        out, lse = fn(q, k, v, valid, block, is_causal, scale, correction)
        out, lse = out[:, :, :length], lse[:, :, :length]
    return out.to(dtype)


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

    # ---- 1-D sequence: Combiner ---------------------------------------------------------------------------------
    # (length, reference backend too, the pre-item-7 implementation too)
    sizes = [(n, False, True), (n // 4, True, False)] + ([] if quick else [(4 * n, False, False)])
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the sizes and fewer repeats")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    args = parser.parse_args()
    report("local", main(quick=args.quick, device=args.device))
