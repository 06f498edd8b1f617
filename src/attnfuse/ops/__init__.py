"""Parameter-free attention operators.

Every operator is a plain function over already-projected queries, keys and values.

Shape legend (used by every docstring in this package):

    B   batch size
    H   number of heads
    L   query length (``Lq``)
    S   key / value length (``Lk``)
    D   query / key head dimension
    Dv  value head dimension

Layout is heads-first, as in :func:`torch.nn.functional.scaled_dot_product_attention`:
``q (B, H, L, D)``, ``k (B, H, S, D)``, ``v (B, H, S, Dv)``; grid operators take
``(B, H, X, Y, D)`` / ``(B, H, X, Y, Z, D)``.

Masks come in two kinds, with one meaning in every operator (booleans, ``True`` = takes part):

* a **key mask** ``key_mask=``: which keys exist, ``(B, *keys)`` or ``(B, H, *keys)`` where ``*keys``
  is the key token shape (``(S,)`` for sequences, ``*grid`` for grids) and ``B``, ``H`` may be 1.
  Every operator takes it;
* a **pair mask** ``mask=``: which (query, key) pairs take part, broadcastable to ``(B, H, L, S)``.
  Only operators that can attend arbitrary pairs take it (``dense``, ``silu_kernel``).

Conventions shared by all operators:

* A query with no allowed key returns exactly zero, and no gradient is NaN.
* Masked positions never influence the result, NaN / inf included: keys and values no query may
  attend are zeroed (``torch.where``) before any matmul, in every backend.
* Empty in, empty out: ``B = 0``, no queries, no keys or an empty grid give results of the
  documented shapes (zeros, ``lse = -inf``) without running a backend, with zero gradients.
* ``bias`` is an additive score bias that receives gradients; its layout is the operator's (see its
  Shapes section); not every operator takes one.
* An argument an operator does not take (a pair mask on a grid operator, ``bias=`` on routing, ...)
  raises a ``TypeError`` naming the operator and what it takes; passed at its neutral value
  (``None`` / ``False``) it is ignored, so generic callers may pass the full set.
* ``return_weights=True`` returns ``(out, weights)``; ``return_lse=True`` returns ``(out, lse)``,
  the log-sum-exp of the scores per query, ``-inf`` for a query with no allowed key.
* ``backend="auto"`` picks the fastest backend that supports the call; see
  :mod:`attnfuse.ops.backends` for the list and the scope override.

Each operator is declared once, ``@operator(name, backends=..., layout=..., cross=...)``, which also
generates its typed options class :class:`OpConfig` (``attnfuse.ops.configs.<Name>``); see
``docs/ops.md`` for the table of what every operator takes.
"""

from attnfuse.ops import backends
from attnfuse.ops._registry import (
    EXTENSIONS,
    OPERATORS,
    Capabilities,
    OpConfig,
    OperatorSpec,
    get_operator,
    list_operators,
    op_config,
    operator,
    register_extension,
)
from attnfuse.ops.axial import axial_attention
from attnfuse.ops.combiner import combiner_attention
from attnfuse.ops.dense import dense_attention
from attnfuse.ops.evidential import (
    alpha_from_opinion,
    conflict,
    dempster_combine,
    dempster_combine_many,
    opinion_from_alpha,
    opinion_from_evidence,
)
from attnfuse.ops.frequency import (
    dct_basis,
    dct_pool,
    estimate_shift,
    fcanet_frequencies,
    frequency_decomposition,
    gradient_magnitude,
    patch_autocorrelation,
    phase_agreement,
    phase_correlation,
    unit_phasor,
)
from attnfuse.ops.halo import halo_attention
from attnfuse.ops.kernel import kernel_attention
from attnfuse.ops.merge import merge_attention
from attnfuse.ops.moh import MoHRouting, mixture_of_heads, moh_route, query_norm_logits
from attnfuse.ops.neighborhood import neighborhood_attention
from attnfuse.ops.reference import aggregate, apply_mask, masked_softmax, scores
from attnfuse.ops.routing import routing_attention
from attnfuse.ops.silu_kernel import silu_kernel_attention
from attnfuse.ops.wavelet import haar_dwt, haar_idwt

__all__ = [
    "EXTENSIONS",
    "OPERATORS",
    "Capabilities",
    "MoHRouting",
    "OpConfig",
    "OperatorSpec",
    "aggregate",
    "alpha_from_opinion",
    "apply_mask",
    "axial_attention",
    "backends",
    "combiner_attention",
    "conflict",
    "dct_basis",
    "dct_pool",
    "dempster_combine",
    "dempster_combine_many",
    "dense_attention",
    "estimate_shift",
    "fcanet_frequencies",
    "frequency_decomposition",
    "get_operator",
    "gradient_magnitude",
    "haar_dwt",
    "haar_idwt",
    "halo_attention",
    "kernel_attention",
    "list_operators",
    "masked_softmax",
    "merge_attention",
    "mixture_of_heads",
    "moh_route",
    "neighborhood_attention",
    "op_config",
    "operator",
    "opinion_from_alpha",
    "opinion_from_evidence",
    "patch_autocorrelation",
    "phase_agreement",
    "phase_correlation",
    "query_norm_logits",
    "register_extension",
    "routing_attention",
    "scores",
    "silu_kernel_attention",
    "unit_phasor",
]
