"""The operator registry: names, lookup errors, duplicates, option checks, use from nn.Attention."""

from __future__ import annotations

import pytest
import torch

from attnfuse import ops
from attnfuse.nn import Attention
from attnfuse.ops import OPERATORS, OperatorSpec, get_operator, list_operators, register_operator


@pytest.fixture
def scratch_name():
    """A registry name that is removed again after the test."""
    name = "test_only_scaled_dense"
    assert name not in OPERATORS
    yield name
    OPERATORS.pop(name, None)


def test_dense_is_registered():
    assert "dense" in list_operators()
    spec = get_operator("dense")
    assert spec.fn is ops.dense_attention
    assert spec.layout == "sequence" and spec.cross
    assert spec.options == frozenset({"scale", "backend"})
    assert list_operators() == sorted(list_operators())


def test_unknown_operator_lists_the_registered_names():
    with pytest.raises(KeyError, match=r"unknown attention operator 'nope'; registered operators: \[.*'dense'.*\]"):
        get_operator("nope")


def test_duplicate_registration_raises_and_keeps_the_first():
    with pytest.raises(ValueError, match=r"operator 'dense' is already registered \(by attnfuse.ops.dense\)"):

        @register_operator("dense")
        def other(q, k, v, *, mask=None):  # pragma: no cover - never called
            return q

    assert get_operator("dense").fn is ops.dense_attention


def test_check_options_rejects_unknown_names():
    spec = get_operator("dense")
    spec.check_options({"scale": 0.5, "backend": "reference"})
    spec.check_options({})
    with pytest.raises(TypeError, match=r"operator 'dense' got unknown option\(s\) \['kernel_size'\]; it accepts \['backend', 'scale'\]"):
        spec.check_options({"kernel_size": 3})
    bare = OperatorSpec(name="bare", fn=lambda q, k, v: q)
    with pytest.raises(TypeError, match="it accepts no options"):
        bare.check_options({"scale": 1.0})


def test_registered_operator_is_used_by_attention_module(scratch_name):
    calls = []

    @register_operator(scratch_name)
    def scaled_dense(q, k, v, *, temperature: float = 1.0, mask=None, bias=None, is_causal=False, return_weights=False):
        calls.append(temperature)
        return ops.dense_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal, scale=1.0 / temperature,
                                   return_weights=return_weights)

    spec = get_operator(scratch_name)
    assert spec.options == frozenset({"temperature"})
    torch.manual_seed(0)
    attn = Attention(16, 2, op=scratch_name, temperature=2.0)
    x = torch.randn(2, 5, 16)
    out = attn(x, mask=torch.ones(2, 5, dtype=torch.bool))
    assert calls == [2.0]
    # same parameters, dense operator with the equivalent scale -> same output
    ref = Attention(16, 2, op="dense", scale=0.5)
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(out, ref(x, mask=torch.ones(2, 5, dtype=torch.bool)))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['scale'\]; it accepts \['temperature'\]"):
        Attention(16, 2, op=scratch_name, scale=1.0)


def test_unknown_operator_in_attention_module():
    with pytest.raises(KeyError, match="registered operators"):
        Attention(16, 2, op="nope")
