"""Harrell's concordance index as a torchmetrics metric (accumulated over an epoch, synced under DDP)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from attnfuse.losses import concordance_index

__all__ = ["ConcordanceIndex"]


class ConcordanceIndex(Metric):
    """Harrell's C over every sample seen since the last reset (higher risk = earlier event).

    ``update(risk, target)`` with ``risk (B,)`` or ``(B, 1)`` and ``target (B, 2)`` = (time, event),
    or ``update(risk, time=..., event=...)``. ``compute()`` equals
    ``lifelines.utils.concordance_index(time, -risk, event)`` on the concatenated samples; it is
    NaN (with no error) when no pair is comparable, e.g. no events were seen.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("risk", default=[], dist_reduce_fx="cat")
        self.add_state("time", default=[], dist_reduce_fx="cat")
        self.add_state("event", default=[], dist_reduce_fx="cat")

    def update(self, risk: Tensor, target: Tensor | None = None, *, time: Tensor | None = None,
               event: Tensor | None = None) -> None:
        if target is not None:
            if target.dim() != 2 or target.shape[1] != 2:
                raise ValueError(f"target must be (B, 2) = (time, event), got shape {tuple(target.shape)}")
            time, event = target[:, 0], target[:, 1]
        if time is None or event is None:
            raise ValueError("ConcordanceIndex.update needs target (B, 2) or time= and event=")
        self.risk.append(risk.detach().reshape(-1).float())
        self.time.append(time.detach().reshape(-1).float())
        self.event.append(event.detach().reshape(-1).float())

    def compute(self) -> Tensor:
        risk, time, event = (dim_zero_cat(s) for s in (self.risk, self.time, self.event))
        try:
            return concordance_index(risk.cpu(), time.cpu(), event.cpu()).float().to(self.device)
        except ValueError:  # no comparable pair
            return torch.tensor(float("nan"), device=self.device)
