"""Inject: identity at init, frozen backbone, ADEM-VL wiring (MLP-in -> MLP-out, alpha), per-site modules, export."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnfuse.fusion import CrossAttentionFusion, Inject, ParameterFreeCrossAttention, TokenSet
from attnfuse.nn import MLP

D = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = MLP(D, hidden=2 * D)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 4, generator=g), TokenSet(torch.randn(2, 9, D, generator=g), torch.rand(2, 9, generator=g) > 0.3)


def cross_inject(**kw):
    torch.manual_seed(0)
    backbone = Tiny().eval()
    fusion = CrossAttentionFusion(["text", "visual"], D, heads=2, query="text", key="visual", mlp_ratio=2.0)
    return backbone, Inject(backbone, fusion, sites=["blocks.0", "blocks.2"], query="text", query_from="output",
                            fusion_returns="tokens", **kw).eval()


def test_identity_at_init_and_frozen_backbone():
    backbone, model = cross_inject()
    x, visual = data()
    ref = backbone(x)
    assert torch.equal(model(x, context={"visual": visual}), ref)
    assert all(not p.requires_grad for p in backbone.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("fusion.", "gates.")) for n in trainable)
    with torch.no_grad():
        model.gates["blocks__0"].fill_(0.5)
    out = model(x, context={"visual": visual})
    assert not torch.allclose(out, ref)
    out.square().sum().backward()
    assert model.gates["blocks__0"].grad.abs() > 0 and model.gates["blocks__2"].grad.abs() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    assert all(p.grad is None for p in backbone.parameters())


def test_plain_backbone_without_context_and_after_remove():
    backbone, model = cross_inject()
    with torch.no_grad():
        for g in model.gates.values():
            g.fill_(1.0)
    x, visual = data()
    ref = backbone(x)
    assert torch.equal(model(x), ref)  # no context: the hooks pass through
    assert not torch.allclose(model(x, context={"visual": visual}), ref)
    assert model.remove() is backbone
    assert torch.equal(backbone(x), ref)


def test_adem_vl_wiring_matches_manual_forward():
    torch.manual_seed(0)
    backbone = Tiny().eval()
    fuse = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.1)
    model = Inject(backbone, fuse, sites=lambda name, m: name.endswith(".mlp"), query="text", scale=0.1, init=None)
    assert model.sites == ("blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    x, visual = data()
    out = model(x, context={"visual": visual})
    h = backbone.embed(x)
    for b in backbone.blocks:
        z = b.norm(h)
        a = F.silu(z) @ F.silu(visual.x).transpose(1, 2)  # (B, L, S)
        a = a.masked_fill(~visual.mask[:, None, :], float("inf"))
        n = visual.mask.sum(1)
        thr = a.sort(-1).values.gather(-1, (0.1 * n).floor().long().view(2, 1, 1).expand(2, 6, 1))
        w = torch.where(visual.mask[:, None, :] & (a >= thr), a, torch.zeros(()))
        h = h + b.mlp(z) + 0.1 * (w @ torch.where(visual.mask[..., None], visual.x, 0.0))
    torch.testing.assert_close(out, backbone.head(h), rtol=1e-5, atol=1e-5)
    # ADEM-VL's own identity at init: zero visual values leave the backbone unchanged
    zero = TokenSet(torch.zeros(2, 9, D), visual.mask)
    assert torch.equal(model(x, context={"visual": zero}), backbone(x))


def test_adem_vl_block_with_learnable_offsets_matches_the_paper_formula():
    # out = h + FFN(norm h) + alpha * (A * M)(X_v + E2),  A = SiLU(norm h) SiLU(X_v + E1)^T,
    # M drops the floor(gamma * M_v) lowest scores of each text token; E1 ~ N(0, 0.02^2), E2 = 0 at init.
    torch.manual_seed(0)
    backbone = Tiny().eval()
    fuse = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.25)
    model = Inject(backbone, fuse, sites=lambda name, m: name.endswith(".mlp"), query="text", scale=0.1, init=None,
                   context_tokens=8)
    assert model.key_offset.shape == model.value_offset.shape == (1, 8, D)
    assert torch.equal(model.value_offset, torch.zeros(1, 8, D)) and 0.005 < model.key_offset.std() < 0.05
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"key_offset", "value_offset"}
    with torch.no_grad():
        model.value_offset.normal_()  # make E2 matter in the comparison
    g = torch.Generator().manual_seed(3)
    x, xv = torch.randn(2, 6, 4, generator=g), torch.randn(2, 8, D, generator=g)
    out = model(x, context={"visual": TokenSet(xv)})
    e1, e2 = model.key_offset.detach(), model.value_offset.detach()
    h = backbone.embed(x)
    for b in backbone.blocks:
        z = b.norm(h)
        a = F.silu(z) @ F.silu(xv + e1).transpose(1, 2)  # (B, L, M_v)
        n_drop = int(0.25 * 8)
        fused = torch.zeros_like(z)
        for bi in range(2):
            for i in range(6):
                dropped = a[bi, i].argsort()[:n_drop]  # the lowest scores of this text token
                m = torch.ones(8)
                m[dropped] = 0.0
                fused[bi, i] = (a[bi, i] * m) @ (xv[bi] + e2[0])
        h = h + b.mlp(z) + 0.1 * fused
    torch.testing.assert_close(out, backbone.head(h), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.key_offset.grad.abs().sum() > 0 and model.value_offset.grad.abs().sum() > 0


def test_offsets_need_a_fusion_that_takes_them():
    fusion = CrossAttentionFusion(["text", "visual"], D, heads=2, query="text", key="visual")
    with pytest.raises(ValueError, match="takes key_offset= and value_offset="):
        Inject(Tiny(), fusion, sites=["blocks.0"], query="text", context_tokens=9)
    with pytest.raises(ValueError, match="context_tokens must be a positive int"):
        Inject(Tiny(), ParameterFreeCrossAttention(["text", "visual"], D), sites=["blocks.0.mlp"], query="text", context_tokens=0)
    model = Inject(Tiny(), ParameterFreeCrossAttention(["text", "visual"], D), sites=["blocks.0.mlp"], query="text",
                   context_tokens=5)
    x, visual = data()
    with pytest.raises(ValueError, match="key_offset must broadcast"):
        model(x, context={"visual": visual})  # 9 visual tokens, offsets for 5


def test_per_site_modules_query_mask_and_errors():
    torch.manual_seed(0)
    backbone = Tiny().eval()
    fusions = {s: CrossAttentionFusion(["text", "visual"], D, heads=2, query="text", key="visual") for s in ("blocks.0", "blocks.1")}
    model = Inject(backbone, fusions, sites=list(fusions), query="text", query_from="output", fusion_returns="tokens")
    assert set(model.fusion.keys()) == {"blocks__0", "blocks__1"}
    x, visual = data()
    with torch.no_grad():
        for g in model.gates.values():
            g.fill_(1.0)
    qmask = torch.ones(2, 6, dtype=torch.bool)
    qmask[1, 3:] = False
    out = model(x, context={"visual": visual}, query_mask=qmask)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown site"):
        Inject(Tiny(), fusions["blocks.0"], sites=["blocks.7"], query="text")
    with pytest.raises(ValueError, match="no module for site"):
        Inject(Tiny(), {"blocks.0": fusions["blocks.0"]}, sites=["blocks.0", "blocks.1"], query="text")
    wrong = Inject(Tiny(), fusions["blocks.0"], sites=["blocks.0"], query="text", query_from="output", fusion_returns="update")
    with pytest.raises(ValueError, match="returned shape"):
        wrong(x, context={"visual": visual})  # fused has the fusion token first: one token too many


class _Export(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, v, vmask):
        return self.model(x, context={"visual": TokenSet(v, vmask)})


def test_export_round_trip():
    _, model = cross_inject()
    with torch.no_grad():
        for g in model.gates.values():
            g.fill_(0.5)
    wrapped = _Export(model).eval()
    x, visual = data()
    exported = torch.export.export(wrapped, (x, visual.x, visual.mask))
    x2, v2 = data(seed=3)
    mask2 = v2.mask.clone()
    mask2[0] = False
    torch.testing.assert_close(exported.module()(x2, v2.x, mask2), wrapped(x2, v2.x, mask2))
