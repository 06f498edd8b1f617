"""The operator registry: one declaration per operator, lookup errors, duplicates, options, configs, use from nn.Attention."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re
from pathlib import Path

import pytest
import torch

from attnfuse import ops
from attnfuse.nn import Attention
from attnfuse.ops import OPERATORS, OpConfig, OperatorSpec, get_operator, list_operators, op_config, operator
from attnfuse.ops.backends import BACKENDS, Backend, list_backends

BUILTIN = sorted(n for n in OPERATORS if not n.startswith("test_"))


@pytest.fixture
def scratch_name():
    """A registry name that is removed again after the test."""
    name = "test_only_scaled_dense"
    assert name not in OPERATORS
    yield name
    OPERATORS.pop(name, None)
    BACKENDS.pop(name, None)


def test_dense_is_registered():
    assert "dense" in list_operators()
    spec = get_operator("dense")
    assert spec.fn is ops.dense_attention and ops.dense_attention.spec is spec
    assert spec.layout == "sequence" and spec.cross
    assert spec.options == frozenset({"scale", "is_causal", "backend"})
    assert list_operators() == sorted(list_operators())


@pytest.mark.parametrize("name", BUILTIN)
def test_one_declaration_gives_backends_spec_and_config(name):
    spec = OPERATORS[name]
    assert list_backends(name) == [b.name for b in spec.backends] and spec.backends is BACKENDS[name]
    assert spec.fn.spec is spec
    assert get_operator(spec.config.__name__) is spec  # the class name resolves too ("Neighborhood")
    # the config's fields are exactly the operator's options, with its types and defaults
    params = inspect.signature(spec.fn).parameters
    fields = {f.name: f for f in dataclasses.fields(spec.config)}
    assert set(fields) == spec.options
    for f in fields.values():
        default = params[f.name].default
        assert (f.default is dataclasses.MISSING) == (default is inspect.Parameter.empty), f.name
        if default is not inspect.Parameter.empty:
            assert f.default == default
    assert spec.config.name == name and issubclass(spec.config, OpConfig)
    assert spec.config.__module__ == "attnfuse.ops.configs"


def test_configs_are_importable_by_class_path():
    import attnfuse.ops.configs as configs

    for name in BUILTIN:
        cls = OPERATORS[name].config
        assert getattr(configs, cls.__name__) is cls and cls.__name__ in configs.__all__
    from attnfuse.ops.configs import Combiner, Dense, Neighborhood, SiluKernel  # noqa: F401

    cfg = Neighborhood(kernel_size=7)
    assert cfg.name == "neighborhood"
    assert cfg.options() == {
        "kernel_size": 7, "dilation": 1, "is_causal": False, "stride": 1, "border": "shift", "scale": None, "backend": "auto",
    }
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kernel_size = 3
    with pytest.raises(TypeError, match="kernel_size"):
        Neighborhood()
    with pytest.raises(AttributeError, match="operator configs"):
        configs.Nope  # noqa: B018


def test_config_runs_its_operator():
    from attnfuse.ops.configs import Dense

    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    key_mask = torch.rand(2, 5) > 0.3
    cfg = Dense(scale=0.5, backend="reference")
    torch.testing.assert_close(cfg(q, k, v, key_mask=key_mask), ops.dense_attention(q, k, v, key_mask=key_mask, scale=0.5))


def test_op_config_from_names_and_configs():
    from attnfuse.ops.configs import Axial, Dense

    assert op_config("dense") == Dense()
    assert op_config("Dense", backend="reference") == Dense(backend="reference")
    assert op_config(Dense(scale=2.0), backend="sdpa") == Dense(scale=2.0, backend="sdpa")
    with pytest.raises(TypeError, match=r"operator 'axial' needs option\(s\) \['axis'\].*op=Axial\(axis=\.\.\.\).*class_path: "
                                        r"attnfuse\.ops\.configs\.Axial"):
        op_config("axial")
    assert op_config("axial", axis=1) == Axial(axis=1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['kernel_size'\]"):
        op_config(Dense(), kernel_size=3)
    with pytest.raises(TypeError, match=r"operator name or an attnfuse\.ops\.OpConfig"):
        op_config(3)


def test_unknown_operator_lists_the_registered_names():
    with pytest.raises(KeyError, match=r"unknown attention operator 'nope'; registered operators: \[.*'dense'.*\]"):
        get_operator("nope")


def test_duplicate_registration_raises_and_keeps_the_first():
    with pytest.raises(ValueError, match=r"operator 'dense' is already registered \(by attnfuse.ops.dense\)"):

        @operator("dense")
        def other(q, k, v, *, key_mask=None):  # pragma: no cover - never called
            return q

    assert get_operator("dense").fn is ops.dense_attention


def test_duplicate_config_or_backend_names_raise(scratch_name):
    with pytest.raises(ValueError, match="config class name 'Dense'"):

        @operator(scratch_name, config_name="Dense")
        def a(q, k, v):  # pragma: no cover - never called
            return q

    with pytest.raises(ValueError, match="backend names"):

        @operator(scratch_name, backends=(Backend("x", None), Backend("x", None)))
        def b(q, k, v):  # pragma: no cover - never called
            return q

    assert scratch_name not in OPERATORS


def test_check_options_rejects_unknown_names():
    spec = get_operator("dense")
    spec.check_options({"scale": 0.5, "backend": "reference"})
    spec.check_options({})
    with pytest.raises(TypeError, match=r"operator 'dense' got unknown option\(s\) \['kernel_size'\]; it accepts \['backend', "
                                        r"'is_causal', 'scale'\]"):
        spec.check_options({"kernel_size": 3})
    bare = OperatorSpec(name="bare", fn=lambda q, k, v: q)
    with pytest.raises(TypeError, match="it accepts no options"):
        bare.check_options({"scale": 1.0})


def test_registered_operator_is_used_by_attention_module(scratch_name):
    calls = []

    @operator(scratch_name)
    def scaled_dense(q, k, v, *, temperature: float = 1.0, key_mask=None, bias=None, is_causal=False, return_weights=False):
        calls.append(temperature)
        return ops.dense_attention(q, k, v, key_mask=key_mask, bias=bias, is_causal=is_causal, scale=1.0 / temperature,
                                   return_weights=return_weights)

    spec = get_operator(scratch_name)
    assert spec.options == frozenset({"temperature", "is_causal"})
    assert list_backends(scratch_name) == []
    cfg_cls = spec.config
    assert cfg_cls.__name__ == "TestOnlyScaledDense" and cfg_cls(temperature=2.0).options() == {"temperature": 2.0, "is_causal": False}
    import attnfuse.ops.configs as configs

    assert configs.TestOnlyScaledDense is cfg_cls  # registered after the module was imported: still resolves
    torch.manual_seed(0)
    attn = Attention(16, 2, op=cfg_cls(temperature=2.0))
    x = torch.randn(2, 5, 16)
    out = attn(x, mask=torch.ones(2, 5, dtype=torch.bool))
    assert calls == [2.0]
    # same parameters, dense operator with the equivalent scale -> same output
    ref = Attention(16, 2, op="dense", scale=0.5)
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(out, ref(x, mask=torch.ones(2, 5, dtype=torch.bool)))
    legacy = Attention(16, 2, op=scratch_name, temperature=2.0)  # legacy keyword form
    assert legacy.op == cfg_cls(temperature=2.0) and legacy.op_kwargs == {"temperature": 2.0}
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['scale'\]; it accepts \['is_causal', 'temperature'\]"):
        Attention(16, 2, op=scratch_name, scale=1.0)


def test_unknown_operator_in_attention_module():
    with pytest.raises(KeyError, match="registered operators"):
        Attention(16, 2, op="nope")


DOCS = Path(__file__).resolve().parents[2] / "docs" / "ops.md"


def _table_rows() -> dict[str, list[str]]:
    text = DOCS.read_text()
    table = text.split("<!-- operator-table -->")[1].split("<!-- /operator-table -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    return {row[0].strip("`"): row for row in rows}


def test_docs_table_matches_the_registry():
    rows = _table_rows()
    assert sorted(rows) == BUILTIN, "docs/ops.md: one table row per registered operator"
    for name in BUILTIN:
        spec = OPERATORS[name]
        _, fn, layout, cross, key_mask, pair_mask, bias, causal, weights, lse, backends, options = rows[name]
        assert fn == f"`{spec.fn.__name__}`" and layout == spec.layout and (cross == "yes") == spec.cross, name
        for cell, taken in ((key_mask, spec.takes.key_mask), (pair_mask, spec.takes.pair_mask), (bias, spec.takes.bias),
                            (causal, spec.takes.causal), (weights, spec.takes.weights), (lse, spec.takes.lse)):
            assert (cell != "—") == taken, f"{name}: {cell!r} but the operator {'takes' if taken else 'does not take'} it"
        assert backends == ", ".join(f"`{b}`" for b in list_backends(name)), name
        fields = ", ".join(f"**{f.name}**" if f.name in spec.required_options else f.name for f in dataclasses.fields(spec.config))
        assert options == f"`{spec.config.__name__}({fields})`", name


def test_docs_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 5
    before = set(OPERATORS)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/ops.md block {i}", "exec"), {})
    finally:
        for name in set(OPERATORS) - before:  # operators the examples declare
            OPERATORS.pop(name)
            BACKENDS.pop(name, None)
