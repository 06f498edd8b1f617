"""A tiny timing harness shared by every benchmark: warm-up, interleaved runs, median, records.

Timing: each callable is warmed up, then the candidates are run in turns (the order alternates every
round, A B / B A, so slow drift of a shared machine hits all of them alike) and the median of the
per-call wall times is kept. On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``.

Records are plain dicts: ``op, backend, variant, pass, shape, dtype, device, ms`` plus extras
(``gflops``, ``ratio``, ``mem_mb`` on CUDA); :func:`report` prints them as a markdown table and writes
``benchmarks/results/<name>.json`` with the environment next to them.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["RESULTS_DIR", "competing_load", "environment", "markdown_table", "pick_device", "record", "report", "time_interleaved"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DEFAULT_COLUMNS = ("op", "backend", "variant", "pass", "shape", "dtype", "device", "ms", "min_ms", "gflops", "ratio", "ratio_min")


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int = 2,
    repeat: int = 10,
) -> dict[str, dict[str, float]]:
    """Time several callables against each other in one run.

    Args:
        fns: name -> zero-argument callable doing the work once.
        device: where the work runs (for synchronisation and memory statistics).
        warmup: untimed calls of each callable first.
        repeat: timed calls of each callable, interleaved with the others.

    Returns:
        name -> ``{"ms": median ms, "min_ms": fastest, "iqr_ms": interquartile range}`` and, on CUDA,
        ``"mem_mb"``: peak memory allocated by that callable.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeat):
        for name in names if i % 2 == 0 else reversed(names):
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        ts = sorted(times[name])
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"ms": statistics.median(ts), "min_ms": ts[0], "iqr_ms": q[2] - q[0]}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fns[name]()
            _sync(device)
            out[name]["mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def record(
    *, op: str, backend: str, shape: Sequence[int] | str, dtype: torch.dtype | str, device: torch.device | str, ms: float, **extra: Any
) -> dict[str, Any]:
    """One benchmark result as a JSON-able dict (extra keys such as ``pass``, ``gflops`` kept as given)."""
    shape_s = shape if isinstance(shape, str) else "x".join(str(s) for s in shape)
    dtype_s = str(dtype).removeprefix("torch.")
    return {"op": op, "backend": backend, "shape": shape_s, "dtype": dtype_s, "device": str(device), "ms": ms, **extra}


def environment() -> dict[str, Any]:
    """Versions and machine facts stored next to the records."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(records: Sequence[Mapping[str, Any]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """Records as a markdown table; columns absent from every record are dropped."""
    cols = [c for c in columns if any(c in r for r in records)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in records]
    return "\n".join(lines)


def report(name: str, records: Sequence[Mapping[str, Any]], *, columns: Sequence[str] = DEFAULT_COLUMNS,
           results_dir: Path = RESULTS_DIR) -> str:
    """Print ``records`` as a markdown table and write them to ``results_dir/<name>.json``.

    Returns:
        The markdown table.
    """
    table = markdown_table(records, columns)
    print(f"\n### {name}\n\n{table}\n")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps({"name": name, "environment": environment(), "records": list(records)}, indent=2) + "\n")
    print(f"(written to {path})")
    return table


#: The busy loop a competing process runs: single-threaded fp32 matmuls until it is terminated.
_BUSY_LOOP = (
    "import sys, torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(256, 256)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)


@contextlib.contextmanager
def competing_load(processes: int = 1) -> Iterator[list[int]]:
    """Run ``processes`` busy single-threaded matmul loops beside the ``with`` block (a noisy neighbour).

    Each is a separate Python process started here and terminated (by its own pid) on exit; the block
    starts once every process has reported that it runs. Yields their pids.
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUSY_LOOP], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(processes)
    ]
    try:
        for p in procs:
            p.stdout.readline()  # "ready"
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
