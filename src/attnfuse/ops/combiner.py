"""Combiner: full-support attention at sub-quadratic cost (direct keys + region summaries, one softmax).

Paper: Ren, Dai, Dai, Yang, Leskovec, Schuurmans, Dai, "Combiner: Full Attention Transformer with
Sparse Computation Cost" (NeurIPS 2021, https://arxiv.org/abs/2107.05768); released code
``google-research/google-research/combiner`` (``tf/approx_attention.py``, ``jax/model/layer.py``), read, not copied.
Status: backends ``"blocked"`` (O(L sqrt L) for ``"fixed"`` / ``"axial"``, O(L log L) for
``"logsparse"``) and ``"reference"`` (materialises the implied ``L x L`` attention matrix); they agree
to rounding. Self-attention only (region summaries pool queries and keys of the same positions).
Unmasked axial (``L = n s``, mean / sum pooling) and logsparse (``L = 2^k``) inputs take fused paths
(``_axial_dense`` / ``_AxialCPU``, ``_logsparse_dense``: a few fused attentions with additive masks shared
by every batch and head); masked or padded inputs take the general ones. Both agree with the reference.

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
from attnfuse.ops.dense import _sdpa as _dense_sdpa
from attnfuse.ops.merge import merge_attention
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


def _attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, key_valid: Tensor | None = None, pair: Tensor | None = None,
            bias: Tensor | None = None, is_causal: bool = False) -> tuple[Tensor, Tensor]:
    """Fused softmax attention with its log-sum-exp (the ``sdpa`` backend of ``dense``), inputs already valid.

    ``q (B, G, Lq, D)``, ``k (B, G, S, D)``, ``v (B, G, S, Dv)``; ``key_valid (B', G', S)`` bool,
    ``pair`` bool broadcastable to ``(B, G, Lq, S)``, ``bias`` float (no gradient) broadcastable to it.
    Returns ``out (B, G, Lq, Dv)`` (0 for a query with no allowed key) and ``lse (B, G, Lq)`` (``-inf`` there).
    """
    mask = None if key_valid is None else key_valid.unsqueeze(-2)  # (B', G', 1, S)
    if pair is not None:
        mask = pair if mask is None else mask & pair
    out, _, lse = _dense_sdpa(q, k, v, mask=mask, bias=bias, scale=scale, is_causal=is_causal, need_weights=False, need_lse=True)
    return out, lse


def _groups(t: Tensor, h: int) -> Tensor:
    """Fold the head axis and the next one of a mask / bias: ``(B', H', n, *rest)`` -> ``(B', H * n, *rest)``."""
    return t.expand(t.shape[0], h, *t.shape[2:]).reshape(t.shape[0], h * t.shape[2], *t.shape[3:])


def _pool_blocks(xb: Tensor, vm: Tensor | None, count: Tensor, pooling: str) -> Tensor:
    """Summary of each block: ``xb (B, H, n, t, C)``, ``vm (B', H', n, t)`` valid (None: all),
    ``count (B', H', n)`` -> ``(B, H, n, C)``.

    Masked positions are excluded with ``where`` (NaN there cannot reach a summary); an empty block gives 0.
    """
    if pooling == "max":
        if vm is None:
            return xb.amax(-2)
        pooled = torch.where(vm.unsqueeze(-1), xb, float("-inf")).amax(-2)  # (B, H, n, C)
        return torch.where((count > 0).unsqueeze(-1), pooled, torch.zeros((), dtype=xb.dtype, device=xb.device))
    total = (xb if vm is None else drop_masked(xb, vm)).sum(-2)  # (B, H, n, C)
    return total / count.clamp(min=1).unsqueeze(-1) if pooling == "mean" else total


def _summaries(qb, kb, vb, vm, scale, correction, pooling, masked=True):
    """Per-block summary key, count term and attention-pooled value.

    ``qb, kb (B, H, n, t, D)``, ``vb (B, H, n, t, Dv)``, ``vm (B', H', n, t)`` valid keys (``masked=False``:
    all valid, nothing to exclude) -> ``k_bar (B, H, n, D)``, ``log_count (B', H', n)`` (``-inf`` for an
    empty block), ``v_bar (B, H, n, Dv)``.
    """
    count = vm.sum(-1).to(qb.dtype)  # (B', H', n)
    pool_mask = vm if masked else None
    k_bar, q_bar = _pool_blocks(kb, pool_mask, count, pooling), _pool_blocks(qb, pool_mask, count, pooling)  # (B, H, n, D)
    s = torch.einsum("bhnd,bhntd->bhnt", q_bar, kb) * scale  # (B, H, n, t)
    pool, _ = masked_softmax(s.masked_fill(~vm, float("-inf")) if masked else s)
    v_bar = torch.einsum("bhnt,bhntv->bhnv", pool, vb)  # (B, H, n, Dv)
    log_count = count.clamp(min=1).log() if correction else torch.zeros_like(count)
    return k_bar, log_count.masked_fill(count == 0, float("-inf")), v_bar


def _region_keys(log_count: Tensor, correction: bool) -> tuple[Tensor, Tensor | None]:
    """Valid summary keys (non-empty regions) and their count bias (None without count correction)."""
    ok = torch.isfinite(log_count)
    return ok, (log_count.masked_fill(~ok, 0.0) if correction else None)


def _fixed(q, k, v, valid, s, is_causal, scale, correction, pooling, masked):
    # Two fused attentions merged by their log-sum-exps: the own row (direct) and the other rows' summaries.
    b, h, length, d = q.shape
    dv, n = v.shape[-1], length // s
    qb, kb, vb = (t.reshape(b, h, n, s, t.shape[-1]) for t in (q, k, v))  # (B, H, n, s, *)
    vm = valid.reshape(valid.shape[0], valid.shape[1], n, s)  # (B', H', n, s)
    k_bar, log_count, v_bar = _summaries(qb, kb, vb, vm, scale, correction, pooling, masked)  # (B, H, n, *)
    out_d, lse_d = _attend(qb.reshape(b, h * n, s, d), kb.reshape(b, h * n, s, d), vb.reshape(b, h * n, s, dv),
                           key_valid=_groups(vm, h) if masked else None, scale=scale, is_causal=is_causal)  # (B, H*n, s, *)
    r, row = torch.arange(n, device=q.device), torch.arange(length, device=q.device) // s
    pair = (r.view(1, -1) < row.view(-1, 1)) if is_causal else (r.view(1, -1) != row.view(-1, 1))  # (L, n) other rows
    ok, bias = _region_keys(log_count, correction)  # (B', H', n)
    out_s, lse_s = _attend(q, k_bar, v_bar, key_valid=ok, pair=pair, scale=scale,
                           bias=None if bias is None else bias.unsqueeze(-2))  # (B, H, L, Dv)
    return merge_attention([out_d.reshape(b, h, length, dv), out_s], [lse_d.reshape(b, h, length), lse_s])


def _prefix_pool(xc: Tensor, vm: Tensor | None, count: Tensor, pooling: str, reverse: bool) -> Tensor:
    """Exclusive prefix (``reverse``: suffix) summaries along the rows: ``xc (B, H, s, n, C)``, ``vm (B', H', s, n)``
    valid (None: all), ``count (B', H', s, n)`` valid rows before (after) -> ``(B, H, s, n, C)``, 0 where none.
    """
    if pooling == "max":
        filled = xc if vm is None else torch.where(vm.unsqueeze(-1), xc, float("-inf"))  # (B, H, s, n, C)
        if reverse:
            filled = filled.flip(-2)
        inclusive = filled.cummax(-2).values
        exclusive = torch.nn.functional.pad(inclusive[..., :-1, :], (0, 0, 1, 0), value=float("-inf"))  # shift by one row
        if reverse:
            exclusive = exclusive.flip(-2)
        return torch.where((count > 0).unsqueeze(-1), exclusive, torch.zeros((), dtype=xc.dtype, device=xc.device))
    xw = xc if vm is None else drop_masked(xc, vm)  # a masked query never reaches a summary (NaN there included)
    inclusive = xw.cumsum(-2)
    total = inclusive - xw if not reverse else inclusive[..., -1:, :] - inclusive  # rows strictly before / after
    return total / count.clamp(min=1).unsqueeze(-1) if pooling == "mean" else total


def _prefix_summaries(qc, kc, vc, vmc, scale, correction, reverse, pooling, masked):
    """Summaries of the earlier (or, ``reverse``, later) rows of every column.

    ``qc, kc (B, H, s, n, D)``, ``vc (B, H, s, n, Dv)``, ``vmc (B', H', s, n)`` by (column, row) ->
    ``k_bar (B, H, s, n, D)``, ``log_count (B', H', s, n)``, ``v_bar (B, H, s, n, Dv)`` for region (column, row).
    """
    b, h, s, n, d = qc.shape
    w = vmc.to(qc.dtype)
    inclusive = w.cumsum(-1)
    count = inclusive - w if not reverse else inclusive[..., -1:] - inclusive  # (B', H', s, n) rows before / after
    pool_mask = vmc if masked else None
    k_bar, q_bar = (_prefix_pool(t, pool_mask, count, pooling, reverse) for t in (kc, qc))  # (B, H, s, n, D)
    r = torch.arange(n, device=kc.device)
    rows = (r.view(1, -1) > r.view(-1, 1)) if reverse else (r.view(1, -1) < r.view(-1, 1))  # (n, n) region row -> key row
    v_bar, _ = _attend(q_bar.reshape(b, h * s, n, d), kc.reshape(b, h * s, n, d), vc.reshape(b, h * s, n, -1),
                       key_valid=_groups(vmc, h) if masked else None, pair=rows, scale=scale)  # attention pooling
    log_count = count.clamp(min=1).log() if correction else torch.zeros_like(count)
    return k_bar, log_count.masked_fill(count == 0, float("-inf")), v_bar.reshape(b, h, s, n, -1)


def _axial(q, k, v, valid, s, is_causal, scale, correction, pooling, masked):
    # Three fused attentions merged by their log-sum-exps: own row, own column (without the query) and,
    # for the other columns, the summaries of their earlier (and later) rows.
    b, h, length, d = q.shape
    dv, n = v.shape[-1], length // s
    qg, kg, vg = (t.reshape(b, h, n, s, t.shape[-1]) for t in (q, k, v))  # (B, H, n rows, s cols, *)
    vm = valid.reshape(valid.shape[0], valid.shape[1], n, s)  # (B', H', n, s)
    qc, kc, vc = (t.transpose(2, 3).contiguous() for t in (qg, kg, vg))  # (B, H, s cols, n rows, *)
    vmc = vm.transpose(2, 3)  # (B', H', s, n)
    out_r, lse_r = _attend(qg.reshape(b, h * n, s, d), kg.reshape(b, h * n, s, d), vg.reshape(b, h * n, s, dv),
                           key_valid=_groups(vm, h) if masked else None, scale=scale, is_causal=is_causal)  # own row
    eye_n = torch.eye(n, dtype=torch.bool, device=q.device)
    col_pair = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1) if is_causal else ~eye_n  # r' < r / r' != r
    out_c, lse_c = _attend(qc.reshape(b, h * s, n, d), kc.reshape(b, h * s, n, d), vc.reshape(b, h * s, n, dv),
                           key_valid=_groups(vmc, h) if masked else None, pair=col_pair, scale=scale)  # (B, H*s, n, *)
    out_c = out_c.reshape(b, h, s, n, dv).transpose(2, 3).reshape(b, h, length, dv)  # back to row-major positions
    lse_c = lse_c.reshape(b, h, s, n).transpose(2, 3).reshape(b, h, length)
    keys, values, counts = [], [], []
    for reverse in (False,) if is_causal else (False, True):
        k_bar, log_count, v_bar = _prefix_summaries(qc, kc, vc, vmc, scale, correction, reverse, pooling, masked)
        keys.append(k_bar.transpose(2, 3))  # (B, H, n, s, D): row r's summary of column c'
        values.append(v_bar.transpose(2, 3))
        counts.append(log_count.transpose(2, 3))  # (B', H', n, s)
    m = len(keys) * s
    k_sum = torch.cat(keys, dim=-2).reshape(b, h * n, m, d)  # (B, H*n, m, D)
    v_sum = torch.cat(values, dim=-2).reshape(b, h * n, m, dv)
    ok, bias = _region_keys(torch.cat(counts, dim=-1), correction)  # (B', H', n, m)
    other = ~torch.eye(s, dtype=torch.bool, device=q.device).repeat(1, len(keys))  # (s, m) column c' != c
    out_s, lse_s = _attend(qg.reshape(b, h * n, s, d), k_sum, v_sum, key_valid=_groups(ok, h), pair=other, scale=scale,
                           bias=None if bias is None else _groups(bias, h).unsqueeze(-2))  # (B, H*n, s, Dv)
    return merge_attention(
        [out_r.reshape(b, h, length, dv), out_c, out_s.reshape(b, h, length, dv)],
        [lse_r.reshape(b, h, length), lse_c, lse_s.reshape(b, h, length)],
    )


def _pool_matrix(n: int, is_causal: bool, pooling: str, dtype, device) -> Tensor:
    """Pooling weights of the column regions, ``(m n, n)`` (m = 1 causal, 2 bidirectional): row ``r`` of block
    ``a`` averages (``"mean"``) or sums (``"sum"``) the rows before (``a = 0``) / after (``a = 1``) row ``r``."""
    r = torch.arange(n, device=device)
    parts = [r.view(1, -1) < r.view(-1, 1)] + ([] if is_causal else [r.view(1, -1) > r.view(-1, 1)])  # (n, n) each
    w = torch.cat(parts).to(dtype)  # (m n, n)
    return w / w.sum(-1, keepdim=True).clamp(min=1) if pooling == "mean" else w


def _axial_dense(q, k, v, s, is_causal, scale, correction, pooling):
    # Unmasked axial with L = n s, mean or sum pooling: two fused attentions merged by their log-sum-exps.
    # (1) Per column, one call for the column's queries (keys: its other rows; causal: earlier rows) and the
    #     pooling queries of its regions (keys: the region's rows), whose outputs are the pooled values v_bar.
    # (2) Per row, one call over the row's own keys and the summary keys of the other columns, with the
    #     log-count term and the "other column" rule in one additive mask shared by every (batch, head).
    # An empty key set (row 0 of a column, an empty region) gets key 0 in the kernel and is dropped after:
    # its log-sum-exp is set to -inf (column) or its summary key gets -inf (region).
    b, h, length, _ = q.shape
    dv, n, bh = v.shape[-1], length // s, b * h
    m = 1 if is_causal else 2
    dev, dt = q.device, q.dtype
    qg, kg, vg = (t.reshape(bh, n, s, t.shape[-1]) for t in (q, k, v))  # (BH, n rows, s cols, *)
    kc, vc = (t.transpose(1, 2).contiguous() for t in (kg, vg))  # (BH, s cols, n rows, *)
    qc = qg.transpose(1, 2)  # (BH, s, n, D) view
    w = _pool_matrix(n, is_causal, pooling, dt, dev)  # (m n, n)
    q_col = torch.cat([qc, torch.matmul(w, qc)], dim=2)  # (BH, s, (1 + m) n, D): column queries, pooling queries
    k_bar = torch.matmul(w, kc)  # (BH, s, m n, D) summary keys by (column, region)
    col_mask, col_empty, row_mask = _axial_masks(n, s, is_causal, correction, dt, dev)
    out_c, _, lse_c = _dense_sdpa(q_col, kc, vc, mask=None, bias=col_mask, scale=scale, is_causal=False,
                                  need_weights=False, need_lse=True)  # (BH, s, (1 + m) n, *)
    v_bar = out_c[:, :, n:]  # (BH, s, m n, Dv)
    out_c, lse_c = out_c[:, :, :n].transpose(1, 2), lse_c[:, :, :n].transpose(1, 2)  # (BH, n, s, *) row layout
    lse_c = lse_c.masked_fill(col_empty.view(n, 1), float("-inf"))  # a query with no column key
    # (2) keys of row r: its own s keys, then the summaries (a, c') of every column c' (a: earlier / later rows)
    k_row, v_row = torch.cat([kg, _to_rows(k_bar, m, n)], dim=2), torch.cat([vg, _to_rows(v_bar, m, n)], dim=2)
    out_r, _, lse_r = _dense_sdpa(qg, k_row, v_row, mask=None, bias=row_mask, scale=scale, is_causal=False,
                                  need_weights=False, need_lse=True)  # (BH, n, s, *)
    out, lse = merge_attention([out_r, out_c], [lse_r, lse_c])
    return out.reshape(b, h, length, dv), lse.reshape(b, h, length)


def _to_rows(t: Tensor, m: int, n: int) -> Tensor:
    """Summaries by (column, region) ``(BH, s, m n, C)`` -> by row ``(BH, n, m s, C)`` (region ``a`` of column ``c'``
    at ``a s + c'``)."""
    bh, s, _, c = t.shape
    return t.unflatten(2, (m, n)).permute(0, 3, 2, 1, 4).reshape(bh, n, m * s, c)


def _to_columns(t: Tensor, m: int, s: int) -> Tensor:
    """Inverse of :func:`_to_rows`: ``(BH, n, m s, C)`` -> ``(BH, s, m n, C)``."""
    bh, n, _, c = t.shape
    return t.unflatten(2, (m, s)).permute(0, 3, 2, 1, 4).reshape(bh, s, m * n, c)


class _AxialCPU(torch.autograd.Function):
    """:func:`_axial_dense` with one hand-written backward (CPU flash kernels, ``D == Dv``, fp32 / fp64).

    Backward of the log-sum-exp merge: the joint softmax over both key sets has ``dS = P (dO V^T - Δ + g_lse)``
    with ``Δ = dO . out`` of the *merged* output; each part's kernel recomputes its local ``P`` from its own
    log-sum-exp, so it is called with ``dO_part = w_part dO`` and the merged output (``w_part`` its merge
    weight): its ``Δ`` is then ``w_part (Δ - g_lse)``, the joint gradient. The column call's pooling rows get
    the gradient of the pooled values from the row call, with their own output.
    """

    @staticmethod
    def forward(ctx, q, k, v, s, is_causal, scale, correction, pooling):
        from attnfuse.ops._sdpa_lse import _cpu_forward
        b, h, length, d = q.shape
        n, bh, m = length // s, b * h, 1 if is_causal else 2
        qg, kg, vg = (t.reshape(bh, n, s, d) for t in (q, k, v))  # (BH, n, s, D)
        kc, vc = (t.transpose(1, 2).contiguous() for t in (kg, vg))  # (BH, s, n, D)
        qc = qg.transpose(1, 2)
        w = _pool_matrix(n, is_causal, pooling, q.dtype, q.device)  # (m n, n)
        q_col = torch.cat([qc, torch.matmul(w, qc)], dim=2)  # (BH, s, (1 + m) n, D)
        col_mask, col_empty, row_mask = _axial_masks(n, s, is_causal, correction, q.dtype, q.device)
        out_c, lse_c = _cpu_forward(q_col, kc, vc, col_mask, scale, False)  # (BH, s, (1 + m) n, *)
        v_bar = out_c[:, :, n:]  # (BH, s, m n, D)
        k_row = torch.cat([kg, _to_rows(torch.matmul(w, kc), m, n)], dim=2)  # (BH, n, s + m s, D)
        v_row = torch.cat([vg, _to_rows(v_bar, m, n)], dim=2)
        qg = qg.contiguous()
        out_r, lse_r = _cpu_forward(qg, k_row, v_row, row_mask, scale, False)  # (BH, n, s, *)
        lse_col = lse_c[:, :, :n].transpose(1, 2).masked_fill(col_empty.view(n, 1), float("-inf"))  # (BH, n, s)
        lse = torch.logaddexp(lse_r, lse_col)  # lse_r is finite: every query has itself
        w_r, w_c = (lse_r - lse).exp(), (lse_col - lse).exp()  # merge weights (BH, n, s)
        out = torch.addcmul(out_r * w_r.unsqueeze(-1), out_c[:, :, :n].transpose(1, 2), w_c.unsqueeze(-1))  # (BH, n, s, D)
        ctx.save_for_backward(qg, k_row, v_row, q_col, kc, vc, out_c, lse_c, lse_r, w_r, w_c, out, w, col_mask, row_mask)
        ctx.meta = (b, h, length, d, n, s, m, scale)
        return out.reshape(b, h, length, d), lse.reshape(b, h, length).to(q.dtype)

    @staticmethod
    def backward(ctx, g, g_lse):
        from attnfuse.ops._sdpa_lse import _cpu_backward
        qg, k_row, v_row, q_col, kc, vc, out_c, lse_c, lse_r, w_r, w_c, out, w, col_mask, row_mask = ctx.saved_tensors
        b, h, length, d, n, s, m, scale = ctx.meta
        bh = b * h
        g = torch.zeros_like(out) if g is None else g.reshape(bh, n, s, d).to(out.dtype)
        g_lse = None if g_lse is None else g_lse.reshape(bh, n, s).to(out.dtype)
        dq_r, dk_row, dv_row = _cpu_backward(g * w_r.unsqueeze(-1), None if g_lse is None else g_lse * w_r,
                                             qg, k_row, v_row, out, lse_r, row_mask, scale, False)  # (BH, n, *, D)
        dk_bar, dv_bar = _to_columns(dk_row[:, :, s:], m, s), _to_columns(dv_row[:, :, s:], m, s)  # (BH, s, m n, D)
        d_col = torch.cat([(g * w_c.unsqueeze(-1)).transpose(1, 2), dv_bar], dim=2)  # (BH, s, (1 + m) n, D)
        o_col = torch.cat([out.transpose(1, 2), out_c[:, :, n:]], dim=2)
        lse_g = None
        if g_lse is not None:
            lse_g = torch.cat([(g_lse * w_c).transpose(1, 2), g_lse.new_zeros(bh, s, m * n)], dim=2)
        dq_col, dkc, dvc = _cpu_backward(d_col, lse_g, q_col, kc, vc, o_col, lse_c, col_mask, scale, False)
        wt = w.t()  # (n, m n)
        dq = dq_r + (dq_col[:, :, :n] + torch.matmul(wt, dq_col[:, :, n:])).transpose(1, 2)  # (BH, n, s, D)
        dk = dk_row[:, :, :s] + (dkc + torch.matmul(wt, dk_bar)).transpose(1, 2)
        dv = dv_row[:, :, :s] + dvc.transpose(1, 2)
        shape = (b, h, length, d)
        return dq.reshape(shape), dk.reshape(shape), dv.reshape(shape), None, None, None, None, None


def _axial_masks(n, s, is_causal, correction, dtype, device):
    """Additive masks of :func:`_axial_dense`: column call ``(1, 1, (1 + m) n, n)``, which column queries have
    no column key ``(n,)``, row call ``(1, n, s, s + m s)``."""
    m, ninf = (1 if is_causal else 2), float("-inf")
    r = torch.arange(n, device=device)
    earlier = r.view(1, -1) < r.view(-1, 1)  # (n, n) key row < query row
    sets = [earlier if is_causal else r.view(1, -1) != r.view(-1, 1), earlier] + ([] if is_causal else [r.view(1, -1) > r.view(-1, 1)])
    allowed = torch.cat(sets)  # ((1 + m) n, n)
    allowed[:, 0] |= ~allowed.any(-1)  # empty set: key 0 stands in (dropped by the caller)
    col_mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, ninf).view(1, 1, -1, n)
    count = torch.stack([r, n - 1 - r][:m]).to(dtype)  # (m, n) rows before / after row r
    log_count = count.clamp(min=1).log() if correction else torch.zeros_like(count)
    log_count = log_count.masked_fill(count == 0, ninf).t()  # (n, m)
    other = ~torch.eye(s, dtype=torch.bool, device=device)  # (s, s) query column c, summary column c'
    summary = torch.where(other.view(1, s, 1, s), log_count.view(n, 1, m, 1), ninf).reshape(n, s, m * s)
    own = torch.zeros(s, s, dtype=dtype, device=device)
    if is_causal:
        own = own.masked_fill(~torch.ones(s, s, dtype=torch.bool, device=device).tril(), ninf)
    row_mask = torch.cat([own.expand(n, s, s), summary], dim=-1).unsqueeze(0)  # (1, n, s, s + m s)
    return col_mask, ~sets[0].any(-1), row_mask


def _partner(t: Tensor) -> Tensor:
    """Swap adjacent blocks along axis 2 (block ``u`` -> block ``u ^ 1``); the axis length is even."""
    return t.unflatten(2, (t.shape[2] // 2, 2)).flip(3).flatten(2, 3)


def _block_dot(xb: Tensor, y: Tensor) -> Tensor:
    """``xb (B, H, n, t, C) . y (B, H, n, C)`` per block position -> ``(B, H, n, t)``."""
    if xb.shape[-2] == 1:
        return (xb.squeeze(-2) * y).sum(-1, keepdim=True)
    return torch.einsum("bhntc,bhnc->bhnt", xb, y)


def _block_mix(w: Tensor, xb: Tensor) -> Tensor:
    """``sum_t w (B, H, n, t) * xb (B, H, n, t, C)`` -> ``(B, H, n, C)``."""
    if xb.shape[-2] == 1:
        return w * xb.squeeze(-2)
    return torch.einsum("bhnt,bhntc->bhnc", w, xb)


def _logsparse(q, k, v, valid, is_causal, scale, correction, pooling, masked):
    # At level l a query in block u = i >> l (blocks of 2^l) uses block u - 1 when u is odd (its earlier
    # dyadic block) and, bidirectional, block u + 1 when u is even: always the partner block u ^ 1.
    # Region summaries are pooled level by level from the two halves of the level below (O(L D) in all);
    # each level then reads q, k and v once and adds its part to the output in place.
    length = q.shape[2]
    levels = _levels(length)
    padded = 2**levels
    pad = padded - length
    masked = masked or pad > 0
    qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))  # (B, H, P, *)
    vmp = torch.nn.functional.pad(valid, (0, pad), value=False) if pad else valid  # (B', H', P)
    self_s = (q * k).sum(-1) * scale  # (B, H, L): the query itself
    scores = [self_s.masked_fill(~valid, float("-inf")) if masked else self_s]
    count = vmp.to(q.dtype)  # (B', H', P) valid positions per block, level 0
    if pooling == "max":
        q_pool, k_pool = ((torch.where(vmp.unsqueeze(-1), t, float("-inf")) if masked else t) for t in (qp, kp))
    else:
        q_pool, k_pool = ((drop_masked(t, vmp) if masked else t) for t in (qp, kp))  # (B, H, P, D)
    v_bars = []
    for level in range(levels):
        size, n_blocks = 2**level, padded >> level
        if level:  # pool the two halves of each block of the level below
            count = count.unflatten(-1, (n_blocks, 2)).sum(-1)  # (B', H', n)
            halves = [t.unflatten(2, (n_blocks, 2)) for t in (q_pool, k_pool)]  # (B, H, n, 2, D)
            q_pool, k_pool = (t.amax(3) if pooling == "max" else t.sum(3) for t in halves)  # (B, H, n, D)
        nonempty = (count > 0).unsqueeze(-1)  # (B', H', n, 1)
        if pooling == "mean" and level:  # level 0: the token itself (count 0 or 1)
            q_bar, k_bar = (t / count.clamp(min=1).unsqueeze(-1) for t in (q_pool, k_pool))
        elif pooling == "max" and masked:
            q_bar, k_bar = (torch.where(nonempty, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in (q_pool, k_pool))
        else:
            q_bar, k_bar = q_pool, k_pool
        kb, vb, qb = (t.unflatten(2, (n_blocks, size)) for t in (kp, vp, qp))  # (B, H, n, size, *)
        s = _block_dot(kb, q_bar) * scale  # (B, H, n, size) attention pooling inside each block
        if masked:
            pool, _ = masked_softmax(s.masked_fill(~vmp.unflatten(-1, (n_blocks, size)), float("-inf")))
        else:
            pool = torch.softmax(s, dim=-1)
        v_bar = _block_mix(pool, vb)  # (B, H, n, Dv)
        log_count = count.clamp(min=1).log() if correction else torch.zeros_like(count)
        log_count = log_count.masked_fill(count == 0, float("-inf"))  # (B', H', n)
        k_bar, v_bar, log_count = _partner(k_bar), _partner(v_bar), _partner(log_count)  # block u reads block u ^ 1
        s_q = _block_dot(qb, k_bar) * scale + log_count.unsqueeze(-1)  # (B, H, n, size)
        if is_causal:  # only odd blocks look back
            odd = (torch.arange(n_blocks, device=q.device) % 2 == 1).view(-1, 1)
            s_q = s_q.masked_fill(~odd, float("-inf"))
        scores.append(s_q.flatten(2)[:, :, :length])  # (B, H, L)
        v_bars.append(v_bar)
    w, lse = masked_softmax(torch.stack(scores, dim=-1))  # (B, H, L, 1 + levels)
    w = torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w  # (B, H, P, 1 + levels)
    out = w[..., :1] * vp  # (B, H, P, Dv)
    for level, v_bar in enumerate(v_bars):
        n_blocks = padded >> level
        wl = w[..., level + 1].unflatten(2, (n_blocks, 2**level)).unsqueeze(-1)  # (B, H, n, size, 1)
        out.unflatten(2, (n_blocks, 2**level)).addcmul_(wl, v_bar.unsqueeze(3))  # in place: (B, H, n, size, Dv)
    return out[:, :, :length], lse


_LOGSPARSE_GROUP = 32  # queries per group of the fused logsparse path (a power of two)


def _logsparse_masks(length: int, group: int, is_causal: bool, correction: bool, dtype, device) -> tuple[Tensor, Tensor]:
    """Additive masks of :func:`_logsparse_dense` for ``L = 2^levels`` positions in groups of ``S = group``.

    Returns the main call's ``(1, G, S, K)`` mask (``K = 2 S - 2 + levels - a``, ``S = 2^a``: the group's
    tokens, its level-1..a-1 summaries, one summary per coarser level) and the in-group pooling mask
    ``(1, 1, S - 1, S)`` (levels 1..a, block-membership).
    """
    levels, a = _levels(length), _levels(group)
    n_groups, ninf = length // group, float("-inf")
    p = torch.arange(group, device=device)  # query position in its group
    parts, cols = [], []
    for level in range(a):  # fine levels: level 0 = the tokens themselves (the query and its partner)
        blocks = torch.arange(group >> level, device=device)
        up = p >> level
        ok = blocks.view(1, -1) == (up ^ 1).view(-1, 1)  # (S, S >> l) the partner block
        if is_causal:
            ok = ok & (up & 1 == 1).view(-1, 1)
        if level == 0:
            ok = ok | (blocks.view(1, -1) == p.view(-1, 1))  # the query itself
        bias = level * math.log(2.0) if correction else 0.0
        parts.append(torch.full(ok.shape, bias, dtype=dtype, device=device).masked_fill(~ok, ninf))
    fine = torch.cat(parts, dim=-1).expand(n_groups, group, -1)  # (G, S, 2 S - 2)
    g = torch.arange(n_groups, device=device)
    for level in range(a, levels):  # coarse levels: one summary per group (its block's partner block)
        ok = (g >> (level - a)) & 1 == 1 if is_causal else torch.ones_like(g, dtype=torch.bool)
        bias = level * math.log(2.0) if correction else 0.0
        cols.append(torch.full(ok.shape, bias, dtype=dtype, device=device).masked_fill(~ok, ninf))  # (G,)
    coarse = torch.stack(cols, -1).unsqueeze(1).expand(n_groups, group, -1) if cols else fine[..., :0]
    main = torch.cat([fine, coarse], dim=-1).unsqueeze(0)  # (1, G, S, K)
    member = torch.cat([(p >> level).view(1, -1) == torch.arange(group >> level, device=device).view(-1, 1)
                        for level in range(1, a + 1)])  # (S - 1, S)
    pool = torch.zeros((), dtype=dtype, device=device).masked_fill(~member, ninf).view(1, 1, group - 1, group)
    return main, pool


def _logsparse_dense(q, k, v, is_causal, scale, correction, pooling):
    # Unmasked logsparse with L = 2^levels: queries in groups of S = 2^a. Inside a group, levels < a use
    # summaries of blocks inside the group (the same for every group); levels >= a use one summary per
    # group. So one fused attention over [the group's tokens, its fine summaries, its coarse summaries]
    # with an additive mask (partner rule, causal rule, log-count) shared by every (batch, head) gives
    # the output and the log-sum-exp. Pooled values: one masked call per group for levels 1..a, one
    # call per coarser level (a query per block over the block's keys).
    b, h, length, d = q.shape
    dv, bh = v.shape[-1], b * h
    levels = _levels(length)
    group = min(_LOGSPARSE_GROUP, length)
    a, n_groups = _levels(group), length // group
    qf, kf, vf = (t.reshape(bh, length, t.shape[-1]) for t in (q, k, v))  # (BH, L, *)
    q_bars, k_bars = [qf], [kf]  # level l: (BH, L >> l, D)
    q_pool, k_pool = qf, kf
    for level in range(1, levels):
        q_pool, k_pool = (t.unflatten(1, (t.shape[1] // 2, 2)) for t in (q_pool, k_pool))  # (BH, n, 2, D)
        q_pool, k_pool = (t.amax(2) if pooling == "max" else t.sum(2) for t in (q_pool, k_pool))
        div = float(2**level) if pooling == "mean" else 1.0
        q_bars.append(q_pool / div if div != 1.0 else q_pool)
        k_bars.append(k_pool / div if div != 1.0 else k_pool)
    main_mask, pool_mask = _logsparse_masks(length, group, is_causal, correction, q.dtype, q.device)
    qg, kg, vg = (t.view(bh, n_groups, group, t.shape[-1]) for t in (qf, kf, vf))  # (BH, G, S, *)
    # attention pooling, one call: per group the queries of its level-1..a blocks (keys: their members in the
    # group) and of the coarser blocks containing it (keys: the whole group; merged across the block's groups
    # by their log-sum-exps below)
    g = torch.arange(n_groups, device=q.device)
    top = min(a, levels - 1)
    pool_q = [q_bars[level].reshape(bh, n_groups, group >> level, d) for level in range(1, top + 1)]
    n_fine = sum(t.shape[2] for t in pool_q)
    pool_q += [q_bars[level].index_select(1, g >> (level - a)).unsqueeze(2) for level in range(a + 1, levels)]
    v_fine, v_coarse = [], {}
    if pool_q:
        n_coarse = len(pool_q) - top
        mask = torch.cat([pool_mask[0, 0, :n_fine], pool_mask.new_zeros(n_coarse, group)]).view(1, 1, -1, group)
        pooled, _, p_lse = _dense_sdpa(torch.cat(pool_q, dim=2), kg, vg, mask=None, bias=mask, scale=scale, is_causal=False,
                                       need_weights=False, need_lse=True)  # (BH, G, n_q, *)
        v_fine = list(pooled[:, :, :n_fine].split([t.shape[2] for t in pool_q[:top]], dim=2))  # level l: (BH, G, S >> l, Dv)
        for i, level in enumerate(range(a + 1, levels)):
            span = 2 ** (level - a)  # groups per block
            part = pooled[:, :, n_fine + i].unflatten(1, (n_groups // span, span))  # (BH, n, span, Dv)
            w = torch.softmax(p_lse[:, :, n_fine + i].unflatten(1, (n_groups // span, span)), dim=-1)  # (BH, n, span)
            v_coarse[level] = (w.unsqueeze(-1) * part).sum(2)  # (BH, n, Dv)
    keys, values = [kg], [vg]
    for level in range(1, a):
        keys.append(k_bars[level].reshape(bh, n_groups, group >> level, d))
        values.append(v_fine[level - 1])
    for level in range(a, levels):  # one summary per group: its level-l block's partner
        v_bar = v_fine[a - 1].reshape(bh, length >> level, dv) if level == a else v_coarse[level]  # (BH, n, Dv)
        partner = (g >> (level - a)) ^ 1  # (G,)
        keys.append(k_bars[level].index_select(1, partner).unsqueeze(2))  # (BH, G, 1, D)
        values.append(v_bar.index_select(1, partner).unsqueeze(2))
    out, _, lse = _dense_sdpa(qg, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask=None, bias=main_mask,
                              scale=scale, is_causal=False, need_weights=False, need_lse=True)  # (BH, G, S, *)
    return out.reshape(b, h, length, dv), lse.reshape(b, h, length)


def _blocked(q, k, v, *, mode, block, is_causal, key_mask, scale, correction, pooling, need_weights):
    dtype, compute = q.dtype, _compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    length = q.shape[2]
    valid = _key_valid(key_mask, length, q.device)  # (B', H', L)
    masked = key_mask is not None
    if mode == "logsparse":
        if not masked and length >= 2 and length & (length - 1) == 0:  # unmasked, L a power of two
            out, lse = _logsparse_dense(q, k, v, is_causal, scale, correction, pooling)
        else:
            out, lse = _logsparse(q, k, v, valid, is_causal, scale, correction, pooling, masked)
    else:
        pad = ceil_div(length, block) * block - length
        if pad:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, Lp, *)
            valid = torch.nn.functional.pad(valid, (0, pad), value=False)
        if mode == "axial" and not (masked or pad) and pooling != "max":
            if (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and q.shape[-1] == v.shape[-1]
                    and not torch.compiler.is_compiling()):
                out, lse = _AxialCPU.apply(q, k, v, block, is_causal, scale, correction, pooling)
            else:
                out, lse = _axial_dense(q, k, v, block, is_causal, scale, correction, pooling)
        else:
            fn = _fixed if mode == "fixed" else _axial
            out, lse = fn(q, k, v, valid, block, is_causal, scale, correction, pooling, masked or pad > 0)
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
