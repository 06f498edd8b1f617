"""ConditionalCrossAttention (CCA): formula, constant update, symmetries, CLS shortcut, mixed conditions, export."""

import pytest
import torch
from torch import nn

from attnfuse.fusion import ConditionalCrossAttention, TokenSet

D = 16


def module(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_conditions", 3)
    return ConditionalCrossAttention(["image"], D, heads=2, mlp_ratio=2.0, **kw).eval()


def image(batch=3, n=6, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n, generator=g) > 0.3 if pad else torch.ones(batch, n, dtype=torch.bool)
    mask[:, 0] = True
    return TokenSet(torch.randn(batch, n, D, generator=g), mask)


def test_matches_written_out_block():
    cca = module()
    img = image(pad=False)
    cond = torch.tensor([0, 2, 1])
    out = cca({"image": img}, condition=cond, return_weights=True)
    q = cca.table.weight[cond].unsqueeze(1)
    u = cca.cross(q, context=cca.norm_context(img.x))
    x1 = img.x + u
    ref = x1 + cca.mlp(cca.norm_mlp(x1))
    torch.testing.assert_close(out.fused.x, ref)
    assert out.weights["cross"].shape == (3, 2, 1, 6)


def test_same_update_at_every_position_and_token_permutation():
    cca = module()
    with torch.no_grad():
        cca.mlp.fc2.weight.zero_()
        cca.mlp.fc2.bias.zero_()
    img = image()
    out = cca({"image": img}, condition=torch.tensor([1, 1, 2]))
    delta = (out.fused.x - img.x)[0][img.mask[0]]
    torch.testing.assert_close(delta, delta[:1].expand_as(delta))
    cca = module()
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    out = cca({"image": img}, condition=torch.tensor([0, 1, 2]))
    out_p = cca({"image": TokenSet(img.x[:, perm], img.mask[:, perm])}, condition=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out_p.fused.x, out.fused.x[:, perm], rtol=1e-5, atol=1e-5)


def test_cls_only_equals_full_and_is_declared_ordered():
    full, cls = module(), module(query_positions="cls_only")
    assert full.symmetry == "equivariant" and cls.symmetry == "ordered"
    img = image()
    cond = torch.tensor([2, 0, 1])
    torch.testing.assert_close(cls({"image": img}, condition=cond).fused.x, full({"image": img}, condition=cond).fused.x[:, :1])


def test_mixed_condition_batch_equals_per_condition_runs_and_conditions_differ():
    cca = module()
    img = image()
    cond = torch.tensor([2, 0, 1])
    mixed = cca({"image": img}, condition=cond).fused.x
    for c in range(3):
        per = cca({"image": img}, condition=torch.full((3,), c)).fused.x
        torch.testing.assert_close(mixed[cond == c], per[cond == c])
    a = cca({"image": img}, condition=torch.zeros(3, dtype=torch.long)).fused.x
    b = cca({"image": img}, condition=torch.ones(3, dtype=torch.long)).fused.x
    assert not torch.allclose(a, b)


def test_condition_from_a_source_absent_equals_all_false():
    cca = ConditionalCrossAttention(["image", "attr"], D, heads=2, context="image", condition_source="attr").eval()
    img = image()
    attr = TokenSet(torch.randn(3, 1, D))
    absent = cca({"image": img}).fused.x
    masked = cca({"image": img, "attr": attr.with_mask(torch.zeros(3, 1, dtype=torch.bool))}).fused.x
    torch.testing.assert_close(absent, masked)
    assert not torch.allclose(cca({"image": img, "attr": attr}).fused.x, absent)


def test_padding_equals_deletion_fully_masked_and_gradients():
    cca = module()
    img = image()
    cond = torch.tensor([0, 1, 2])
    out = cca({"image": img}, condition=cond)
    alone = cca({"image": TokenSet(img.x[1:2][:, img.mask[1]])}, condition=cond[1:2])
    torch.testing.assert_close(out.fused.x[1][img.mask[1]], alone.fused.x[0], rtol=1e-5, atol=1e-5)
    empty = cca({"image": img.with_mask(torch.zeros_like(img.mask))}, condition=cond)
    assert torch.count_nonzero(empty.fused.x) == 0
    x = img.x.clone().requires_grad_()
    cca({"image": TokenSet(x, img.mask)}, condition=cond).fused.x.square().sum().backward()
    assert cca.table.weight.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="condition= ids"):
        cca({"image": img})
    with pytest.raises(ValueError, match="no condition"):
        ConditionalCrossAttention(["image"], D, heads=2)
    with pytest.raises(ValueError, match="at most one"):
        ConditionalCrossAttention(["image", "attr"], D, condition_source="attr", num_conditions=2)
    with pytest.raises(ValueError, match="must differ"):
        ConditionalCrossAttention(["image", "attr"], D, context=["image", "attr"], condition_source="attr")
    with pytest.raises(ValueError, match="take no part"):
        ConditionalCrossAttention(["image", "attr", "z"], D, context="image", condition_source="attr")
    # no context: no output positions (the same valid tokens as a fully masked context)
    by_source = ConditionalCrossAttention(["image", "attr"], D, heads=2, context="image", condition_source="attr")
    empty_out = by_source({"attr": TokenSet(torch.randn(3, 1, D))})
    assert empty_out.fused.x.shape == (3, 0, D) and empty_out.per_source == {}


def test_defaults_condition_on_the_first_source_and_update_the_others():
    torch.manual_seed(0)
    cca = ConditionalCrossAttention(["attr", "image", "text"], D, heads=2).eval()
    assert cca.condition_source == ("attr",) and cca.context == ("image", "text") and cca.out_dim == D
    g = torch.Generator().manual_seed(3)
    attr, img, text = TokenSet(torch.randn(3, 2, D, generator=g)), image(), image(n=4, seed=1)
    out = cca({"attr": attr, "image": img, "text": text}, return_weights=True)
    assert out.fused.x.shape == (3, 10, D) and out.layout == {"image": (0, 6), "text": (6, 10)}
    assert out.weights["cross"].shape == (3, 2, 1, 10)
    # written out: the condition is attr's mean token, the context both sources' tokens
    x = torch.cat([img.x * img.mask[..., None], text.x * text.mask[..., None]], 1)
    mask = torch.cat([img.mask, text.mask], 1)
    u = cca.cross(attr.x.mean(1, keepdim=True), context=cca.norm_context(x), context_mask=mask)
    ref = (x + u) + cca.mlp(cca.norm_mlp(x + u))
    torch.testing.assert_close(out.fused.x, ref * mask[..., None])
    torch.testing.assert_close(out.per_source["text"].x, out.fused.x[:, 6:])
    # the paper's setting is still one constructor away
    table = ConditionalCrossAttention(["image"], D, num_conditions=3)
    assert table.context == ("image",) and table.condition_source == ()


class _Wrapped(nn.Module):
    def __init__(self, cca):
        super().__init__()
        self.cca = cca

    def forward(self, x, mask, condition):
        return self.cca({"image": TokenSet(x, mask)}, condition=condition).fused.x


def test_export_round_trip():
    model = _Wrapped(module()).eval()
    img = image()
    exported = torch.export.export(model, (img.x, img.mask, torch.tensor([0, 1, 2])))
    other = image(seed=4)
    args = (other.x, other.mask, torch.tensor([2, 2, 0]))
    torch.testing.assert_close(exported.module()(*args), model(*args))
