"""DFYP edge operators (attnfuse.nn.edge): rotation equivariance, init values, interpolation limits, blend."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.nn.edge import AdaptiveEdgeBlend, EdgeOperator
from attnfuse.ops.frequency import gradient_magnitude


@pytest.mark.parametrize("kind", ["sobel", "scharr", "learnable"])
def test_rotation_equivariance(kind):
    torch.manual_seed(0)
    op = EdgeOperator(kind)
    x = torch.randn(2, 3, 9, 9)
    for k in (1, 2, 3):
        torch.testing.assert_close(op(torch.rot90(x, k, (2, 3))), torch.rot90(op(x), k, (2, 3)), atol=1e-5, rtol=1e-5)


def test_learnable_init_limits_and_constant_input():
    op = EdgeOperator("learnable")
    k = op.kernel().detach()
    torch.testing.assert_close(k, torch.tensor([[-0.3496, 0, 0.3496], [-1, 0, 1], [-0.3496, 0, 0.3496]]), atol=1e-3,
                               rtol=0)
    assert abs(torch.sigmoid(op.b).item() - 0.525) < 1e-3
    with torch.no_grad():
        op.a.fill_(30.0)
    torch.testing.assert_close(op.kernel().detach(), torch.tensor([[-.5, 0, .5], [-1, 0, 1], [-.5, 0, .5]]))
    with torch.no_grad():
        op.a.fill_(-30.0)
    torch.testing.assert_close(op.kernel().detach(), torch.tensor([[-.3, 0, .3], [-1, 0, 1], [-.3, 0, .3]]))
    assert op.kernel().abs().max() == 1
    fresh = EdgeOperator("learnable", eps=1e-6)
    out = fresh(torch.full((1, 2, 6, 6), 4.0))[..., 1:-1, 1:-1]
    torch.testing.assert_close(out, torch.full_like(out, math.sqrt(1e-6) * torch.sigmoid(torch.tensor(0.1)).item()))
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(EdgeOperator("sobel")(x), gradient_magnitude(x, EdgeOperator("sobel").sobel))
    with pytest.raises(ValueError, match="kind"):
        EdgeOperator("prewitt")


def test_blend_limits_and_luma():
    torch.manual_seed(1)
    op = EdgeOperator("scharr")
    blend = AdaptiveEdgeBlend(op)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        blend.w.zero_()
    assert torch.equal(blend(x), x)
    with torch.no_grad():
        blend.w.fill_(1.0)
    torch.testing.assert_close(blend(x), op(x))
    luma = AdaptiveEdgeBlend(op, luma=True, w_init=1.0)
    y = luma(x)
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(y, op(gray).expand_as(x))
    with pytest.raises(ValueError, match="RGB"):
        luma(torch.randn(1, 4, 6, 6))
