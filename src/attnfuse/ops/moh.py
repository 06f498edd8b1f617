"""Mixture-of-Head attention (MoH): the parameter-free part — routing gates and the gated head combination.

Paper: Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv 2410.11842
(ICML 2025); released code ``SkyworkAI/MoH`` (``MoH-ViT/attention.py``, ``MoH-DiT/models.py``,
``MoH-LLaMA3/Inference_code/modeling_llama.py``). Spec: ``docs/moh.md``.

Status: complete. Three functions, no parameters (the router weights live in
:class:`attnfuse.nn.MixtureOfHeadAttention`):

* :func:`moh_route`: router logits -> :class:`MoHRouting` (routing probabilities, the top-``k`` choice,
  and one gate per (token, head)), with the released code's scaling (``"code"``), the paper's formula
  (``"paper"``) or binary gates (``"binary"``, MoH-LLaMA3);
* :func:`query_norm_logits`: the parameter-free router of MoH-LLaMA3 (per-head query L2 norm over its
  standard deviation across the routed heads of the token);
* :func:`mixture_of_heads`: per-head attention outputs multiplied by their gates, ``g_i(x_t) H_i(t)``,
  computed either for every head (``compute="dense"``, the reference) or only for the (token, head)
  pairs whose gate is non-zero (``compute="sparse"``: queries are grouped per head, gathered, attended
  against that head's keys and scattered back, so a skipped head costs nothing).

Why not an ``@operator``: the gates are a per-(token, head) input produced by a router with parameters,
which ``nn.Attention(op=...)`` cannot supply; registered with ``gates=None`` the operator would be
dense attention under another name. :func:`mixture_of_heads` follows the operator conventions
(heads-first layout, key / pair masks, ``is_causal``, zeros for a query with no key, empty in -> empty out)
and calls :func:`attnfuse.ops.dense_attention` for the math.

The weighted sum of the paper, ``out_t = sum_i g_i(x_t) H_i(t) W_O^i``, is ``W_O`` applied to the
concatenation of the gated head outputs this module returns; ``W_O`` belongs to the module.

Example (4 heads, 1 shared + top-2 of 3 routed, zero router):
    >>> r = moh_route(torch.zeros(2, 5, 3), 2, shared=1)
    >>> r.gates[0, 0]            # shared head 1.0; two routed heads chosen by tie-breaking get 1.0
    tensor([1., 0., 1., 1.])
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfuse.ops._checks import check_key_mask, check_mask, check_qkv
from attnfuse.ops.dense import dense_attention

__all__ = ["MoHRouting", "mixture_of_heads", "moh_route", "query_norm_logits"]

GateScale = Literal["code", "paper", "binary"]


class MoHRouting(NamedTuple):
    """One MoH layer's routing for a batch of tokens (``...`` = the token layout, e.g. ``(B, N)``).

    Attributes:
        probs: routing probabilities over the ``E`` routed heads ``(..., E)`` (softmax of the router logits;
            differentiable).
        selected: the top-``k`` routed heads of each token ``(..., k)`` long, indices in ``[0, E)`` (no gradient).
        gates: the gate of every head ``(..., H)``, shared heads first, then routed heads; 0 = skipped.
        token_mask: ``(...)`` bool, True = a real token (padding is left out of the load-balance loss), or None.
    """

    probs: Tensor
    selected: Tensor
    gates: Tensor
    token_mask: Tensor | None = None

    def active_fraction(self) -> Tensor:
        """Fraction of heads each token uses (non-zero gate), ``(...)`` float in ``[0, 1]``."""
        return (self.gates != 0).to(self.probs.dtype).mean(-1)

    def head_load(self) -> Tensor:
        """``f_i``: fraction of (real) tokens that select routed head ``i``, ``(E,)``; sums to ``k``."""
        e = self.probs.shape[-1]
        chosen = torch.zeros_like(self.probs).scatter_(-1, self.selected, 1.0).reshape(-1, e).detach()  # (T, E)
        if self.token_mask is not None:
            keep = self.token_mask.reshape(-1, 1).to(chosen.dtype)
            return (chosen * keep).sum(0) / keep.sum().clamp_min(1.0)
        return chosen.sum(0) / max(chosen.shape[0], 1)

    def balance_loss(self, normalization: Literal["paper", "code"] = "code") -> Tensor:
        """The load-balance loss of this layer, :func:`attnfuse.losses.moh_load_balance_loss` (padding left out).

        ``"code"`` (default, the released trainers): ``E * sum_i f_i P_i`` (``k`` at uniform ``P``);
        ``"paper"``: ``sum_i f_i P_i`` (``k / E`` at uniform ``P``). 0 when no head is routed.
        """
        e = self.probs.shape[-1]
        if e == 0 or self.selected.shape[-1] == 0:
            return self.probs.sum() * 0.0
        f = self.head_load()  # (E,) detached
        p = self.probs.reshape(-1, e)
        if self.token_mask is not None:
            keep = self.token_mask.reshape(-1, 1).to(p.dtype)
            big_p = (p * keep).sum(0) / keep.sum().clamp_min(1.0)
        else:
            big_p = p.mean(0)
        loss = (f * big_p).sum()
        return loss * e if normalization == "code" else loss


def moh_route(
    routed_logits: Tensor | None,
    top_k: int,
    *,
    shared: int,
    shared_logits: Tensor | None = None,
    mix_logits: Tensor | None = None,
    gate_scale: GateScale = "code",
    token_mask: Tensor | None = None,
) -> MoHRouting:
    """Gates of every head from router logits: shared heads always on, routed heads top-``k`` per token.

    With ``E = H - shared`` routed heads, per token (``S`` = its top-``k`` set, ``p = softmax(routed_logits)``)::

        "code"   (released MoH-ViT / MoH-DiT):  g_r,i = k * p_i / sum_{j in S} p_j  (i in S), 0 otherwise
                                                g_s   = shared * softmax(shared_logits)   (1 if not given)
                                                [a_s, a_r] = 2 * softmax(mix_logits)      (1, 1 if not given)
        "paper"  (the paper's formula):         g_r,i = p_i (i in S);  g_s = softmax(shared_logits);
                                                [a_s, a_r] = softmax(mix_logits)
        "binary" (MoH-LLaMA3):                  g = 1 for shared and selected heads, 0 otherwise
        gates = [a_s * g_s ; a_r * g_r]         (the mix only when shared > 0 and top_k > 0)

    With all logits zero, ``"code"`` gives gate 1 to every shared and selected head (MHA with the
    unselected heads zeroed). ``torch.topk`` breaks ties (implementation-defined order).

    Args:
        routed_logits: router logits over the routed heads ``(..., E)``; None or ``E = 0`` when every head is shared.
        top_k: routed heads per token, ``0 <= top_k <= E`` (0 only when ``E = 0``).
        shared: number of shared heads ``h_s`` (first in the head order).
        shared_logits: ``(..., shared)`` logits of the shared-head weights, or None (uniform).
        mix_logits: ``(..., 2)`` logits of the shared / routed mix, or None (equal halves).
        gate_scale: ``"code"``, ``"paper"`` or ``"binary"``.
        token_mask: ``(...)`` bool, True = real token; stored in the record for the load-balance loss.

    Returns:
        :class:`MoHRouting` ``(probs (..., E), selected (..., k) long, gates (..., H), token_mask)``.

    Raises:
        ValueError / TypeError: bad ``top_k`` / ``shared`` / ``gate_scale``, logits of the wrong shape or dtype.
    """
    if gate_scale not in ("code", "paper", "binary"):
        raise ValueError(f"gate_scale must be 'code', 'paper' or 'binary', got {gate_scale!r}")
    if not isinstance(shared, int) or shared < 0:
        raise ValueError(f"shared must be an int >= 0, got {shared!r}")
    ref = next((t for t in (routed_logits, shared_logits, mix_logits) if t is not None), None)
    if ref is None:
        raise ValueError("moh_route needs routed_logits (..., E) or shared_logits (..., shared) to know the token shape")
    for name, t in (("routed_logits", routed_logits), ("shared_logits", shared_logits), ("mix_logits", mix_logits)):
        if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
    lead = ref.shape[:-1]
    e = 0 if routed_logits is None else routed_logits.shape[-1]
    if routed_logits is not None and routed_logits.shape[:-1] != lead:
        raise ValueError(f"routed_logits must be (..., E) with leading shape {tuple(lead)}, got {tuple(routed_logits.shape)}")
    if not isinstance(top_k, int) or not (0 <= top_k <= e) or (e > 0 and top_k == 0):
        raise ValueError(f"top_k must be an int in [1, E={e}] (0 only when no head is routed), got {top_k!r}")
    if shared_logits is not None and shared_logits.shape != (*lead, shared):
        raise ValueError(f"shared_logits must be (..., shared) = {(*lead, shared)}, got {tuple(shared_logits.shape)}")
    if mix_logits is not None and mix_logits.shape != (*lead, 2):
        raise ValueError(f"mix_logits must be (..., 2) = {(*lead, 2)}, got {tuple(mix_logits.shape)}")
    if token_mask is not None and (not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool or token_mask.shape != lead):
        raise ValueError(f"token_mask must be a bool tensor of shape {tuple(lead)}")
    if shared + e == 0:
        raise ValueError("MoH needs at least one head (shared + E > 0)")
    dtype, device = ref.dtype, ref.device

    # routed heads: probabilities, top-k choice, gates
    if e > 0:
        probs = torch.softmax(routed_logits, dim=-1)  # (..., E)
        top_p, selected = torch.topk(probs, top_k, dim=-1)  # (..., k)
        if gate_scale == "code":
            top_g = top_p / top_p.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).eps) * top_k
        elif gate_scale == "paper":
            top_g = top_p
        else:
            top_g = torch.ones_like(top_p)
        routed = torch.zeros_like(probs).scatter(-1, selected, top_g)  # (..., E)
    else:
        probs = ref.new_zeros((*lead, 0))
        selected = torch.zeros((*lead, 0), dtype=torch.long, device=device)
        routed = probs

    # shared heads: weights and the two-way mix
    if shared > 0:
        if gate_scale == "binary" or shared_logits is None:
            g_s = torch.ones((*lead, shared), dtype=dtype, device=device)
        else:
            g_s = torch.softmax(shared_logits, dim=-1) * (shared if gate_scale == "code" else 1.0)
        if e > 0 and gate_scale != "binary":
            if mix_logits is not None:
                mix = torch.softmax(mix_logits, dim=-1) * (2.0 if gate_scale == "code" else 1.0)  # (..., 2)
                g_s, routed = g_s * mix[..., :1], routed * mix[..., 1:]
            elif gate_scale == "paper":
                g_s, routed = g_s * 0.5, routed * 0.5
        gates = torch.cat([g_s, routed], dim=-1)  # (..., H)
    else:
        gates = routed
    return MoHRouting(probs=probs, selected=selected, gates=gates, token_mask=token_mask)


def query_norm_logits(q: Tensor, shared: int) -> Tensor:
    """MoH-LLaMA3's parameter-free router: routed-head logits from the queries' L2 norms.

    ``logit_i(t) = ||q_i(t)||_2 / std_j ||q_j(t)||_2`` over the routed heads ``i, j >= shared`` of token ``t``
    (``std`` with Bessel's correction, as ``torch.std`` in the released code). Invariant to scaling all
    routed queries of a token by ``c > 0``. Where the norms do not vary (std 0) every logit is 0.

    Args:
        q: queries, heads-first ``(B, H, L, D)`` (before any rotary embedding).
        shared: number of shared heads (the first ``shared`` heads; not routed).

    Returns:
        ``(B, L, E)`` logits, ``E = H - shared``.

    Raises:
        ValueError: fewer than 2 routed heads (no standard deviation), bad shapes.
    """
    if not isinstance(q, Tensor) or not q.is_floating_point() or q.dim() != 4:
        raise ValueError(f"q must be a floating-point (B, H, L, D) tensor, got {getattr(q, 'shape', type(q).__name__)}")
    e = q.shape[1] - shared
    if e < 2:
        raise ValueError(f"the query-norm router needs at least 2 routed heads (H - shared), got {e}")
    norms = torch.linalg.vector_norm(q[:, shared:], dim=-1).transpose(1, 2)  # (B, L, E)
    std = norms.std(dim=-1, keepdim=True)  # (B, L, 1)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, norms / safe, torch.zeros_like(norms))


def _check_gates(gates: Tensor, b: int, h: int, lq: int) -> None:
    if not isinstance(gates, Tensor) or not gates.is_floating_point():
        got = gates.dtype if isinstance(gates, Tensor) else type(gates).__name__
        raise TypeError(f"gates must be a floating-point tensor (B, L, H), got {got}")
    if tuple(gates.shape) != (b, lq, h):
        raise ValueError(f"gates must be (B, L, H) = {(b, lq, h)} (one gate per token and head), got {tuple(gates.shape)}")


def mixture_of_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    *,
    key_mask: Tensor | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    compute: Literal["dense", "sparse"] = "dense",
    return_weights: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Gated per-head attention: ``out[b, h, l] = gates[b, l, h] * Attn_h(q[b, h, l])`` (MoH's ``g_i H_i``).

    ``compute="dense"`` (reference) runs :func:`~attnfuse.ops.dense_attention` over every head and
    multiplies by the gates. ``compute="sparse"`` computes only the (token, head) pairs with a non-zero
    gate: heads every token uses run as one dense call (``is_causal`` stays a kernel flag); each other
    head gathers its active queries (padded to the most any batch row has), attends them against that
    head's keys with the causal and pair masks gathered by query position, and scatters the results
    back. With ``is_causal`` the gathered queries (in position order) are split into chunks that only
    see the keys up to their last position, so causal sparse keeps the triangle saving. Forward and the
    gradients of ``q, k, v`` and of the non-zero gates equal the dense path; the gradient of a zero gate
    is 0 in the sparse path (its head output is never computed) and ``<grad, H_i>`` in the dense one.
    ``compute="sparse"`` has data-dependent shapes: use ``"dense"`` under ``torch.export``.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)``.
        v: values ``(B, H, S, Dv)``.
        gates: ``(B, L, H)`` float, the gate of every (token, head) (e.g. :attr:`MoHRouting.gates`); 0 = skip.
        key_mask: bool key mask ``(B, S)`` or ``(B, H, S)`` (``B``, ``H`` may be 1), True = the key exists.
        mask: bool pair mask broadcastable to ``(B, H, L, S)``.
        scale: score scale, ``1/sqrt(D)`` when None.
        is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned).
        compute: ``"dense"`` or ``"sparse"``.
        return_weights: also return the gated weights ``gates * softmax(...)`` ``(B, H, L, S)`` (dense only,
            through the reference backend).
        backend: the :func:`~attnfuse.ops.dense_attention` backend (``"auto"``, ``"sdpa"``, ``"reference"``).

    Returns:
        ``out (B, H, L, Dv)``, or ``(out, weights)``.

    Raises:
        TypeError / ValueError: as :func:`~attnfuse.ops.dense_attention`, plus bad ``gates`` or ``compute``.

    Shapes:
        See :mod:`attnfuse.ops`. Takes a key mask, a pair mask and ``is_causal``; no bias.

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 8)
        >>> gates = (torch.rand(2, 16, 4) > 0.5).float()
        >>> mixture_of_heads(q, k, v, gates, compute="sparse").shape
        torch.Size([2, 4, 16, 8])
    """
    check_qkv(q, k, v)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    _check_gates(gates, b, h, lq)
    if compute not in ("dense", "sparse"):
        raise ValueError(f"compute must be 'dense' or 'sparse', got {compute!r}")
    if return_weights and compute != "dense":
        raise ValueError("return_weights=True needs compute='dense'")
    check_mask(mask, (b, h, lq, lk))
    km = check_key_mask("mixture_of_heads", key_mask, b, h, (lk,))  # (B', H', S)
    g = gates.to(q.dtype).transpose(1, 2).unsqueeze(-1)  # (B, H, L, 1)
    if compute == "dense" or q.numel() == 0 or lk == 0:
        call = dict(key_mask=km, mask=mask, scale=scale, is_causal=is_causal)
        if return_weights:
            out, weights = dense_attention(q, k, v, return_weights=True, backend="reference", **call)
            return out * g, weights * g
        return dense_attention(q, k, v, backend=backend, **call) * g
    return _sparse(q, k, v, gates.to(q.dtype), km, mask, scale, is_causal)


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, causal: bool, scale: float | None,
            may_be_empty: bool = True) -> Tensor:
    """SDPA over ``q (B, H', n, D)`` with an optional bool pair mask ``allowed`` broadcastable to ``(B, H', n, S)``.

    A row with no allowed key gets every key unmasked for the kernel and is zeroed afterwards (its
    gradient is then exactly 0), as :func:`attnfuse.ops.dense_attention`'s SDPA backend;
    ``may_be_empty=False`` skips that guard where every row has a key (a causal mask without key or pair masks).
    """
    if allowed is not None and not may_be_empty:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    row_ok = allowed.any(dim=-1, keepdim=True)  # (B?, H?, n, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~row_ok, scale=scale)
    return torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _sparse(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, km: Tensor | None, mask: Tensor | None,
            scale: float | None, is_causal: bool) -> Tensor:
    """Gated per-head outputs ``(B, H, L, Dv)`` computed only where the gate is non-zero; 0 elsewhere.

    Calls SDPA directly (the masks are built here). Rows gathered only to pad a head's batch rows to the
    same count are real queries at inactive positions; their gate 0 drops them.
    """
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    if km is not None:  # masked keys and values never reach a matmul (NaN there included)
        keep = km.unsqueeze(-1)  # (B', H', S, 1)
        k = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
        v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
    active = (gates != 0).transpose(1, 2)  # (B, H, L)
    counts = active.sum(-1)  # (B, H)
    stats = torch.stack([(counts == lq).all(0).to(counts.dtype), counts.amax(0)]).tolist()  # one sync
    full_heads = [i for i in range(h) if stats[0][i]]
    most = stats[1]  # per head: the most active queries any batch row has
    pair = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B?, H?, L?, S)
    out = q.new_zeros(b, h, lq, dv)

    def key_rows(idx: list[int] | slice) -> Tensor | None:  # the key mask as a pair mask (B', H'', 1, S)
        if km is None:
            return None
        return (km if km.shape[1] == 1 else km[:, idx]).unsqueeze(-2)

    if full_heads:
        sel = full_heads if len(full_heads) < h else slice(None)
        allowed = key_rows(sel)
        if pair is not None:
            ph = pair if pair.shape[1] == 1 else pair[:, sel]
            allowed = ph if allowed is None else allowed & ph
        if allowed is not None and is_causal:
            allowed = allowed & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        o = _attend(q[:, sel], k[:, sel], v[:, sel], allowed, is_causal and allowed is None, scale)  # (B, |sel|, L, Dv)
        o = o * gates[:, :, sel].transpose(1, 2).unsqueeze(-1)
        if isinstance(sel, slice):
            return o
        out[:, sel] = o
    positions = torch.arange(lk, device=q.device)  # (S,)
    gates_h = gates.transpose(1, 2)  # (B, H, L)

    def run_group(idx: list[int], n: int) -> None:
        """The heads ``idx`` in one batched call, each with its active queries padded to ``n``."""
        nonlocal out
        g_n = len(idx)
        hs = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx
        # active positions first, in position order; then inactive ones (padding rows, gate 0)
        order = torch.argsort((~active[:, hs]).to(torch.uint8), dim=-1, stable=True)[..., :n]  # (B, G, n)
        q_sel = q[:, hs].gather(2, order.unsqueeze(-1).expand(b, g_n, n, d))  # (B, G, n, D)
        k_h, v_h = k[:, hs], v[:, hs]
        rows = key_rows(hs)  # (B', G', 1, S) or None
        if pair is not None:
            ph = pair if pair.shape[1] == 1 else pair[:, hs]  # (B?, G?, L?, S)
            ph = ph.expand(b, g_n, lq, lk).gather(2, order.unsqueeze(-1).expand(b, g_n, n, lk))  # (B, G, n, S)
            rows = ph if rows is None else rows & ph
        valid = torch.arange(n, device=q.device) < counts[:, hs].unsqueeze(-1)  # (B, G, n) False on padding rows
        spans, ends = [(0, n)], [lk]
        if is_causal:  # chunks of the (position-ordered) queries see only the keys up to their last position
            n_chunks = max(1, min(8, math.ceil(n / 128)))
            cuts = [round(c * n / n_chunks) for c in range(n_chunks + 1)]
            spans = [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]
            ends = torch.stack([order[..., lo:hi].amax() for lo, hi in spans]).add(1).clamp(max=lk).tolist()
        parts = []
        for (lo, hi), s_end in zip(spans, ends):
            allowed = None if rows is None else rows[..., lo:hi, :s_end] if rows.shape[-2] > 1 else rows[..., :s_end]
            if is_causal:
                causal = positions[:s_end] <= order[..., lo:hi].unsqueeze(-1)  # (B, G, c, S')
                allowed = causal if allowed is None else allowed & causal
            parts.append(_attend(q_sel[:, :, lo:hi], k_h[:, :, :s_end], v_h[:, :, :s_end], allowed, False, scale,
                                 may_be_empty=rows is not None))
        o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, G, n, Dv)
        zero = torch.zeros((), dtype=o.dtype, device=o.device)
        g_sel = torch.where(valid, gates_h[:, hs].gather(2, order), zero)
        o = torch.where(valid.unsqueeze(-1), o * g_sel.unsqueeze(-1), zero)
        index = order.unsqueeze(-1).expand(b, g_n, n, dv)
        if isinstance(hs, slice):
            out[:, hs].scatter_(2, index, o)
        else:
            out[:, hs] = q.new_zeros(b, g_n, lq, dv).scatter(2, index, o)

    rest = [i for i in range(h) if i not in full_heads and most[i] > 0]
    if len(rest) > 1 and max(most[i] for i in rest) <= 1.25 * sum(most[i] for i in rest) / len(rest):
        run_group(rest, max(most[i] for i in rest))  # balanced routing: one batched call for every routed head
    else:
        for i in rest:
            run_group([i], most[i])
    return out  # (B, H, L, Dv)
