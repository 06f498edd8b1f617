"""Backend dispatch: capabilities, then reasons, then an ordered list.

Each operator declares an ordered tuple of :class:`Backend` s (fastest first) in its
``@operator(name, backends=...)`` declaration (:mod:`attnfuse.ops._registry`). ``backend="auto"``
walks it and takes the first backend with no reason against the call; a named backend is used
if it supports the call, and otherwise the error lists why. Within a ``with restrict(...)`` scope
``"auto"`` only considers the named backends (the scope is restored on exit, also on error); a
per-call ``backend=`` name always wins. Nothing here reads environment variables.

Example:
    >>> from attnfuse import ops
    >>> with ops.backends.restrict("reference"):
    ...     out = ops.dense_attention(q, k, v)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

__all__ = ["BACKENDS", "Backend", "Call", "choose_backend", "list_backends", "restrict"]

log = logging.getLogger(__name__)

_RESTRICT: ContextVar[tuple[str, ...] | None] = ContextVar("attnfuse_backend_restrict", default=None)


@dataclass(frozen=True)
class Call:
    """What a backend needs to know about one operator call to say whether it supports it."""

    device: str
    dtype: torch.dtype
    requires_grad: bool
    has_mask: bool
    has_bias: bool
    need_weights: bool
    need_lse: bool

    @classmethod
    def of(cls, q: torch.Tensor, *tensors: torch.Tensor | None, mask=None, bias=None,
           need_weights: bool = False, need_lse: bool = False) -> Call:
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, *tensors, bias)
        )
        return cls(q.device.type, q.dtype, grad, mask is not None, bias is not None, need_weights, need_lse)


@dataclass(frozen=True)
class Backend:
    """One implementation of an operator and what it supports.

    Attributes:
        name: name users pass as ``backend=``.
        fn: the implementation.
        devices: device types supported (``None`` = any).
        dtypes: dtypes supported (``None`` = any floating dtype).
        weights: can return attention weights.
        lse: can return the log-sum-exp.
        grad: supports backward.
        auto_devices: device types on which ``"auto"`` may pick this backend (``None`` = every
            supported device); elsewhere it runs only when requested by name.
    """

    name: str
    fn: Callable
    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    weights: bool = False
    lse: bool = False
    grad: bool = True
    auto_devices: frozenset[str] | None = None

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Every reason this backend cannot run ``call`` (empty if it can)."""
        reasons = []
        if self.devices is not None and call.device not in self.devices:
            reasons.append(f"device {call.device!r} not in {sorted(self.devices)}")
        if self.dtypes is not None and call.dtype not in self.dtypes:
            reasons.append(f"dtype {call.dtype} not supported")
        if call.need_weights and not self.weights:
            reasons.append("cannot return attention weights")
        if call.need_lse and not self.lse:
            reasons.append("cannot return the log-sum-exp")
        if call.requires_grad and not self.grad:
            reasons.append("no backward")
        return reasons


#: operator name -> its backends, fastest first. Filled only by the ``@operator(name, backends=...)`` declarations.
BACKENDS: dict[str, tuple[Backend, ...]] = {}


def list_backends(op: str) -> list[str]:
    """Names of an operator's backends, in ``"auto"`` priority order (empty if it declares none)."""
    return [b.name for b in BACKENDS.get(op, ())]


@torch.compiler.assume_constant_result
def _restricted() -> tuple[str, ...] | None:
    # Dynamo cannot trace ContextVar.get; under torch.compile the scope in effect when the graph
    # is traced is baked into it (all backends are exact, so only the kernel choice can go stale).
    return _RESTRICT.get()


@contextmanager
def restrict(*names: str) -> Iterator[None]:
    """Within this scope, ``backend="auto"`` only considers backends named in ``names``."""
    if not names:
        raise ValueError("restrict() needs at least one backend name")
    token = _RESTRICT.set(tuple(names))
    try:
        yield
    finally:
        _RESTRICT.reset(token)


def choose_backend(op: str, requested: str, call: Call) -> Backend:
    """Pick the backend of ``op`` for ``call``.

    Args:
        op: operator name (a key of :data:`BACKENDS`).
        requested: ``"auto"`` or a backend name.
        call: the call's properties.

    Raises:
        ValueError: unknown backend name (listing valid ones), or no backend supports the call
            (listing every backend's reasons).
    """
    candidates = BACKENDS[op]
    names = [b.name for b in candidates]
    if requested != "auto":
        if requested not in names:
            raise ValueError(f"unknown backend {requested!r} for operator {op!r}; valid: ['auto', {', '.join(map(repr, names))}]")
        backend = candidates[names.index(requested)]
        reasons = backend.not_supported_reasons(call)
        if reasons:
            raise ValueError(f"backend {requested!r} of operator {op!r} cannot run this call: {'; '.join(reasons)}")
        return backend
    allowed = _restricted()
    if allowed is not None:
        candidates = tuple(b for b in candidates if b.name in allowed)
    all_reasons = {}
    for backend in candidates:
        reasons = backend.not_supported_reasons(call)
        if backend.auto_devices is not None and call.device not in backend.auto_devices:
            reasons = [*reasons, f"not picked by 'auto' on {call.device!r} (request it by name)"]
        if not reasons:
            if not torch.compiler.is_compiling():  # Dynamo cannot trace logging calls
                log.debug("attnfuse: %s -> backend %s for %s", op, backend.name, call)
            return backend
        all_reasons[backend.name] = reasons
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in all_reasons.items()) or "no backend allowed"
    raise ValueError(f"no backend of operator {op!r} supports this call ({detail}); restricted to {allowed}")
