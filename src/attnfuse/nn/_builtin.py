"""Registry entries of the modules that predate :func:`attnfuse.nn.register_module` (declared here so that their
defining files stay untouched); each comes with the tiny example the registry-wide tests run."""

from __future__ import annotations

import torch

from attnfuse.nn._registry import register_module
from attnfuse.nn.attention import Attention
from attnfuse.nn.local import HaloAttention, RoutingAttention
from attnfuse.nn.neighborhood import NeighborhoodAttention
from attnfuse.nn.transformer import MLP, Encoder, TransformerBlock

__all__: list[str] = []


def _seq(c: int = 16) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 6, c),)


def _grid(c: int = 16, side: int = 8) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, side, side, c),)


register_module("attention", group="attention", example=lambda: (Attention(16, 2), _seq()))(Attention)
register_module("neighborhood_attention", group="attention",
                example=lambda: (NeighborhoodAttention(16, 2, 3), _grid(side=6)))(NeighborhoodAttention)
register_module("halo_attention", group="attention",
                example=lambda: (HaloAttention(16, 2, block_size=4, halo_size=1), _grid()))(HaloAttention)
register_module("routing_attention", group="attention",
                example=lambda: (RoutingAttention(16, 2, regions=2, topk=2), _grid()))(RoutingAttention)
register_module("mlp", group="attention", example=lambda: (MLP(16, hidden=32), _seq()))(MLP)
register_module("transformer_block", group="attention",
                example=lambda: (TransformerBlock(16, 2, gate=True), _seq()))(TransformerBlock)
register_module("encoder", group="attention", example=lambda: (Encoder(16, depth=2, heads=2), _seq()))(Encoder)
