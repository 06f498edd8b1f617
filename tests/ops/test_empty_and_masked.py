"""Empty inputs and masked positions, for every registered operator and every backend that runs the call.

Enumerated from ``OPERATORS`` (a new operator fails ``test_every_registered_operator_has_a_case`` until it
gets its minimal options here), over each backend of the operator that can run the call on the device
(backends ``"auto"`` would not pick on the CPU are left out there; on CUDA every available one runs):

* empty in, empty out: batch 0, no keys (``S = 0``), no queries, an empty grid give outputs of the
  documented shapes (zeros; ``lse = -inf``; weights zeros), also with ``return_weights`` /
  ``return_lse``, and backward runs with zero gradients;
* masked positions never influence the result: NaN / inf in ``k`` and ``v`` where the key mask (or a
  pair mask, for every query) excludes them gives the result of zeros there, outputs and gradients
  finite; for self-attention operators the same holds for ``q`` at masked positions as seen by the
  other (valid) positions.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.ops import OPERATORS
from attnfuse.ops.neighborhood import make_geometry

H, D, DV = 2, 4, 3

# Minimal options and token shapes per operator: ``queries`` / ``keys`` are the query / key token shapes
# (sequence operators: ``(L,)`` / ``(S,)``; grid operators: the grid, ``keys`` differing from ``queries``
# only where the operator attends another token set).
CASES = {
    "dense": {"options": {}, "queries": (5,), "keys": (7,)},
    "silu_kernel": {"options": {"drop_ratio": 0.2}, "queries": (5,), "keys": (7,)},
    "kernel": {"options": {"similarity": "taylor"}, "queries": (5,), "keys": (7,)},
    "combiner": {"options": {"mode": "fixed", "block_size": 3}, "queries": (8,), "keys": (8,)},
    "axial": {"options": {"axis": 1}, "queries": (3, 4), "keys": (3, 5)},
    "halo": {"options": {"block_size": 2, "halo_size": 1}, "queries": (5, 4), "keys": (5, 4)},
    "routing": {"options": {"regions": 2, "topk": 2}, "queries": (6, 4), "keys": (6, 4)},
    "neighborhood": {"options": {"kernel_size": 3}, "queries": (5, 6), "keys": (5, 6)},
}
NAMES = sorted(n for n in OPERATORS if not n.startswith("test_"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_every_registered_operator_has_a_case():
    missing = sorted(set(NAMES) - set(CASES))
    assert not missing, f"add minimal options and token shapes for {missing} to CASES"


def backends(name: str, device: str) -> list[str]:
    """Backends to run on ``device``: available ones; on the CPU only those "auto" may pick there."""
    out = []
    for b in OPERATORS[name].backends:
        unavailable = getattr(b, "unavailable", None)
        if unavailable is not None and unavailable():
            continue
        if device == "cpu" and b.auto_devices is not None and "cpu" not in b.auto_devices:
            continue
        out.append(b.name)
    return out


def dtype_for(device: str) -> torch.dtype:
    return torch.float64 if device == "cpu" else torch.float32


def call(name, q, k, v, backend, **kw):
    """Run the operator; ``None`` if this backend cannot run this call (its dispatch says so)."""
    try:
        return OPERATORS[name].fn(q, k, v, **CASES[name]["options"], backend=backend, **kw)
    except ValueError as err:
        if f"backend {backend!r} of operator {name!r} cannot run this call" in str(err):
            return None
        raise


def flag_sets(name: str) -> list[dict]:
    """The return flags to try: none, and each flag the operator takes."""
    takes = OPERATORS[name].takes
    sets = [{}]
    if takes.weights:
        sets.append({"return_weights": True})
    if takes.lse:
        sets.append({"return_lse": True})
    if takes.weights and takes.lse:
        sets.append({"return_weights": True, "return_lse": True})
    return sets


def unpack(result, flags: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if not flags:
        return result, None, None
    result = list(result)
    out = result.pop(0)
    weights = result.pop(0) if flags.get("return_weights") else None
    lse = result.pop(0) if flags.get("return_lse") else None
    return out, weights, lse


def weights_shape(name: str, b: int, queries: tuple[int, ...], keys: tuple[int, ...]) -> tuple[int, ...]:
    """The documented weights shape: window slots for neighborhood, dense ``(B, H, Nq, Nk)`` otherwise."""
    if name == "neighborhood":
        return (b, H, *queries, math.prod(make_geometry(CASES[name]["keys"], CASES[name]["options"]["kernel_size"]).kernel))
    return (b, H, math.prod(queries), math.prod(keys))


def empty_variants(name: str) -> dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """``label -> (B, queries, keys)``: batch 0, and every way of emptying the token axes this operator allows."""
    case = CASES[name]
    qs, ks = case["queries"], case["keys"]
    variants = {"batch 0": (0, qs, ks)}
    differ = [a for a, (x, y) in enumerate(zip(qs, ks)) if x != y]
    if differ:  # keys from another token set: empty keys, empty queries
        a = differ[0]
        variants["no keys"] = (2, qs, (*ks[:a], 0, *ks[a + 1:]))
        variants["no queries"] = (2, (*qs[:a], 0, *qs[a + 1:]), ks)
    variants["empty grid"] = (2, (0, *qs[1:]), (0, *ks[1:]))
    return variants


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_weights_shape_rule_matches_a_nonempty_call(name, device):
    """The shape rule used below is the operator's own (checked on a non-empty call with the reference backend)."""
    case = CASES[name]
    dtype = dtype_for(device)
    q = torch.randn(2, H, *case["queries"], D, dtype=dtype, device=device)
    k = torch.randn(2, H, *case["keys"], D, dtype=dtype, device=device)
    v = torch.randn(2, H, *case["keys"], DV, dtype=dtype, device=device)
    if OPERATORS[name].takes.weights:
        _, w = OPERATORS[name].fn(q, k, v, **case["options"], return_weights=True, backend="reference")
        assert tuple(w.shape) == weights_shape(name, 2, case["queries"], case["keys"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_empty_in_empty_out(name, device):
    """Batch 0, no keys, no queries, an empty grid: documented shapes, zeros / -inf, and a backward pass."""
    dtype = dtype_for(device)
    ran = 0
    for label, (b, qs, ks) in empty_variants(name).items():
        for backend in backends(name, device):
            for flags in flag_sets(name):
                q = torch.randn(b, H, *qs, D, dtype=dtype, device=device, requires_grad=True)
                k = torch.randn(b, H, *ks, D, dtype=dtype, device=device, requires_grad=True)
                v = torch.randn(b, H, *ks, DV, dtype=dtype, device=device, requires_grad=True)
                key_mask = torch.ones(b, *ks, dtype=torch.bool, device=device)
                for km in (None, key_mask):
                    what = f"{name} {backend} {label} {flags} key_mask={'yes' if km is not None else 'no'}"
                    result = call(name, q, k, v, backend, key_mask=km, **flags)
                    if result is None:
                        continue
                    ran += 1
                    out, weights, lse = unpack(result, flags)
                    assert tuple(out.shape) == (b, H, *qs, DV), what
                    assert out.dtype == dtype and torch.equal(out, torch.zeros_like(out)), what
                    loss = out.sum()
                    if weights is not None:
                        assert tuple(weights.shape) == weights_shape(name, b, qs, ks), what
                        assert torch.equal(weights, torch.zeros_like(weights)), what
                        loss = loss + weights.sum()
                    if lse is not None:
                        assert tuple(lse.shape) == (b, H, *qs), what
                        assert bool((lse == float("-inf")).all()), what
                        loss = loss + torch.where(torch.isfinite(lse), lse, 0.0).sum()
                    grads = torch.autograd.grad(loss, (q, k, v))
                    for t, g in zip((q, k, v), grads):
                        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g)), what
    assert ran, f"no backend of {name} ran an empty call"


def _inputs(name, device, seed=0):
    case = CASES[name]
    g = torch.Generator().manual_seed(seed)
    dtype = dtype_for(device)
    q = torch.randn(2, H, *case["queries"], D, generator=g, dtype=torch.float64).to(device, dtype)
    k = torch.randn(2, H, *case["keys"], D, generator=g, dtype=torch.float64).to(device, dtype)
    v = torch.randn(2, H, *case["keys"], DV, generator=g, dtype=torch.float64).to(device, dtype)
    keep = torch.rand(2, *case["keys"], generator=g) < 0.6  # (B, *keys)
    keep.view(2, -1)[:, 0] = True
    keep.view(2, -1)[1, 1:] = False  # sample 1 keeps a single key
    return q, k, v, keep.to(device)


def _poisoned(t: torch.Tensor, gone: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with ``value`` where ``gone (B?, H?, *keys)`` is True."""
    return torch.where(gone.unsqueeze(-1), torch.full((), value, dtype=t.dtype, device=t.device), t)


def _compare(name, backend, device, q, k, v, gone, kwargs, *, poison_q=False, rows=None):
    """The operator (``backend``, ``kwargs``) with NaN / inf at ``gone`` equals it with zeros there, all finite.

    With ``poison_q`` (q poisoned too) only the outputs at ``rows`` are compared, not gradients: a query
    that is NaN makes its own row NaN, and a backward pass through that row is NaN by itself.
    """
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    results = {}
    for label, value_k, value_v in (("zero", 0.0, 0.0), ("nan", float("nan"), float("nan")), ("inf", float("inf"), float("-inf"))):
        qq, kk, vv = leaves
        if poison_q:
            qq = _poisoned(qq, gone, value_k)
        kk, vv = _poisoned(kk, gone, value_k), _poisoned(vv, gone, value_v)
        res = call(name, qq, kk, vv, backend, **kwargs)
        if res is None:
            return False
        outs = [r for r in (res if isinstance(res, tuple) else (res,)) if r.is_floating_point()]
        if rows is not None:  # only the outputs of valid positions (the masked queries' own rows are theirs)
            outs[0] = outs[0][rows]
        loss = sum(torch.where(torch.isfinite(o), o, 0.0).sum() * (i + 1) for i, o in enumerate(outs))
        grads = (None, None, None) if poison_q else torch.autograd.grad(loss, leaves, allow_unused=True)
        results[label] = (outs, grads)
    outs0, grads0 = results["zero"]
    for label in ("nan", "inf"):
        outs, grads = results[label]
        what = f"{name} {backend} on {device}, {label} at masked positions{' (q too)' if poison_q else ''}"
        for i, (o, o0) in enumerate(zip(outs, outs0)):
            fin = torch.isfinite(o0)  # lse is -inf for an empty row; compare those as they are
            assert torch.equal(torch.isfinite(o), fin), f"{what}: output {i} not finite where the zero run is"
            torch.testing.assert_close(o, o0, msg=f"{what}: output {i} differs")
        for t, g, g0 in zip(("q", "k", "v"), grads, grads0):
            if g0 is None:
                continue
            assert torch.isfinite(g).all(), f"{what}: gradient of {t} not finite"
            torch.testing.assert_close(g, g0, msg=f"{what}: gradient of {t} differs")
    return True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_masked_keys_never_influence_the_result(name, device):
    """NaN / inf in k and v at key-masked positions: the result (out, weights, lse) and gradients of the zero run."""
    q, k, v, keep = _inputs(name, device)
    gone = ~keep[:, None]  # (B, 1, *keys)
    ran = 0
    for backend in backends(name, device):
        for flags in flag_sets(name):
            ran += _compare(name, backend, device, q, k, v, gone, {"key_mask": keep, **flags})
    assert ran


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in NAMES if OPERATORS[n].takes.pair_mask])
def test_keys_masked_for_every_query_never_influence_the_result(name, device):
    """Operators with a pair mask: NaN / inf in k and v at keys no query may attend."""
    q, k, v, _ = _inputs(name, device)
    nq, nk = math.prod(CASES[name]["queries"]), math.prod(CASES[name]["keys"])
    g = torch.Generator().manual_seed(3)
    pairs = (torch.rand(2, H, nq, nk, generator=g) < 0.7).to(device)
    pairs[..., 0] = True
    pairs[:, :, :, 2] = False  # key 2 excluded for every query
    pairs[1, :, :, 4:] = False  # and keys 4.. in sample 1
    gone = ~pairs.any(dim=-2)  # (B, H, S)
    ran = 0
    for backend in backends(name, device):
        for flags in flag_sets(name):
            ran += _compare(name, backend, device, q, k, v, gone, {"mask": pairs, **flags})
    assert ran


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in NAMES if not OPERATORS[n].cross])
def test_masked_positions_of_self_attention_never_influence_valid_positions(name, device):
    """Self-attention: NaN / inf in q, k and v at masked positions leave the outputs of valid positions as with zeros.

    (Region summaries of routing and combiner average queries too: a masked query must not reach them.)
    """
    q, k, v, keep = _inputs(name, device)
    gone = ~keep[:, None]  # (B, 1, *grid)
    rows = keep[:, None].expand(2, H, *keep.shape[1:])  # valid query positions, (B, H, *grid)
    ran = 0
    for backend in backends(name, device):
        ran += _compare(name, backend, device, q, k, v, gone, {"key_mask": keep}, poison_q=True, rows=rows)
    assert ran
