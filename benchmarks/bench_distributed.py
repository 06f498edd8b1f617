"""Ring attention on 1, 2 and 4 CPU processes (gloo): per-rank peak memory, wall time, longest sequence, balance.

Setup: B=1, H=4, D=64, fp32, causal, zig-zag layout unless stated; forward + backward of
``attnfuse.distributed.ring_attention(..., return_lse=True)`` on each rank's shard. With one process the
call is ``dense_attention(..., return_lse=True)`` (no communication), i.e. the same LSE-path kernel the
ring runs per block, so the P = 1 row is the single-process anchor. Each rank uses one intra-op thread.

Measured per configuration, inside one run:

* ``mem_mb``: per-rank peak resident memory added by one forward + backward (``VmHWM`` reset through
  ``/proc/self/clear_refs`` before the call, minus ``VmRSS`` before it; glibc's mmap threshold fixed at
  128 KiB so freed blocks are returned), the maximum over ranks; ``mem_ratio`` = ``mem_mb / mem_mb(P=1)``.
* ``ms``: wall time of forward + backward (median of the repeats; the maximum over ranks);
  ``ratio`` = ``ms / ms(P=1)`` at the same length. The 4 ranks share this machine's cores with each
  other (and with other jobs), so times measure overhead, not speed-up.
* ``max_len``: the longest power-of-two length (up to a cap) whose per-rank peak stays within
  ``budget_mb`` (16 MiB), per P.
* causal load balance per layout at P = 4: score pairs computed per rank (``causal_work``, the block
  rectangles this implementation evaluates) and causal pairs allowed (the work of a kernel that skips
  masked tiles), max / min over ranks, and the measured wall time relative to the contiguous layout.

Run: ``python -m benchmarks.bench_distributed [--quick]`` (or ``python -m benchmarks.run --only distributed``).
Linux only (``/proc``); gloo over ``tcp://127.0.0.1``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnfuse.distributed import LAYOUTS, causal_work, ring_attention, shard_sequence
from benchmarks.harness import record, report

__all__ = ["main"]

B, H, D = 1, 4, 64
BUDGET_MB = 16.0
COLUMNS = ("op", "variant", "pass", "shape", "layout", "ms", "ratio", "mem_mb", "mem_ratio", "max_len", "budget_mb",
           "computed_max_min", "allowed_max_min", "work_per_rank_M")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(length: int, layout: str, seed: int = 0):
    """A zero-argument forward + backward of this rank's shard at global ``length``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, length, D, generator=g) for _ in range(3))
    parts = [shard_sequence(t, layout=layout).clone().requires_grad_() for t in (q, k, v)]
    del q, k, v

    def run() -> None:
        for p in parts:
            p.grad = None
        out, lse = ring_attention(*parts, is_causal=True, layout=layout, return_lse=True)
        (out.sum() + lse.sum()).backward()

    return run


def _measure(run, repeat: int) -> tuple[float, float]:
    """(median ms, peak MB added) of ``run`` on this rank; the group is synchronised around each call."""
    run()  # warm-up
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    before = _status_mb("VmRSS")
    run()
    peak = _status_mb("VmHWM") - before
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _rank(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    torch.set_num_threads(1)
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmapped and returned on free
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        result: dict[str, Any] = {"scaling": {}, "budget": {}, "layouts": {}}
        for length in cfg["lengths"]:
            ms, mb = _measure(_step(length, "zigzag"), cfg["repeat"])
            result["scaling"][length] = _max_over_ranks([ms, mb])
        length, fits = cfg["budget_start"], 0
        while length <= cfg["budget_cap"]:  # stop at the first length over the budget
            run = _step(length, "zigzag")
            run()
            dist.barrier()
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_mb("VmRSS")
            run()
            (peak,) = _max_over_ranks([_status_mb("VmHWM") - before])
            del run
            if peak > BUDGET_MB:
                break
            fits, length = length, length * 2
        result["budget"] = {"max_len": fits, "capped": length > cfg["budget_cap"]}
        if world == cfg["balance_world"]:
            for layout in LAYOUTS:
                ms, _ = _measure(_step(cfg["balance_len"], layout), cfg["repeat"])
                result["layouts"][layout] = _max_over_ranks([ms])[0]
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run_world(world: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_rank, args=(world, _free_port(), cfg, out), nprocs=world, join=True, start_method="fork")
        return json.loads(Path(out).read_text())


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    """Run the benchmark (CPU only; ``device`` other than cpu is refused) and return its records."""
    if device not in (None, "cpu"):
        raise ValueError(f"bench_distributed runs gloo CPU processes only, got device={device!r}")
    cfg = {"lengths": [512, 1024] if quick else [2048, 4096], "repeat": 2 if quick else 3,
           "budget_start": 512, "budget_cap": 2048 if quick else 8192,
           "balance_world": 4, "balance_len": 512 if quick else 2048}
    worlds = [1, 2, 4]
    results = {w: _run_world(w, cfg) for w in worlds}
    records: list[dict] = []
    for length in cfg["lengths"]:
        ms1, mb1 = results[1]["scaling"][str(length)]
        for w in worlds:
            ms, mb = results[w]["scaling"][str(length)]
            records.append(record(op="ring_attention", backend="gloo", variant=f"P={w}", shape=(B, H, length, D),
                                  dtype=torch.float32, device="cpu", ms=ms, ratio=ms / ms1, mem_mb=mb,
                                  mem_ratio=mb / mb1 if mb1 > 0 else None, layout="zigzag", **{"pass": "fwd+bwd"}))
    for w in worlds:
        budget = results[w]["budget"]
        records.append(record(op="ring_attention", backend="gloo", variant=f"P={w}", shape="longest L in budget",
                              dtype=torch.float32, device="cpu", ms=None, budget_mb=BUDGET_MB, layout="zigzag",
                              max_len=f"{budget['max_len']}{'+ (cap)' if budget['capped'] else ''}", **{"pass": "fwd+bwd"}))
    base = results[cfg["balance_world"]]["layouts"]["contiguous"]
    for layout in LAYOUTS:
        computed = causal_work(cfg["balance_len"], cfg["balance_world"], layout, "computed")
        allowed = causal_work(cfg["balance_len"], cfg["balance_world"], layout, "allowed")
        records.append(record(
            op="ring_attention", backend="gloo", variant=f"P={cfg['balance_world']}", shape=(B, H, cfg["balance_len"], D),
            dtype=torch.float32, device="cpu", ms=results[cfg["balance_world"]]["layouts"][layout],
            ratio=results[cfg["balance_world"]]["layouts"][layout] / base, layout=layout,
            computed_max_min=max(computed) / min(computed), allowed_max_min=max(allowed) / min(allowed),
            work_per_rank_M=" / ".join(f"{c / 1e6:.2f}" for c in computed), **{"pass": "fwd+bwd causal"}))
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    recs = main(quick=args.quick)
    report("distributed", recs, columns=COLUMNS)
    print(f"({time.perf_counter() - t0:.1f} s)")
