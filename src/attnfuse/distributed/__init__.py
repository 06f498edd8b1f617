"""Sequence-parallel attention over ``torch.distributed`` process groups (ring and all-to-all).

Long sequences are split across the ranks of a process group (gloo on CPU, NCCL on GPU); each rank
holds its shard ``(B, H, L_r, D)`` and the result equals single-process attention on the whole sequence:

* :func:`ring_attention`: key/value blocks travel around the ring (point-to-point), partial results
  merged exactly by log-sum-exp; memory per rank ~ ``(L / W)^2`` per block. Causal load balance by the
  ``"zigzag"`` / ``"striped"`` layouts.
* :func:`ulysses_attention`: all-to-all head/sequence re-partition, then any registered operator on the
  whole sequence for ``H / W`` heads.
* :func:`shard_sequence`, :func:`gather_sequence`, :func:`global_positions`: the layouts.
* :class:`Ring`, :class:`Ulysses`: typed options for ``nn.Attention(op=...)``; ``op="ring"`` / ``"ulysses"``
  (or the class names). Importing this package registers them in :data:`attnfuse.ops.EXTENSIONS`, so the
  names resolve in :func:`attnfuse.ops.op_config` and wherever an operator is chosen (blocks, modules,
  fusions, fit configs); :mod:`attnfuse.nn` imports it. ``attnfuse list`` shows them with the operators.

With no initialised process group (or one rank) every function is its single-process counterpart.
This package imports only :mod:`attnfuse.ops` (STYLE R1). Guide: ``docs/distributed.md``.
"""

from attnfuse.distributed.configs import SEQUENCE_PARALLEL, Ring, Ulysses
from attnfuse.distributed.layouts import LAYOUTS, gather_sequence, global_positions, group_rank_world, shard_sequence, shard_sizes
from attnfuse.distributed.ring import causal_work, ring_attention
from attnfuse.distributed.ulysses import ulysses_attention

__all__ = [
    "LAYOUTS",
    "SEQUENCE_PARALLEL",
    "Ring",
    "Ulysses",
    "causal_work",
    "gather_sequence",
    "global_positions",
    "group_rank_world",
    "ring_attention",
    "shard_sequence",
    "shard_sizes",
    "ulysses_attention",
]
