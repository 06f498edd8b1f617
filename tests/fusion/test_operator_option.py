"""Typed operator options in the fusion modules: ``op: str | OpConfig``, no option dicts, and YAML / CLI parsing."""

import inspect
import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from attnfuse.fusion import BLOCKS, FUSIONS, EarlyFusion, ParameterFreeCrossAttention, TokenSet, get_fusion
from attnfuse.ops import OpConfig, op_config
from attnfuse.ops.configs import Combiner, Dense, Halo, SiluKernel

D = 16
DTYPE = torch.float64
NAMES = ("a", "b", "c")
#: every registered fusion that takes an attention operator
WITH_OP = sorted(name for name, cls in FUSIONS.items() if "op" in inspect.signature(cls).parameters)


def _build(name: str, **options):
    cls = get_fusion(name)
    params = inspect.signature(cls).parameters
    if "num_classes" in params and params["num_classes"].default is None:
        options.setdefault("num_classes", 3)
    torch.manual_seed(0)
    return cls(list(NAMES), D, dtype=DTYPE, **options).eval()


def _inputs(batch: int = 3, n: int = 5) -> dict[str, TokenSet]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in NAMES:
        mask = torch.rand(batch, n, generator=g) > 0.3
        mask[:, 0] = True
        out[name] = TokenSet(torch.randn(batch, n, D, generator=g, dtype=DTYPE), mask)
    return out


def test_every_fusion_with_an_operator_takes_op_and_no_option_dict():
    assert {"early", "late", "hierarchical", "latent", "cross", "coattention", "conditional", "axis", "layer",
            "parameter_free"} <= set(WITH_OP)
    for name, cls in {**FUSIONS, **BLOCKS}.items():
        params = inspect.signature(cls).parameters
        assert "op_options" not in params, name
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{name} swallows keyword arguments"
        if "op" in params:
            assert params["op"].annotation in ("str | OpConfig", str | OpConfig), (name, params["op"].annotation)
            assert params["op"].default in ("dense", "silu_kernel"), name


@pytest.mark.parametrize("name", WITH_OP)
def test_op_options_is_a_type_error(name):
    with pytest.raises(TypeError, match="op_options"):
        get_fusion(name)(["a", "b"], D, op_options={"backend": "reference"})


@pytest.mark.parametrize("name", WITH_OP)
def test_a_typed_config_builds_the_same_fusion_as_the_operator_name(name):
    default = inspect.signature(get_fusion(name)).parameters["op"].default
    by_name = _build(name)
    typed = _build(name, op=op_config(default, backend="reference"))
    inputs = _inputs()
    a, b = by_name(inputs).fused, typed(inputs).fused
    assert torch.equal(a.valid(), b.valid())
    torch.testing.assert_close(a.x, b.x)


def test_early_fusion_with_a_dense_config_equals_the_default():
    torch.manual_seed(0)
    default = EarlyFusion(["a", "b"], 16)
    torch.manual_seed(0)
    typed = EarlyFusion(["a", "b"], 16, op=Dense(backend="reference"))
    assert all(blk.attn.op == Dense(backend="reference") for blk in typed.encoder.blocks)
    inputs = {"a": TokenSet(torch.randn(2, 4, 16), torch.tensor([[True] * 4, [True, True, False, False]])),
              "b": TokenSet(torch.randn(2, 3, 16))}
    torch.testing.assert_close(typed(inputs).fused.x, default(inputs).fused.x, atol=1e-5, rtol=1e-4)


def test_scale_argument_replaces_the_configs_scale():
    co = get_fusion("coattention")(["a", "b"], D, heads=1, scale=1.0, op=Dense(backend="reference"))
    assert co.cross_a.op == co.cross_b.op == Dense(scale=1.0, backend="reference")
    axis = get_fusion("axis")(["a"], D, heads=2, block="attention", scale=0.5, op="dense")
    assert axis.attn.op == Dense(scale=0.5)


def test_parameter_free_holds_a_typed_config_and_owns_drop_ratio():
    names = ["text", "visual"]
    fuse = ParameterFreeCrossAttention(names, D, drop_ratio=0.2, op=SiluKernel(backend="reference"))
    assert fuse.op == SiluKernel(drop_ratio=0.2, backend="reference")
    assert ParameterFreeCrossAttention(names, D).op == SiluKernel(drop_ratio=0.1)  # the method's default gamma
    # drop_ratio is its own argument: it replaces the config's value
    assert ParameterFreeCrossAttention(names, D, drop_ratio=0.0, op=SiluKernel(drop_ratio=0.3)).op == SiluKernel()
    softmax = ParameterFreeCrossAttention(names, D, drop_ratio=0.0, op=Dense(backend="reference"))
    assert softmax.op == Dense(backend="reference")  # Dense has no drop_ratio field
    with pytest.raises(ValueError, match="takes no drop_ratio"):
        ParameterFreeCrossAttention(names, D, drop_ratio=0.1, op=Dense())
    with pytest.raises(ValueError, match="no cross-attention"):
        ParameterFreeCrossAttention(names, D, drop_ratio=0.0, op=Combiner())
    with pytest.raises(TypeError, match="op_options"):
        ParameterFreeCrossAttention(names, D, op_options={"backend": "reference"})


def test_parameter_free_key_padding_is_a_key_mask():
    """Padded context tokens (key mask) are the same as leaving them out, for both operators."""
    g = torch.Generator().manual_seed(1)
    text, visual = torch.randn(2, 4, D, generator=g), torch.randn(2, 6, D, generator=g)
    keep = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    for op, ratio in ((SiluKernel(backend="reference"), 0.2), (Dense(backend="reference"), 0.0)):
        fuse = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=ratio, op=op)
        out = fuse({"text": TokenSet(text), "visual": TokenSet(visual, keep)}).fused.x
        alone = fuse({"text": TokenSet(text[:1]), "visual": TokenSet(visual[:1, keep[0]])}).fused.x
        torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(out[1]) == 0, "a sample without context tokens gets Fuse = 0"


# ---- YAML / CLI: jsonargparse builds the configs ------------------------------------------------------------------
jsonargparse = pytest.importorskip("jsonargparse")


@pytest.mark.parametrize(
    ("op", "want"),
    [
        ("dense", "dense"),
        ({"class_path": "Dense", "init_args": {"backend": "reference"}}, Dense(backend="reference")),
        ({"class_path": "attnfuse.ops.configs.SiluKernel", "init_args": {"drop_ratio": 0.1}}, SiluKernel(drop_ratio=0.1)),
        ({"class_path": "Combiner", "init_args": {"mode": "logsparse"}}, Combiner(mode="logsparse")),
        # halo is a grid operator: on a (B, N, D) token set it attends over a 1-D grid of the tokens
        ({"class_path": "Halo", "init_args": {"block_size": 2, "halo_size": 1}}, Halo(block_size=2, halo_size=1)),
    ],
)
def test_jsonargparse_builds_a_fusion_with_a_typed_operator(op, want):
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EarlyFusion, "fusion")
    cfg = parser.parse_object({"fusion": {"sources": ["a", "b"], "dim": D, "heads": 2, "depth": 1, "op": op}})
    fusion = parser.instantiate(cfg).fusion
    assert fusion.encoder.blocks[0].attn.op == op_config(want)
    out = fusion({"a": TokenSet(torch.randn(2, 5, D)), "b": TokenSet(torch.randn(2, 6, D), torch.rand(2, 6) > 0.3)})
    assert out.fused.x.shape == (2, 12, D)
    out.fused.x.sum().backward()


def _print_config(*args: str) -> str:
    from attnfuse.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as done:
        main(["fit", "--model.fusion", "early", *args, "--print_config"])
    assert done.value.code in (0, None)
    return buf.getvalue()


def test_cli_takes_the_operator_by_name_and_as_a_typed_config():
    yaml = pytest.importorskip("yaml")
    printed = yaml.safe_load(_print_config("--model.fusion.op", "Dense"))
    assert printed["model"]["fusion"]["init_args"]["op"] == "Dense"
    halo = json.dumps({"class_path": "Halo", "init_args": {"block_size": 2, "halo_size": 1}})
    printed = yaml.safe_load(_print_config("--model.fusion.init_args.op", halo))
    op = printed["model"]["fusion"]["init_args"]["op"]
    assert op["class_path"] == "attnfuse.ops.configs.Halo"
    assert op["init_args"] == {"block_size": 2, "halo_size": 1, "scale": None, "backend": "auto"}
    printed = yaml.safe_load(_print_config("--model.fusion.op", "Dense", "--model.fusion.op.backend", "reference"))
    assert printed["model"]["fusion"]["init_args"]["op"]["init_args"]["backend"] == "reference"


def test_fit_config_with_a_typed_operator_trains(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    from attnfuse.cli import main

    cfg = {
        "seed_everything": 0,
        "data": {"dataset": "synthetic", "options": {"num_rows": 120}, "batch_size": 32},
        "model": {"dim": 16, "fusion": {"class_path": "early", "init_args": {
            "depth": 1, "op": {"class_path": "Halo", "init_args": {"block_size": 2, "halo_size": 1}}}}},
        "trainer": {"max_steps": 2, "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path)},
        "test_after_fit": False,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 0, capsys.readouterr().err[-3000:]
    assert next((tmp_path / "lightning_logs").glob("version_0/checkpoints/*.ckpt"), None) is not None
