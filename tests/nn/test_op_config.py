"""Typed operator options in the nn modules: ``op: str | OpConfig``, the legacy keyword form, pair masks, and YAML (jsonargparse)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from attnfuse.nn import Attention, Encoder, FactorizedEncoder, TransformerBlock
from attnfuse.ops import OpConfig
from attnfuse.ops.configs import Axial, Dense, Halo, Neighborhood, Routing
from attnfuse.tokens import TokenSet

F64 = torch.float64


def test_name_config_and_legacy_keywords_build_the_same_module():
    torch.manual_seed(0)
    a = Attention(16, 2, op=Dense(scale=0.5, backend="reference")).double()
    b = Attention(16, 2, op="dense", scale=0.5, backend="reference").double()  # legacy keyword form
    c = Attention(16, 2, op="Dense", scale=0.5, backend="reference").double()  # the class name works as a name
    d = Attention(16, 2, op=Dense(scale=2.0), scale=0.5, backend="reference").double()  # keywords override fields
    assert a.op == b.op == c.op == d.op == Dense(scale=0.5, backend="reference")
    assert b.op_kwargs == {"scale": 0.5, "backend": "reference"} and a.op_kwargs == {}
    x = torch.randn(2, 5, 16, dtype=F64)
    for m in (b, c, d):
        m.load_state_dict(a.state_dict())
        torch.testing.assert_close(m(x), a(x))
    assert "op=Dense(" in repr(a)


def test_required_options_without_defaults_are_a_clear_error():
    with pytest.raises(TypeError, match=r"'neighborhood' needs option\(s\) \['kernel_size'\].*op=Neighborhood\(kernel_size=\.\.\.\)"):
        Attention(8, 2, op="neighborhood")
    with pytest.raises(TypeError, match=r"operator 'halo' needs option\(s\) \['block_size', 'halo_size'\]"):
        TransformerBlock(8, 2, op="halo")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['kernel'\]"):
        Attention(8, 2, op=Neighborhood(kernel_size=3), kernel=3)
    with pytest.raises(TypeError, match=r"operator name or an attnfuse\.ops\.OpConfig"):
        Attention(8, 2, op=3)


def test_blocks_and_encoders_take_configs_and_legacy_option_dicts():
    block = TransformerBlock(16, 2, op=Dense(scale=0.5), op_options={"backend": "reference"}, cross_attention=True)
    assert block.attn.op == block.cross.op == Dense(scale=0.5, backend="reference")
    enc = Encoder(16, depth=2, heads=2, op=Neighborhood(kernel_size=3, backend="reference"))
    assert all(b.attn.op == Neighborhood(kernel_size=3, backend="reference") for b in enc.blocks)
    x = torch.randn(2, 6, 5, 16)
    assert enc(x, mask=torch.rand(2, 6, 5) > 0.2).shape == x.shape
    legacy = Encoder(16, depth=1, heads=2, op="neighborhood", op_options={"kernel_size": 3, "backend": "reference"})
    assert legacy.blocks[0].attn.op == Neighborhood(kernel_size=3, backend="reference")


def test_config_causal_flag_equals_the_call_flag():
    torch.manual_seed(0)
    a = Attention(8, 2, op=Dense(is_causal=True))
    b = Attention(8, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False, True, True, True, True], [True] * 5])
    torch.testing.assert_close(a(x, mask=mask), b(x, mask=mask, is_causal=True))
    assert torch.equal(a(x, mask=mask)[0, 0], torch.zeros(8)), "query 0 sees only a padded key"


def test_factorized_encoder_takes_the_axial_config():
    torch.manual_seed(0)
    a = FactorizedEncoder(8, 2, axes=("time", "space"), depth=2, op=Axial(axis=0, backend="reference"))
    b = FactorizedEncoder(8, 2, axes=("time", "space"), depth=2, op_options={"backend": "reference"})
    assert [blk.attn.op for blk in a.blocks] == [Axial(axis=0, backend="reference"), Axial(axis=1, backend="reference")]
    assert [blk.attn.op for blk in b.blocks] == [blk.attn.op for blk in a.blocks]
    b.load_state_dict(a.state_dict())
    ts = TokenSet(torch.randn(2, 4, 3, 8), torch.rand(2, 4, 3) > 0.2, ("time", "space"))
    torch.testing.assert_close(a(ts).x, b(ts).x)
    with pytest.raises(ValueError, match="'axial' operator, got 'dense'"):
        FactorizedEncoder(8, 2, depth=2, op="dense")


def test_pair_mask_reaches_operators_that_take_one():
    torch.manual_seed(0)
    attn = Attention(8, 2, op=Dense(backend="reference")).double()
    x = torch.randn(2, 4, 8, dtype=F64)
    pairs = torch.rand(2, 1, 4, 4) > 0.4
    pairs[0, :, 1] = False  # query 1 of sample 0: no allowed key
    key_mask = torch.tensor([[True, True, True, False], [True] * 4])
    out = attn(x, mask=key_mask, pair_mask=pairs)
    q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    allowed = pairs & key_mask[:, None, None, :]
    w = torch.softmax((q @ k.transpose(-1, -2) / 2.0).masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    want = attn.proj((w @ v).transpose(1, 2).reshape(2, 4, 8)) * allowed.any(-1).any(1)[..., None]
    torch.testing.assert_close(out, want)
    assert torch.equal(out[0, 1], torch.zeros(8, dtype=F64)), "a query without an allowed pair gets a zero update"


@pytest.mark.parametrize(
    ("op", "kwargs", "match"),
    [
        (Halo(block_size=2, halo_size=1), {"pair_mask": torch.ones(1, 1, 16, 16, dtype=torch.bool)}, r"'halo' .*pair mask \(mask=\)"),
        (Routing(regions=2, topk=1), {"bias": torch.zeros(1, 1, 16, 16)}, r"'routing' .*score bias \(bias=\)"),
        (Halo(block_size=2, halo_size=1), {"is_causal": True}, r"'halo' .*causal flag \(is_causal=\)"),
    ],
)
def test_arguments_an_operator_does_not_take_raise_naming_it(op, kwargs, match):
    attn = Attention(8, 2, op=op)
    with pytest.raises(TypeError, match=match + r"; it takes key_mask="):
        attn(torch.randn(1, 4, 4, 8), **kwargs)


# ---- YAML / CLI: jsonargparse builds the configs ------------------------------------------------------------------
jsonargparse = pytest.importorskip("jsonargparse")


def _parser():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--op", type=str | OpConfig, default="dense")
    return parser


def test_jsonargparse_accepts_names_and_class_paths():
    parser = _parser()
    init = parser.instantiate(parser.parse_args([]))
    assert init.op == "dense"
    init = parser.instantiate(parser.parse_args(["--op=Neighborhood"]))  # short form: the name, default options
    assert init.op == "Neighborhood"
    with pytest.raises(TypeError, match="needs option"):
        Attention(8, 2, op=init.op)
    value = json.dumps({"class_path": "attnfuse.ops.configs.Neighborhood", "init_args": {"kernel_size": 7, "dilation": [1, 2]}})
    init = parser.instantiate(parser.parse_args([f"--op={value}"]))
    assert init.op == Neighborhood(kernel_size=7, dilation=(1, 2))
    init = parser.instantiate(parser.parse_args(["--op=Neighborhood", "--op.kernel_size=5"]))
    assert init.op == Neighborhood(kernel_size=5)
    assert Attention(8, 2, op=init.op).op == Neighborhood(kernel_size=5)


def test_jsonargparse_print_config_shows_the_fields(tmp_path):
    cfg = tmp_path / "op.yaml"
    cfg.write_text("op:\n  class_path: attnfuse.ops.configs.Neighborhood\n  init_args:\n    kernel_size: 7\n")
    parser = _parser()
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit):
        parser.parse_args([f"--config={cfg}", "--print_config"])
    printed = buf.getvalue()
    assert "class_path: attnfuse.ops.configs.Neighborhood" in printed
    for line in ("kernel_size: 7", "dilation: 1", "is_causal: false", "backend: auto"):
        assert line in printed, printed
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit):
        parser.parse_args(["--op.help", "Neighborhood"])
    help_text = buf.getvalue()
    assert "--op.kernel_size" in help_text and "(required, type: int | tuple[int, ...])" in " ".join(help_text.split())
    assert "default: auto" in help_text and "window size" in help_text  # types, defaults and the operator's own docs


def test_jsonargparse_builds_a_block_from_yaml(tmp_path):
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TransformerBlock, "block")
    cfg = parser.parse_object(
        {"block": {"dim": 16, "heads": 2, "op": {"class_path": "Halo", "init_args": {"block_size": 2, "halo_size": 1}}}}
    )
    block = parser.instantiate(cfg).block
    assert block.attn.op == Halo(block_size=2, halo_size=1)
    x = torch.randn(2, 4, 6, 16)
    assert block(x).shape == x.shape
