"""One-shot fusion of trained Transformers: optimal-transport fusion, vanilla averaging, ensembling.

Paper: Imfeld, Graldi, Giordano, Hofmann, Anagnostidis, Singh, "Transformer Fusion with Optimal
Transport" (https://arxiv.org/abs/2310.05719, ICLR 2024); released code ``graldij/transformer-fusion``.
Spec: ``shared/papers/ot-transformer-fusion.md``; user guide ``docs/merge.md``.

Status: OT fusion of chains of pre-norm :class:`attnfuse.nn.TransformerBlock` with their embeddings,
norms and heads (:class:`attnfuse.merge.TransportGraph`); acts and wts costs; EMD and Sinkhorn; residual
policies ``mean`` / ``weighted_scalar`` / ``only_resid`` / ``no_resid`` (released) and ``acts`` (attnfuse);
Q/K maps ``separate`` / ``shared``; full-width ("cross-head") Q/K/V maps; N parents; heterogeneous widths
(a parent of another width is fused into the anchor's shape); ``heads="aligned"`` (an attnfuse option of the
spec: OT between heads, then within-head maps). Not implemented: ``qk="joint"``, ``weighted_matrix`` and ``resid_as_identity``.

Per parameter (every aligned axis contracted with its map, the map scaled to column sums 1)::

    W_A' = T_out^T W_A T_in,  b_A' = T_out^T b_A,  LN: gamma' = gamma_A T, beta' = beta_A T
    W    = sum_k w_k W_k'     (anchor: W' = W; default w_k = 1/N: vanilla fusion when every T = I)

Deviations from the released code (documented in ``docs/merge.md``):

- The stream map entering the first block comes from the stream's activations there (embeddings, CLS and
  position embeddings already summed), not from ``combine(T_patch, T_pos)`` and a separate CLS map (the
  released CLS map sorts the values of one vector: a pitfall in the spec).
- Maps are applied scaled to column sums 1 (``T * n_b / n_a``, the predecessor otfusion's ``correction``);
  for equal widths this is the spec's row-normalised ``n_a * T``.
- Sinkhorn is POT's log-domain solver in float64 (the default one underflows at small ``reg``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnfuse.merge.graph import Axis, TransportGraph
from attnfuse.merge.transport import combine_maps, solve_ot, standardize_rows, transport_plan

__all__ = ["Ensemble", "FusionReport", "fuse", "ot_fuse", "vanilla_average"]


@dataclass
class FusionReport:
    """What :func:`ot_fuse` did: every map (``maps[k][key]``, ``n_a x n_b``, rows sum to 1) and OT cost per parent.

    The anchor's entries are empty (its basis is kept). ``seconds`` is the wall-clock time of the fusion.
    """

    graph: TransportGraph
    maps: list[dict[str, Tensor]] = field(default_factory=list)
    costs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _call(model: nn.Module, batch: Any) -> Any:
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def _batches(data: Any) -> list[Any]:
    return list(data) if isinstance(data, list) else [data]


@torch.no_grad()
def _activations(model: nn.Module, graph: TransportGraph, data: Any,
                 token_filter: Callable[[Tensor], Tensor] | None) -> dict[str, Tensor]:
    """Features ``(C, S)`` of every site with activations: outputs / inputs of its module over all batches."""
    modules = dict(model.named_modules())
    wanted: dict[tuple[str, str], list[Tensor]] = {}
    for s in graph.sites:
        if s.acts is not None:
            wanted.setdefault(s.acts, [])
        for m in s.extra_acts:
            wanted.setdefault((m, "output"), [])

    def keep(store: list[Tensor], t: Any) -> None:
        t = t[0] if isinstance(t, tuple) else t
        if token_filter is not None and t.dim() >= 3:
            t = token_filter(t)
        store.append(t.detach().reshape(-1, t.shape[-1]).double())  # (samples, C)

    handles = []
    for (name, io), store in wanted.items():
        if name not in modules:
            raise ValueError(f"module {name!r} of the transport graph is not in this model")
        mod = modules[name]
        if io == "input":
            handles.append(mod.register_forward_pre_hook(lambda _m, args, store=store: keep(store, args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _a, out, store=store: keep(store, out)))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(data):
            _call(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    cat = {k: torch.cat(v, 0).T for k, v in wanted.items() if v}  # (C, S)
    feats = {}
    for s in graph.sites:
        if s.acts is None or s.acts not in cat:
            continue
        parts = [cat[s.acts]] + [cat[(m, "output")] for m in s.extra_acts]
        feats[s.key] = torch.cat(parts, dim=1)
    return feats


def _contract(t: Tensor, axis: int, chunks: int, tn: Tensor) -> Tensor:
    """Contract axis ``axis`` (``chunks`` copies of width n_a) of ``t`` with ``tn (n_a, n_b)``."""
    n_a = tn.shape[0]
    if t.shape[axis] != chunks * n_a:
        raise ValueError(f"axis {axis} of a parameter {tuple(t.shape)} does not hold {chunks} x {n_a} channels")
    moved = t.movedim(axis, -1).unflatten(-1, (chunks, n_a))  # (..., chunks, n_a)
    return (moved @ tn).flatten(-2).movedim(-1, axis)  # (..., chunks * n_b) at axis


def _normalised(t: Tensor) -> Tensor:
    """A map with rows summing to 1, rescaled to column sums 1 (``T * n_b / n_a``) for application."""
    return t * (t.shape[1] / t.shape[0])


def _align(p: Tensor, axes: Sequence[Axis | None], maps: dict[str, Tensor], skip: int | None = None) -> Tensor:
    out = p.double()
    for i, a in enumerate(axes):
        if a is not None and i != skip:
            out = _contract(out, i, a.chunks, _normalised(maps[a.key]))
    return out


def _rows(p: Tensor, axis: Axis, i: int) -> Tensor:
    """``p`` as ``(n, features)`` with the channels of axis ``i`` (``axis.chunks`` copies) as rows."""
    moved = p.movedim(i, 0)
    moved = moved.unflatten(0, (axis.chunks, moved.shape[0] // axis.chunks)).movedim(1, 0)  # (n, chunks, ...)
    return moved.reshape(moved.shape[0], -1)


def _weight_features(state: dict[str, Tensor], graph: TransportGraph, key: str, producers: list[tuple[str, int]],
                     maps: dict[str, Tensor] | None) -> Tensor:
    parts = []
    for name, i in producers:
        axes = graph.slots[name]
        p = state[name].double() if maps is None else _align(state[name], axes, maps, skip=i)
        parts.append(_rows(p, axes[i], i))
    if not parts:
        raise ValueError(f"map {key!r}: mode='wts' needs weights that write this stream (embeddings); use mode='acts'")
    f = torch.cat(parts, dim=1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _head_aligned(fq: tuple[Tensor, Tensor], fv: tuple[Tensor, Tensor], heads: tuple[int, int], *, solver: str,
                  reg: float, standardize: bool) -> tuple[Tensor, Tensor, float]:
    """``heads="aligned"``: OT between heads, then within-head maps (one for Q/K, one for V/O).

    The cost of pairing head ``i`` of A with head ``j`` of B is the OT cost between their Q/K channels plus that
    between their V channels (one cost matrix per kind over all channels, max-normalised once, so that head
    pairs are comparable). The full maps are block matrices: block ``(i, j)`` = head map ``(i, j)`` times the
    within-head map of that pair; rows sum to 1. Shapes: features ``(H * Dh, S)`` -> maps ``(H_a Dh_a, H_b Dh_b)``.
    """
    (ha, hb) = heads
    costs = []
    for fa, fb in (fq, fv):
        fa, fb = fa.double(), fb.double()
        if standardize:
            fa, fb = standardize_rows(fa), standardize_rows(fb)
        m = torch.cdist(fa, fb)
        costs.append(m / m.max() if float(m.max()) > 0 else m)
    dims = [(m.shape[0] // ha, m.shape[1] // hb) for m in costs]
    within = [[[None, None] for _ in range(hb)] for _ in range(ha)]
    pair_cost = torch.zeros(ha, hb, dtype=torch.float64)
    for i in range(ha):
        for j in range(hb):
            for kind, (m, (da, db)) in enumerate(zip(costs, dims, strict=True)):
                plan, c = solve_ot(m[i * da : (i + 1) * da, j * db : (j + 1) * db], solver=solver, reg=reg)
                within[i][j][kind] = plan * da  # rows sum to 1
                pair_cost[i, j] += c
    head_plan, head_cost = solve_ot(pair_cost / pair_cost.max() if float(pair_cost.max()) > 0 else pair_cost,
                                    solver=solver, reg=reg)
    th = head_plan * ha  # (H_a, H_b), rows sum to 1
    maps = []
    for kind, (da, db) in enumerate(dims):
        t = torch.zeros(ha * da, hb * db, dtype=torch.float64)
        for i in range(ha):
            for j in range(hb):
                t[i * da : (i + 1) * da, j * db : (j + 1) * db] = th[i, j] * within[i][j][kind]
        maps.append(t)
    return maps[0], maps[1], head_cost


def _maps_for(a: nn.Module, b: nn.Module, graph: TransportGraph, *, mode: str, solver: str, reg: float, residual: str,
              heads: str, acts_a: dict[str, Tensor] | None,
              acts_b: dict[str, Tensor] | None) -> tuple[dict[str, Tensor], dict[str, float]]:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    sites = {s.key: s for s in graph.sites}
    maps: dict[str, Tensor] = {}
    costs: dict[str, float] = {}

    def features(s) -> tuple[Tensor, Tensor]:
        if mode == "acts":
            return acts_a[s.key], acts_b[s.key]
        return _weight_features(sa, graph, s.key, s.producers, maps), _weight_features(sb, graph, s.key, s.producers, None)

    def solve(fa: Tensor, fb: Tensor, key: str, standardize: bool) -> None:
        plan, cost = transport_plan(fa, fb, solver=solver, reg=reg, standardize=standardize)
        maps[key], costs[key] = plan * fa.shape[0], cost

    for s in graph.sites:
        if s.key in maps:  # computed with its head group
            continue
        if s.kind == "join":
            if residual == "acts":
                solve(acts_a[s.key], acts_b[s.key], s.key, True)
                continue
            weights = None
            if residual == "weighted_scalar":
                if acts_a is None:
                    raise ValueError("residual='weighted_scalar' needs activations: use mode='acts'")
                w = [float((acts_a[k].abs().mean() + acts_b[k].abs().mean()) / 2) for k in s.inputs]
                weights = (w[0], w[1])
            maps[s.key] = combine_maps(maps[s.inputs[0]], maps[s.inputs[1]], policy=residual, weights=weights)
        elif heads == "aligned" and s.key.endswith(".qk"):
            v_site = sites[s.key[: -len("qk")] + "v"]
            block = s.acts[0].rsplit(".attn.", 1)[0]
            n_heads = (mods_a[block].attn.heads, mods_b[block].attn.heads)
            t_qk, t_v, cost = _head_aligned(features(s), features(v_site), n_heads, solver=solver, reg=reg,
                                            standardize=mode == "acts")
            maps[s.key], maps[v_site.key], costs[s.key] = t_qk, t_v, cost
        else:
            fa, fb = features(s)
            solve(fa, fb, s.key, mode == "acts")
    return maps, costs


def ot_fuse(
    models: Sequence[nn.Module],
    *,
    anchor: int = -1,
    data: Any = None,
    mode: Literal["acts", "wts"] = "acts",
    solver: Literal["emd", "sinkhorn"] = "sinkhorn",
    reg: float = 0.08,
    residual: Literal["mean", "weighted_scalar", "only_resid", "no_resid", "acts"] = "mean",
    qk: Literal["separate", "shared"] = "separate",
    heads: Literal["cross", "aligned"] = "cross",
    weights: Sequence[float] | None = None,
    token_filter: Callable[[Tensor], Tensor] | None = None,
    fixed: Sequence[str] = (),
) -> tuple[nn.Module, FusionReport]:
    """Fuse ``models`` into the anchor's architecture by optimal-transport alignment, then averaging.

    Args:
        models: two or more trained models of the same layer types (widths may differ: the result has the
            anchor's widths).
        anchor: index of the anchor (its neuron order is kept; released: the last model).
        data: inputs for the activations (``mode="acts"``): one batch or a list of batches, each passed as
            ``model(batch)`` (``model(*batch)`` for a tuple). The released default uses 200 samples.
        mode: ``"acts"`` (cost between activations, released default) or ``"wts"`` (between weight rows).
        solver: ``"emd"`` (hard) or ``"sinkhorn"`` (soft, ``reg``; released default 0.08 for acts).
        residual: how the maps of a residual join combine (see :func:`attnfuse.merge.combine_maps`);
            ``"acts"`` (attnfuse) computes every stream map from the stream's own activations.
        qk: ``"separate"`` Q and K maps (released default) or ``"shared"`` (one map for both, which keeps
            ``Q K^T`` for hard maps that permute whole heads).
        heads: ``"cross"``: full-width Q/K/V maps that may move channels between heads (released);
            ``"aligned"`` (attnfuse, spec option): OT between whole heads, then one within-head map shared by Q
            and K and one for V/O (implies one Q/K map, ``qk="shared"``), so channels never change heads.
        weights: per-model weights (default ``1/N`` each; for two models ``[1 - alpha, alpha]``).
        token_filter: ``(B, L, C) -> (..., C)``: which tokens' activations enter the costs (e.g. CLS + centre).
        fixed: parameter-name prefixes to average without alignment.

    Returns:
        ``(fused model, FusionReport)``; the fused model is a copy of the anchor with the fused weights.

    Raises:
        ValueError: unsupported structure (the message lists what is supported), bad options, no ``data``
            in acts mode. ModuleNotFoundError: POT missing (``pip install "attnfuse[merge]"``).
    """
    start = time.perf_counter()
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"ot_fuse needs two or more models, got {len(models)}")
    n = len(models)
    anchor = anchor % n
    if mode not in ("acts", "wts"):
        raise ValueError(f"mode must be 'acts' or 'wts', got {mode!r}")
    if heads not in ("cross", "aligned"):
        raise ValueError(f"heads must be 'cross' (full-width Q/K/V maps, released) or 'aligned', got {heads!r}")
    if heads == "aligned":
        qk = "shared"
    if residual not in ("mean", "weighted_scalar", "only_resid", "no_resid", "acts"):
        raise ValueError(f"unknown residual policy {residual!r}")
    if mode == "wts" and residual == "acts":
        raise ValueError("residual='acts' needs mode='acts'")
    if mode == "acts" and data is None:
        raise ValueError("mode='acts' needs data= (a batch or a list of batches of inputs)")
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights must have one entry per model ({n}), got {len(w)}")
    graphs = [TransportGraph.from_module(m, qk=qk, fixed=fixed) for m in models]
    graph = graphs[anchor]
    for k, g in enumerate(graphs):
        if list(g.slots) != list(graph.slots):
            raise ValueError(f"model {k} has other parameters than the anchor: "
                             f"{sorted(set(g.slots) ^ set(graph.slots))[:6]}")
    use_acts = mode == "acts" or residual == "weighted_scalar"
    acts_b = _activations(models[anchor], graph, data, token_filter) if use_acts else None
    report = FusionReport(graph=graph)
    fused = {name: w[anchor] * p.detach().double() for name, p in models[anchor].named_parameters()}
    for k, model in enumerate(models):
        if k == anchor:
            report.maps.append({})
            report.costs.append({})
            continue
        acts_a = _activations(model, graphs[k], data, token_filter) if use_acts else None
        maps, costs = _maps_for(model, models[anchor], graph, mode=mode, solver=solver, reg=reg, residual=residual,
                                heads=heads, acts_a=acts_a, acts_b=acts_b)
        report.maps.append(maps)
        report.costs.append(costs)
        for name, p in model.named_parameters():
            aligned = _align(p.detach(), graph.slots[name], maps)
            if aligned.shape != fused[name].shape:
                raise ValueError(f"{name}: aligned shape {tuple(aligned.shape)} differs from the anchor's "
                                 f"{tuple(fused[name].shape)}")
            fused[name] += w[k] * aligned
    out = copy.deepcopy(models[anchor])
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(fused[name].to(p.dtype))
    report.seconds = time.perf_counter() - start
    return out, report


def vanilla_average(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """Vanilla fusion (VF): the weighted average of same-shaped models' parameters (every map ``I``).

    Returns a copy of the last model with the averaged floating-point parameters and buffers.

    Raises:
        ValueError: fewer than one model, different parameter names or shapes, wrong number of weights.
    """
    models = list(models)
    if not models:
        raise ValueError("vanilla_average needs at least one model")
    w = [1.0 / len(models)] * len(models) if weights is None else [float(x) for x in weights]
    if len(w) != len(models):
        raise ValueError(f"weights must have one entry per model ({len(models)}), got {len(w)}")
    states = [m.state_dict() for m in models]
    ref = states[-1]
    for k, s in enumerate(states):
        if list(s) != list(ref) or any(s[n].shape != ref[n].shape for n in ref):
            raise ValueError(f"model {k} differs from the last model in parameter names or shapes; vanilla averaging "
                             "needs identical architectures (use ot_fuse for other widths)")
    out = copy.deepcopy(models[-1])
    avg = {}
    for name, t in ref.items():
        if t.is_floating_point():
            avg[name] = sum(wk * s[name].double() for wk, s in zip(w, states, strict=True)).to(t.dtype)
        else:
            avg[name] = t
    out.load_state_dict(avg)
    return out


class Ensemble(nn.Module):
    """Output ensemble: the weighted mean of the models' outputs (logits), the reference of the paper's tables.

    Shapes: whatever the models take -> their common output shape.
    """

    def __init__(self, models: Iterable[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        n = len(self.members)
        if n == 0:
            raise ValueError("Ensemble needs at least one model")
        w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
        if len(w) != n:
            raise ValueError(f"weights must have one entry per model ({n}), got {len(w)}")
        self.weights = w

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return sum(w * m(*args, **kwargs) for w, m in zip(self.weights, self.members, strict=True))


def fuse(models: Sequence[nn.Module], method: Literal["ot", "average", "ensemble"] = "ot", **options: Any) -> nn.Module:
    """One entry point for the three ways to combine models: ``"ot"`` (:func:`ot_fuse`, options passed on),
    ``"average"`` (:func:`vanilla_average`, option ``weights``) and ``"ensemble"`` (:class:`Ensemble`).

    Raises:
        ValueError: an unknown method, or options the method does not take.
    """
    if method == "ot":
        return ot_fuse(models, **options)[0]
    if method in ("average", "ensemble"):
        unknown = sorted(set(options) - {"weights"})
        if unknown:
            raise ValueError(f"method {method!r} takes only weights=, got {unknown}")
        return vanilla_average(models, **options) if method == "average" else Ensemble(models, **options)
    raise ValueError(f"method must be 'ot', 'average' or 'ensemble', got {method!r}")
