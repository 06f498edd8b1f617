"""attnfuse: attention operators and attention-based fusion of many inputs.

The names below are imported on first use (PEP 562): ``import attnfuse`` itself loads nothing heavy,
so the ``attnfuse`` command answers ``--help`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnfuse import fusion, heads, nn, ops
    from attnfuse.fusion import (
        CrossAttentionFusion,
        EarlyFusion,
        FusionOutput,
        HierarchicalFusion,
        LateFusion,
        LatentBottleneck,
    )
    from attnfuse.nn import Attention, Encoder, TransformerBlock
    from attnfuse.ops import dense_attention, merge_attention
    from attnfuse.tokens import TokenSet

__version__ = "0.1.0"

#: public name -> the module that defines it (sub-packages map to themselves)
_EXPORTS = {
    **{name: f"attnfuse.{name}" for name in ("fusion", "heads", "nn", "ops")},
    **dict.fromkeys(["CrossAttentionFusion", "EarlyFusion", "FusionOutput", "HierarchicalFusion", "LateFusion",
                     "LatentBottleneck"], "attnfuse.fusion"),
    **dict.fromkeys(["Attention", "Encoder", "TransformerBlock"], "attnfuse.nn"),
    **dict.fromkeys(["dense_attention", "merge_attention"], "attnfuse.ops"),
    "TokenSet": "attnfuse.tokens",
}

__all__ = [
    "Attention",
    "CrossAttentionFusion",
    "EarlyFusion",
    "Encoder",
    "FusionOutput",
    "HierarchicalFusion",
    "LateFusion",
    "LatentBottleneck",
    "TokenSet",
    "TransformerBlock",
    "dense_attention",
    "fusion",
    "heads",
    "merge_attention",
    "nn",
    "ops",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"{__name__}.{name}" else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
