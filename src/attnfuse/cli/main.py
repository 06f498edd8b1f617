"""``attnfuse`` command: ``fit | validate | test | predict`` (LightningCLI), ``list``, ``describe``, ``demo``,
``seeds``, ``quickstart``, ``bench``.

Start-up is lazy: ``attnfuse --help`` imports neither torch nor Lightning, ``list`` and ``describe`` import
the registries only (torch; tasks and datasets also need the ``train`` extra), and Lightning loads for the
commands that train. Every command runs inside :func:`attnfuse.train.console.quiet_console` (Lightning's
adverts and the warnings a user cannot act on are silenced) and, where it trains, with the thread count of
:mod:`attnfuse.train.threads` (``--threads N`` / ``ATTNFUSE_THREADS``; read here, in the command layer).
A command whose optional dependencies are not installed says in one line which extra to install.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

__all__ = ["main"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
#: environment variable with the intra-op thread count of every command (``--threads N`` wins)
THREADS_ENV_VAR = "ATTNFUSE_THREADS"
#: import name -> distribution name, where they differ (to find which extra provides a missing module)
_DISTRIBUTIONS = {"yaml": "pyyaml", "sentence_transformers": "sentence-transformers", "sklearn": "scikit-learn", "ot": "pot"}


def _core_registries() -> dict[str, dict]:
    """The registries of the core install (torch only): kind -> {name: object}."""
    from attnfuse import fusion
    from attnfuse.distributed import SEQUENCE_PARALLEL
    from attnfuse.nn import MODULES
    from attnfuse.ops import OPERATORS

    return {"operator": {k: v.fn for k, v in OPERATORS.items()},
            "sequence-parallel operator": dict(SEQUENCE_PARALLEL),  # typed options classes (Ring, Ulysses)
            "fusion": dict(fusion.FUSIONS),
            "block": dict(getattr(fusion, "BLOCKS", {})), "module": {k: v.cls for k, v in MODULES.items()}}


def _train_registries() -> dict[str, dict]:
    """Tasks and datasets (the ``train`` extra: torchmetrics, pandas). Raises ModuleNotFoundError without it."""
    from attnfuse.data import DATASETS
    from attnfuse.train.tasks import TASKS

    return {"task": dict(TASKS), "dataset": dict(DATASETS)}


def _summary(text: str, width: int) -> str:
    """``text`` on one line of at most ``width`` characters, cut at a word boundary with an ellipsis."""
    plain = re.sub(r"``([^`]*)``", r"\1", " ".join(text.split()))
    return textwrap.shorten(plain, width=max(width, 20), placeholder=" …")


def _first_line(obj: object) -> str:
    return (inspect.getdoc(obj) or "").split("\n\n")[0]


def _line_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def _list(_: argparse.Namespace) -> int:
    from attnfuse.ops.backends import list_backends

    width = _line_width()
    core = _core_registries()
    print("operators (nn.Attention(op=NAME), fusion option op: NAME):")
    for name in sorted(core["operator"]):
        print(f"  {name:<16} backends: {', '.join(list_backends(name)) or '(single implementation)'}")
    for name, cls in sorted(core["sequence-parallel operator"].items()):  # attnfuse.distributed: not in OPERATORS
        head = f"  {name:<16} "
        print(head + _summary(f"sequence-parallel ({cls.__name__}, group=...); local without a process group", width - len(head)))
    print("fusions (model.fusion: NAME in a fit config):")
    for name, cls in sorted(core["fusion"].items()):
        print(f"  {name:<16} {cls.__name__} (symmetry: {cls.symmetry}, parameters: {cls.has_parameters})")
    if core["block"]:
        print("fusion building blocks (Python: attnfuse.fusion; not fusions of named inputs):")
        for name, cls in sorted(core["block"].items()):
            print(f"  {name:<16} {cls.__name__}")
    if core["module"]:
        from attnfuse.nn import MODULES

        print("modules (Python: attnfuse.nn.get_module(NAME).cls, by group):")
        for group in sorted({spec.group for spec in MODULES.values()}):
            names = sorted(n for n, spec in MODULES.items() if spec.group == group)
            head = f"  {group:<16} "
            print(head + textwrap.fill(", ".join(names), width=max(width - len(head), 40), subsequent_indent=" " * len(head)))
    try:
        train = _train_registries()
    except ModuleNotFoundError as err:
        extra = _extra_for(err.name) or "train"
        print(f"tasks and datasets: not installed (no module {err.name!r}): pip install \"attnfuse[{extra}]\"")
        return 0
    print("tasks (model.task: NAME; default: the data schema's task):")
    for name, cls in sorted(train["task"].items()):
        head = f"  {name:<16} {cls.__name__}: "
        print(head + _summary(_first_line(cls), width - len(head)))
    print("datasets (data.dataset: NAME; `attnfuse describe NAME` shows options):")
    for name, spec in sorted(train["dataset"].items()):
        head = f"  {name:<16} "
        print(head + _summary(spec.summary, width - len(head)))
    return 0


def _baselines() -> dict[str, str]:
    """The values of ``model.baseline`` (from :class:`FusionTask`'s signature) -> the documentation of each."""
    import typing

    from attnfuse.train.module import FusionTask

    def strings(tp: Any) -> list[str]:
        return [tp] if isinstance(tp, str) else [s for arg in typing.get_args(tp) for s in strings(arg)]

    names = strings(typing.get_type_hints(FusionTask.__init__)["baseline"])
    doc = inspect.getdoc(FusionTask) or ""
    entry = re.search(r"^\s*baseline: (.*?)(?=^\s*\w[\w, ]*: |\Z)", doc, re.MULTILINE | re.DOTALL)
    text = " ".join(entry.group(1).split()) if entry else ""
    described = {}
    for name in names:  # the sentence part about this value: ``"concat_mlp"`` (concatenated inputs -> MLP)
        found = re.search(rf'``"{re.escape(name)}"``\s*(\([^)]*\))', text)
        described[name] = found.group(1).strip("()") if found else text
    return described


def _describe(args: argparse.Namespace) -> int:
    reg = _core_registries()
    missing = None
    if not any(args.name in entries for entries in reg.values()):  # tasks and datasets: imported only when needed
        try:
            reg.update(_train_registries())
        except ModuleNotFoundError as err:
            missing = err
    hits = [(kind, entries[args.name]) for kind, entries in reg.items() if args.name in entries]
    if not hits and missing is None and args.name in (baselines := _baselines()):
        _describe_baseline(args.name, baselines)
        return 0
    if not hits:
        known = sorted({n for entries in reg.values() for n in entries})
        print(f"attnfuse: unknown name {args.name!r}; known: {', '.join(known)}", file=sys.stderr)
        if missing is not None:
            print(f"attnfuse: tasks, datasets and baselines are not installed (no module {missing.name!r}): "
                  f"pip install \"attnfuse[{_extra_for(missing.name) or 'train'}]\"", file=sys.stderr)
        return 2
    for kind, obj in hits:
        if kind == "dataset":
            from attnfuse.data import describe_dataset

            print(describe_dataset(args.name))
            continue
        print(f"{args.name} ({kind}): {obj.__module__}.{obj.__qualname__}{inspect.signature(obj)}\n")
        print(inspect.getdoc(obj))
    return 0


def _describe_baseline(name: str, baselines: dict[str, str]) -> None:
    from attnfuse.models.fusion_model import ConcatMLP

    print(f"{name} (baseline): a value of model.baseline, not a fusion: {baselines[name]}; the model replaces the "
          f"encoders and the fusion.\n  in a fit config:  model: {{baseline: {name}}}\n  on the command line: "
          f"--model.baseline {name}\n  in Python: FusionPredictor(..., baseline={name!r})\n"
          f"other baselines: {', '.join(n for n in baselines if n != name)}\n")
    print(f"{ConcatMLP.__module__}.{ConcatMLP.__qualname__}{inspect.signature(ConcatMLP)}\n")
    print(inspect.getdoc(ConcatMLP))


def _demo(args: argparse.Namespace) -> int:
    from attnfuse.train.console import quiet_console
    from attnfuse.train.demo import run_demo

    if args.seeds < 1 or args.epochs < 1:
        raise ValueError(f"--seeds and --epochs must be >= 1, got {args.seeds} and {args.epochs}")
    seeds = tuple(range(args.seeds))
    with quiet_console():
        run_demo(out_dir=args.out, seeds=seeds, max_epochs=args.epochs, dataset=args.dataset)
    return 0


def _seeds(args: argparse.Namespace) -> int:
    import yaml

    from attnfuse.train.console import quiet_console
    from attnfuse.train.seeds import run_seeds

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    try:
        with open(args.config) as f:
            config = yaml.safe_load(f)
    except OSError as err:
        raise FileNotFoundError(f"cannot read --config {args.config!r}: {err.strerror}") from None
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"--config {args.config!r} must hold a mapping with data / model / trainer sections")
    with quiet_console():
        result = run_seeds(config or {}, list(range(args.seeds)), max_missing=args.max_missing, max_epochs=args.epochs,
                           out_dir=args.out)
    print(result["markdown"])
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run the repository's speed benchmarks, ``python -m benchmarks.run ARGS``, as a subprocess; its exit status.

    ``benchmarks/`` is repository code that the installed package never imports. The checkout is
    ``--repo PATH`` when given (anywhere in ``args.bench_args``), else the current folder or its nearest
    parent holding ``benchmarks/run.py``. The runner starts with this Python, in the checkout's root.

    Raises:
        FileNotFoundError: no checkout found (or ``--repo`` names none); the message says what to do.
    """
    import os
    import subprocess
    from pathlib import Path

    runner = Path("benchmarks", "run.py")
    rest, repo, it = [], None, iter(args.bench_args)
    for arg in it:
        if arg == "--repo" or arg.startswith("--repo="):
            repo = arg.partition("=")[2] if "=" in arg else next(it, "")
            if not repo:
                raise FileNotFoundError("--repo needs the path of an attnfuse repository checkout")
        else:
            rest.append(arg)
    if repo is not None:
        root = Path(repo).expanduser().resolve()
        if not (root / runner).is_file():
            raise FileNotFoundError(f"--repo {repo}: no {runner} there; pass the root of an attnfuse repository checkout")
    else:
        cwd = Path.cwd()
        root = next((d for d in (cwd, *cwd.parents) if (d / runner).is_file()), None)
        if root is None:
            raise FileNotFoundError(
                f"no attnfuse repository checkout (a folder with {runner}) at or above {cwd}: the speed benchmarks are "
                "not installed with the package; run `attnfuse bench` inside a clone of the repository, or pass --repo PATH"
            )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    code = subprocess.run([sys.executable, "-m", "benchmarks.run", *rest], cwd=root, env=env, check=False).returncode
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def _merge(args: argparse.Namespace) -> int:
    """``attnfuse merge``: fuse fit checkpoints into one (:func:`attnfuse.train.merge.merge_checkpoints`)."""
    import yaml

    from attnfuse.train.console import quiet_console
    from attnfuse.train.merge import merge_checkpoints

    config = None
    if args.config:
        try:
            with open(args.config) as f:
                config = yaml.safe_load(f) or {}
        except OSError as err:
            raise FileNotFoundError(f"cannot read --config {args.config!r}: {err.strerror}") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config {args.config!r} must hold a mapping with data / model / trainer sections")
    with quiet_console():
        record = merge_checkpoints(args.models, output=args.output, method=args.method, config=config, anchor=args.anchor,
                                   mode=args.mode, solver=args.solver, reg=args.reg, residual=args.residual,
                                   samples=args.samples, fixed=args.fixed, overwrite=args.overwrite)
    print(f"wrote {record['output']} (+ .sha256): {args.method} of {len(args.models)} checkpoints; evaluate it with "
          f"attnfuse test --config <fit config> --ckpt_path {record['output']}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from attnfuse.cli.quickstart import run_quickstart

    run_quickstart(steps=args.steps, seed=args.seed)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    import pickle

    import yaml
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from attnfuse.data import DatasetUnavailableError, SchemaError
    from attnfuse.train.checkpoints import CheckpointError  # a URL / missing / damaged / foreign checkpoint: one line

    return (ValueError, KeyError, TypeError, FileNotFoundError, IsADirectoryError, DatasetUnavailableError, SchemaError,
            pickle.UnpicklingError, MisconfigurationException, yaml.YAMLError, CheckpointMismatchError, CheckpointError)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not fit the model built from this config / data."""


def _explain(err: BaseException) -> BaseException:
    """Turn torch's state-dict mismatch into a user error that says what to check."""
    msg = str(err)
    if isinstance(err, RuntimeError) and ("Error(s) in loading state_dict" in msg or "size mismatch" in msg):
        first = next((line.strip() for line in msg.splitlines() if "size mismatch" in line or "Missing key" in line), msg[:200])
        return CheckpointMismatchError(
            f"the checkpoint does not fit the model built from this config and data ({first}); use the config and "
            "data (or the preprocessor.json) of the run that wrote the checkpoint"
        )
    return err


def _extra_for(module: str | None) -> str | None:
    """The extra of this package that installs ``module`` (``"train"`` for ``pandas``), or None.

    Read from the installed package's metadata (the ``Requires-Dist: ...; extra == "train"`` lines), so
    it follows ``pyproject.toml``; the ``dev`` extra is named only when no other extra has the module.
    """
    from importlib import metadata

    if not module:
        return None
    wanted = re.sub(r"[-_.]+", "-", _DISTRIBUTIONS.get(module.split(".")[0], module.split(".")[0])).lower()
    try:
        requires = metadata.requires("attnfuse") or []
    except metadata.PackageNotFoundError:
        return None
    extras = []
    for req in requires:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if name and extra and re.sub(r"[-_.]+", "-", name.group(1)).lower() == wanted:
            extras.append(extra.group(1))
    return next((e for e in extras if e != "dev"), extras[0] if extras else None)


def _reported_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can cause, reported as one ``error:`` line (the builtin ones without the train extra)."""
    try:
        return _user_errors()
    except ImportError:  # the core install: no yaml / Lightning / pandas, so none of their errors can occur
        return (ValueError, KeyError, TypeError, FileNotFoundError, IsADirectoryError)


def _threads_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {text!r}")
    return int(text)


def _env_threads() -> int | None:
    """``ATTNFUSE_THREADS`` (a number >= 1, or empty / ``auto`` for the automatic choice)."""
    raw = os.environ.get(THREADS_ENV_VAR, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV_VAR} must be a whole number of threads >= 1 or 'auto', got {raw!r}")
    return int(raw)


def _pop_threads(args: list[str]) -> tuple[int | None, list[str]]:
    """``--threads N`` / ``--threads=N`` taken out of a Lightning subcommand's arguments (LightningCLI does not know it)."""
    rest, threads, it = [], None, iter(args)
    for arg in it:
        if arg == "--threads" or arg.startswith("--threads="):
            value = arg.partition("=")[2] if "=" in arg else next(it, "")
            try:
                threads = _threads_arg(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"--threads: {err}") from None
        else:
            rest.append(arg)
    return threads, rest


THREADS_HELP = (f"intra-op CPU threads (default: from the model size, 1 for small models; also {THREADS_ENV_VAR}=N; "
                "see docs/training.md, Threads)")
_LIGHTNING_HELP = {
    "fit": "train a model from a config; ends by testing the best checkpoint (`attnfuse fit --help`)",
    "validate": "validation metrics of a checkpoint (--ckpt_path)",
    "test": "test metrics of a checkpoint (--ckpt_path)",
    "predict": "predictions of a checkpoint, written with --output FILE",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnfuse", description="Attention operators and attention fusion.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Lightning subcommands: " + ", ".join(LIGHTNING_COMMANDS) + " (see `attnfuse fit --help`: --config, "
               "--model.*, --data.*, --trainer.*; also --threads N).\n"
               "Training commands need the train extra: pip install \"attnfuse[train]\".")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(
        [*LIGHTNING_COMMANDS, "list", "describe", "demo", "seeds", "quickstart", "bench", "merge"]) + "}")
    for name in LIGHTNING_COMMANDS:  # listed for the help; main() hands them to LightningCLI before this parser runs
        sub.add_parser(name, help=_LIGHTNING_HELP[name], add_help=False)
    sub.add_parser("list", help="registered operators, fusions, tasks and datasets").set_defaults(fn=_list)
    p = sub.add_parser("describe", help="signature and documentation of an operator, fusion, task, dataset or baseline")
    p.add_argument("name")
    p.set_defaults(fn=_describe)
    p = sub.add_parser("demo", help="the main job: compare fusion methods on mfeat (real data), report + plots")
    p.add_argument("--out", default="runs/demo", help="output folder for report.md and plots")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=25, help="epochs per run")
    p.add_argument("--dataset", default="mfeat", help="mfeat, or synthetic_views (labelled synthetic)")
    p.add_argument("--threads", type=_threads_arg, default=None, help=THREADS_HELP)
    p.set_defaults(fn=_demo)
    p = sub.add_parser("seeds", help="fit + test a config over N seeds (mean ± std) and sweep missing inputs")
    p.add_argument("--config", required=True, help="a fit config (YAML with data, model, trainer sections)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--max-missing", type=int, default=1, help="sweep every subset of up to this many missing inputs")
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    p.add_argument("--threads", type=_threads_arg, default=None, help=THREADS_HELP)
    p.add_argument("--out", default=None, help="folder for seeds.md")
    p.set_defaults(fn=_seeds)
    p = sub.add_parser("quickstart", help="a seconds-long fusion example on a labelled synthetic task (no data download)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_threads_arg, default=None, help=THREADS_HELP)
    p.set_defaults(fn=_quickstart)
    p = sub.add_parser("bench", help="operator speed benchmarks: runs the repository's `python -m benchmarks.run` inside "
                       "a checkout (or --repo PATH); e.g. bench --quick --only dense")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="[--repo PATH] and the arguments of python -m benchmarks.run")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("merge", help="fuse fit checkpoints into one (optimal-transport fusion or weight averaging; "
                       "needs the merge extra for ot); see docs/merge.md")
    p.add_argument("--models", nargs="+", required=True, help="two or more checkpoints written by attnfuse fit")
    p.add_argument("--method", choices=("ot", "average"), default="ot", help="ot: optimal-transport fusion; average: vanilla")
    p.add_argument("--config", default=None, help="the fit config: its data gives the activations of OT fusion")
    p.add_argument("--output", required=True, help="the merged checkpoint (a .sha256 is written beside it)")
    p.add_argument("--anchor", type=int, default=-1, help="index of the anchor model (default: the last)")
    p.add_argument("--mode", choices=("acts", "wts"), default=None, help="OT cost (default: acts with --config, else wts)")
    p.add_argument("--solver", choices=("sinkhorn", "emd"), default="sinkhorn", help="soft or hard OT")
    p.add_argument("--reg", type=float, default=0.08, help="Sinkhorn regularisation")
    p.add_argument("--residual", default="mean", choices=("mean", "weighted_scalar", "only_resid", "no_resid", "acts"),
                   help="how transport maps combine at residual joins")
    p.add_argument("--samples", type=int, default=200, help="training samples for the activations")
    p.add_argument("--fixed", nargs="*", default=[], help="parameter-name prefixes averaged without alignment (ot), e.g. "
                   "head.pool when a layer is not on the residual stream")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--threads", type=_threads_arg, default=None, help=THREADS_HELP)
    p.set_defaults(fn=_merge)
    return parser


def _lightning(command: str, args: list[str] | None) -> int:
    """Run a LightningCLI command; a parser error is one ``error:`` line (with a did-you-mean), not the usage."""
    from attnfuse.cli.lightning import run_lightning
    from attnfuse.train.console import quiet_console

    with quiet_console():
        try:
            try:
                return run_lightning(args)
            except RuntimeError as err:
                raise _explain(err) from err
        except argparse.ArgumentError as err:
            print(f"attnfuse {command}: error: {err}\nattnfuse {command}: every option: attnfuse {command} --help",
                  file=sys.stderr)
            return 2


def _with_threads(threads: int | None, run: Callable[[], int]) -> int:
    from attnfuse.train.threads import use_threads

    with use_threads(threads):
        return run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnfuse`` command; returns the exit status.

    ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands (``--config``,
    ``--print_config``, ``--trainer.*``, ``--model.*``, ``--data.*``); the others are listed by
    ``attnfuse --help``. User errors (a bad option, config or file; a missing optional dependency)
    are one ``error:`` line and exit status 2.
    """
    from_sys = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark runner
        try:
            return _bench(argparse.Namespace(bench_args=argv[1:]))
        except FileNotFoundError as err:
            print(f"attnfuse bench: error: {err}", file=sys.stderr)
            return 2
    command = argv[0] if argv and argv[0] in LIGHTNING_COMMANDS else None
    args = None if command else _parser().parse_args(argv)  # --help and usage errors exit here
    command = command or args.command
    try:
        if args is None:
            threads, rest = _pop_threads(argv[1:])
            given = None if from_sys and len(rest) == len(argv) - 1 else [command, *rest]  # None: LightningCLI reads sys.argv
            return _with_threads(threads or _env_threads(), lambda: _lightning(command, given))
        if hasattr(args, "threads"):
            return _with_threads(args.threads or _env_threads(), lambda: args.fn(args))
        return args.fn(args)
    except ModuleNotFoundError as err:
        extra = _extra_for(err.name)
        if extra is None:
            raise
        print(f"attnfuse {command}: error: this command needs the {extra!r} extra (no module {err.name!r}): "
              f"pip install \"attnfuse[{extra}]\"", file=sys.stderr)
        return 2
    except _reported_errors() as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"attnfuse {command}: error: {msg}", file=sys.stderr)
        return 2
