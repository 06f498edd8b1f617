"""Encoders: one raw input -> a :class:`~attnfuse.tokens.TokenSet` of width ``dim``.

``encoder(x, mask) -> TokenSet``; ``mask`` has the shape of ``x`` without its last axis (``(B,)``
presence for fixed-size inputs, ``(B, L)`` for padded sequences; ``(B,)`` for images ``(B, C, H, W)``)
and the output mask is all False for absent samples. Registered by input kind: ``numeric``,
``categorical``, ``vector``, ``text``, ``image``.
See ``docs/data.md``.
"""

from attnfuse.encoders._registry import ENCODERS, create_encoder, get_encoder, list_encoders, register_encoder
from attnfuse.encoders.base import check_mask, encode_inputs
from attnfuse.encoders.image import ImageEncoder
from attnfuse.encoders.tabular import CategoricalEncoder, NumericEncoder
from attnfuse.encoders.text import DEFAULT_TEXT_MODEL, EmbeddingCache, TextEncoder, embed_texts, load_minilm
from attnfuse.encoders.vector import VectorEncoder, chunk_tokens_reference

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "ENCODERS",
    "CategoricalEncoder",
    "EmbeddingCache",
    "ImageEncoder",
    "NumericEncoder",
    "TextEncoder",
    "VectorEncoder",
    "check_mask",
    "chunk_tokens_reference",
    "create_encoder",
    "embed_texts",
    "encode_inputs",
    "get_encoder",
    "list_encoders",
    "load_minilm",
    "register_encoder",
]
