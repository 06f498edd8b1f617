"""Deconstructed attention: controlled relaxations of standard attention, alone and in hybrid stacks.

Paper: Xue, Moosavi, Aletras, "Deconstructing Attention: Investigating Design Principles for Effective Language
Modeling" (https://arxiv.org/abs/2510.11602). Code (``HUIYINXUE/DeconAttn``) was not available; built from the
paper text (spec ``shared/papers/deconstructing-attention.md``).
Status: all six variants, uniform / hybrid / explicit layouts, evaluation-time skipping. No stream cache in eval
(the fixed-stream variants recompute their stream every call).

Each variant relaxes one principle of ``O = softmax(Q K^T / sqrt(d_h)) V`` with ``Q, K, V = H W_{Q,K,V}``
(``H`` the layer's normalised hidden states); all are multi-head, causal when asked, and parameter-matched to
attention's ``4 d^2`` (no biases)::

    variant            relaxes              per layer, per head
    "standard"         —                    softmax(Q K^T/sqrt(d_h)) V
    "mlp"              token mixing         O = FC_dn(SiLU(FC_gt(H)) * FC_up(H)),  width m = round(4d/3)
    "approximate"      form (kept close)    A_ij ∝ 1 + s_ij + s_ij^2/2 (Taylor of exp; kernel op "taylor")
    "non_approximate"  form (dropped)       q = SiLU(H W_Q); s_j = (q_j . k_j)/sqrt(d_h); o_i = Σ_{j<=i} e^{s_j} v_j / Σ_{j<=i} e^{s_j}
    "rnd_emb_qk"       sequence dependence  Q, K from X_l, the layer-l state of a frozen random input eps ~ N(0, sigma^2)
                                            (length x d) run through the same blocks; V = H W_V
    "fixed_seq_qk"     sequence dependence  as rnd_emb_qk with a fixed input (the embedded fixed text, ``stream=``)
    "static_emb_qk"    current Q/K          Q, K = e W_{Q,K} from the encoder's input e (the static embeddings); V = H W_V

In the fixed-stream variants the stream runs through every block as plain self-attention (its own Q, K, V), its
gradient reaches the shared block weights (the maps are "learned but fixed"), and the block's own LayerNorm is
applied to ``X_l`` (or ``e``) before ``W_Q``, ``W_K``. Layouts (1-based layer ids, as the paper): ``"uniform"``
(every layer the variant), ``"hybrid_odd"`` (odd layers the variant, even layers standard), or the tuple of the
layers that keep standard attention. ``skip`` (attribute, settable after training) removes the mixing sublayer of
the listed layers: the paper's *Skip* evaluation (its output is zero; the stream still passes those blocks).
Deviations: pre-LN blocks with a GELU MLP and no RoPE (positions are the caller's); the random stream has no
positional embedding (``eps`` is position-specific already).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.nn._checks import resolve_head_dim
from attnfuse.nn._registry import register_module
from attnfuse.nn.transformer import MLP
from attnfuse.ops import OpConfig, op_config

__all__ = ["STREAM_VARIANTS", "VARIANTS", "DeconstructedBlock", "DeconstructedEncoder", "DecoupledAttention",
           "GatedMLPMixer", "standard_layers"]

Variant = Literal["standard", "mlp", "approximate", "non_approximate", "rnd_emb_qk", "fixed_seq_qk", "static_emb_qk"]
VARIANTS: tuple[str, ...] = ("standard", "mlp", "approximate", "non_approximate", "rnd_emb_qk", "fixed_seq_qk",
                             "static_emb_qk")
#: Variants whose Q, K come from a second, input-independent stream through the same blocks.
STREAM_VARIANTS = frozenset({"rnd_emb_qk", "fixed_seq_qk"})


class GatedMLPMixer(nn.Module):
    """The "MLP" variant's mixer (no token mixing): ``FC_dn(SiLU(FC_gt(x)) * FC_up(x))``, no biases.

    Args:
        dim: channel width ``d``.
        hidden: width ``m``; default ``round(4d/3)`` so that ``3 d m ≈ 4 d^2`` (attention's Q, K, V, O).
        device, dtype: for the parameters.

    Shapes: ``(B, *tokens, d) -> (B, *tokens, d)``; position ``i`` of the output depends on position ``i`` only.
    """

    def __init__(self, dim: int, *, hidden: int | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        hidden = round(4 * dim / 3) if hidden is None else hidden
        if dim <= 0 or hidden <= 0:
            raise ValueError(f"dim and hidden must be positive, got {dim=}, {hidden=}")
        dd = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(dim, hidden, bias=False, **dd)
        self.up = nn.Linear(dim, hidden, bias=False, **dd)
        self.down = nn.Linear(hidden, dim, bias=False, **dd)

    def forward(self, x: Tensor, *, qk: Tensor | None = None, mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        """``qk``, ``mask`` and ``is_causal`` are accepted for a uniform mixer interface and have no effect."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoupledAttention(nn.Module):
    """Multi-head attention whose queries and keys may come from another tensor than the values.

    ``Q = act(qk W_Q)``, ``K = qk W_K``, ``V = x W_V``, ``out = op(Q, K, V) W_O`` (no biases: ``4 d^2`` parameters);
    ``qk`` defaults to ``x`` (standard self-attention).

    Args:
        dim: channel width ``d``.
        heads: number of heads.
        op: the attention operator (typed options or registered name), e.g. ``Kernel(similarity="taylor")``.
        query_act: ``"none"`` or ``"silu"`` (the Non-approximate variant's ``q = SiLU(H W_Q)``).
        device, dtype: for the parameters.

    Shapes:
        x ``(B, T, d)``; qk ``(B, T, d)`` or ``(1, T, d)`` (one stream shared by the batch); mask ``(B, T)`` key
        mask -> ``(B, T, d)``.
    """

    def __init__(self, dim: int, heads: int, *, op: str | OpConfig = "dense", query_act: Literal["none", "silu"] = "none",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.head_dim = resolve_head_dim(dim, heads, None)
        if query_act not in ("none", "silu"):
            raise ValueError(f"query_act must be 'none' or 'silu', got {query_act!r}")
        self.heads, self.query_act = heads, query_act
        self.op = op_config(op)
        dd = {"device": device, "dtype": dtype}
        self.to_q, self.to_k, self.to_v, self.proj = (nn.Linear(dim, dim, bias=False, **dd) for _ in range(4))

    def _split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, T, d) -> (B, H, T, Dh)

    def forward(self, x: Tensor, *, qk: Tensor | None = None, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Attend; see the class docstring for shapes."""
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, d), got x.shape={tuple(x.shape)}")
        qk = x if qk is None else qk
        if qk.dim() != 3 or qk.shape[1:] != x.shape[1:] or qk.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"qk must be (B, T, d) or (1, T, d) with x.shape={tuple(x.shape)}, got qk.shape={tuple(qk.shape)}")
        q = self.to_q(qk)
        if self.query_act == "silu":
            q = F.silu(q)
        b = x.shape[0]
        q = self._split(q).expand(b, -1, -1, -1)  # (B, H, T, Dh)
        k = self._split(self.to_k(qk)).expand(b, -1, -1, -1)  # (B, H, T, Dh)
        v = self._split(self.to_v(x))  # (B, H, T, Dh)
        call = {"key_mask": mask} if mask is not None else {}
        if is_causal:
            call["is_causal"] = True
        out = self.op(q, k, v, **call)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(x.shape))  # (B, T, d)


def _mixer(variant: str, dim: int, heads: int, dd: dict) -> nn.Module:
    if variant == "mlp":
        return GatedMLPMixer(dim, **dd)
    if variant == "approximate":
        return DecoupledAttention(dim, heads, op=op_config("kernel", similarity="taylor"), **dd)
    if variant == "non_approximate":
        return DecoupledAttention(dim, heads, op=op_config("kernel", similarity="self_gated"), query_act="silu", **dd)
    return DecoupledAttention(dim, heads, op="dense", **dd)


class DeconstructedBlock(nn.Module):
    """Pre-norm block ``x + mixer(LN x, qk=LN qk) ; x + MLP(LN x)`` with one of the :data:`VARIANTS` as mixer.

    Args:
        dim, heads: width and heads.
        variant: the mixer (see the module docstring).
        mlp_ratio: hidden width of the (GELU) MLP relative to ``dim``.
        device, dtype: for the parameters.

    Shapes: x ``(B, T, d)``, qk ``(B or 1, T, d)``, mask ``(B, T)`` -> ``(B, T, d)``.
    """

    def __init__(self, dim: int, heads: int, *, variant: Variant = "standard", mlp_ratio: float = 4.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        dd = {"device": device, "dtype": dtype}
        self.variant = variant
        self.norm_mix = nn.LayerNorm(dim, **dd)
        self.mixer = _mixer(variant, dim, heads, dd)
        self.norm_mlp = nn.LayerNorm(dim, **dd)
        self.mlp = MLP(dim, hidden=int(dim * mlp_ratio), **dd)

    def forward(self, x: Tensor, *, qk: Tensor | None = None, mask: Tensor | None = None, is_causal: bool = False,
                skip_mixer: bool = False) -> Tensor:
        """``qk``: the un-normalised source of Q, K (None: ``x``); ``skip_mixer`` drops the mixing sublayer."""
        if not skip_mixer:
            h = self.norm_mix(x)
            x = x + self.mixer(h, qk=None if qk is None else self.norm_mix(qk), mask=mask, is_causal=is_causal)
        return x + self.mlp(self.norm_mlp(x))


def standard_layers(depth: int, layout: str | Sequence[int]) -> frozenset[int]:
    """1-based ids of the layers that keep standard attention under ``layout``.

    Raises:
        ValueError: unknown layout name or ids outside ``1..depth``.
    """
    if layout == "uniform":
        return frozenset()
    if layout == "hybrid_odd":
        return frozenset(range(2, depth + 1, 2))
    if isinstance(layout, str):
        raise ValueError(f"layout must be 'uniform', 'hybrid_odd' or a sequence of 1-based layer ids, got {layout!r}")
    ids = frozenset(int(i) for i in layout)
    bad = sorted(i for i in ids if not 1 <= i <= depth)
    if bad:
        raise ValueError(f"layout ids must lie in 1..{depth} (1-based standard-attention layers), got {bad}")
    return ids


class DeconstructedEncoder(nn.Module):
    """A stack of :class:`DeconstructedBlock` s: one variant in a chosen layout, the other layers standard.

    Args:
        dim: channel width ``d``.
        depth: number of blocks.
        heads: attention heads.
        variant: one of :data:`VARIANTS`.
        layout: ``"uniform"``, ``"hybrid_odd"``, or the 1-based ids of the layers that keep standard attention.
        mlp_ratio: MLP width relative to ``dim``.
        context: maximum length ``T`` (needed by ``"rnd_emb_qk"``: the size of ``eps``).
        sigma: std of ``eps`` (``"rnd_emb_qk"``).
        seed: seed of ``eps`` (reproducible; ``eps`` is a buffer, saved with the state dict, never trained).
        skip: 1-based layer ids whose mixing sublayer is removed (evaluation-time *Skip*; settable later).
        final_norm: LayerNorm after the last block.
        device, dtype: for the parameters.

    Shapes:
        ``forward(x (B, T, d), *, mask (B, T), is_causal, stream (1 or B, T, d)) -> (B, T, d)``. ``stream`` is the
        input of the fixed stream: required for ``"fixed_seq_qk"`` (the embedded fixed text), optional for
        ``"rnd_emb_qk"`` (default ``eps[:T]``); ``"static_emb_qk"`` takes Q, K from ``x`` itself (the static embeddings).

    Raises:
        ValueError: unknown variant or layout, ``"rnd_emb_qk"`` without ``context``, ``T > context``.

    Example:
        >>> enc = DeconstructedEncoder(32, depth=4, heads=4, variant="mlp", layout="hybrid_odd")
        >>> enc(torch.randn(2, 10, 32), is_causal=True).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        heads: int,
        variant: Variant = "standard",
        layout: str | Sequence[int] = "uniform",
        mlp_ratio: float = 4.0,
        context: int | None = None,
        sigma: float = 1.0,
        seed: int = 0,
        skip: Sequence[int] = (),
        final_norm: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth=}")
        standard = standard_layers(depth, layout)
        self.variant, self.layout = variant, layout
        self.layer_variants = tuple("standard" if i + 1 in standard else variant for i in range(depth))
        dd = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList(DeconstructedBlock(dim, heads, variant=v, mlp_ratio=mlp_ratio, **dd)
                                    for v in self.layer_variants)
        self.norm = nn.LayerNorm(dim, **dd) if final_norm else None
        self.skip = tuple(skip)
        if variant == "rnd_emb_qk":
            if context is None:
                raise ValueError("variant='rnd_emb_qk' needs context= (the length of the frozen random stream eps)")
            g = torch.Generator().manual_seed(seed)
            eps = torch.randn(context, dim, generator=g, dtype=torch.float64) * sigma
            self.register_buffer("eps", eps.to(device=device, dtype=dtype or torch.get_default_dtype()))
        else:
            self.eps = None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def stream_states(self, stream: Tensor, *, is_causal: bool = False) -> list[Tensor]:
        """``[X_1, ..., X_depth]``: the stream's input to each layer, the stream running through every block as
        plain self-attention (Q, K, V from itself), with gradients into the shared block weights."""
        states, h = [], stream
        for block in self.blocks:
            states.append(h)
            h = block(h, is_causal=is_causal)
        return states

    def forward(self, x: Tensor, *, mask: Tensor | None = None, is_causal: bool = False,
                stream: Tensor | None = None) -> Tensor:
        """Apply the stack; see the class docstring."""
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, d), got x.shape={tuple(x.shape)}")
        t = x.shape[1]
        qk_per_layer: list[Tensor | None] = [None] * self.depth
        if self.variant in STREAM_VARIANTS:
            if stream is None:
                if self.eps is None:
                    raise ValueError("variant='fixed_seq_qk' needs stream= (1 or B, T, d): the embedded fixed text")
                if t > self.eps.shape[0]:
                    raise ValueError(f"sequence length {t} exceeds the random stream's context {self.eps.shape[0]}")
                stream = self.eps[:t].unsqueeze(0).to(x.dtype)  # (1, T, d)
            if stream.dim() != 3 or stream.shape[1:] != x.shape[1:]:
                raise ValueError(f"stream must be (1 or B, T, d) matching x.shape={tuple(x.shape)}, got {tuple(stream.shape)}")
            qk_per_layer = self.stream_states(stream, is_causal=is_causal)
        elif self.variant == "static_emb_qk":
            qk_per_layer = [x] * self.depth
        skip = set(self.skip)
        for i, block in enumerate(self.blocks):
            qk = qk_per_layer[i] if self.layer_variants[i] != "standard" else None
            x = block(x, qk=qk, mask=mask, is_causal=is_causal, skip_mixer=(i + 1) in skip)
        return x if self.norm is None else self.norm(x)


def _tiny_encoder() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return DeconstructedEncoder(16, depth=2, heads=2, variant="rnd_emb_qk", layout="hybrid_odd", context=8), (torch.randn(2, 6, 16),)


register_module("deconstructed_encoder", group="attention", example=_tiny_encoder)(DeconstructedEncoder)
register_module("gated_mlp_mixer", group="attention",
                example=lambda: (GatedMLPMixer(16), (torch.randn(2, 6, 16),)))(GatedMLPMixer)
register_module("decoupled_attention", group="attention",
                example=lambda: (DecoupledAttention(16, 2, op=op_config("kernel", similarity="self_gated"), query_act="silu"),
                                 (torch.randn(2, 6, 16),)))(DecoupledAttention)
