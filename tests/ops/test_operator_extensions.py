"""Operators registered from above ``ops`` (``attnfuse.ops.EXTENSIONS``): lookup by name and class name, duplicates."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

from attnfuse.ops import EXTENSIONS, OPERATORS, Capabilities, OpConfig, OperatorSpec, get_operator, op_config, operator
from attnfuse.ops import dense_attention as _dense


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScratchExt(OpConfig):
    """Options of a scratch extension operator (tests only)."""

    name: ClassVar[str] = "test_only_ext"
    scale: float | None = None

    @property
    def spec(self) -> OperatorSpec:
        return EXTENSIONS["test_only_ext"]


def _fn(q, k, v, *, key_mask=None, scale=None):
    return _dense(q, k, v, key_mask=key_mask, scale=scale)


@pytest.fixture
def scratch():
    from attnfuse.ops import register_extension

    spec = OperatorSpec(name="test_only_ext", fn=_fn, options=frozenset({"scale"}), takes=Capabilities(key_mask=True),
                        config=ScratchExt)
    assert "test_only_ext" not in EXTENSIONS
    yield register_extension(spec)
    EXTENSIONS.pop("test_only_ext", None)


def test_extension_resolves_by_name_and_class_name(scratch):
    assert get_operator("test_only_ext") is scratch and get_operator("ScratchExt") is scratch
    assert op_config("test_only_ext", scale=0.5) == ScratchExt(scale=0.5) == op_config("ScratchExt", scale=0.5)
    with pytest.raises(TypeError, match=r"operator 'test_only_ext' got unknown option\(s\) \['nope'\]"):
        op_config("test_only_ext", nope=1)
    q = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(op_config("test_only_ext")(q, q, q), _dense(q, q, q))
    assert "test_only_ext" not in OPERATORS  # the registry-wide single-process tests do not see it


def test_extension_names_are_unique_across_both_registries(scratch):
    from attnfuse.ops import register_extension

    again = dataclasses.replace(scratch, fn=lambda q, k, v: q)  # another definition under the same name
    again.fn.__module__ = "elsewhere"
    with pytest.raises(ValueError, match="'test_only_ext' is already registered"):
        register_extension(again)
    with pytest.raises(ValueError, match="'dense' is already registered"):
        register_extension(dataclasses.replace(scratch, name="dense"))
    with pytest.raises(ValueError, match=r"config class name 'ScratchExt'.*taken by operator 'test_only_ext'"):
        register_extension(dataclasses.replace(scratch, name="test_only_ext2"))
    with pytest.raises(ValueError, match="needs config="):
        register_extension(dataclasses.replace(scratch, name="test_only_ext3", config=None))
    with pytest.raises(ValueError, match="'test_only_ext' is already registered"):
        operator("test_only_ext")(_fn)
    with pytest.raises(ValueError, match="config class name 'ScratchExt'"):
        operator("test_only_other", config_name="ScratchExt")(_fn)
    assert "test_only_other" not in OPERATORS
    assert register_extension(scratch) is scratch  # the same definition again (a module reload) is a no-op


def test_ops_alone_names_the_package_that_registers_ring():
    """``attnfuse.ops`` never imports ``attnfuse.distributed``: without it, the error says what to import."""
    code = ("import attnfuse.ops as o\ntry:\n    o.get_operator('ring')\nexcept KeyError as e:\n    print(e)\n"
            "import attnfuse.distributed\nprint(o.op_config('Ring'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "resolve once attnfuse.distributed is imported" in out
    assert "Ring(layout='contiguous'" in out
