"""Ring and Ulysses attention equal single-process attention on the gathered sequence (forward and gradients).

One ``torch.multiprocessing`` spawn per world size (2 and 4 gloo ranks on ``tcp://127.0.0.1:<free port>``)
runs every case; every rank draws the full tensors from one seed, shards them, and asserts against
single-process :func:`attnfuse.ops.dense_attention` (or the operator Ulysses wraps) on the full sequence.
A failing assertion in any rank fails the test (the spawn context re-raises it; the other ranks are killed);
a hang is killed after a hard timeout.
"""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnfuse.distributed.ring as ring_module
from attnfuse import ops
from attnfuse.distributed import (
    LAYOUTS,
    Ring,
    Ulysses,
    causal_work,
    gather_sequence,
    global_positions,
    ring_attention,
    shard_sequence,
    shard_sizes,
    ulysses_attention,
)
from attnfuse.distributed.ring import _plan, _positions
from attnfuse.nn import Attention

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float64: {"atol": 1e-12, "rtol": 1e-12}}
B, H, D, DV = 2, 4, 8, 6
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int) -> None:
    """Run ``fn(rank, world, port)`` on ``world`` gloo ranks; re-raise the first failure; kill a hang.

    The ranks are forked (``torch.multiprocessing.start_processes``): they inherit the imported modules,
    which saves each rank the seconds of importing torch on a busy CI machine; each rank sets one intra-op
    thread before any work (OpenMP is not fork-safe with a thread pool).
    """
    port = _free_port()
    ctx = mp.start_processes(fn, args=(world, port), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} on {world} ranks did not finish within {TIMEOUT_S} s")


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _inputs(length: int, dtype: torch.dtype, seed: int, masked: str):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, length, d, generator=g, dtype=dtype) for d in (D, D, DV))
    key_mask = None
    if masked == "random":
        key_mask = torch.rand(B, length, generator=g) > 0.3
        key_mask[1, :] = False  # one sample without any key: zeros, lse -inf, finite gradients
    elif masked == "heads":
        key_mask = torch.rand(B, H, length, generator=g) > 0.4
    grad_out = torch.randn(B, H, length, DV, generator=g, dtype=dtype)
    grad_lse = torch.randn(B, H, length, generator=g, dtype=dtype)
    return q, k, v, key_mask, grad_out, grad_lse


def _loss(out, lse, grad_out, grad_lse):
    finite = torch.isfinite(lse)
    return (out * grad_out).sum() + (torch.where(finite, lse, torch.zeros_like(lse)) * grad_lse).sum()


def _check_case(fn, length, dtype, layout, causal, masked, seed, *, reference=None):
    """One case: ``fn`` on the shards vs ``reference`` (default dense_attention) on the full sequence."""
    reference = reference or (lambda q, k, v, **kw: ops.dense_attention(q, k, v, **kw))
    q, k, v, key_mask, grad_out, grad_lse = _inputs(length, dtype, seed, masked)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference(*full, key_mask=key_mask, is_causal=causal, return_lse=True)
    _loss(out, lse, grad_out, grad_lse).backward()

    def shard(t, dim=2):
        return shard_sequence(t, layout=layout, dim=dim)

    parts = [shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
    km = None if key_mask is None else shard(key_mask, dim=key_mask.dim() - 1)
    out_r, lse_r = fn(*parts, key_mask=km, is_causal=causal, return_lse=True, layout=layout)
    _loss(out_r, lse_r, shard(grad_out), shard(grad_lse)).backward()
    what = f"{getattr(fn, '__name__', fn)} L={length} {dtype} {layout} causal={causal} mask={masked}"
    tol = TOL[dtype]
    torch.testing.assert_close(out_r, shard(out.detach()), **tol, msg=lambda m: f"{what} out: {m}")
    torch.testing.assert_close(lse_r, shard(lse.detach()), **tol, msg=lambda m: f"{what} lse: {m}")
    for name, p, f in zip("qkv", parts, full):
        assert torch.isfinite(p.grad).all(), f"{what} d{name} not finite"
        torch.testing.assert_close(p.grad, shard(f.grad), **tol, msg=lambda m, n=name: f"{what} d{n}: {m}")


def _lengths(world: int, layout: str) -> list[int]:
    # zig-zag needs L % 2W == 0, striped L % W == 0; contiguous also gets an uneven last shard
    return [4 * world, 4 * world - 3] if layout == "contiguous" else [4 * world]


#: (dtype, key mask) cases run for every layout, length and causal flag, on 2 and 4 ranks
MATRIX = [(torch.float64, "none"), (torch.float64, "random"), (torch.float64, "heads"), (torch.float32, "none"),
          (torch.float32, "random")]


def _rank_main(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    if world == 2:
        ring_module.TILE_ELEMENTS = 64  # backward in tiles of 1-2 query rows (causal tiles see fewer keys)
    try:
        seed = 0
        for layout in LAYOUTS:
            for length in _lengths(world, layout):
                # layouts round-trip (uneven contiguous shards included)
                x = torch.randn(3, length, 5, generator=torch.Generator().manual_seed(length))
                assert torch.equal(gather_sequence(shard_sequence(x, layout=layout, dim=1), layout=layout, dim=1), x)
                # the gathered ring output is the full output
                q, k, v, key_mask, *_ = _inputs(length, torch.float64, length, "random")
                out_r = ring_attention(*(shard_sequence(t, layout=layout) for t in (q, k, v)), is_causal=True, layout=layout,
                                       key_mask=shard_sequence(key_mask, layout=layout, dim=1))
                torch.testing.assert_close(gather_sequence(out_r, layout=layout),
                                           ops.dense_attention(q, k, v, key_mask=key_mask, is_causal=True), **TOL[torch.float64])
                assert shard_sequence(x, layout=layout, dim=1).shape[1] == shard_sizes(length, world, layout)[rank]
                for dtype, masked in MATRIX:
                    for causal in (False, True):
                        seed += 1
                        _check_case(ring_attention, length, dtype, layout, causal, masked, seed)
                        _check_case(ulysses_attention, length, dtype, layout, causal, masked, seed)
        # Ulysses with another operator inside: 1-D neighborhood attention on the gathered sequence
        from attnfuse.ops.configs import Neighborhood

        nb = Neighborhood(kernel_size=3)
        for causal in (False, True):
            seed += 1

            def uly_nb(*a, **kw):
                return ulysses_attention(*a, op=nb, **kw)

            def ref_nb(*a, **kw):
                return nb(*a, **kw)

            _check_case(uly_nb, 4 * world, torch.float64, "zigzag", causal, "random", seed, reference=ref_nb)
        _check_errors(rank, world)
        _check_module_training(rank, world)
        if world == 4:
            _check_sequence_and_data_parallel(rank)
    finally:
        dist.destroy_process_group()


def _check_errors(rank: int, world: int) -> None:
    q = torch.randn(1, world, 2 + rank, 4)  # zig-zag / striped need equal shards: every rank raises
    for layout in ("zigzag", "striped"):
        with pytest.raises(ValueError, match="equal shards"):
            ring_attention(q, q, q, is_causal=True, layout=layout)
    with pytest.raises(ValueError, match=rf"divisible by {2 * world}"):
        shard_sequence(torch.randn(1, 1, 2 * world + 1, 2), layout="zigzag")
    with pytest.raises(ValueError, match=rf"heads divisible by the world size, got H={world + 1}, world={world}"):
        ulysses_attention(*(torch.randn(1, world + 1, 4, 2) for _ in range(3)))
    with pytest.raises(ValueError, match=r"must agree on every rank"):
        ring_attention(*(torch.randn(1, 2, 4, 2 + (rank == 1)) for _ in range(3)))


def _check_module_training(rank: int, world: int) -> None:
    """nn.Attention(op="ring" | "ulysses") on token shards: outputs on valid tokens and summed parameter gradients
    equal one process (fp64), so a data-replicated model trains identically (STYLE R17: no branching on world size)."""
    length = 4 * world
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, length, 16, generator=g, dtype=torch.float64)
    mask = torch.rand(2, length, generator=g) > 0.2
    mask[:, 0] = True
    for op, layout in (("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "striped")):
        torch.manual_seed(0)
        single = Attention(16, 4, op="dense", dtype=torch.float64)
        parallel = Attention(16, 4, op=op, layout=layout, dtype=torch.float64)
        parallel.load_state_dict(single.state_dict())
        out = single(x, mask=mask, is_causal=True)
        (out.square() * mask.unsqueeze(-1)).sum().backward()
        x_r, m_r = shard_sequence(x, layout=layout, dim=1), shard_sequence(mask, layout=layout, dim=1)
        out_r = parallel(x_r, mask=m_r, is_causal=True)
        (out_r.square() * m_r.unsqueeze(-1)).sum().backward()
        valid = m_r.unsqueeze(-1)
        torch.testing.assert_close(out_r * valid, shard_sequence(out.detach(), layout=layout, dim=1) * valid, **TOL[torch.float64])
        grads = torch.cat([p.grad.flatten() for p in parallel.parameters()])
        dist.all_reduce(grads)  # data-parallel style: parameter gradients summed over the sequence shards
        ref = torch.cat([p.grad.flatten() for p in single.parameters()])
        torch.testing.assert_close(grads, ref, **TOL[torch.float64], msg=lambda m, o=op, lay=layout: f"{o} {lay} parameter gradients: {m}")


def _check_sequence_and_data_parallel(rank: int) -> None:
    """2 x 2 ranks: sequence groups {0, 1}, {2, 3} (ring over the shards of one sample), data groups {0, 2}, {1, 3}
    (different samples). Parameter gradients summed over the sequence group and averaged over the data group equal
    single-process gradients of the batch-mean loss (docs/distributed.md, "Sequence parallel + data parallel")."""
    s_size = 2
    seq_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in one order
    data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    seq_group, data_group = seq_groups[rank // s_size], data_groups[rank % s_size]
    sample = rank // s_size
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, 16, generator=g, dtype=torch.float64)  # 2 samples, 8 tokens
    torch.manual_seed(0)
    single = Attention(16, 4, op="dense", dtype=torch.float64)
    parallel = Attention(16, 4, op="ring", layout="zigzag", group=seq_group, dtype=torch.float64)
    parallel.load_state_dict(single.state_dict())
    single(x, is_causal=True).square().sum(dim=(1, 2)).mean().backward()  # mean over samples of per-sample losses
    x_r = shard_sequence(x[sample:sample + 1], group=seq_group, layout="zigzag", dim=1)
    parallel(x_r, is_causal=True).square().sum().backward()
    grads = torch.cat([p.grad.flatten() for p in parallel.parameters()])
    dist.all_reduce(grads, group=seq_group)  # the sample's gradient: sum over its shards
    dist.all_reduce(grads, group=data_group)  # DDP: average over the samples
    grads /= 2
    ref = torch.cat([p.grad.flatten() for p in single.parameters()])
    torch.testing.assert_close(grads, ref, **TOL[torch.float64])


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_ulysses_equal_single_process_attention(world):
    _spawn(_rank_main, world)


def test_one_process_is_the_local_operator():
    """No process group: ring / Ulysses are dense_attention (no communication), bitwise."""
    q, k, v, key_mask, *_ = _inputs(9, torch.float64, 0, "random")
    for causal in (False, True):
        ref = ops.dense_attention(q, k, v, key_mask=key_mask, is_causal=causal, return_lse=True)
        for fn in (ring_attention, ulysses_attention):
            got = fn(q, k, v, key_mask=key_mask, is_causal=causal, return_lse=True, layout="zigzag")
            assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(shard_sequence(q, layout="striped"), q)
    attn = Attention(8, 2, op=Ring(is_causal=True))
    ref = Attention(8, 2, op="dense", is_causal=True)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(attn(x), ref(x))
    assert Attention(8, 2, op="ulysses").op == Ulysses()
    with pytest.raises(ValueError, match=r"group= was given but torch\.distributed is not initialised"):
        ring_attention(q, k, v, group=object())
    with pytest.raises(TypeError, match="does not return attention weights"):
        attn(x, return_weights=True)


def test_layout_positions_and_causal_load_balance():
    assert global_positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert global_positions(8, 2, 1, "striped").tolist() == [1, 3, 5, 7]
    assert shard_sizes(10, 4) == [3, 3, 3, 1]
    for layout in LAYOUTS:  # every position held exactly once
        pos = torch.cat([global_positions(16, 4, r, layout) for r in range(4)])
        assert sorted(pos.tolist()) == list(range(16))
    # allowed causal pairs per rank at W = 4, L = 4096 (spec): 0.52M / 1.57M / 2.62M / 3.67M; balanced otherwise
    assert causal_work(4096, 4, "contiguous", "allowed") == [524800, 1573376, 2621952, 3670528]
    assert causal_work(4096, 4, "zigzag", "allowed") == [2097664] * 4
    striped = causal_work(4096, 4, "striped", "allowed")
    assert max(striped) / min(striped) < 1.01
    # the planner's rectangle + kind reproduces the causal pattern of any increasing positions (every kind occurs)
    g = torch.Generator().manual_seed(3)
    kinds = set()
    for _ in range(60):
        pos_q = torch.sort(torch.randperm(12, generator=g)[:5]).values
        pos_k = torch.sort(torch.randperm(12, generator=g)[:4]).values
        want = pos_q.unsqueeze(1) >= pos_k.unsqueeze(0)  # (5, 4)
        block = _plan(pos_q, pos_k, 5, 4)
        got = torch.zeros(5, 4, dtype=torch.bool)
        if block is not None:
            kinds.add(block.kind)
            rect = {"full": torch.ones(5 - block.r0, block.nk, dtype=torch.bool),
                    "causal": torch.ones(5 - block.r0, block.nk, dtype=torch.bool).tril(),
                    "mask": block.pairs}[block.kind]
            got[block.r0:, : block.nk] = rect
        assert torch.equal(got, want), (pos_q, pos_k, block)
    assert kinds == {"full", "causal", "mask"}
    # computed blocks per rank: contiguous r + 1, zig-zag and striped W (causal skipping)
    for layout, expected in (("contiguous", [1, 2, 3, 4]), ("zigzag", [4] * 4), ("striped", [4] * 4)):
        lengths = shard_sizes(32, 4, layout)
        pos = _positions(lengths, 4, layout)
        blocks = [sum(_plan(pos[r], pos[s], lengths[r], lengths[s]) is not None for s in range(4)) for r in range(4)]
        assert blocks == expected, layout
