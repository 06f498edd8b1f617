"""Run every ``benchmarks/bench_*.py`` module and print its table: ``python -m benchmarks.run [--quick]``.

Each module exposes ``main(quick: bool = False, device: str | None = None) -> list[dict]``; the
records are printed as markdown and written to ``benchmarks/results/<name>.json`` (``<name>`` is
the module name without ``bench_``). Timings on a shared machine are noisy: compare the ``ratio``
column (measured within one run) rather than absolute times across runs.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch

from benchmarks.harness import environment, report

__all__ = ["discover", "main"]


def discover() -> list[str]:
    """Names of the benchmark modules (``bench_*.py`` next to this file), sorted."""
    return sorted(p.stem for p in Path(__file__).resolve().parent.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description="Run the attnfuse speed benchmarks.")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (a smoke run)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME", help="run only these modules (e.g. dense)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - {n.removeprefix("bench_") for n in names})
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {[n.removeprefix('bench_') for n in names]}")
        names = [n for n in names if n.removeprefix("bench_") in args.only]
    print(f"environment: {environment()}")
    for module_name in names:
        module = importlib.import_module(f"benchmarks.{module_name}")
        t0 = time.perf_counter()
        records = module.main(quick=args.quick, device=args.device)
        report(module_name.removeprefix("bench_"), records)
        print(f"({module_name}: {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
