"""One mask convention across every registered operator (enumerated from ``OPERATORS``).

A key mask ``key_mask=`` (which keys exist) has the shapes ``(B, *keys)`` / ``(B, H, *keys)`` (B, H may
be 1) in every operator; a pair mask ``mask=`` ``(B, H, L, S)`` only where an operator takes one; an
argument an operator does not take is a ``TypeError`` naming the operator.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse import ops
from attnfuse.nn import Attention
from attnfuse.ops import OPERATORS
from attnfuse.ops._registry import CALL_KINDS
from attnfuse.ops.neighborhood import make_geometry, window_indices

F64 = torch.float64
B, H, D = 2, 2, 4

# Minimal options and shapes per operator. ``keys``: key token shape; ``queries``: query token shape
# (sequence operators with cross-attention get L != S); ``normalized``: softmax rows sum to 1.
CASES = {
    "dense": {"options": {}, "queries": (5,), "keys": (7,), "normalized": True},
    "silu_kernel": {"options": {"drop_ratio": 0.2}, "queries": (5,), "keys": (7,), "normalized": False},
    "kernel": {"options": {"similarity": "taylor"}, "queries": (5,), "keys": (7,), "normalized": True},
    "combiner": {"options": {"mode": "fixed", "block_size": 3}, "queries": (8,), "keys": (8,), "normalized": True},
    "axial": {"options": {"axis": 1}, "queries": (3, 4), "keys": (3, 5), "normalized": True},
    "halo": {"options": {"block_size": 2, "halo_size": 1}, "queries": (5, 4), "keys": (5, 4), "normalized": True},
    "routing": {"options": {"regions": 2, "topk": 2}, "queries": (6, 4), "keys": (6, 4), "normalized": True},
    "neighborhood": {"options": {"kernel_size": 3}, "queries": (5, 6), "keys": (5, 6), "normalized": True},
}
NAMES = sorted(n for n in OPERATORS if not n.startswith("test_"))


def test_every_registered_operator_has_a_case():
    missing = sorted(set(NAMES) - set(CASES))
    assert not missing, f"add minimal options and shapes for {missing} to CASES"


def cpu_backends(name: str) -> list[str]:
    """The backends that run on the CPU here: those "auto" may pick on the CPU, and "reference"."""
    out = []
    for b in OPERATORS[name].backends:
        unavailable = getattr(b, "unavailable", None)
        if unavailable is not None and unavailable():
            continue
        if b.auto_devices is None or "cpu" in b.auto_devices:
            out.append(b.name)
    return out


def inputs(name: str, seed: int = 0):
    case = CASES[name]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, *case["queries"], D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, H, *case["keys"], D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, *case["keys"], 3, generator=g, dtype=F64, requires_grad=True)
    return q, k, v


def key_mask(name: str, seed: int = 1, p: float = 0.7) -> torch.Tensor:
    """A per-head key mask ``(B, H, *keys)`` where every (batch, head) keeps at least one key."""
    keys = CASES[name]["keys"]
    m = torch.rand(B, H, *keys, generator=torch.Generator().manual_seed(seed)) < p
    m.view(B, H, -1)[:, :, 0] = True
    return m


def run(name, q, k, v, **kw):
    return OPERATORS[name].fn(q, k, v, **CASES[name]["options"], **kw)


def forms(m: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every accepted form of a key mask ``(B, H, *keys)`` that is the same for every batch element and head."""
    return {
        "(B, *keys)": m[:, 0],
        "(B, H, *keys)": m,
        "(B, 1, *keys)": m[:, :1],
        "(1, *keys)": m[:1, 0],
        "(1, H, *keys)": m[:1],
        "(1, 1, *keys)": m[:1, :1],
    }


def dense_weights(name: str, w: torch.Tensor) -> torch.Tensor:
    """Attention weights as the dense ``(B, H, Nq, Nk)`` matrix over the flattened tokens."""
    if name != "neighborhood":
        return w
    grid = CASES[name]["keys"]
    keys, valid, _ = window_indices(make_geometry(grid, CASES[name]["options"]["kernel_size"]))  # (N, K)
    n = math.prod(grid)
    w = w.reshape(B, H, n, -1) * valid  # (B, H, N, K)
    return torch.zeros(B, H, n, n, dtype=w.dtype).scatter_add(-1, keys.expand(B, H, n, -1), w)


@pytest.mark.parametrize("name", NAMES)
def test_every_operator_takes_key_masks(name):
    assert OPERATORS[name].takes.key_mask


@pytest.mark.parametrize("name", NAMES)
def test_every_key_mask_form_gives_the_same_result(name):
    q, k, v = inputs(name)
    base = key_mask(name)
    same = base[:1, :1].expand_as(base).contiguous()  # (B, H, *keys), the same for every batch element and head
    for backend in cpu_backends(name):
        want = run(name, q, k, v, key_mask=same, backend=backend)
        for label, m in forms(same).items():
            got = run(name, q, k, v, key_mask=m, backend=backend)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"{name} {backend} key mask {label}")
        # a per-batch, per-head key mask equals running every (batch, head) on its own
        got = run(name, q, k, v, key_mask=base, backend=backend)
        if name != "routing":  # routing is shared by the heads (BiFormer): its heads are not independent
            for b in range(B):
                for h in range(H):
                    sl = (slice(b, b + 1), slice(h, h + 1))
                    one = run(name, q[sl], k[sl], v[sl], key_mask=base[sl], backend=backend)
                    torch.testing.assert_close(got[sl], one, msg=f"{name} {backend} batch {b} head {h}")


@pytest.mark.parametrize("name", NAMES)
def test_key_mask_matches_the_explicit_formulation(name):
    """Reference weights are zero on masked keys, rows are normalised, and out = weights @ v; every backend agrees."""
    q, k, v = inputs(name)
    m = key_mask(name)
    out, w = run(name, q, k, v, key_mask=m, return_weights=True, backend="reference")
    w = dense_weights(name, w)  # (B, H, Nq, Nk)
    nq, nk = w.shape[-2:]
    allowed = m.reshape(B, H, 1, nk).expand_as(w)
    assert torch.equal(w[~allowed], torch.zeros_like(w[~allowed])), "a masked key got weight"
    torch.testing.assert_close(out.reshape(B, H, nq, -1), w @ v.reshape(B, H, nk, -1))
    if CASES[name]["normalized"]:
        sums = w.sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums)) or torch.all((sums - 1).abs() < 1e-9 + (sums == 0).double())
    for backend in cpu_backends(name):
        torch.testing.assert_close(run(name, q, k, v, key_mask=m, backend=backend), out, msg=f"{name} {backend}")
    if OPERATORS[name].takes.pair_mask:  # a key mask is the pair mask that is constant over the queries
        pairs = m.reshape(B, H, 1, nk)
        for backend in cpu_backends(name):
            torch.testing.assert_close(run(name, q, k, v, mask=pairs, backend=backend), out)
            both = run(name, q, k, v, key_mask=m, mask=torch.ones(B, H, nq, nk, dtype=torch.bool), backend=backend)
            torch.testing.assert_close(both, out)


@pytest.mark.parametrize("name", NAMES)
def test_masked_keys_do_not_change_outputs(name):
    q, k, v = inputs(name)
    m = key_mask(name, p=0.6)
    gone = ~m[:, 0].unsqueeze(1).unsqueeze(-1)  # (B, 1, *keys, 1): masked in every head
    km = m[:, :1].expand(B, H, *m.shape[2:])  # (B, H, *keys), the same for every head
    k2 = torch.where(gone, k + 3.0, k)
    v2 = torch.where(gone, v - 5.0, v)
    for backend in cpu_backends(name):
        torch.testing.assert_close(run(name, q, k2, v2, key_mask=km, backend=backend), run(name, q, k, v, key_mask=km, backend=backend),
                                   msg=f"{name} {backend}")


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_rows_give_zeros_and_finite_gradients(name):
    q, k, v = inputs(name)
    m = key_mask(name)
    m[0] = False  # sample 0: no key at all
    for backend in cpu_backends(name):
        out = run(name, q, k, v, key_mask=m[:, 0], backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0])), f"{name} {backend}"
        assert torch.isfinite(out).all()
        grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads), f"{name} {backend}: NaN gradient"


def _non_neutral(name: str, keyword: str, q, k):
    nq, nk = math.prod(CASES[name]["queries"]), math.prod(CASES[name]["keys"])
    return {"mask": torch.ones(B, H, nq, nk, dtype=torch.bool), "bias": torch.zeros(B, H, nq, nk, dtype=F64),
            "is_causal": True, "return_weights": True, "return_lse": True}[keyword]


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_kinds_raise_naming_the_operator(name):
    q, k, v = inputs(name)
    spec = OPERATORS[name]
    for keyword in CALL_KINDS:
        if spec.takes.takes(keyword):
            continue
        with pytest.raises(TypeError, match=rf"operator '{name}' .*does not take a {CALL_KINDS[keyword][0]} \({keyword}=\); it takes "
                                            r".*key_mask="):
            run(name, q, k, v, **{keyword: _non_neutral(name, keyword, q, k)})
        run(name, q, k, v, **{keyword: CALL_KINDS[keyword][1]})  # the neutral value is accepted and ignored
    with pytest.raises(TypeError, match=rf"operator '{name}' .*unexpected argument 'nope'"):
        run(name, q, k, v, nope=1)


@pytest.mark.parametrize("name", NAMES)
def test_bad_key_masks_raise_naming_the_operator(name):
    q, k, v = inputs(name)
    keys = CASES[name]["keys"]
    with pytest.raises(TypeError, match=rf"operator '{name}': key_mask must be a torch.bool tensor"):
        run(name, q, k, v, key_mask=torch.ones(B, *keys))
    for bad in [(B + 1, *keys), (B, H + 1, *keys), (B, *keys[:-1], keys[-1] + 1), (B, 1, 1, *keys)]:
        with pytest.raises(ValueError, match=rf"operator '{name}': key_mask must be \(B, .*\) or \(B, H, .*\) \(B and H may be 1\)"):
            run(name, q, k, v, key_mask=torch.ones(bad, dtype=torch.bool))


@pytest.mark.parametrize("name", NAMES)
def test_attention_module_passes_token_validity_as_the_key_mask(name):
    """nn.Attention: ``mask`` (B, *tokens) reaches the operator as its key mask (flattened for sequence operators)."""
    torch.manual_seed(0)
    spec = OPERATORS[name]
    case = CASES[name]
    attn = Attention(8, H, op=ops.op_config(name, **case["options"])).double()
    tokens = case["keys"]
    x = torch.randn(B, *tokens, 8, dtype=F64)
    m = key_mask(name)[:, 0]  # (B, *tokens)
    out = attn(x, mask=m)

    def split(t):  # (B, *tokens, H*Dh) -> (B, H, *tokens, Dh), flattened for sequence operators
        t = t.unflatten(-1, (H, 4)).movedim(-2, 1)
        return t.flatten(2, -2) if spec.layout == "sequence" else t

    km = m.reshape(B, -1) if spec.layout == "sequence" else m
    core = spec.fn(split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x)), key_mask=km, **case["options"])
    want = attn.proj(core.movedim(1, -2).reshape(*x.shape[:-1], 8))
    torch.testing.assert_close(out, want)
