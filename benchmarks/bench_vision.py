"""Dense-vision blocks against their anchors: coordinate attention and SE vs timm 1.0.31, Haar DWT/IDWT vs a
conv-based Haar (pytorch_wavelets-style).

Shapes (fp32; ``--quick`` uses B = 2 and 32 x 28 x 28):

* ``CoordinateAttention`` (``preset="timm"``: the same width and no biases as timm's ``CoordAttn``, and
  ``preset="official"``, r = 32) vs ``timm.layers.CoordAttn``; ``SqueezeExcite`` (hidden 8, biases) vs
  ``timm.layers.SEModule``: input ``B x 64 x 56 x 56``, B = 8, forward (no grad) and forward+backward
  (gradient w.r.t. the input and every parameter), train mode.
* ``ops.haar_dwt`` / ``ops.haar_idwt`` vs a strided depthwise ``conv2d`` / ``conv_transpose2d`` with the four
  2x2 Haar filters per channel (how pytorch_wavelets-style code computes one Haar level; written here as the
  anchor), on ``B x 64 x 56 x 56``; outputs checked equal before timing.

``ratio = ms / anchor ms`` within one run (below 1 = faster than the anchor). timm is loaded without its
torchvision-dependent package ``__init__`` when torchvision is unavailable (see ``_timm_layers``); without
timm the timm rows are skipped and the attnfuse rows are reported alone.

Run: ``python -m benchmarks.bench_vision [--quick]`` or ``python -m benchmarks.run --only vision``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnfuse import ops
from attnfuse.nn import CoordinateAttention, SqueezeExcite
from benchmarks.harness import pick_device, record, report, time_interleaved

__all__ = ["main"]


def _timm_layers() -> tuple[Any, Any] | None:
    """timm's ``layers.coord_attn`` and ``layers.squeeze_excite`` modules, or None when timm is not installed."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        return None
    try:
        from timm.layers import coord_attn, squeeze_excite
        return coord_attn, squeeze_excite
    except Exception:  # torchvision missing or built for another torch: load the two layer files directly
        name = "_attnfuse_timm_layers"
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(os.path.dirname(spec.origin), "layers")]
            sys.modules[name] = pkg
        return importlib.import_module(f"{name}.coord_attn"), importlib.import_module(f"{name}.squeeze_excite")


def _haar_filters(channels: int, device, dtype) -> torch.Tensor:
    """``(4C, 1, 2, 2)``: per channel the LL, high-along-H, high-along-W, HH 2x2 orthonormal Haar filters."""
    lo = torch.tensor([1.0, 1.0]) / math.sqrt(2.0)
    hi = torch.tensor([1.0, -1.0]) / math.sqrt(2.0)
    bank = torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)])
    return bank.unsqueeze(1).repeat(channels, 1, 1, 1).to(device=device, dtype=dtype)


def conv_haar_dwt(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Anchor: one strided depthwise conv, ``(B, C, H, W) -> (B, C, 4, H/2, W/2)``."""
    b, c, h, w = x.shape
    return F.conv2d(x, filters, stride=2, groups=c).view(b, c, 4, h // 2, w // 2)


def conv_haar_idwt(bands: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Anchor inverse: the transposed conv with the same (orthonormal) filters."""
    b, c, _, h, w = bands.shape
    return F.conv_transpose2d(bands.reshape(b, 4 * c, h, w), filters, stride=2, groups=c)


def _runner(fn: Callable[[], torch.Tensor], params: list[torch.Tensor], pass_name: str) -> Callable[[], Any]:
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return fn()
    else:
        def run():
            out = fn()
            return torch.autograd.grad(out, params, torch.ones_like(out))
    return run


def _compare(group: dict[str, tuple[Callable, list]], *, anchor: str, op: str, shape, dev, repeat: int,
             passes=("fwd", "fwd+bwd")) -> list[dict]:
    out = []
    for pass_name in passes:
        t = time_interleaved({n: _runner(f, p, pass_name) for n, (f, p) in group.items()}, device=dev,
                             warmup=2, repeat=repeat)
        base = t.get(anchor)
        for name, tt in t.items():
            extra = {}
            if base is not None:
                extra = {"ratio": tt["ms"] / base["ms"], "ratio_min": tt["min_ms"] / base["min_ms"]}
            out.append(record(op=op, backend=name, shape=shape, dtype=torch.float32, device=dev, ms=tt["ms"],
                              min_ms=tt["min_ms"], **{"pass": pass_name}, **extra))
    return out


def _copy_conv_state(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    dev = pick_device(device)
    b, c, hw = (2, 32, 28) if quick else (8, 64, 56)
    repeat = 5 if quick else 40
    torch.manual_seed(0)
    x = torch.randn(b, c, hw, hw, device=dev, requires_grad=True)
    shape = (b, c, hw, hw)
    timm = _timm_layers()
    records: list[dict] = []

    # coordinate attention
    ours_timm = CoordinateAttention(c, preset="timm").to(dev).train()
    ours_official = CoordinateAttention(c, preset="official").to(dev).train()
    group = {
        "attnfuse (timm preset)": (lambda: ours_timm(x), [x, *ours_timm.parameters()]),
        "attnfuse (official preset)": (lambda: ours_official(x), [x, *ours_official.parameters()]),
    }
    anchor = "attnfuse (timm preset)"
    if timm is not None:
        ref = timm[0].CoordAttn(c).to(dev).train()
        _copy_conv_state(ours_timm, ref)
        torch.testing.assert_close(ours_timm(x), ref(x), atol=1e-5, rtol=1e-5)
        group["timm CoordAttn"] = (lambda: ref(x), [x, *ref.parameters()])
        anchor = "timm CoordAttn"
    records += _compare(group, anchor=anchor, op="coordinate_attention", shape=shape, dev=dev, repeat=repeat)

    # squeeze-excitation
    se = SqueezeExcite(c, hidden=8).to(dev).train()
    group = {"attnfuse SqueezeExcite": (lambda: se(x), [x, *se.parameters()])}
    anchor = "attnfuse SqueezeExcite"
    if timm is not None:
        ref_se = timm[1].SEModule(c, rd_channels=8).to(dev).train()
        with torch.no_grad():
            se.fc1.weight.copy_(ref_se.fc1.weight.flatten(1)), se.fc1.bias.copy_(ref_se.fc1.bias)
            se.fc2.weight.copy_(ref_se.fc2.weight.flatten(1)), se.fc2.bias.copy_(ref_se.fc2.bias)
        torch.testing.assert_close(se(x), ref_se(x), atol=1e-5, rtol=1e-5)
        group["timm SEModule"] = (lambda: ref_se(x), [x, *ref_se.parameters()])
        anchor = "timm SEModule"
    records += _compare(group, anchor=anchor, op="squeeze_excite", shape=shape, dev=dev, repeat=repeat)

    # Haar DWT / IDWT
    filters = _haar_filters(c, dev, torch.float32)
    bands = ops.haar_dwt(x.detach()).requires_grad_(True)
    torch.testing.assert_close(ops.haar_dwt(x), conv_haar_dwt(x, filters), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.haar_idwt(bands), conv_haar_idwt(bands, filters), atol=1e-5, rtol=1e-5)
    records += _compare({"attnfuse haar_dwt": (lambda: ops.haar_dwt(x), [x]),
                         "conv2d stride 2": (lambda: conv_haar_dwt(x, filters), [x])},
                        anchor="conv2d stride 2", op="haar_dwt", shape=shape, dev=dev, repeat=repeat)
    records += _compare({"attnfuse haar_idwt": (lambda: ops.haar_idwt(bands), [bands]),
                         "conv_transpose2d stride 2": (lambda: conv_haar_idwt(bands, filters), [bands])},
                        anchor="conv_transpose2d stride 2", op="haar_idwt", shape=shape, dev=dev, repeat=repeat)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    report("vision", main(quick=args.quick, device=args.device),
           columns=("op", "backend", "pass", "shape", "device", "ms", "min_ms", "ratio", "ratio_min"))
