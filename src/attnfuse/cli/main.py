"""``attnfuse`` command: ``list``, ``describe``, ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import inspect
import sys

__all__ = ["main"]


def _registries() -> dict[str, dict]:
    """Every registry ``list`` shows and ``describe`` looks in: kind -> {name: object}."""
    from attnfuse import fusion
    from attnfuse.data import DATASETS
    from attnfuse.ops import OPERATORS
    from attnfuse.train.tasks import TASKS

    return {"operator": {k: v.fn for k, v in OPERATORS.items()}, "fusion": dict(fusion.FUSIONS),
            "block": dict(getattr(fusion, "BLOCKS", {})), "task": dict(TASKS), "dataset": dict(DATASETS)}


def _first_line(obj: object) -> str:
    return (inspect.getdoc(obj) or "").split("\n")[0][:80]


def _list(_: argparse.Namespace) -> int:
    from attnfuse.fusion import FUSIONS
    from attnfuse.ops import OPERATORS
    from attnfuse.ops.backends import list_backends

    reg = _registries()
    print("operators (nn.Attention(op=NAME), fusion option op: NAME):")
    for name in sorted(OPERATORS):
        print(f"  {name:<16} backends: {', '.join(list_backends(name)) or '(single implementation)'}")
    print("fusions (model.fusion: NAME in a fit config):")
    for name, cls in sorted(FUSIONS.items()):
        print(f"  {name:<16} {cls.__name__} (symmetry: {cls.symmetry}, parameters: {cls.has_parameters})")
    if reg["block"]:
        print("fusion building blocks (Python: attnfuse.fusion; not fusions of named inputs):")
        for name, cls in sorted(reg["block"].items()):
            print(f"  {name:<16} {cls.__name__}")
    print("tasks (model.task: NAME; default: the data schema's task):")
    for name, cls in sorted(reg["task"].items()):
        print(f"  {name:<16} {cls.__name__}: {_first_line(cls)}")
    print("datasets (data.dataset: NAME; `attnfuse describe NAME` shows options):")
    for name, spec in sorted(reg["dataset"].items()):
        print(f"  {name:<16} {spec.summary}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    from attnfuse.data import describe_dataset

    reg = _registries()
    hits = [(kind, entries[args.name]) for kind, entries in reg.items() if args.name in entries]
    if not hits:
        known = sorted({n for entries in reg.values() for n in entries})
        print(f"attnfuse: unknown name {args.name!r}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    for kind, obj in hits:
        if kind == "dataset":
            print(describe_dataset(args.name))
            continue
        print(f"{args.name} ({kind}): {obj.__module__}.{obj.__qualname__}{inspect.signature(obj)}\n")
        print(inspect.getdoc(obj))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from attnfuse.train.demo import run_demo

    if args.seeds < 1 or args.epochs < 1:
        raise ValueError(f"--seeds and --epochs must be >= 1, got {args.seeds} and {args.epochs}")
    seeds = tuple(range(args.seeds))
    run_demo(out_dir=args.out, seeds=seeds, max_epochs=args.epochs, dataset=args.dataset)
    return 0


def _seeds(args: argparse.Namespace) -> int:
    import torch
    import yaml

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
    if args.threads:
        torch.set_num_threads(args.threads)
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


def _quickstart(args: argparse.Namespace) -> int:
    from attnfuse.cli.quickstart import run_quickstart

    run_quickstart(steps=args.steps, seed=args.seed)
    return 0


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attnfuse`` command; returns the exit status.

    ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands (``--config``,
    ``--print_config``, ``--trainer.*``, ``--model.*``, ``--data.*``); the others are listed by
    ``attnfuse --help``.
    """
    from_sys = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from attnfuse.cli.lightning import run_lightning

        try:
            try:
                return run_lightning(None if from_sys else argv)
            except RuntimeError as err:
                raise _explain(err) from err
        except _user_errors() as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"attnfuse {argv[0]}: error: {msg}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="attnfuse", description="Attention operators and attention fusion.")
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark runner
        try:
            return _bench(argparse.Namespace(bench_args=argv[1:]))
        except FileNotFoundError as err:
            print(f"attnfuse bench: error: {err}", file=sys.stderr)
            return 2
    parser.epilog = "Lightning subcommands: " + ", ".join(LIGHTNING_COMMANDS) + " (see `attnfuse fit --help`)."
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered operators and fusion modules").set_defaults(fn=_list)
    p = sub.add_parser("describe", help="signature and documentation of an operator or fusion module")
    p.add_argument("name")
    p.set_defaults(fn=_describe)
    p = sub.add_parser("demo", help="the main job: compare fusion methods on mfeat (real data), report + plots")
    p.add_argument("--out", default="runs/demo", help="output folder for report.md and plots")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=25, help="epochs per run")
    p.add_argument("--dataset", default="mfeat", help="mfeat, or synthetic_views (labelled synthetic)")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("seeds", help="fit + test a config over N seeds (mean ± std) and sweep missing inputs")
    p.add_argument("--config", required=True, help="a fit config (YAML with data, model, trainer sections)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--max-missing", type=int, default=1, help="sweep every subset of up to this many missing inputs")
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest for small models)")
    p.add_argument("--out", default=None, help="folder for seeds.md")
    p.set_defaults(fn=_seeds)
    p = sub.add_parser("bench", help="operator speed benchmarks: runs the repository's `python -m benchmarks.run` inside "
                       "a checkout (or --repo PATH); e.g. bench --quick --only dense")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="[--repo PATH] and the arguments of python -m benchmarks.run")
    p.set_defaults(fn=_bench)
    p = sub.add_parser("quickstart", help="a seconds-long fusion example on a labelled synthetic task (no data download)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_quickstart)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as err:
        print(f"attnfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
