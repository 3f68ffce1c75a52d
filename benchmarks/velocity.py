"""Speed and memory of the exact velocity against two simple references, in one run.

    python benchmarks/velocity.py                 # default sizes on cuda if available, else cpu
    python benchmarks/velocity.py --device cpu --configs 20000,3072,64 --times 0.5
    python benchmarks/velocity.py --quick         # tiny smoke run (seconds)

Methods, all computing u(x, t) = (m - x) / sigma_t with m the softmax-weighted support mean:

- ``two_gemm``: logits = one ``addmm`` (x X^T scaled, minus the key norms, computed in the
  call), softmax, mean = a second matrix product. The plain fast implementation.
- ``two_gemm_pre``: the same with the key norms computed once beforehand.
- ``sdpa`` / ``sdpa_pre``: torch's ``scaled_dot_product_attention`` (a fused kernel) with the
  key norms as an additive float mask, computed in the call / beforehand: the peer to beat.
- ``cdist``: the naive one: squared ``torch.cdist`` distances to t X, softmax, mean.
- ``nwflow``: :func:`nwflow.velocity` (builds its centre and key norms in the call).
- ``field``: :meth:`nwflow.EmpiricalField.velocity` with the field built beforehand (``screen=False``:
  one evaluation, nothing carried from the previous call), its reduced-precision screen as the
  device's default (on for CUDA: fp16; off on a CPU without bf16 instructions); the JSON says which.
- ``field_half_off``: the same with ``reduced_precision=False``, only where the default is on,
  so that what the half-precision screen buys is measured in the same run.

Times are medians over ``--repeats`` rounds; within a round the methods run one after the
other in a rotating order, so a slow spell on a shared machine hits all of them. Ratios:
``nwflow / two_gemm``, ``field / two_gemm_pre``, ``nwflow / sdpa``, ``field / sdpa_pre``,
``sdpa / two_gemm``, ``cdist / two_gemm``, from wall-clock
times and (``cpu_time_ratios``) from the process's CPU time, which on a shared machine
tracks the work done better than the wall clock (with one thread it is the work; with
several it also counts threads waiting at barriers).

``paired_ratios`` take the ratio within each round first (the two methods of a ratio run back
to back, see ``METHODS``) and report its median over the rounds with a distribution-free
interval for that median (order statistics of the binomial, at least 95% coverage; with 7
rounds it is the smallest and largest ratio). A spell that slows one round slows both calls
of its pair, so the paired median is the steadier estimate on a shared machine: with 7
rounds the ratio of medians was seen 0.14 above it, when a spell caught the two medians
in different rounds.

Peak memory is the extra peak over what is held before the call (support, queries, field):
on CUDA ``torch.cuda.max_memory_allocated`` after a reset; on the CPU each method runs once
in a fresh subprocess that resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
right before the call and reads ``VmHWM - VmRSS`` after it (falling back to the growth of
``ru_maxrss`` where the counter cannot be reset).

Writes JSON (through a temporary file and a rename) to ``benchmarks/out/`` with provenance.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import nwflow
from nwflow._io import write_json_atomic
from nwflow._precision import exact_matmul
from nwflow.empirical import EmpiricalField
from nwflow.provenance import cpu_model, provenance

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIGS = [(20000, 3072, 64), (50000, 3072, 16), (50000, 3072, 64), (50000, 3072, 256),
                   (400000, 768, 16)]
QUICK_CONFIGS = [(3000, 64, 8), (1000, 32, 4)]
# The rotation's cycle: each ratio's two methods run one after the other (sdpa / two_gemm two
# apart), so that the per-round ratio compares calls made under the same load.
METHODS = ["two_gemm_pre", "field", "sdpa_pre", "sdpa", "nwflow", "two_gemm", "cdist"]
HALF_OFF = "field_half_off"
RATIOS = {"nwflow/two_gemm": ("nwflow", "two_gemm"), "field/two_gemm_pre": ("field", "two_gemm_pre"),
          "nwflow/sdpa": ("nwflow", "sdpa"), "field/sdpa_pre": ("field", "sdpa_pre"),
          "sdpa/two_gemm": ("sdpa", "two_gemm"), "cdist/two_gemm": ("cdist", "two_gemm")}


# -- the references -----------------------------------------------------------------------
def two_gemm(x: torch.Tensor, t: float, X: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """softmax((t x X^T - t^2 ||X||^2 / 2) / sigma^2) X, then (m - x) / sigma (sigma_min = 0)."""
    s2 = (1.0 - t) ** 2
    if norms is None:
        norms = torch.linalg.vector_norm(X, dim=1).square()
    logits = torch.addmm(norms[None, :], x, X.T, beta=-t * t / (2 * s2), alpha=t / s2)
    m = torch.softmax(logits, dim=1) @ X
    return (m - x) / (1.0 - t)


def sdpa(x: torch.Tensor, t: float, X: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """torch's fused attention: scaled_dot_product_attention with scale t / sigma^2 and the key
    norms as an additive float mask, -t^2 ||X||^2 / (2 sigma^2); then (m - x) / sigma."""
    s2 = (1.0 - t) ** 2
    if norms is None:
        norms = torch.linalg.vector_norm(X, dim=1).square()
    bias = (norms * (-t * t / (2 * s2))).view(1, 1, 1, -1)
    m = F.scaled_dot_product_attention(x[None, None], X[None, None], X[None, None], attn_mask=bias,
                                       scale=t / s2)[0, 0]
    return (m - x) / (1.0 - t)


def cdist_softmax(x: torch.Tensor, t: float, X: torch.Tensor) -> torch.Tensor:
    """The naive form: -||x - t X_j||^2 / (2 sigma^2) from cdist, softmax, mean."""
    logits = torch.cdist(x, t * X).square().div_(-2 * (1.0 - t) ** 2)
    m = torch.softmax(logits, dim=1) @ X
    return (m - x) / (1.0 - t)


def make_problem(n: int, D: int, B: int, t: float, device: torch.device, seed: int = 0):
    """Support with data-like statistics (unit-variance Gaussian), and queries on its path."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.empty(n, D, device=device)
    rows = max(1, 2**24 // D)  # fill in blocks: no second (n, D) copy at any time
    for s in range(0, n, rows):
        X[s:s + rows] = torch.randn(min(rows, n - s), D, generator=g).to(device)
    idx = torch.randint(0, n, (B,), generator=g)
    x = ((1 - t) * torch.randn(B, D, generator=g)).to(device) + t * X[idx.to(device)]
    return X, x


def method_fn(name: str, x: torch.Tensor, t: float, X: torch.Tensor,
              field: EmpiricalField | None, norms: torch.Tensor | None):
    if name == "two_gemm":
        return lambda: two_gemm(x, t, X)
    if name == "two_gemm_pre":
        return lambda: two_gemm(x, t, X, norms)
    if name == "sdpa":
        return lambda: sdpa(x, t, X)
    if name == "sdpa_pre":
        return lambda: sdpa(x, t, X, norms)
    if name == "cdist":
        return lambda: cdist_softmax(x, t, X)
    if name == "nwflow":
        return lambda: nwflow.velocity(x, t, X)
    if name in ("field", HALF_OFF):
        return lambda: field.velocity(x, t)
    raise ValueError(f"unknown method {name!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory -----------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_child(name: str, n: int, D: int, B: int, t: float) -> dict[str, Any]:
    """Run one method once in this (fresh) process; return its extra peak RSS in bytes."""
    X, x = make_problem(n, D, B, t, torch.device("cpu"))
    field = (EmpiricalField(X, screen=False, reduced_precision=None if name == "field" else False)
             if name in ("field", HALF_OFF) else None)  # as bench_config
    norms = torch.linalg.vector_norm(X, dim=1).square() if name.endswith("_pre") else None
    fn = method_fn(name, x, t, X, field, norms)
    rss_before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = _status_kib("VmHWM") is not None
    except OSError:
        reset = False
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with exact_matmul():
        fn()
    if reset:
        extra = (_status_kib("VmHWM") - rss_before) * 1024
        how = "VmHWM-VmRSS after clear_refs"
    else:
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) * 1024
        how = "ru_maxrss growth"
    return {"extra_peak_bytes": int(extra), "method": how}


def cpu_peak(name: str, n: int, D: int, B: int, t: float, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", name,
           f"{n},{D},{B}", str(t), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_peak(fn, device: torch.device) -> dict[str, Any]:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return {"extra_peak_bytes": int(torch.cuda.max_memory_allocated(device) - before),
            "method": "torch.cuda.max_memory_allocated - memory_allocated before"}


# -- one configuration -------------------------------------------------------------------------
def bench_config(n: int, D: int, B: int, t: float, device: torch.device, repeats: int, warmup: int,
                 threads: int, memory: bool) -> dict[str, Any]:
    X, x = make_problem(n, D, B, t, device)
    # Single evaluations: the carried screen off, or the repeated calls on the same queries
    # would be answered from the previous call's trail (benchmarks/trajectory.py measures that).
    field = EmpiricalField(X, screen=False)
    norms = torch.linalg.vector_norm(X, dim=1).square()
    methods, ratios = list(METHODS), dict(RATIOS)
    fns = {m: method_fn(m, x, t, X, field, norms) for m in METHODS}
    if field.reduced_precision is not None:
        methods.append(HALF_OFF)
        ratios[f"{HALF_OFF}/sdpa_pre"] = (HALF_OFF, "sdpa_pre")
        ratios[f"field/{HALF_OFF}"] = ("field", HALF_OFF)
        fns[HALF_OFF] = method_fn(HALF_OFF, x, t, X, EmpiricalField(X, screen=False, reduced_precision=False),
                                  norms)
    with exact_matmul():  # the references run under the same (full fp32) precision
        outputs = {m: fn() for m, fn in fns.items()}
        for _ in range(warmup - 1):
            for fn in fns.values():
                fn()
        sync(device)
        times: dict[str, list[float]] = {m: [] for m in methods}
        cpu_times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(repeats):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                fns[m]()
                sync(device)
                times[m].append(time.perf_counter() - start)
                cpu_times[m].append(time.process_time() - cpu_start)
    ref = outputs["two_gemm"].double()
    agreement = {m: float(((o.double() - ref).norm(dim=1) / ref.norm(dim=1)).max())
                 for m, o in outputs.items()}
    # The accuracy that matters: against the exact field in float64 (the tolerance: 1e-5 in fp32).
    with exact_matmul():
        exact = EmpiricalField(X.double(), screen=False).velocity(x.double(), t)
    errors = {m: float(((o.double() - exact).norm(dim=1) / exact.norm(dim=1)).max())
              for m, o in outputs.items()}
    del exact
    med = {m: statistics.median(v) for m, v in times.items()}
    cpu_med = {m: statistics.median(v) for m, v in cpu_times.items()}
    result: dict[str, Any] = {
        "n": n, "D": D, "B": B, "t": t, "dtype": "float32",
        "support_bytes": X.numel() * X.element_size(),
        "chunk": field._chunk(B),
        "reduced_precision": str(field.reduced_precision),
        "reduced_rows": field.reduced_rows,
        "time_s": {m: {"median": med[m], "min": min(v), "all": v} for m, v in times.items()},
        "cpu_time_s": {m: {"median": cpu_med[m], "all": v} for m, v in cpu_times.items()},
        "ratios": {k: med[a] / med[b] for k, (a, b) in ratios.items()},
        "cpu_time_ratios": {k: cpu_med[a] / cpu_med[b] for k, (a, b) in ratios.items()},
        "paired_ratios": {k: dict(zip(("median", "low", "high"), median_interval(
            [ta / tb for ta, tb in zip(times[a], times[b], strict=True)]), strict=True))
            for k, (a, b) in ratios.items()},
        "max_rel_diff_vs_two_gemm": agreement,
        "max_rel_error_vs_float64": errors,
    }
    if memory:
        del outputs
        if device.type == "cuda":
            result["peak_memory"] = {m: cuda_peak(fn, device) for m, fn in fns.items()}
        else:
            del X, x, field, norms, fns
            result["peak_memory"] = {m: cpu_peak(m, n, D, B, t, threads) for m in methods}
    return result


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free interval for it: the order statistics
    x_(j) and x_(R + 1 - j) with the largest j such that P(Binomial(R, 1/2) < j) <= (1 - level) / 2,
    which covers the median with probability at least ``level`` (j = 1 when R is too small)."""
    xs, R = sorted(values), len(values)
    tail, j, below = (1.0 - level) / 2.0, 1, 0.0
    while j < (R + 1) // 2:
        below += math.comb(R, j - 1) / 2.0**R       # P(X <= j - 1)
        if below + math.comb(R, j) / 2.0**R > tail:  # P(X <= j) too large: stop at j
            break
        j += 1
    return statistics.median(xs), xs[j - 1], xs[R - j]


def parse_config(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a configuration is n,D,B (positive ints), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", type=parse_config, nargs="+", help="n,D,B triples")
    parser.add_argument("--times", type=float, nargs="+", default=[0.5], help="values of t")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 repeats, 1 thread: a smoke run")
    parser.add_argument("--out", type=Path,
                        help="JSON path (default benchmarks/out/velocity-<device>-<time>.json)")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        n, D, B = parse_config(rest[0])
        print(json.dumps(cpu_peak_child(args.memory_child, n, D, B, float(rest[1]))))
        return {}
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if not all(0.0 < t < 1.0 for t in args.times):
        parser.error("every --times value must lie in (0, 1)")
    configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    repeats = 3 if args.quick and args.repeats == 7 else args.repeats
    started = time.perf_counter()
    results = []
    for n, D, B in configs:
        for t in args.times:
            r = bench_config(n, D, B, t, device, repeats, max(1, args.warmup), args.threads,
                             memory=not args.no_memory)
            results.append(r)
            mem = r.get("peak_memory", {})
            print(f"n={n:>7} D={D:>5} B={B:>4} t={t:<5} "
                  + " ".join(f"{m}={v['median'] * 1e3:8.2f}ms" for m, v in r["time_s"].items())
                  + " | " + " ".join(f"{k}={v:.3f}" for k, v in r["ratios"].items())
                  + " | cpu-time " + " ".join(f"{k}={v:.3f}" for k, v in r["cpu_time_ratios"].items())
                  + " | paired " + " ".join(f"{k}={v['median']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                                            for k, v in r["paired_ratios"].items())
                  + " | error vs float64 "
                  + " ".join(f"{m}={e:.1e}" for m, e in r["max_rel_error_vs_float64"].items())
                  + (" | extra peak MiB " + " ".join(f"{m}={v['extra_peak_bytes'] / 2**20:.0f}"
                                                     for m, v in mem.items()) if mem else ""),
                  flush=True)
    record = {
        "provenance": provenance(
            {"configs": [list(c) for c in configs], "times": args.times, "repeats": repeats,
             "warmup": args.warmup, "quick": args.quick, "memory": not args.no_memory},
            device=device, wall_time_s=time.perf_counter() - started),
        "cpu_model": cpu_model(),
        "threads": args.threads,
        "methods": METHODS,
        "ratio_definitions": {k: f"median {a} / median {b}" for k, (a, b) in RATIOS.items()},
        "paired_ratio_definitions": {k: f"median over rounds of {a} / {b} in the same round, with an "
                                     "order-statistic interval of at least 95% coverage"
                                     for k, (a, b) in RATIOS.items()},
        "results": results,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "out" / f"velocity-{device.type}-{stamp}.json"
    write_json_atomic(out, record)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
