"""Operator registry: one ``@operator(...)`` declaration per operator fills it.

The declaration registers the functional under its name, stores its backends (fastest first) for
:func:`attnfuse.ops.backends.choose_backend`, derives from the signature which call arguments the
operator takes (key mask, pair mask, bias, causal flag, weights, log-sum-exp) and generates its typed
options class (:class:`OpConfig`), importable as ``attnfuse.ops.configs.<Name>``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from attnfuse.ops.backends import BACKENDS, Backend, Call, choose_backend

__all__ = [
    "CALL_ARGUMENTS", "EXTENSIONS", "OPERATORS", "Capabilities", "OpConfig", "OperatorSpec", "get_operator", "list_operators",
    "op_config", "operator", "register_extension",
]

#: Per-call arguments (tensors, masks, flags of what to return): never operator options.
CALL_ARGUMENTS = frozenset({"q", "k", "v", "key_mask", "mask", "bias", "return_weights", "return_lse"})

#: The call keywords a generic caller may pass to any operator, what they are, and their neutral value:
#: an operator that does not take one accepts it at its neutral value and rejects anything else.
CALL_KINDS: dict[str, tuple[str, object]] = {
    "key_mask": ("key mask", None),
    "mask": ("pair mask", None),
    "bias": ("score bias", None),
    "is_causal": ("causal flag", False),
    "return_weights": ("attention weights", False),
    "return_lse": ("log-sum-exp", False),
}

#: Where the generated option classes live (the class path YAML configs name).
CONFIG_MODULE = "attnfuse.ops.configs"


class OpConfig:
    """Typed, frozen options of one operator; the base of every ``attnfuse.ops.configs.<Name>``.

    Each registered operator gets one subclass, a frozen keyword-only dataclass whose fields are
    exactly the operator's own options (everything but ``q, k, v``, masks, bias, tensor inputs
    and ``return_*``), with their types and defaults. Use it wherever an operator is chosen:
    ``nn.Attention(64, 4, op=Neighborhood(kernel_size=7))``, or in YAML
    ``op: {class_path: attnfuse.ops.configs.Neighborhood, init_args: {kernel_size: 7}}``.

    Attributes:
        name: registry name of the operator (class attribute).

    Example:
        >>> from attnfuse.ops.configs import Dense
        >>> cfg = Dense(backend="reference")
        >>> cfg.name, cfg.options()
        ('dense', {'scale': None, 'is_causal': False, 'backend': 'reference'})
        >>> out = cfg(q, k, v, key_mask=key_mask)  # doctest: +SKIP
    """

    name: ClassVar[str] = ""

    def options(self) -> dict[str, Any]:
        """The option values as keyword arguments of the operator."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def spec(self) -> OperatorSpec:
        """The registered operator these options belong to."""
        return get_operator(self.name)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, **call: Any) -> Any:
        """Run the operator with these options; ``call`` holds the per-call arguments (masks, bias, flags), which win."""
        return self.spec.fn(q, k, v, **{**self.options(), **call})


@dataclass(frozen=True)
class Capabilities:
    """Which per-call arguments an operator takes (derived from its signature).

    Attributes:
        key_mask: ``key_mask=``: which keys exist, ``(B, *keys)`` or ``(B, H, *keys)``.
        pair_mask: ``mask=``: arbitrary (query, key) pairs, broadcastable to ``(B, H, L, S)``.
        bias: ``bias=``: an additive score bias (its layout is the operator's; see its Shapes).
        causal: ``is_causal=``.
        weights: ``return_weights=``.
        lse: ``return_lse=``.
    """

    key_mask: bool = False
    pair_mask: bool = False
    bias: bool = False
    causal: bool = False
    weights: bool = False
    lse: bool = False

    @classmethod
    def of(cls, params: Sequence[str]) -> Capabilities:
        p = set(params)
        return cls("key_mask" in p, "mask" in p, "bias" in p, "is_causal" in p, "return_weights" in p, "return_lse" in p)

    def takes(self, keyword: str) -> bool:
        """Whether the call keyword ``keyword`` (a key of ``CALL_KINDS``) is taken."""
        return {"key_mask": self.key_mask, "mask": self.pair_mask, "bias": self.bias, "is_causal": self.causal,
                "return_weights": self.weights, "return_lse": self.lse}[keyword]

    def describe(self) -> str:
        taken = [f"{kw}= ({what})" for kw, (what, _) in CALL_KINDS.items() if self.takes(kw)]
        return ", ".join(taken) or "no masks, bias or flags"


@dataclass(frozen=True)
class OperatorSpec:
    """What a module needs to know to call an operator.

    Attributes:
        name: registry name.
        fn: the functional, ``fn(q, k, v, *, key_mask=..., mask=..., bias=..., return_weights=..., **options)``
            (only the arguments it takes; see ``takes``).
        layout: ``"sequence"`` if token axes are flattened into one ``L`` axis before the call,
            ``"grid"`` if the operator takes the token grid ``(B, H, *grid, D)`` as is.
        cross: whether keys may come from another token set than the queries.
        options: the operator's own keyword options (the fields of ``config``).
        takes: the per-call arguments it takes.
        config: its typed options class (an :class:`OpConfig` subclass).
    """

    name: str
    fn: Callable
    layout: Literal["sequence", "grid"] = "sequence"
    cross: bool = True
    options: frozenset[str] = frozenset()
    takes: Capabilities = Capabilities()
    config: type[OpConfig] | None = None

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The operator's backends, in ``"auto"`` priority order."""
        return BACKENDS.get(self.name, ())

    @property
    def required_options(self) -> tuple[str, ...]:
        """Options without a default."""
        if self.config is None:
            return ()
        return tuple(f.name for f in dataclasses.fields(self.config)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)

    def choose_backend(self, requested: str, call: Call) -> Backend:
        """:func:`attnfuse.ops.backends.choose_backend` for this operator."""
        return choose_backend(self.name, requested, call)

    def check_options(self, options: dict) -> None:
        """Raise ``TypeError`` if ``options`` contains a keyword the operator does not take."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise TypeError(
                f"operator {self.name!r} got unknown option(s) {unknown}; "
                f"it accepts {sorted(self.options) or 'no options'}"
            )

    def unsupported(self, keyword: str) -> TypeError:
        """The error for a call keyword the operator does not take."""
        fn = getattr(self.fn, "__name__", self.name)
        if keyword in CALL_KINDS:
            what = CALL_KINDS[keyword][0]
            hint = ""
            if keyword == "mask" and self.takes.key_mask:
                hint = " (a mask of the keys that exist is a key mask: pass it as key_mask=)"
            return TypeError(
                f"operator {self.name!r} ({fn}) does not take a {what} ({keyword}=); "
                f"it takes {self.takes.describe()}; options: {sorted(self.options) or 'none'}{hint}"
            )
        return TypeError(
            f"operator {self.name!r} ({fn}) got an unexpected argument {keyword!r}; "
            f"it takes {self.takes.describe()}; options: {sorted(self.options) or 'none'}"
        )


OPERATORS: dict[str, OperatorSpec] = {}

#: Operators defined outside :mod:`attnfuse.ops` (by a higher layer, which this package never imports): name ->
#: spec, filled by :func:`register_extension`. :func:`get_operator` / :func:`op_config` resolve these names (and
#: their config class names) like those of :data:`OPERATORS`, so ``op="ring"`` works wherever an operator is
#: chosen once :mod:`attnfuse.distributed` is imported (``attnfuse.nn`` imports it). They are kept apart from
#: :data:`OPERATORS` because they are not single-process operators: the registry-wide operator tests and the
#: ``docs/ops.md`` table iterate :data:`OPERATORS` only.
EXTENSIONS: dict[str, OperatorSpec] = {}


def _config_name_owner(class_name: str) -> str | None:
    """The operator (in :data:`OPERATORS` or :data:`EXTENSIONS`) whose config class is named ``class_name``."""
    for spec in (*OPERATORS.values(), *EXTENSIONS.values()):
        if spec.config is not None and spec.config.__name__ == class_name:
            return spec.name
    return None


def register_extension(spec: OperatorSpec) -> OperatorSpec:
    """Register an operator defined outside :mod:`attnfuse.ops` under ``spec.name`` (see :data:`EXTENSIONS`).

    ``spec.config`` is its hand-written :class:`OpConfig` subclass (whose ``spec`` property returns ``spec``);
    its class name resolves too (``"Ring"``). Registering the same spec again is a no-op (a module reload).

    Args:
        spec: the operator's spec, with ``config`` set.

    Returns:
        ``spec``.

    Raises:
        ValueError: no ``config``, or the name / config class name already taken by another operator.
    """
    if spec.config is None or not issubclass(spec.config, OpConfig):
        raise ValueError(f"extension operator {spec.name!r} needs config= (an attnfuse.ops.OpConfig subclass)")
    previous = EXTENSIONS.get(spec.name)
    if previous is not None and previous.config is not None and previous.config.__qualname__ == spec.config.__qualname__ \
            and previous.fn.__module__ == spec.fn.__module__:
        EXTENSIONS[spec.name] = spec  # the same definition again (e.g. importlib.reload)
        return spec
    if spec.name in OPERATORS or spec.name in EXTENSIONS:
        raise ValueError(f"operator {spec.name!r} is already registered")
    owner = _config_name_owner(spec.config.__name__)
    if owner is not None:
        raise ValueError(f"config class name {spec.config.__name__!r} of operator {spec.name!r} is taken by operator {owner!r}")
    EXTENSIONS[spec.name] = spec
    return spec


def _is_tensor_input(hint: object) -> bool:
    """Whether a parameter annotation names a tensor (``Tensor`` or ``Tensor | None``): an input, not an option."""
    return hint is Tensor or Tensor in typing.get_args(hint)


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _option_docs(fn: Callable, names: Sequence[str]) -> str:
    """The ``Args:`` entries of ``fn``'s Google docstring for ``names``, re-indented."""
    doc = inspect.getdoc(fn) or ""
    match = re.search(r"^Args:\n((?:(?: {4}.*)?\n)+)", doc + "\n", flags=re.MULTILINE)
    entries: dict[str, list[str]] = {}
    current = None
    for line in (match.group(1) if match else "").splitlines():
        head = re.match(r" {4}(\w+)(?:, \w+)*:(.*)", line)
        if head:
            current = head.group(1)
            entries[current] = [head.group(2).strip()]
        elif current is not None and line.strip():
            entries[current].append(line.strip())
    lines = [f"    {n}: {' '.join(entries[n])}" for n in names if n in entries]
    return "\n".join(lines)


def _make_config(name: str, fn: Callable, option_params: list[inspect.Parameter], hints: dict, class_name: str) -> type[OpConfig]:
    fields = []
    for p in option_params:
        typ = hints.get(p.name, Any)
        if p.default is inspect.Parameter.empty:
            fields.append((p.name, typ))
        else:
            fields.append((p.name, typ, dataclasses.field(default=p.default)))
    doc = (f"Options of the {name!r} operator (:func:`{fn.__module__}.{fn.__name__}`); "
           "see :class:`attnfuse.ops.OpConfig`.\n")
    args = _option_docs(fn, [p.name for p in option_params])
    if args:
        doc += f"\nArgs:\n{args}\n"
    cls = dataclasses.make_dataclass(
        class_name, fields, bases=(OpConfig,), frozen=True, kw_only=True,
        namespace={"name": name, "__doc__": doc, "__module__": CONFIG_MODULE},
    )
    cls.__qualname__ = class_name
    return cls


def operator(
    name: str,
    *,
    backends: Sequence[Backend] = (),
    layout: Literal["sequence", "grid"] = "sequence",
    cross: bool = True,
    config_name: str | None = None,
) -> Callable[[Callable], Callable]:
    """Declare an attention functional: its name, backends, layout and cross-attention support.

    This is the only place an operator's name is written. The decorated function gets a ``.spec``
    attribute (its :class:`OperatorSpec`) and rejects a call argument it does not take (a pair mask
    on a grid operator, ``bias=`` on an operator without one, ...) with a ``TypeError`` that names the
    operator and what it takes; such an argument at its neutral value (``None`` / ``False``) is
    dropped, so generic callers may pass the full set.

    Args:
        name: registry name (``nn.Attention(op=name)``).
        backends: the implementations, fastest first (``"auto"`` takes the first that supports a call).
        layout: ``"sequence"`` or ``"grid"``; see :class:`OperatorSpec`.
        cross: whether keys may come from another token set than the queries.
        config_name: class name of the generated :class:`OpConfig` (default: ``name`` in CamelCase).

    Raises:
        ValueError: ``name``, the config class name or a backend name already taken.

    Example:
        >>> @operator("scaled_dense")
        ... def scaled_dense(q, k, v, *, factor: float = 1.0, key_mask=None):
        ...     return dense_attention(q * factor, k, v, key_mask=key_mask)  # doctest: +SKIP
    """

    def decorator(fn: Callable) -> Callable:
        if name in OPERATORS or name in EXTENSIONS:
            owner = (OPERATORS.get(name) or EXTENSIONS[name]).fn.__module__
            raise ValueError(f"operator {name!r} is already registered (by {owner})")
        class_name = config_name or _camel(name)
        clash = _config_name_owner(class_name)
        if clash is not None:
            raise ValueError(f"config class name {class_name!r} of operator {name!r} is taken by operator {clash!r}; "
                             "pass config_name=")
        names = [b.name for b in backends]
        if len(set(names)) != len(names) or "auto" in names:
            raise ValueError(f"backend names of operator {name!r} must be unique and not 'auto', got {names}")
        params = inspect.signature(fn).parameters
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotations: treat every option as Any
            hints = {}
        option_params = [
            p for p in params.values()
            if p.name not in CALL_ARGUMENTS and not p.name.startswith("return_")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and not _is_tensor_input(hints.get(p.name))
        ]
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        accepted = frozenset(params)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            if not open_kwargs:
                for key in kwargs:
                    if key not in accepted:
                        return fn(*args, **_drop_neutral(spec, accepted, kwargs))
            return fn(*args, **kwargs)

        spec = OperatorSpec(
            name=name, fn=checked, layout=layout, cross=cross, options=frozenset(p.name for p in option_params),
            takes=Capabilities.of(list(params)), config=_make_config(name, fn, option_params, hints, class_name),
        )
        checked.spec = spec
        OPERATORS[name] = spec
        if backends:
            BACKENDS[name] = tuple(backends)
        return checked

    return decorator


def _drop_neutral(spec: OperatorSpec, accepted: frozenset[str], kwargs: dict) -> dict:
    """``kwargs`` without the call arguments the operator does not take; they must be at their neutral value."""
    kept = {}
    for key, value in kwargs.items():
        if key in accepted:
            kept[key] = value
        elif key in CALL_KINDS and value is CALL_KINDS[key][1]:
            continue
        else:
            raise spec.unsupported(key)
    return kept


def get_operator(name: str) -> OperatorSpec:
    """Look up an operator by registry name (``"neighborhood"``) or config class name (``"Neighborhood"``).

    Searches :data:`OPERATORS`, then :data:`EXTENSIONS` (``"ring"`` / ``"Ring"`` once :mod:`attnfuse.distributed`
    is imported).

    Raises:
        KeyError: listing the registered names if ``name`` is unknown.
    """
    spec = OPERATORS.get(name) or EXTENSIONS.get(name)
    if spec is not None:
        return spec
    for spec in (*OPERATORS.values(), *EXTENSIONS.values()):
        if spec.config is not None and spec.config.__name__ == name:
            return spec
    extensions = f"; other operators: {sorted(EXTENSIONS)}" if EXTENSIONS else \
        " (sequence-parallel 'ring' / 'ulysses' resolve once attnfuse.distributed is imported)"
    raise KeyError(f"unknown attention operator {name!r}; registered operators: {list_operators()}{extensions}")


def list_operators() -> list[str]:
    """Sorted names of the registered operators."""
    return sorted(OPERATORS)


def op_config(op: str | OpConfig, **options: Any) -> OpConfig:
    """An operator choice as its typed options: a name plus keyword options, or an :class:`OpConfig`.

    Args:
        op: a registry name (``"dense"``), a config class name (``"Dense"``) or an :class:`OpConfig`; names of
            :data:`EXTENSIONS` (``"ring"``, ``"Ulysses"``) too.
        **options: option values (legacy keyword form); with an :class:`OpConfig` they replace its fields.

    Raises:
        KeyError: unknown operator name.
        TypeError: ``op`` of another type, an unknown option, or a required option (no default) not given.

    Example:
        >>> op_config("neighborhood", kernel_size=7)
        Neighborhood(kernel_size=7, dilation=1, is_causal=False, stride=1, border='shift', scale=None, backend='auto')
    """
    if isinstance(op, OpConfig):
        if not options:
            return op
        op.spec.check_options(options)
        return dataclasses.replace(op, **options)
    if not isinstance(op, str):
        raise TypeError(f"op must be an operator name or an attnfuse.ops.OpConfig, got {type(op).__name__}")
    spec = get_operator(op)
    spec.check_options(options)
    missing = [n for n in spec.required_options if n not in options]
    if missing:
        cls = spec.config.__name__
        example = ", ".join(f"{n}=..." for n in missing)
        raise TypeError(
            f"operator {spec.name!r} needs option(s) {missing}, which have no default: pass op={cls}({example}) "
            f"(YAML: op: {{class_path: {spec.config.__module__}.{cls}, init_args: {{{', '.join(f'{n}: ...' for n in missing)}}}}})"
        )
    return spec.config(**options)
