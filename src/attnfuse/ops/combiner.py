"""Combiner: full-support attention at sub-quadratic cost (direct keys + region summaries, one softmax).

Paper: Ren, Dai, Dai, Yang, Leskovec, Schuurmans, Dai, "Combiner: Full Attention Transformer with
Sparse Computation Cost" (NeurIPS 2021, https://arxiv.org/abs/2107.05768); released code
``google-research/google-research/combiner`` (``tf/approx_attention.py``, ``jax/model/layer.py``), read, not copied.
Status: backends ``"blocked"`` (O(L sqrt L) for ``"fixed"`` / ``"axial"``, O(L log L) for
``"logsparse"``) and ``"reference"`` (materialises the implied ``L x L`` attention matrix); they agree
to rounding. Self-attention only (region summaries pool queries and keys of the same positions).

Attention is the conditional expectation ``E_{p(j|i)}[v_j]``. Combiner splits the support of query
``i`` into a *direct* set ``D_i`` and disjoint *regions* ``Omega_i^r`` and factorises
``p(j|i) = p(Omega|i) q(j|Omega)`` inside each region, with ``q`` independent of ``i``::

    out_i  = sum_{j in D_i} w_ij v_j + sum_r w_ir vbar_r              one softmax over D_i and the regions
    w_ij   ~ exp(scale q_i.k_j)                                        direct keys
    w_ir   ~ exp(scale q_i.kbar_r + log |Omega_r|)                     region summary key, log-count corrected
    vbar_r = sum_{j in Omega_r} q(j|Omega_r) v_j,   q(j|Omega_r) = softmax_j(scale qbar_r.k_j)   attention pooling

``kbar_r`` / ``qbar_r`` summarise the region's valid keys / queries (``pooling``, below). The
``log |Omega_r|`` term makes a summary stand for the mass of its whole region: if a region's keys are
all equal, its summary contributes exactly what its keys would contribute under dense attention
(``count_correction=False`` drops it).

Pooling (``pooling=`` and ``count_correction=``), three forms:

* **paper** (Combiner §3, eq. 9): ``pooling="max", count_correction=False``: elementwise max of the
  region's keys / queries, no count term.
* **released TF code** (``combiner/tf/approx_attention.py``): the axial summaries use ``approx_cummax``,
  which returns a cumulative **sum** (the max is commented out), and no count term:
  ``pooling="sum", count_correction=False`` (its ``sqrt_fixed_full`` uses max, as the paper; the JAX
  code uses a true ``cummax``). Sums grow with the region size.
* **attnfuse default**: ``pooling="mean", count_correction=True``: means, plus ``log |Omega_r|`` so that
  a region of equal keys contributes exactly its dense-attention mass (our deviation; the count term
  can be combined with any pooling). The implied attention matrix ``A_ij = w_ij`` (direct) or ``w_ir q(j|Omega_r)``
(``j`` in region ``r``) has rows summing to 1 and is non-zero on the whole support (every valid key,
or every valid key ``j <= i`` when causal): full attention in one layer.

Factorisations (``s = block_size``, default ``ceil(sqrt(L))``; position ``i`` has row ``i // s`` and column ``i % s``):

* ``"fixed"`` (Combiner-Fixed): direct = own row (``j <= i`` when causal); one region per other row
  (earlier rows when causal).
* ``"axial"`` (Combiner-Axial): direct = own row and own column (``j <= i`` when causal); for every
  other column ``c'`` one region of its earlier rows and (bidirectional) one of its later rows.
* ``"logsparse"`` (Combiner-Logsparse): direct = the query itself; ``[0, i)`` split into aligned dyadic
  blocks (one per set bit of ``i``) and, bidirectional, ``(i, L)`` into aligned dyadic blocks (one per
  clear bit); ``block_size`` does not apply.

Tiny materialised example of the support partition, ``mode="fixed"``, ``L = 4``, ``block_size = 2``,
causal (``d`` = direct, ``0`` = through the summary of region 0 = positions {0, 1}, ``.`` = not in support)::

    q0  d . . .
    q1  d d . .
    q2  0 0 d .
    q3  0 0 d d
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from attnfuse.ops._blocks import ceil_div
from attnfuse.ops._checks import check_key_mask, check_qkv
from attnfuse.ops._guards import drop_masked, drop_masked_keys, empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops.backends import Backend, Call
from attnfuse.ops.reference import masked_softmax

__all__ = ["combiner_attention", "combiner_regions"]

MODES = ("axial", "fixed", "logsparse")
POOLINGS = ("mean", "max", "sum")


def _levels(length: int) -> int:
    return max(0, math.ceil(math.log2(length))) if length > 1 else 0


def combiner_regions(mode: str, length: int, block_size: int | None, is_causal: bool,
                     device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The explicit support partition of a Combiner factorisation.

    Returns:
        ``direct (L, L)`` bool (query, key); ``member (R, L)`` bool: the positions of each region;
        ``uses (L, R)`` bool: the regions each query reaches through a summary. For every query the
        direct set and its regions partition ``[0, L)`` (``[0, i]`` when causal).
    """
    i = torch.arange(length, device=device)
    past = i.view(1, -1) <= i.view(-1, 1)  # (L, L) key j <= query i
    if mode == "logsparse":
        direct = torch.eye(length, dtype=torch.bool, device=device)
        members, uses = [], []
        for level in range(_levels(length)):
            t = torch.arange(ceil_div(length, 2**level), device=device)  # block numbers at this level
            members.append(t.view(-1, 1) == (i >> level).view(1, -1))  # (n_l, L)
            up = i >> level  # (L,)
            use = ((up & 1) == 1).view(-1, 1) & (t.view(1, -1) == (up - 1).view(-1, 1))  # earlier block
            if not is_causal:
                use = use | (((up & 1) == 0).view(-1, 1) & (t.view(1, -1) == (up + 1).view(-1, 1)))  # later block
            uses.append(use)  # (L, n_l)
        member = torch.cat(members) if members else torch.zeros(0, length, dtype=torch.bool, device=device)
        use = torch.cat(uses, dim=1) if uses else torch.zeros(length, 0, dtype=torch.bool, device=device)
        return direct, member, use
    s = block_size
    n = ceil_div(length, s)
    row, col = i // s, i % s
    same_row = row.view(-1, 1) == row.view(1, -1)  # (L, L)
    if mode == "fixed":
        direct = same_row & past if is_causal else same_row
        r = torch.arange(n, device=device)
        member = r.view(-1, 1) == row.view(1, -1)  # (n, L)
        use = r.view(1, -1) != row.view(-1, 1)  # (L, n)
        if is_causal:
            use = use & (r.view(1, -1) < row.view(-1, 1))
        return direct, member, use
    # axial: regions (column c, row r) -> earlier rows of column c ("above") / later rows ("below")
    direct = same_row | (col.view(-1, 1) == col.view(1, -1))
    if is_causal:
        direct = direct & past
    c = torch.arange(s, device=device).view(s, 1, 1)
    r = torch.arange(n, device=device).view(1, n, 1)
    in_col = col.view(1, 1, -1) == c  # (s, 1, L)
    above = (in_col & (row.view(1, 1, -1) < r)).reshape(s * n, length)  # (s*n, L)
    below = (in_col & (row.view(1, 1, -1) > r)).reshape(s * n, length)
    use_cr = (c.view(1, s, 1) != col.view(-1, 1, 1)) & (r.view(1, 1, n) == row.view(-1, 1, 1))  # (L, s, n)
    use_cr = use_cr.reshape(length, s * n)
    if is_causal:
        return direct, above, use_cr
    return direct, torch.cat([above, below]), torch.cat([use_cr, use_cr], dim=1)


def _key_valid(key_mask: Tensor | None, length: int, device) -> Tensor:
    """Key validity ``(B', H', S)`` from a checked key mask ``(B', H', S)`` (all True if None)."""
    if key_mask is None:
        return torch.ones(1, 1, length, dtype=torch.bool, device=device)
    return key_mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pool_regions(x: Tensor, member: Tensor, count: Tensor, pooling: str) -> Tensor:
    """Region summaries of ``x (B, H, S, C)`` over ``member (B', H', R, S)`` (valid positions of each region).

    ``count (B', H', R)`` is the number of members; an empty region gets 0. Returns ``(B, H, R, C)``.
    Masked positions are excluded with ``where`` (a masked query never reaches a summary, NaN included).
    """
    if pooling == "max":
        filled = torch.where(member.unsqueeze(-1), x.unsqueeze(-3), float("-inf"))  # (B, H, R, S, C)
        pooled = filled.amax(-2) if x.shape[-2] else x.new_full((*filled.shape[:-2], x.shape[-1]), float("-inf"))
        return torch.where((count > 0).unsqueeze(-1), pooled, torch.zeros((), dtype=x.dtype, device=x.device))
    w = member.to(x.dtype)  # (B', H', R, S)
    if pooling == "mean":
        w = w / count.clamp(min=1).unsqueeze(-1)
    keep = member.any(-2)  # (B', H', S) positions in some region
    return w @ drop_masked(x, keep)  # (B, H, R, C)


def _reference(q, k, v, *, mode, block, is_causal, key_mask, scale, correction, pooling, need_weights):
    dtype, compute = q.dtype, _compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    length = q.shape[2]
    direct, member, use = combiner_regions(mode, length, block, is_causal, q.device)
    valid = _key_valid(key_mask, length, q.device)  # (B', H', S)
    member_v = member & valid.unsqueeze(-2)  # (B', H', R, S) valid keys of each region
    count = member_v.sum(-1).to(compute)  # (B', H', R)
    k_bar, q_bar = _pool_regions(k, member_v, count, pooling), _pool_regions(q, member_v, count, pooling)  # (B, H, R, D)
    pool, _ = masked_softmax((q_bar @ k.transpose(-2, -1) * scale).masked_fill(~member_v, float("-inf")))  # (B, H, R, S)
    s_direct = (q @ k.transpose(-2, -1) * scale).masked_fill(~(direct & valid.unsqueeze(-2)), float("-inf"))  # (B, H, L, S)
    s_summary = q @ k_bar.transpose(-2, -1) * scale  # (B, H, L, R)
    if correction:
        s_summary = s_summary + count.clamp(min=1).log().unsqueeze(-2)
    s_summary = s_summary.masked_fill(~(use & (count > 0).unsqueeze(-2)), float("-inf"))
    w, lse = masked_softmax(torch.cat([s_direct, s_summary], dim=-1))  # (B, H, L, S + R)
    implied = w[..., :length] + w[..., length:] @ pool  # (B, H, L, S): the full attention matrix
    out = implied @ v  # (B, H, L, Dv)
    return out.to(dtype), (implied.to(dtype) if need_weights else None), lse.to(dtype)


def _pool_blocks(xb: Tensor, vm: Tensor, count: Tensor, pooling: str) -> Tensor:
    """Summary of each block: ``xb (B, H, n, t, C)``, ``vm (B', H', n, t)`` valid, ``count (B', H', n)`` -> ``(B, H, n, C)``.

    Masked positions are excluded with ``where`` (NaN there cannot reach a summary); an empty block gives 0.
    """
    if pooling == "max":
        pooled = torch.where(vm.unsqueeze(-1), xb, float("-inf")).amax(-2)  # (B, H, n, C)
        return torch.where((count > 0).unsqueeze(-1), pooled, torch.zeros((), dtype=xb.dtype, device=xb.device))
    total = drop_masked(xb, vm).sum(-2)  # (B, H, n, C)
    return total / count.clamp(min=1).unsqueeze(-1) if pooling == "mean" else total


def _summaries(qb, kb, vb, vm, scale, correction, pooling):
    """Per-block mean key, count term and attention-pooled value.

    ``qb, kb (B, H, n, t, D)``, ``vb (B, H, n, t, Dv)``, ``vm (B', H', n, t)`` valid keys ->
    ``k_bar (B, H, n, D)``, ``log_count (B', H', n)`` (``-inf`` for an empty block), ``v_bar (B, H, n, Dv)``.
    """
    count = vm.sum(-1).to(qb.dtype)  # (B', H', n)
    k_bar, q_bar = _pool_blocks(kb, vm, count, pooling), _pool_blocks(qb, vm, count, pooling)  # (B, H, n, D)
    s = torch.einsum("bhnd,bhntd->bhnt", q_bar, kb) * scale  # (B, H, n, t)
    pool, _ = masked_softmax(s.masked_fill(~vm, float("-inf")))
    v_bar = torch.einsum("bhnt,bhntv->bhnv", pool, vb)  # (B, H, n, Dv)
    log_count = count.clamp(min=1).log() if correction else torch.zeros_like(count)
    return k_bar, log_count.masked_fill(count == 0, float("-inf")), v_bar


def _fixed(q, k, v, valid, s, is_causal, scale, correction, pooling):
    b, h, length, _ = q.shape
    n = q.shape[2] // s
    qb, kb, vb = (t.reshape(b, h, n, s, t.shape[-1]) for t in (q, k, v))  # (B, H, n, s, *)
    vm = valid.reshape(valid.shape[0], valid.shape[1], n, s)  # (B', H', n, s)
    k_bar, log_count, v_bar = _summaries(qb, kb, vb, vm, scale, correction, pooling)
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


def _prefix_pool(xc: Tensor, vm: Tensor, count: Tensor, pooling: str) -> Tensor:
    """Exclusive prefix summaries along the rows: ``xc (B, H, s, n, C)``, ``vm (B', H', s, n)`` valid,
    ``count (B', H', s, n)`` earlier valid rows -> ``(B, H, s, n, C)``, the summary of rows ``< r`` (0 if none).
    """
    if pooling == "max":
        filled = torch.where(vm.unsqueeze(-1), xc, float("-inf"))  # (B, H, s, n, C)
        inclusive = filled.cummax(-2).values
        exclusive = torch.nn.functional.pad(inclusive[..., :-1, :], (0, 0, 1, 0), value=float("-inf"))  # shift by one row
        return torch.where((count > 0).unsqueeze(-1), exclusive, torch.zeros((), dtype=xc.dtype, device=xc.device))
    xw = drop_masked(xc, vm)  # a masked query never reaches a summary (NaN there included)
    total = xw.cumsum(-2) - xw  # rows strictly before
    return total / count.clamp(min=1).unsqueeze(-1) if pooling == "mean" else total


def _prefix_summaries(qc, kc, vc, vmc, scale, correction, reverse, pooling):
    """Summaries of the earlier (or, ``reverse``, later) rows of every column.

    ``qc, kc (B, H, s, n, D)``, ``vc (B, H, s, n, Dv)``, ``vmc (B', H', s, n)`` by (column, row) ->
    ``k_bar (B, H, s, n, D)``, ``log_count (B', H', s, n)``, ``v_bar (B, H, s, n, Dv)`` for region (column, row).
    """
    w = vmc.to(qc.dtype)
    vmf = vmc
    if reverse:
        qc, kc, w, vmf = qc.flip(-2), kc.flip(-2), w.flip(-1), vmc.flip(-1)
    count = w.cumsum(-1) - w  # (B', H', s, n) exclusive: rows strictly before
    k_bar, q_bar = (_prefix_pool(t, vmf, count, pooling) for t in (kc, qc))  # (B, H, s, n, D)
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


def _axial(q, k, v, valid, s, is_causal, scale, correction, pooling):
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
        k_bar, log_count, v_bar = _prefix_summaries(qc, kc, vc, vmc, scale, correction, reverse, pooling)  # by (col c', row r)
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


def _partner(t: Tensor) -> Tensor:
    """Swap adjacent blocks along axis 2 (block ``u`` -> block ``u ^ 1``); the axis length is even."""
    return t.unflatten(2, (t.shape[2] // 2, 2)).flip(3).flatten(2, 3)


def _logsparse(q, k, v, valid, is_causal, scale, correction, pooling):
    # At level l a query in block u = i >> l (blocks of 2^l) uses block u - 1 when u is odd (its earlier
    # dyadic block) and, bidirectional, block u + 1 when u is even: always the partner block u ^ 1.
    length = q.shape[2]
    levels = _levels(length)
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
        k_bar, log_count, v_bar = (_partner(t) for t in _summaries(qb, kb, vb, vm, scale, correction, pooling))
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


def _blocked(q, k, v, *, mode, block, is_causal, key_mask, scale, correction, pooling, need_weights):
    dtype, compute = q.dtype, _compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    length = q.shape[2]
    valid = _key_valid(key_mask, length, q.device)  # (B', H', L)
    if mode == "logsparse":
        out, lse = _logsparse(q, k, v, valid, is_causal, scale, correction, pooling)
    else:
        pad = ceil_div(length, block) * block - length
        if pad:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, Lp, *)
            valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        fn = _fixed if mode == "fixed" else _axial
        out, lse = fn(q, k, v, valid, block, is_causal, scale, correction, pooling)
        out, lse = out[:, :, :length], lse[:, :, :length]
    return out.to(dtype), None, lse.to(dtype)


@operator("combiner", cross=False, backends=(
    Backend("blocked", _blocked, lse=True),
    Backend("reference", _reference, weights=True, lse=True),
))
def combiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: Literal["axial", "fixed", "logsparse"] = "axial",
    block_size: int | None = None,
    is_causal: bool = False,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    count_correction: bool = True,
    pooling: Literal["mean", "max", "sum"] = "mean",
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Combiner self-attention: every query reaches every key, directly or through a region summary.

    See the module docstring for the factorisation and the three modes.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, L, D)`` (same positions as the queries).
        v: values ``(B, H, L, Dv)``.
        mode: ``"axial"``, ``"fixed"`` or ``"logsparse"``.
        block_size: row length ``s`` of ``"fixed"`` / ``"axial"`` (default ``ceil(sqrt(L))``); must
            be None for ``"logsparse"``. ``L`` need not be divisible (pad + mask).
        is_causal: query ``i`` reaches keys ``j <= i`` only.
        key_mask: bool key mask, ``True`` = the key exists: ``(B, L)`` or ``(B, H, L)`` (B, H may be 1);
            masked keys are left out of direct sets, region means, counts and pooling. There is no
            pair mask: query-dependent masks cannot pass through region summaries.
        scale: score scale, ``1/sqrt(D)`` when None.
        count_correction: add ``log |region|`` to summary scores (see the module docstring).
        pooling: how a region's queries and keys are summarised into ``qbar_r`` / ``kbar_r``: ``"mean"``
            (attnfuse's default, with ``count_correction``), ``"max"`` (elementwise max: the paper's form,
            with ``count_correction=False``) or ``"sum"`` (the released TF code's axial summaries, whose
            "cummax" is a cumulative sum). See "Pooling" in the module docstring.
        return_weights: also return the implied attention matrix ``(B, H, L, L)`` (reference path).
        return_lse: also return the log-normaliser ``(B, H, L)`` of the joint softmax (direct scores
            and count-corrected summary scores), ``-inf`` for a query with no valid key; use it to
            merge Combiner with other keys exactly (:func:`attnfuse.ops.merge_attention`).
        backend: ``"auto"``, ``"blocked"`` or ``"reference"``.

    Returns:
        ``out (B, H, L, Dv)``, followed by ``weights`` and / or ``lse`` when asked for.

    Raises:
        TypeError: non-float inputs, mixed dtypes, non-bool key mask, a pair mask (``mask=``) or ``bias=``.
        ValueError: ranks or lengths that do not match (``L`` of q and k must agree), a key mask of
            another shape, unknown ``mode`` or ``pooling``, ``block_size < 1`` or ``block_size`` with ``"logsparse"``.

    Shapes:
        See :mod:`attnfuse.ops` (B, H, L, D, Dv). Takes: key mask ``(B, L)`` / ``(B, H, L)``;
        ``is_causal``; weights; log-sum-exp. No pair mask, no bias.

    Example:
        >>> q = k = v = torch.randn(1, 2, 100, 16)
        >>> out, w = combiner_attention(q, k, v, mode="fixed", block_size=10, return_weights=True, backend="reference")
        >>> bool((w > 0).all()), torch.allclose(w.sum(-1), torch.ones(1, 2, 100))
        (True, True)
    """
    check_qkv(q, k, v)
    length = q.shape[2]
    if k.shape[2] != length:
        raise ValueError(f"combiner is self-attention: q and k must have the same length L, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got pooling={pooling!r}")
    if mode == "logsparse":
        if block_size is not None:
            raise ValueError("block_size does not apply to mode='logsparse' (its blocks are dyadic); leave it None")
    elif block_size is None:
        block_size = max(1, math.ceil(math.sqrt(length)))
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    key_mask = check_key_mask("combiner", key_mask, q.shape[0], q.shape[1], (length,), legend="L")  # (B', H', L)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    call = Call.of(q, k, v, mask=key_mask, need_weights=return_weights, need_lse=return_lse)
    impl = combiner_attention.spec.choose_backend(backend, call)
    b, h = q.shape[:2]
    if is_empty(b, h, length):  # nothing to compute
        out, weights, lse = empty_like_result(
            q, (b, h, length, v.shape[-1]), inputs=(q, k, v), weights_shape=(b, h, length, length) if return_weights else None,
            lse_shape=(b, h, length) if return_lse else None,
        )
    else:
        k, v = drop_masked_keys(k, v, key_mask)  # masked keys never reach a matmul (NaN there included)
        out, weights, lse = impl.fn(q, k, v, mode=mode, block=block_size, is_causal=is_causal, key_mask=key_mask, scale=scale,
                                    correction=count_correction, pooling=pooling, need_weights=return_weights)
    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (out, *extra) if extra else out
