"""A registry is a promise: every name ``attnfuse list`` prints works by name everywhere the listing advertises it.

Registry-wide by construction: every case is parametrised over the registries (``OPERATORS``, ``FUSIONS``,
``MODULES``, ``TASKS``, ``DATASETS``, and the sequence-parallel names ``nn.Attention`` resolves), never over
hand-picked names. The headers of ``attnfuse list`` are the promises checked here:

* ``operators (nn.Attention(op=NAME), fusion option op: NAME)``: every operator builds and trains in
  ``nn.Attention``, ``TransformerBlock``, ``Encoder``, every module and every fusion that takes ``op``, and in
  a fit config (``model.fusion.init_args.op``), by name or by its typed options; where it cannot (no
  cross-attention, options without defaults, a geometry it cannot tile) the error is a ``ValueError`` /
  ``TypeError`` that names the operator or the option, never a ``KeyError`` / ``RuntimeError`` from inside;
* ``fusions (model.fusion: NAME ...)`` / ``modules (...get_module(NAME).cls ...)`` / tasks / datasets:
  listed exactly as registered, and ``attnfuse describe NAME`` works for each.

A known gap is marked ``xfail(strict=True, reason=...)``: the suite stays green, and the marker must go
when the gap is fixed (a strict xfail that passes fails the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import re
from unittest import mock

import pytest
import torch
from tests.nn.test_operator_registry_smoke import MINIMAL_OPTIONS

from attnfuse.distributed import SEQUENCE_PARALLEL
from attnfuse.fusion import BLOCKS, FUSIONS, TokenSet
from attnfuse.nn import MODULES, Attention, Encoder, TransformerBlock
from attnfuse.ops import OPERATORS, OpConfig, op_config

#: registered operators (a test's scratch operator left in the registry is not one)
OPS = sorted(n for n in OPERATORS if not n.startswith("test_"))
#: names nn.Attention resolves besides OPERATORS (attnfuse.distributed: ring / ulysses)
SEQ_PARALLEL = sorted(SEQUENCE_PARALLEL)
#: options that fit a token *sequence* (a 1-D grid); MINIMAL_OPTIONS is written for a 2-D grid
#: (``axial`` axis=1), ``axis=-1`` is the last grid axis on any grid
SEQUENCE_OVERRIDES = {"axial": {"axis": -1}}
#: fusions and modules whose constructor takes an attention operator ``op``
FUSIONS_WITH_OP = sorted(n for n, cls in FUSIONS.items() if "op" in inspect.signature(cls).parameters)
MODULES_WITH_OP = sorted(n for n, s in MODULES.items() if "op" in inspect.signature(s.cls).parameters)
#: tiny sizes for every fusion option of these names it has
TINY_FUSION = {"heads": 2, "depth": 1, "per_source_depth": 1, "cross_depth": 1, "node_depth": 1, "mlp_ratio": 1.0}
D = 8

def _spec_options(name: str) -> dict:
    return {**MINIMAL_OPTIONS.get(name, {}), **SEQUENCE_OVERRIDES.get(name, {})}


def _choice(name: str) -> str | OpConfig:
    """How a config names the operator: the bare name when every option has a default, else its typed options
    (always typed for ring / ulysses: their names are checked on their own, in
    test_sequence_parallel_names_work_wherever_nn_attention_takes_them)."""
    if name in SEQUENCE_PARALLEL:
        return SEQUENCE_PARALLEL[name]()
    spec = OPERATORS[name]
    return spec.config(**_spec_options(name)) if spec.required_options else name


def _option_names(name: str) -> set[str]:
    cls = OPERATORS[name].config if name in OPERATORS else SEQUENCE_PARALLEL[name]
    return {f.name for f in dataclasses.fields(cls)}


def _assert_documented(err: BaseException, name: str) -> None:
    """A refusal is a ValueError / TypeError naming the operator or one of its options (not an internal failure)."""
    msg = str(err)
    assert isinstance(err, ValueError | TypeError), f"{name}: {type(err).__name__}: {msg}"
    assert name in msg or any(re.search(rf"\b{o}\b", msg) for o in _option_names(name)), f"{name}: {msg}"
    if "cross-attention" in msg:
        assert not (name in OPERATORS and OPERATORS[name].cross), f"{name} declares cross=True but was refused: {msg}"


def _backward_finite(outs: list[torch.Tensor], leaves: list[torch.Tensor]) -> None:
    outs = [o for o in outs if o.is_floating_point()]
    assert outs and all(torch.isfinite(o).all() for o in outs)
    sum(o.float().square().mean() for o in outs if o.requires_grad).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


# ---- attnfuse list / describe -----------------------------------------------------------------------------------


def _run_cli(*argv: str) -> tuple[int, str, str]:
    from attnfuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _listing() -> dict[str, set[str]]:
    """``attnfuse list`` as {section header word: names}; group lines of the modules section are unwrapped."""
    code, out, _ = _run_cli("list")
    assert code == 0
    sections: dict[str, set[str]] = {}
    current = None
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.split(" ", 1)[0]
            sections[current] = set()
        elif current == "modules":
            rest = line[2 + 16 + 1:] if not line[2:3].isspace() else line  # "  <group>  name, name" or a wrapped line
            sections[current] |= {n.strip() for n in rest.split(",") if n.strip()}
        else:
            sections[current].add(line.split()[0])
    return sections


def _registries() -> dict[str, set[str]]:
    from attnfuse.data import DATASETS
    from attnfuse.train.tasks import TASKS

    # keys: the first word of each `attnfuse list` header ("fusion building blocks ..." -> "fusion"); the
    # sequence-parallel names are listed with the operators (the header's promise: nn.Attention(op=NAME) takes them)
    return {"operators": set(OPS) | set(SEQ_PARALLEL), "fusions": set(FUSIONS), "fusion": set(BLOCKS), "modules": set(MODULES),
            "tasks": set(TASKS), "datasets": set(DATASETS)}


def test_list_shows_every_registry_exactly():
    listed, registered = _listing(), _registries()
    assert set(listed) == set(registered), f"sections of attnfuse list: {sorted(listed)}"
    for section, names in registered.items():
        assert listed[section] == names, f"{section}: listed {sorted(listed[section] ^ names)} differ from the registry"


def test_no_name_is_in_two_registries():
    """``attnfuse describe NAME`` and the short names of a config are ambiguous otherwise."""
    seen: dict[str, str] = {}
    for section, names in _registries().items():
        for name in names:
            assert name not in seen, f"{name!r} is both in {seen[name]} and in {section}"
            seen[name] = section


ALL_LISTED = sorted({(s, n) for s, names in _registries().items() for n in names})


@pytest.mark.parametrize(("section", "name"), ALL_LISTED, ids=[f"{s}-{n}" for s, n in ALL_LISTED])
def test_describe_every_listed_name(section, name):
    code, out, err = _run_cli("describe", name)
    assert code == 0 and not err, err
    assert out.startswith(name), out[:200]
    assert len(out.splitlines()) >= 3, f"describe {name}: no documentation\n{out}"
    if section == "datasets":  # the header promises: "`attnfuse describe NAME` shows options"
        assert "options:" in out, out


def test_every_listed_name_is_documented():
    """Each operator, fusion, building block and module appears in docs/ (by its class or function name)."""
    from pathlib import Path

    docs = "\n".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
    named = {**{n: OPERATORS[n].fn.__name__ for n in OPS}, **{n: c.__name__ for n, c in {**FUSIONS, **BLOCKS}.items()},
             **{n: s.cls.__name__ for n, s in MODULES.items()}}
    missing = sorted(n for n, obj in named.items() if not re.search(rf"\b{obj}\b", docs))
    assert not missing, f"not mentioned in docs/*.md: {missing}"


@pytest.mark.parametrize("name", SEQ_PARALLEL)
def test_names_nn_attention_resolves_are_listed_and_described(name):
    Attention(D, 2, op=name)  # accepted by nn.Attention (the header "operators (nn.Attention(op=NAME) ...)")
    assert name in _listing()["operators"]
    code, out, _ = _run_cli("describe", name)
    assert code == 0 and out.startswith(name)


# ---- operators in nn.Attention / TransformerBlock / Encoder -------------------------------------------------------


@pytest.mark.parametrize("name", OPS)
def test_operator_by_name_or_class_name_in_attention_block_and_encoder(name):
    """By name (legacy keywords / op_options for its options) and by config class name, in all three nn entry points."""
    spec, opts = OPERATORS[name], _spec_options(name)
    want = op_config(name, **opts)
    for op in (name, spec.config.__name__):
        assert Attention(D, 2, op=op, **opts).op == want
        assert TransformerBlock(D, 2, op=op, op_options=opts).attn.op == want
        assert all(b.attn.op == want for b in Encoder(D, depth=1, heads=2, op=op, op_options=opts).blocks)
    for missing in spec.required_options:  # a name without its required options: the documented TypeError
        with pytest.raises(TypeError, match=rf"needs option\(s\).*{missing}.*class_path: attnfuse\.ops\.configs\.{spec.config.__name__}"):
            Encoder(D, depth=1, heads=2, op=name)
    torch.manual_seed(0)
    enc = Encoder(D, depth=1, heads=2, op=want)
    x = torch.randn((2, 4, 3, D) if spec.layout == "grid" else (2, 6, D), requires_grad=True)
    mask = torch.ones(x.shape[:-1], dtype=torch.bool)
    mask[1, 0] = False
    out = enc(x, mask=mask)
    assert out.shape == x.shape
    _backward_finite([out], [x])


@pytest.mark.parametrize("name", OPS + SEQ_PARALLEL)
def test_operator_cross_attention_in_a_block(name):
    """A cross-attention block takes every operator that declares ``cross=True`` and refuses the others by name."""
    torch.manual_seed(0)
    op = op_config(_choice(name))
    block = TransformerBlock(D, 2, op=op, cross_attention=True)
    x, ctx = torch.randn(2, 4, D, requires_grad=True), torch.randn(2, 6, D, requires_grad=True)
    cross = op.spec.cross
    if cross:
        _backward_finite([block(x, context=ctx, context_mask=torch.rand(2, 6) > 0.3)], [x, ctx])
    else:
        with pytest.raises(ValueError, match=rf"operator '{name}' does not support cross-attention"):
            block(x, context=ctx)


@pytest.mark.parametrize("name", SEQ_PARALLEL)
def test_sequence_parallel_options_fall_back_to_local_attention(name):
    """Without a process group ``Ring()`` / ``Ulysses()`` are the local dense operator (docs/distributed.md)."""
    torch.manual_seed(0)
    ref = Attention(D, 2, op="dense").double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    for op in (name, SEQUENCE_PARALLEL[name]()):
        attn = Attention(D, 2, op=op).double()
        attn.load_state_dict(ref.state_dict())
        torch.testing.assert_close(attn(x, mask=mask)[mask], ref(x, mask=mask)[mask])
        with pytest.raises(TypeError, match=rf"operator '{name}' does not return attention weights"):
            attn(x, return_weights=True)


@pytest.mark.parametrize("name", SEQ_PARALLEL)
def test_sequence_parallel_names_work_wherever_nn_attention_takes_them(name):
    Attention(D, 2, op=name)  # works
    TransformerBlock(D, 2, op=name)
    Encoder(D, depth=1, heads=2, op=name)
    for module in MODULES_WITH_OP:  # the name resolves; a module whose attention needs what the operator lacks
        args, kwargs, _ = _captured_example(module)  # (WDAM: a score bias) refuses it by name, never a KeyError
        try:
            MODULES[module].cls(*args, **{**kwargs, "op": name})
        except Exception as err:
            _assert_documented(err, name)
    for fusion in FUSIONS_WITH_OP:
        if fusion != "parameter_free":  # its default drop_ratio belongs to silu_kernel
            _build_fusion(fusion, name)
    for op in (name, SEQUENCE_PARALLEL[name].__name__):  # the class name, as "Dense" works for dense
        assert op_config(op) == SEQUENCE_PARALLEL[name]()
        assert Attention(D, 2, op=op).op == TransformerBlock(D, 2, op=op).attn.op == SEQUENCE_PARALLEL[name]()


# ---- operators in every nn module / fusion that takes ``op`` ------------------------------------------------------
# Forward only (no_grad) in these two matrices, to stay fast: the backward pass of every operator is checked through
# Encoder, a cross-attention block and a fit config's training step above and below.


def _captured_example(module: str) -> tuple[tuple, dict, tuple]:
    """The constructor arguments a module's registered ``example`` uses, and the example's inputs."""
    spec = MODULES[module]
    calls: list[tuple[tuple, dict]] = []
    init = spec.cls.__init__

    def record(self, *args, **kwargs):
        if type(self) is spec.cls and not calls:
            calls.append((args, kwargs))
        init(self, *args, **kwargs)

    with mock.patch.object(spec.cls, "__init__", record):
        torch.manual_seed(0)
        _, inputs = spec.example()
    args, kwargs = calls[0]
    # sub-modules given to the constructor (ParallelBlock(attn=...)) replace the branch that op= builds: leave them out
    return args, {k: v for k, v in kwargs.items() if not isinstance(v, torch.nn.Module)}, inputs


def _holds(module: torch.nn.Module, choice) -> bool:
    """Whether ``op=choice`` reached the module: a sub-module holds it as its ``op`` (typed options or the spec)."""
    want = op_config(choice)
    return any(getattr(m, "op", None) == want or getattr(m, "op", None) is want.spec for m in module.modules())


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _outputs(o)]
    return [t for t in vars(out).values() if isinstance(t, torch.Tensor)] if hasattr(out, "__dict__") else []


MODULE_OPS = [(m, o) for m in MODULES_WITH_OP for o in OPS + SEQ_PARALLEL]


@pytest.mark.parametrize(("module", "name"), MODULE_OPS)
def test_every_module_with_op_takes_every_operator(module, name):
    """The module's registered example, rebuilt with ``op=`` each operator: it runs, or refuses with a documented error."""
    args, kwargs, inputs = _captured_example(module)
    torch.manual_seed(0)
    try:
        built = MODULES[module].cls(*args, **{**kwargs, "op": _choice(name)})
        with torch.no_grad():
            out = built(*inputs)
    except Exception as err:
        _assert_documented(err, name)
        return
    assert _holds(built, _choice(name)), f"{module}: op={_choice(name)!r} did not reach any attention layer"
    outs = [o for o in _outputs(out) if o.is_floating_point()]
    assert outs and all(torch.isfinite(o).all() for o in outs), module


def test_every_module_with_op_takes_a_typed_config():
    for module in MODULES_WITH_OP:
        args, kwargs, _ = _captured_example(module)
        op = op_config("dense")
        assert _holds(MODULES[module].cls(*args, **{**kwargs, "op": op}), op), module


def _build_fusion(fusion: str, op):
    cls = FUSIONS[fusion]
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in TINY_FUSION.items() if k in params}
    if "num_classes" in params and params["num_classes"].default is None:
        kwargs["num_classes"] = 3
    torch.manual_seed(0)
    return cls(["a", "b", "c"], D, op=op, **kwargs)


def _fusion_inputs() -> dict[str, TokenSet]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("a", "b", "c"):
        mask = torch.rand(2, 4, generator=g) > 0.3
        mask[:, 0] = True
        out[name] = TokenSet(torch.randn(2, 4, D, generator=g), mask)
    return out


@pytest.mark.parametrize("name", OPS + SEQ_PARALLEL)
def test_every_fusion_with_op_takes_every_operator(name):
    """``fusion option op: NAME`` in every fusion that takes ``op`` (typed options where some have no default):
    it runs, or refuses with a documented error; and it runs in at least one fusion."""
    inputs, worked, refused = _fusion_inputs(), [], {}
    for fusion in FUSIONS_WITH_OP:
        try:
            with torch.no_grad():
                out = _build_fusion(fusion, _choice(name))(inputs)
        except Exception as err:
            refused[fusion] = err
            continue
        assert torch.isfinite(out.fused.x).all(), fusion
        worked.append(fusion)
    bad = []
    for fusion, err in refused.items():
        try:
            _assert_documented(err, name)
        except AssertionError as why:
            bad.append(f"{fusion}: {why}")
    assert not bad, "\n".join(bad)
    assert worked, f"operator {name!r} works in no fusion: {refused}"


# ---- operators in a fit config ------------------------------------------------------------------------------------


def _default_fusion() -> str:
    from attnfuse.train.module import FusionTask

    default = inspect.signature(FusionTask).parameters["fusion"].default
    return next(n for n, cls in FUSIONS.items() if cls is default) if isinstance(default, type) else default


def _yaml_op(name: str):
    choice = _choice(name)
    if isinstance(choice, str):
        return choice
    return {"class_path": type(choice).__name__, "init_args": _spec_options(name)}  # the short class name resolves


@pytest.mark.parametrize("name", OPS + SEQ_PARALLEL)
def test_every_operator_in_a_fit_config(name, tmp_path):
    """``model.fusion.init_args.op: NAME`` (or ``{class_path: Config, init_args}``) builds the model and trains a step."""
    pytest.importorskip("lightning")
    from attnfuse.train.lightning_cli import make_cli

    config = {
        "seed_everything": 0,
        "data": {"dataset": "synthetic", "options": {"num_rows": 40}, "batch_size": 8},
        "model": {"dim": D, "fusion": {"class_path": _default_fusion(),
                                       "init_args": {"depth": 1, "heads": 2, "mlp_ratio": 1.0, "op": _yaml_op(name)}}},
        "trainer": {"max_steps": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
    }
    cli = make_cli(config, run=False)
    want = op_config(_choice(name))
    ops = [m.op for m in cli.model.modules() if isinstance(m, Attention)]
    assert ops and all(op == want for op in ops), ops
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    loss = cli.model.training_step(batch, 0)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in cli.model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", SEQ_PARALLEL)
def test_sequence_parallel_name_in_a_fit_config(name, tmp_path):
    """``model.fusion.init_args.op: ring`` (the bare name, not only ``{class_path: Ring}``) builds the model."""
    pytest.importorskip("lightning")
    from attnfuse.train.lightning_cli import make_cli

    config = {"data": {"dataset": "synthetic", "options": {"num_rows": 40}, "batch_size": 8},
              "model": {"dim": D, "fusion": {"class_path": _default_fusion(), "init_args": {"depth": 1, "heads": 2, "op": name}}},
              "trainer": {"logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)}}
    ops = [m.op for m in make_cli(config, run=False).model.modules() if isinstance(m, Attention)]
    assert ops and all(op == SEQUENCE_PARALLEL[name]() for op in ops), ops


def _tasks() -> list[str]:
    try:
        from attnfuse.train.tasks import TASKS
    except ModuleNotFoundError:  # the core install: no train extra
        return []
    return sorted(TASKS)


@pytest.mark.parametrize("task", _tasks())
def test_every_task_in_a_fit_config(task, tmp_path):
    """``model.task: NAME`` on the synthetic table made for that task (it promises every task type): a training step."""
    pytest.importorskip("lightning")
    from attnfuse.train.lightning_cli import make_cli
    from attnfuse.train.tasks import TASKS

    config = {"data": {"dataset": "synthetic", "options": {"num_rows": 40, "task": task}, "batch_size": 8},
              "model": {"dim": D, "task": task, "fusion": {"class_path": _default_fusion(), "init_args": {"depth": 1, "heads": 2}}},
              "trainer": {"logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)}}
    cli = make_cli(config, run=False)
    assert isinstance(cli.model.task, TASKS[task])
    cli.datamodule.setup("fit")
    loss = cli.model.training_step(next(iter(cli.datamodule.train_dataloader())), 0)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)


# ---- commands ------------------------------------------------------------------------------------------------------


def _subcommands() -> list[str]:
    from attnfuse.cli.main import LIGHTNING_COMMANDS, _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    return sorted(set(sub.choices) - set(LIGHTNING_COMMANDS))


@pytest.mark.parametrize("command", _subcommands())
def test_every_advertised_command_has_help(command, capsys):
    """Each subcommand ``attnfuse --help`` lists (merge included) has its own usage and options."""
    from attnfuse.cli.main import _parser

    with pytest.raises(SystemExit) as done:
        _parser().parse_args([command, "--help"])  # `attnfuse bench --help` itself goes to the benchmark runner
    assert done.value.code in (0, None)
    assert f"usage: attnfuse {command}" in capsys.readouterr().out


def test_test_file_basenames_are_unique():
    """pytest's default (prepend) import mode imports test files by basename: two ``test_x.py`` in different folders
    without ``__init__.py`` stop the collection of the whole suite ("import file mismatch")."""
    from collections import defaultdict
    from pathlib import Path

    root = Path(__file__).resolve().parent
    by_name = defaultdict(list)
    for path in root.rglob("test_*.py"):
        if not (path.parent / "__init__.py").exists():
            by_name[path.name].append(str(path.relative_to(root)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"rename one of each (e.g. tests/experiments/test_<name>_experiment.py): {clashes}"
