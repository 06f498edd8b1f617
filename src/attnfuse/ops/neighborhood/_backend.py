"""What a neighborhood-attention backend supports, on top of the generic :class:`Backend` flags."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from attnfuse.ops.backends import Backend, Call

__all__ = ["NABackend", "NACall"]


@dataclass(frozen=True)
class NACall(Call):
    """A neighborhood-attention call: the generic properties plus its extras."""

    has_rpb: bool = False
    has_extra: bool = False
    rank: int = 1
    clip: bool = False
    unit_kernel: bool = False

    @classmethod
    def make(
        cls, base: Call, *, has_rpb: bool, has_extra: bool, rank: int, clip: bool = False, unit_kernel: bool = False
    ) -> NACall:
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Call)}
        return cls(**fields, has_rpb=has_rpb, has_extra=has_extra, rank=rank, clip=clip, unit_kernel=unit_kernel)


@dataclass(frozen=True)
class NABackend(Backend):
    """A neighborhood-attention backend.

    Attributes (besides :class:`Backend`'s):
        masks: supports a key-validity ``mask``.
        score_bias: supports an additive window-slot ``bias``.
        rpb: supports a relative-position bias.
        rpb_grad: can differentiate through the relative-position bias.
        extra: how extra keys are handled: ``"native"`` (inside the backend), ``"merge"`` (the
            backend returns the log-sum-exp and the caller merges a dense pass over the extras),
            or ``None`` (not supported).
        lse_devices / grad_devices: device types where the log-sum-exp / backward exist
            (``None`` = wherever ``lse`` / ``grad`` say).
        unavailable: returns why the backend cannot run at all here (e.g. a missing package),
            or ``None``; checked at call time, never at import.
        clip: supports ``border="clip"`` (windows cut at the grid border instead of shifted).
        unit_kernel: supports a kernel size of 1 on some axis.
    """

    masks: bool = True
    score_bias: bool = True
    rpb: bool = True
    rpb_grad: bool = True
    extra: Literal["native", "merge"] | None = "merge"
    lse_devices: frozenset[str] | None = None
    grad_devices: frozenset[str] | None = None
    unavailable: Callable[[], str | None] | None = None
    clip: bool = True
    unit_kernel: bool = True

    def not_supported_reasons(self, call: Call) -> list[str]:
        if self.unavailable is not None:
            why = self.unavailable()
            if why:
                return [why]
        reasons = super().not_supported_reasons(call)
        if not isinstance(call, NACall):
            return reasons
        if call.has_mask and not self.masks:
            reasons.append("no key mask")
        if call.has_bias and not self.score_bias:
            reasons.append("no additive bias= (use rpb= for a relative-position bias)")
        if call.has_rpb and not self.rpb:
            reasons.append("no relative-position bias (rpb)")
        if call.has_rpb and call.requires_grad and not self.rpb_grad:
            reasons.append("no gradient through the relative-position bias")
        if call.clip and not self.clip:
            reasons.append('no border="clip" (windows are always shifted inward)')
        if call.unit_kernel and not self.unit_kernel:
            reasons.append("no kernel_size 1")
        if call.has_extra and self.extra is None:
            reasons.append("no extra keys")
        needs_lse = call.need_lse or (call.has_extra and self.extra == "merge")
        if needs_lse and self.lse_devices is not None and call.device not in self.lse_devices:
            reasons.append(f"no log-sum-exp on {call.device!r}")
        if call.requires_grad and self.grad_devices is not None and call.device not in self.grad_devices:
            reasons.append(f"no backward on {call.device!r}")
        return reasons
