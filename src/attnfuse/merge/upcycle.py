"""BAM / BTX upcycling: dense specialists into one mixture of FFN experts and soft-routed attention experts.

Paper: Zhang, Gritsch, Gnaneshwar, Guo, Cairuz, Venkitesh, Foerster, Blunsom, Ruder, Üstün, Locatelli,
"BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"
(https://arxiv.org/abs/2408.08274, NeurIPS 2024); BTX: Sukhbaatar et al., arXiv 2403.07816. No official code.
Spec: ``shared/papers/bam.md``.

Status: complete for models built from :class:`attnfuse.nn.ParallelBlock` with dense branches. Initialisation
of the mixture model from the dense models ``[seed, specialist_1, ..., specialist_n]`` (the seed is an expert,
as in the paper, unless ``include_seed=False``)::

    FFN expert i       <- FFN of dense model i                    (MoEFeedForward, top-k)
    attention expert i <- attention of dense model i              (MixtureOfAttention, soft routing)
      shared_kv        :  to_q / proj per expert, to_k / to_v <- average (not stated in the paper: unverified)
      average (BTX)    :  attention <- average, stays dense
    routers            <- random, N(0, router_std^2) (or zeros: uniform routing at initialisation)
    everything else    <- element-wise average (norms, embeddings, heads)

Then continue training on the mixture of domains with ``loss + moe_aux_loss(auxes)`` (Switch load balance
``N sum_i f_i P_i`` times ``alpha`` plus router z-loss times ``beta`` per MoE layer; the paper does not give
alpha and beta: defaults 0.01 (Switch) and 0.001 (ST-MoE)).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.losses import moh_load_balance_loss, router_z_loss
from attnfuse.nn import MLP, Attention, MixtureOfAttention, MoEFeedForward, ParallelBlock

__all__ = ["bam_upcycle", "btx_upcycle", "moe_aux_loss"]


def _check_same(models: Sequence[nn.Module]) -> None:
    ref = models[0].state_dict()
    for i, m in enumerate(models[1:], 1):
        s = m.state_dict()
        if list(s) != list(ref) or any(s[k].shape != ref[k].shape for k in ref):
            raise ValueError(f"dense model {i} differs from the seed in parameter names or shapes; upcycling needs "
                             "copies of one architecture")


def _average_into(target: nn.Module, models: Sequence[nn.Module]) -> None:
    states = [m.state_dict() for m in models]
    avg = {}
    for k, t in states[0].items():
        avg[k] = (sum(s[k].double() for s in states) / len(states)).to(t.dtype) if t.is_floating_point() else t
    target.load_state_dict(avg)


def _init_router(router: nn.Linear, init: str, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        if init == "zeros":
            router.weight.zero_()
        else:
            w = torch.randn(router.weight.shape, generator=generator, dtype=torch.float64) * std
            router.weight.copy_(w.to(router.weight))


def bam_upcycle(
    seed: nn.Module,
    specialists: Sequence[nn.Module],
    *,
    include_seed: bool = True,
    attention: Literal["experts", "shared_kv", "average"] = "experts",
    attention_routing: Literal["soft", "topk"] = "soft",
    attention_k: int | None = None,
    k: int = 1,
    gate: Literal["softmax_then_topk", "renormalized"] = "softmax_then_topk",
    router_init: Literal["normal", "zeros"] = "normal",
    router_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build the BAM (or BTX) mixture model from a dense seed and its specialist copies.

    Args:
        seed: the dense seed model (its architecture is kept; every :class:`~attnfuse.nn.ParallelBlock`
            with a dense ``Attention`` / ``MLP`` is upcycled).
        specialists: dense copies of the seed trained on other data (same architecture).
        include_seed: the seed is expert 0 (BAM: seed + specialists).
        attention: ``"experts"`` (BAM, K/V per expert), ``"shared_kv"`` (BAM, one averaged K/V) or
            ``"average"`` (BTX: the attention is averaged and stays dense).
        attention_routing, attention_k: routing of the attention experts (BAM: ``"soft"``).
        k, gate: FFN routing (BAM: top-1 with the full-softmax gate; ``"renormalized"`` makes identical
            experts reproduce the dense FFN exactly).
        router_init: ``"normal"`` (BAM: random, ``router_std``) or ``"zeros"`` (uniform routing).
        router_std: standard deviation of the random routers.
        generator: random generator of the router initialisation (for reproducibility).

    Returns:
        a new model (the dense models are not changed).

    Raises:
        ValueError: no specialists and no seed, different architectures, no upcyclable block.
    """
    dense = ([seed] if include_seed else []) + list(specialists)
    if not dense:
        raise ValueError("bam_upcycle needs at least one dense model (the seed and / or specialists)")
    if attention not in ("experts", "shared_kv", "average"):
        raise ValueError(f"attention must be 'experts', 'shared_kv' or 'average', got {attention!r}")
    if router_init not in ("normal", "zeros"):
        raise ValueError(f"router_init must be 'normal' or 'zeros', got {router_init!r}")
    _check_same([seed, *dense])
    out = copy.deepcopy(seed)
    _average_into(out, dense)
    blocks = [(n, m) for n, m in out.named_modules() if isinstance(m, ParallelBlock)]
    if not blocks:
        raise ValueError(f"{type(seed).__name__} has no ParallelBlock to upcycle (BAM's parallel attention + FFN layout)")
    sources = [dict(d.named_modules()) for d in dense]
    n = len(dense)
    for name, blk in blocks:
        srcs = [s[name] for s in sources]
        if not isinstance(blk.attn, Attention) or not isinstance(blk.ffn, MLP):
            raise ValueError(f"{name}: upcycling needs a dense Attention and MLP, got {type(blk.attn).__name__} and "
                             f"{type(blk.ffn).__name__}")
        ref = blk.norm.weight
        dd = {"device": ref.device, "dtype": ref.dtype}
        if attention != "average":
            a = blk.attn
            moa = MixtureOfAttention(
                a.to_q.in_features, a.heads, n, routing=attention_routing, k=attention_k, shared_kv=attention == "shared_kv",
                op=a.op, head_dim=a.head_dim, qkv_bias=a.to_q.bias is not None, dropout=a.dropout.p, **dd,
            )
            with torch.no_grad():
                for j, src in enumerate(srcs):
                    expert = moa.experts[j]
                    expert.to_q.load_state_dict(src.attn.to_q.state_dict())
                    expert.proj.load_state_dict(src.attn.proj.state_dict())
                    if attention == "experts":
                        expert.to_k.load_state_dict(src.attn.to_k.state_dict())
                        expert.to_v.load_state_dict(src.attn.to_v.state_dict())
                if attention == "shared_kv":  # the averaged projections of the dense models
                    moa.to_k.load_state_dict(a.to_k.state_dict())
                    moa.to_v.load_state_dict(a.to_v.state_dict())
            _init_router(moa.router, router_init, router_std, generator)
            blk.attn = moa
        f = blk.ffn
        moe = MoEFeedForward(f.fc1.in_features, f.fc1.out_features, n, k=k, gate=gate, dropout=f.drop.p, **dd)
        for j, src in enumerate(srcs):
            moe.experts[j].load_state_dict(src.ffn.state_dict())
        _init_router(moe.router, router_init, router_std, generator)
        blk.ffn = moe
    return out


def btx_upcycle(seed: nn.Module, specialists: Sequence[nn.Module], **options) -> nn.Module:
    """Branch-Train-MiX: :func:`bam_upcycle` with the attention averaged (FFN experts only)."""
    if "attention" in options:
        raise ValueError("btx_upcycle averages the attention; use bam_upcycle(attention=...) for attention experts")
    return bam_upcycle(seed, specialists, attention="average", **options)


def moe_aux_loss(
    auxes: Sequence[Mapping[str, Tensor]],
    *,
    alpha: float = 0.01,
    beta: float = 0.001,
    token_mask: Tensor | None = None,
) -> Tensor:
    """``sum over MoE layers of alpha * L_LB + beta * L_z`` from the ``aux`` dicts of :class:`ParallelBlock` s.

    ``L_LB = N sum_i f_i P_i`` (:func:`attnfuse.losses.moh_load_balance_loss` with ``normalization="code"``:
    1 at perfectly balanced top-1 routing, ``N`` when one expert takes every token with probability 1) and
    ``L_z`` = :func:`attnfuse.losses.router_z_loss`. Layers without an FFN router contribute 0.

    Shapes: each aux ``{"ffn_logits": (B, *tokens, N), "ffn_selected": (B, *tokens, k)}``, token_mask ``(B, *tokens)``.
    """
    total = torch.zeros(())
    for aux in auxes:
        if "ffn_logits" not in aux:
            continue
        logits = aux["ffn_logits"]
        probs = torch.softmax(logits.float(), dim=-1)
        lb = moh_load_balance_loss(probs, aux["ffn_selected"], token_mask=token_mask, normalization="code")
        total = total.to(lb) + alpha * lb + beta * router_z_loss(logits, token_mask=token_mask)
    return total
