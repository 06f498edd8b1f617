"""Modules with parameters built on :mod:`attnfuse.ops` operators."""

from attnfuse.nn.attention import Attention
from attnfuse.nn.transformer import MLP, Encoder, TransformerBlock

__all__ = ["MLP", "Attention", "Encoder", "TransformerBlock"]
