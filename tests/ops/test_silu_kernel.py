"""silu_kernel_attention (ADEM-VL): oracle parity (forward and gradients), drop rule, ties, masks, registry."""

import pytest
import torch
import torch.nn.functional as F

from attnfuse.nn import Attention
from attnfuse.ops import get_operator, silu_kernel_attention
from attnfuse.ops.backends import list_backends


def loop_oracle(q, k, v, mask, drop_ratio):
    """Row by row in Python: valid keys, sorted scores, threshold = sorted[int(gamma * n)], keep >= threshold."""
    b_, h_, lq, _ = q.shape
    out = torch.zeros(b_, h_, lq, v.shape[-1], dtype=q.dtype)
    rows = []
    for b in range(b_):
        for h in range(h_):
            for i in range(lq):
                valid = [j for j in range(k.shape[2]) if mask is None or bool(mask[b, 0, 0, j])]
                if not valid:
                    continue
                s = torch.stack([(F.silu(q[b, h, i]) * F.silu(k[b, h, j])).sum() for j in valid])
                thr = sorted(s.tolist())[int(drop_ratio * len(valid))] if drop_ratio > 0 else -float("inf")
                keep = [(j, sj) for j, sj in zip(valid, s) if sj.item() >= thr]
                rows.append((b, h, i, len(valid) - len(keep)))
                out[b, h, i] = sum(sj * v[b, h, j] for j, sj in keep)
    return out, rows


@pytest.mark.parametrize("drop_ratio", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_loop_oracle_forward_and_gradients(drop_ratio, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = (torch.rand(2, 1, 1, 11, generator=g) > 0.3)
        mask[1, ..., :] = False  # a sample with no key
    out = silu_kernel_attention(q, k, v, mask=mask, drop_ratio=drop_ratio)
    ref, _ = loop_oracle(q, k, v, mask, drop_ratio)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if masked:
        assert torch.count_nonzero(out[1]) == 0 and all(torch.isfinite(t).all() for t in grads)


def test_exact_drop_count_without_ties():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 3)
    _, w = silu_kernel_attention(q, k, v, drop_ratio=0.1, return_weights=True)
    assert (w == 0).sum(-1).flatten().tolist() == [2] * 6  # floor(0.1 * 20)
    # the dropped ones are the two lowest scores of each row
    a = F.silu(q) @ F.silu(k).transpose(-1, -2)
    lowest = a.argsort(-1)[..., :2]
    assert torch.all(w.gather(-1, lowest) == 0)
    # with a mask the count follows the valid keys: floor(0.1 * 12) = 1
    mask = torch.zeros(1, 1, 1, 20, dtype=torch.bool)
    mask[..., :12] = True
    _, wm = silu_kernel_attention(q, k, v, mask=mask, drop_ratio=0.1, return_weights=True)
    assert ((wm[..., :12] == 0).sum(-1) == 1).all() and (wm[..., 12:] == 0).all()


def test_ties_at_threshold_are_kept():
    q = torch.ones(1, 1, 2, 4)
    k = torch.ones(1, 1, 10, 4)  # every score in a row is equal
    k[..., 0, :] = -1.0  # one strictly lower score
    v = torch.randn(1, 1, 10, 2)
    _, w = silu_kernel_attention(q, k, v, drop_ratio=0.3, return_weights=True)
    # floor(0.3 * 10) = 3 would be dropped, but the threshold (3rd smallest) ties with 8 others: only 1 drops
    assert (w == 0).sum(-1).flatten().tolist() == [1, 1]


def test_no_drop_is_dense_bilinear_form_and_linear_in_values():
    torch.manual_seed(1)
    q, k, v1, v2 = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 5)
    out = silu_kernel_attention(q, k, v1)
    torch.testing.assert_close(out, (F.silu(q) @ F.silu(k).transpose(-1, -2)) @ v1)
    lin = silu_kernel_attention(q, k, 2.0 * v1 - 3.0 * v2, drop_ratio=0.3)
    parts = [silu_kernel_attention(q, k, v, drop_ratio=0.3) for v in (v1, v2)]
    torch.testing.assert_close(lin, 2.0 * parts[0] - 3.0 * parts[1])


def test_masked_keys_equal_deleted_keys():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 4)
    keep = torch.tensor([True, False, True, True, False, True, True, True, False])
    out = silu_kernel_attention(q, k, v * 1.0, mask=keep.view(1, 1, 1, 9), drop_ratio=0.2)
    k_big = k.clone()
    k_big[..., ~keep, :] = 100.0  # masked keys must not take part in the ranking either
    out_big = silu_kernel_attention(q, k_big, v, mask=keep.view(1, 1, 1, 9), drop_ratio=0.2)
    ref = silu_kernel_attention(q, k[..., keep, :], v[..., keep, :], drop_ratio=0.2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_big, ref)


def test_errors_registry_and_module_use():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="drop_ratio"):
        silu_kernel_attention(q, q, q, drop_ratio=1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        silu_kernel_attention(q, q, q, backend="sdpa")
    with pytest.raises(TypeError, match="bool"):
        silu_kernel_attention(q, q, q, mask=torch.ones(1, 1, 1, 2))
    spec = get_operator("silu_kernel")
    assert spec.options == {"drop_ratio", "backend"} and list_backends("silu_kernel") == ["reference"]
    attn = Attention(8, 2, op="silu_kernel", drop_ratio=0.25)
    out = attn(torch.randn(2, 3, 8), context=torch.randn(2, 8, 8), context_mask=torch.zeros(2, 8, dtype=torch.bool))
    assert torch.count_nonzero(out) == 0  # no key: exactly zero update
