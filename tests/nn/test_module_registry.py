"""Every registered nn module: forward finite, gradients reach every trainable parameter, compile and export.

Registry-wide by construction (a module registered with ``register_module`` is tested here without a line
of its own), so the registry keeps its promise.
"""

from __future__ import annotations

import pytest
import torch

import attnfuse.nn  # noqa: F401  (fills the registry)
from attnfuse.nn._registry import GROUPS, MODULES, get_module, list_modules, register_module

NAMES = sorted(MODULES)


def _outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _outputs(r)]
    if isinstance(result, dict):
        return [t for r in result.values() for t in _outputs(r)]
    return [t for t in vars(result).values() if isinstance(t, torch.Tensor)] if hasattr(result, "__dict__") else []


def _example(name: str):
    torch.manual_seed(0)
    module, args = MODULES[name].example()
    assert isinstance(args, tuple), f"{name}: example() must return (module, tuple_of_args)"
    return module, args


def test_registry_is_not_empty_and_sorted():
    assert list_modules() == sorted(MODULES)
    for spec in MODULES.values():
        assert spec.group in GROUPS


def test_lookup_errors_and_duplicates():
    with pytest.raises(KeyError, match="unknown module"):
        get_module("no_such_module_xyz")
    if NAMES:
        spec = MODULES[NAMES[0]]
        assert get_module(spec.cls.__name__) is spec
        with pytest.raises(ValueError, match="already registered"):
            register_module(NAMES[0], group=spec.group, example=spec.example)(spec.cls)
    with pytest.raises(ValueError, match="group"):
        register_module("x", group="nope", example=lambda: None)


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_finite_and_gradients_reach_every_parameter(name):
    module, args = _example(name)
    module.train()
    with torch.no_grad():  # perturb: zero-initialised branches must not hide parameters that get no gradient
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    outs = _outputs(module(*args))
    assert outs, f"{name}: forward returned no tensor"
    for out in outs:
        if out.is_floating_point():
            assert torch.isfinite(out).all(), f"{name}: non-finite output"
    loss = sum((o.float() ** 2).mean() + o.float().mean() for o in outs if o.is_floating_point() and o.requires_grad)
    loss.backward()
    dead = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"{name}: parameters with no / zero gradient on a random batch: {dead}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compile_matches_eager_and_exports(name):
    module, args = _example(name)
    module.eval()
    with torch.no_grad():
        want = _outputs(module(*args))
        torch._dynamo.reset()
        got = _outputs(torch.compile(module, backend="aot_eager")(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(module, args, strict=False)
    again = _outputs(exported.module()(*args))
    for g, w in zip(again, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_cli_lists_and_describes_every_module(capsys):
    from attnfuse.cli import main

    assert main(["list"]) == 0
    listed = capsys.readouterr().out.split("modules (", 1)[1]
    for name in NAMES:
        assert name in listed, f"attnfuse list does not show module {name!r}"
        assert main(["describe", name]) == 0
        assert MODULES[name].cls.__name__ in capsys.readouterr().out
