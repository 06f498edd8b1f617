"""Combiner: support partition, a loop-by-loop oracle, blocked vs reference, full support, normalisation, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse import ops
from attnfuse.fusion import EarlyFusion, TokenSet
from attnfuse.nn import Attention
from attnfuse.ops.combiner import combiner_regions
from attnfuse.ops.configs import Combiner

F64 = torch.float64
MODES = ["fixed", "axial", "logsparse"]


def rand_qkv(b, h, length, d=6, dv=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, c, generator=g, dtype=dtype, requires_grad=True) for c in (d, d, dv))


def brute_support(mode, length, s, causal, i):
    """Direct keys and region lists of query ``i``, written from the definitions (loops, no tensors)."""
    if mode == "logsparse":
        regions, level = [], 0
        while 2**level < length:
            up = i >> level
            if up & 1:
                regions.append(list(range((up - 1) * 2**level, up * 2**level)))
            elif not causal:
                regions.append([j for j in range((up + 1) * 2**level, (up + 2) * 2**level) if j < length])
            level += 1
        return [i], [r for r in regions if r]
    row, col = divmod(i, s)
    ok = (lambda j: j <= i) if causal else (lambda j: True)
    if mode == "fixed":
        direct = [j for j in range(length) if j // s == row and ok(j)]
        rows = range(row) if causal else [r for r in range(math.ceil(length / s)) if r != row]
        return direct, [[j for j in range(length) if j // s == r] for r in rows]
    direct = [j for j in range(length) if (j // s == row or j % s == col) and ok(j)]
    regions = []
    for c in range(s):
        if c != col:
            regions.append([j for j in range(length) if j % s == c and j // s < row])
            if not causal:
                regions.append([j for j in range(length) if j % s == c and j // s > row])
    return direct, [r for r in regions if r]


POOL = {"mean": lambda x: x.mean(0), "max": lambda x: x.max(0).values, "sum": lambda x: x.sum(0)}


def brute_combiner(q, k, v, mode, s, causal, valid, scale, correction=True, pooling="mean"):
    """Combiner for one (batch, head) by loops over queries and regions: out (L, Dv) and implied A (L, L)."""
    length = q.shape[0]
    out, implied = torch.zeros(length, v.shape[1], dtype=q.dtype), torch.zeros(length, length, dtype=q.dtype)
    for i in range(length):
        direct, regions = brute_support(mode, length, s, causal, i)
        logits, targets = [], []  # targets: (key index) or (list of keys, pooled weights)
        for j in direct:
            if valid[j]:
                logits.append(scale * q[i] @ k[j])
                targets.append(([j], torch.ones(1, dtype=q.dtype)))
        for reg in regions:
            reg = [j for j in reg if valid[j]]
            if not reg:
                continue
            kbar, qbar = POOL[pooling](k[reg]), POOL[pooling](q[reg])
            pool = torch.softmax(torch.stack([scale * qbar @ k[j] for j in reg]), 0)
            logits.append(scale * q[i] @ kbar + (math.log(len(reg)) if correction else 0.0))
            targets.append((reg, pool))
        if not logits:
            continue
        w = torch.softmax(torch.stack(logits), 0)
        for wr, (keys, pool) in zip(w, targets):
            for j, p in zip(keys, pool):
                implied[i, j] = implied[i, j] + wr * p
        out[i] = implied[i] @ v
    return out, implied


CASES = [(m, c, L, s) for m in MODES for c in (False, True) for L, s in [(16, 4), (23, 5), (7, 3), (1, None), (30, None)]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,block", [(16, 4), (23, 5), (7, 3), (1, None), (30, None), (9, 1), (6, 10)])
def test_regions_partition_the_support(mode, causal, length, block):
    s = block or math.ceil(math.sqrt(length))
    direct, member, use = combiner_regions(mode, length, s, causal)
    cover = direct.long() + use.long() @ member.long()  # how often each key is reached by each query
    want = torch.ones(length, length, dtype=torch.long)
    assert torch.equal(cover, want.tril() if causal else want)
    for i in (0, length // 2, length - 1):  # same sets as written from the definitions
        d_i, regs = brute_support(mode, length, s, causal, i)
        assert direct[i].nonzero().flatten().tolist() == d_i
        got = sorted(member[r].nonzero().flatten().tolist() for r in use[i].nonzero().flatten().tolist())
        assert [g for g in got if g] == sorted(regs)


@pytest.mark.parametrize("mode,causal,length,block", CASES)
def test_blocked_and_reference_match_the_loop_oracle(tol, mode, causal, length, block):
    block = None if mode == "logsparse" else block
    q, k, v = rand_qkv(2, 2, length)
    mask = torch.rand(2, 1, length, generator=torch.Generator().manual_seed(1)) > 0.25  # key mask (B, H, L)
    kw = {"mode": mode, "block_size": block, "is_causal": causal, "key_mask": mask, "scale": 0.6}
    out, lse = ops.combiner_attention(q, k, v, backend="blocked", return_lse=True, **kw)
    ref, implied, lse_ref = ops.combiner_attention(q, k, v, backend="reference", return_weights=True, return_lse=True, **kw)
    torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
    torch.testing.assert_close(lse, lse_ref, **tol(F64, "fwd"))
    s = block or math.ceil(math.sqrt(length))
    for b, h in [(0, 0), (1, 1)]:
        want, want_a = brute_combiner(q[b, h].detach(), k[b, h].detach(), v[b, h].detach(), mode, s, causal, mask[b, 0], 0.6)
        torch.testing.assert_close(ref[b, h].detach(), want, **tol(F64, "fwd"))
        torch.testing.assert_close(implied[b, h].detach(), want_a, **tol(F64, "fwd"))
    g_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g_out), torch.autograd.grad(ref, (q, k, v), g_out)):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("pooling", "correction"), [("max", False), ("sum", False), ("mean", False), ("max", True)],
                         ids=["paper-max", "tf-sum", "mean-nocount", "max-count"])
def test_pooling_forms_match_the_loop_oracle(tol, mode, causal, pooling, correction):
    # paper: max pooling, no count term; released TF axial code: sums (its "cummax" is a cumsum), no count term
    length, block = (23, None) if mode == "logsparse" else (23, 5)
    q, k, v = rand_qkv(2, 1, length, seed=3)
    mask = torch.rand(2, 1, length, generator=torch.Generator().manual_seed(4)) > 0.25
    kw = {"mode": mode, "block_size": block, "is_causal": causal, "key_mask": mask, "scale": 0.6,
          "pooling": pooling, "count_correction": correction}
    out, lse = ops.combiner_attention(q, k, v, backend="blocked", return_lse=True, **kw)
    ref, implied, lse_ref = ops.combiner_attention(q, k, v, backend="reference", return_weights=True, return_lse=True, **kw)
    torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
    torch.testing.assert_close(lse, lse_ref, **tol(F64, "fwd"))
    for b in range(2):
        want, want_a = brute_combiner(q[b, 0].detach(), k[b, 0].detach(), v[b, 0].detach(), mode, block or 1, causal,
                                      mask[b, 0], 0.6, correction=correction, pooling=pooling)
        torch.testing.assert_close(ref[b, 0].detach(), want, **tol(F64, "fwd"))
        torch.testing.assert_close(implied[b, 0].detach(), want_a, **tol(F64, "fwd"))
    g_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g_out), torch.autograd.grad(ref, (q, k, v), g_out)):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


@pytest.mark.parametrize("pooling", ["mean", "max", "sum"])
def test_pooling_ignores_nan_at_masked_positions(pooling):
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 16, seed=5))
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, [3, 9]] = False
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, [3, 9]] = float("nan")
    for mode in MODES:
        kw = {"mode": mode, "key_mask": mask, "pooling": pooling}
        a = ops.combiner_attention(q, k, v, **kw)
        b = ops.combiner_attention(q2, k2, v2, **kw)
        keep = mask[0]
        torch.testing.assert_close(a[:, :, keep], b[:, :, keep])
        assert torch.isfinite(ops.combiner_attention(q2, k2, v2, backend="reference", **kw)[:, :, keep]).all()


def test_pooling_changes_the_result_and_is_checked():
    q, k, v = rand_qkv(1, 1, 16, seed=6)
    outs = [ops.combiner_attention(q, k, v, mode="fixed", block_size=4, pooling=p) for p in ("mean", "max", "sum")]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'max', 'sum'\)"):
        ops.combiner_attention(q, k, v, pooling="cummax")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True])
def test_full_support_by_perturbation_and_normalised_rows(mode, causal):
    length = 20
    q, k, v = (t.detach() for t in rand_qkv(1, 1, length, seed=2))
    base = ops.combiner_attention(q, k, v, mode=mode, is_causal=causal, backend="blocked")
    for j in range(length):
        v2 = v.clone()
        v2[0, 0, j] += 1.0
        k2 = k.clone()
        k2[0, 0, j] += 1.0
        expect = torch.arange(length) >= j if causal else torch.ones(length, dtype=torch.bool)
        for q_, k_, v_ in ((q, k, v2), (q, k2, v)):
            changed = (ops.combiner_attention(q_, k_, v_, mode=mode, is_causal=causal, backend="blocked") - base).abs().amax(-1)[0, 0]
            if k_ is k2 and causal and j == 0:  # query 0 has key 0 only: its weight is 1 whatever k_0 is
                expect = expect.clone()
                expect[0] = False
            assert torch.equal(changed > 1e-12, expect), (j, changed)
    _, implied = ops.combiner_attention(q, k, v, mode=mode, is_causal=causal, backend="reference", return_weights=True)
    torch.testing.assert_close(implied.sum(-1), torch.ones(1, 1, length, dtype=F64))
    support = torch.ones(length, length, dtype=torch.bool)
    support = support.tril() if causal else support
    assert torch.all(implied[0, 0][support] > 0) and torch.all(implied[0, 0][~support] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_constant_keys_per_region_make_fixed_combiner_dense(oracle, tol, causal):
    # with every summarised region's keys equal, the count-corrected summary is exact
    q, _, v = rand_qkv(2, 2, 24, seed=3)
    k_rows = torch.randn(2, 2, 6, 1, 6, dtype=F64)  # 6 rows of length 4
    k = k_rows.expand(2, 2, 6, 4, 6).reshape(2, 2, 24, 6)
    out = ops.combiner_attention(q, k, v, mode="fixed", block_size=4, is_causal=causal)
    want, _, _ = oracle(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, want, **tol(F64, "fwd"))
    uncorrected = ops.combiner_attention(q, k, v, mode="fixed", block_size=4, is_causal=causal, count_correction=False)
    assert (uncorrected - want).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_masked_keys_take_no_part_and_empty_rows_are_zero(mode):
    q, k, v = rand_qkv(2, 2, 17, seed=4)
    mask = torch.rand(2, 17, generator=torch.Generator().manual_seed(4)) > 0.3  # key mask (B, L)
    mask[1] = False
    for backend in ("blocked", "reference"):
        out = ops.combiner_attention(q, k, v, mode=mode, key_mask=mask, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        v2 = torch.where(mask[:, None, :, None], v, v + 5.0)  # change only masked keys' values and keys
        k2 = torch.where(mask[:, None, :, None], k, k - 3.0)
        torch.testing.assert_close(ops.combiner_attention(q, k2, v2, mode=mode, key_mask=mask, backend=backend), out)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_lse_merges_exactly_with_extra_keys(tol):
    q, k, v = rand_qkv(1, 2, 12, seed=5)
    ek, ev = torch.randn(1, 2, 3, 6, dtype=F64), torch.randn(1, 2, 3, 5, dtype=F64)
    out, lse = ops.combiner_attention(q, k, v, mode="fixed", block_size=4, return_lse=True)
    extra, extra_lse = ops.dense_attention(q, ek, ev, return_lse=True)
    merged, _ = ops.merge_attention([out, extra], [lse, extra_lse])
    # the same as one softmax over direct keys, summaries and the extra keys
    s = q.shape[-1] ** -0.5
    _, implied = ops.combiner_attention(q, k, v, mode="fixed", block_size=4, return_weights=True, backend="reference")
    z = lse.exp().unsqueeze(-1)
    ze = (q @ ek.transpose(-2, -1) * s).exp()
    want = (implied * z @ v + ze @ ev) / (z + ze.sum(-1, keepdim=True))
    torch.testing.assert_close(merged, want, **tol(F64, "fwd"))


@st.composite
def combiner_cases(draw):
    mode = draw(st.sampled_from(MODES))
    length = draw(st.integers(1, 40))
    block = None if mode == "logsparse" else draw(st.sampled_from([None, *range(1, 9)]))
    return mode, length, block, draw(st.booleans()), draw(st.floats(0.0, 1.0)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=30, deadline=None)
@given(case=combiner_cases())
def test_combiner_fuzz(tol, case):
    mode, length, block, causal, p_keep, seed = case
    q, k, v = rand_qkv(2, 2, length, seed=seed)
    mask = torch.rand(2, 2, length, generator=torch.Generator().manual_seed(seed)) < p_keep  # per-head key mask
    kw = {"mode": mode, "block_size": block, "is_causal": causal, "key_mask": mask}
    out = ops.combiner_attention(q, k, v, backend="blocked", **kw)
    ref = ops.combiner_attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


def test_float32_and_bfloat16():
    q, k, v = rand_qkv(1, 2, 50, d=16, dv=16, dtype=torch.float32)
    for mode in MODES:
        ref = ops.combiner_attention(q, k, v, mode=mode, backend="reference")
        torch.testing.assert_close(ops.combiner_attention(q, k, v, mode=mode), ref, atol=2e-5, rtol=1e-4)
        low = ops.combiner_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mode=mode)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_bad_arguments():
    q, k, v = rand_qkv(1, 1, 8)
    with pytest.raises(ValueError, match=r"mode must be one of \('axial', 'fixed', 'logsparse'\)"):
        ops.combiner_attention(q, k, v, mode="strided")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        ops.combiner_attention(q, k, v, mode="fixed", block_size=0)
    with pytest.raises(ValueError, match="block_size does not apply to mode='logsparse'"):
        ops.combiner_attention(q, k, v, mode="logsparse", block_size=4)
    with pytest.raises(ValueError, match="same length"):
        ops.combiner_attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match=r"operator 'combiner': key_mask must be \(B, L\) = \(1, 8\) or \(B, H, L\)"):
        ops.combiner_attention(q, k, v, key_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        ops.combiner_attention(q, k, v, key_mask=torch.ones(1, 8))
    with pytest.raises(TypeError, match=r"operator 'combiner' .*does not take a pair mask \(mask=\).*key_mask="):
        ops.combiner_attention(q, k, v, mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="rank 4"):
        ops.combiner_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="cannot return attention weights"):
        ops.combiner_attention(q, k, v, return_weights=True, backend="blocked")


def test_registered_and_used_by_modules():
    spec = ops.get_operator("combiner")
    assert spec.layout == "sequence" and not spec.cross
    assert spec.options == frozenset({"mode", "block_size", "is_causal", "scale", "count_correction", "pooling", "backend"})
    torch.manual_seed(0)
    attn = Attention(16, 2, op="combiner", mode="axial", block_size=3)
    x, mask = torch.randn(2, 10, 16), torch.rand(2, 10) > 0.2
    for causal in (False, True):
        y, w = attn(x, mask=mask, is_causal=causal, return_weights=True)
        assert y.shape == x.shape and w.shape == (2, 2, 10, 10)
    fusion = EarlyFusion(["a", "b"], 16, heads=2, depth=2, op=Combiner(mode="logsparse"))
    out = fusion({"a": TokenSet(torch.randn(2, 5, 16)), "b": TokenSet(torch.randn(2, 3, 4, 16), axes=("x", "y"))})
    assert out.fused.x.shape == (2, 18, 16)
    out.fused.x.sum().backward()


# ---- unmasked axial fast path (issue 13, item 7): one column call + one row call, hand-written backward on the CPU ----
AXIAL_FAST = [(16, 4), (12, 3), (9, 1), (5, 5), (1, None), (36, None)]  # L divisible by the block: no padding


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dv", [6, 5], ids=["custom_backward", "autograd"])  # D == Dv: _AxialCPU; else _axial_dense
@pytest.mark.parametrize(("pooling", "correction"), [("mean", True), ("sum", False), ("mean", False)])
def test_axial_fast_path_matches_reference_with_lse_gradients(tol, monkeypatch, causal, dv, pooling, correction):
    from attnfuse.ops import combiner as mod
    calls = {"fn": 0, "dense": 0}
    apply, dense = mod._AxialCPU.apply, mod._axial_dense
    monkeypatch.setattr(mod._AxialCPU, "apply", lambda *a: (calls.__setitem__("fn", calls["fn"] + 1), apply(*a))[1])
    monkeypatch.setattr(mod, "_axial_dense", lambda *a: (calls.__setitem__("dense", calls["dense"] + 1), dense(*a))[1])
    for i, (length, block) in enumerate(AXIAL_FAST):
        q, k, v = rand_qkv(2, 2, length, d=6, dv=dv, seed=i)
        kw = {"mode": "axial", "block_size": block, "is_causal": causal, "pooling": pooling, "count_correction": correction,
              "scale": 0.7, "return_lse": True}
        out, lse = ops.combiner_attention(q, k, v, backend="blocked", **kw)
        ref, lse_ref = ops.combiner_attention(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
        torch.testing.assert_close(lse, lse_ref, **tol(F64, "fwd"))
        g = torch.Generator().manual_seed(i)
        g_out, g_lse = torch.randn(out.shape, generator=g, dtype=F64), torch.randn(lse.shape, generator=g, dtype=F64)
        g_out[:, :, : length // 2] = 0  # rows whose only gradient is the log-sum-exp's (the extra-column fallback)
        got = torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse))
        want = torch.autograd.grad((ref, lse_ref), (q, k, v), (g_out, g_lse))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol(F64, "bwd"))
    assert calls["fn" if dv == 6 else "dense"] == len(AXIAL_FAST) and calls["fn" if dv == 5 else "dense"] == 0


# ---- unmasked logsparse fast path (issue 13, item 7): L a power of two, queries in groups, one fused call ----
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("pooling", "correction"), [("mean", True), ("max", False), ("sum", False), ("mean", False)])
@pytest.mark.parametrize("group", [4, 32])  # 4: coarse levels (one summary per group) already at L = 16, 64
def test_logsparse_fast_path_matches_reference_with_lse_gradients(tol, monkeypatch, causal, pooling, correction, group):
    from attnfuse.ops import combiner as mod
    monkeypatch.setattr(mod, "_LOGSPARSE_GROUP", group)
    calls = []
    fast = mod._logsparse_dense
    monkeypatch.setattr(mod, "_logsparse_dense", lambda *a: (calls.append(1), fast(*a))[1])
    lengths = [2, 4, 16, 64]
    for i, length in enumerate(lengths):
        q, k, v = rand_qkv(2, 2, length, seed=10 + i)
        kw = {"mode": "logsparse", "is_causal": causal, "pooling": pooling, "count_correction": correction, "scale": 0.7,
              "return_lse": True}
        out, lse = ops.combiner_attention(q, k, v, backend="blocked", **kw)
        ref, lse_ref = ops.combiner_attention(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
        torch.testing.assert_close(lse, lse_ref, **tol(F64, "fwd"))
        g = torch.Generator().manual_seed(i)
        g_out, g_lse = torch.randn(out.shape, generator=g, dtype=F64), torch.randn(lse.shape, generator=g, dtype=F64)
        got = torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse))
        want = torch.autograd.grad((ref, lse_ref), (q, k, v), (g_out, g_lse))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol(F64, "bwd"))
    assert len(calls) == len(lengths)
    q, k, v = rand_qkv(1, 1, 12)  # not a power of two: the general path
    ops.combiner_attention(q, k, v, mode="logsparse")
    assert len(calls) == len(lengths)


@pytest.mark.parametrize(("mode", "length", "block", "d", "dv", "seed"), [("axial", 20, 5, 4, 4, 3), ("logsparse", 64, None, 4, 3, 4)])
def test_fast_path_matches_the_loop_oracle(tol, mode, length, block, d, dv, seed):
    """The unmasked axial / logsparse fast paths (issue 13, item 7) against the loop oracle, both directions."""
    q, k, v = rand_qkv(1, 1, length, d=d, dv=dv, seed=seed)
    for causal in (False, True):
        kw = {"block_size": block} if block is not None else {}
        out = ops.combiner_attention(q, k, v, mode=mode, is_causal=causal, scale=0.8, **kw)
        want, _ = brute_combiner(q[0, 0].detach(), k[0, 0].detach(), v[0, 0].detach(), mode, block, causal,
                                 torch.ones(length, dtype=torch.bool), 0.8)
        torch.testing.assert_close(out[0, 0].detach(), want, **tol(F64, "fwd"))


@pytest.mark.parametrize(("mode", "length"), [("axial", 64), ("logsparse", 128)])
def test_fast_path_float32(mode, length):
    q, k, v = rand_qkv(1, 2, length, d=16, dv=16, dtype=torch.float32)
    for causal in (False, True):
        out = ops.combiner_attention(q, k, v, mode=mode, is_causal=causal)
        ref = ops.combiner_attention(q, k, v, mode=mode, is_causal=causal, backend="reference")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        got = torch.autograd.grad(out.square().sum(), (q, k, v))
        want = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
