"""Closed-form sampling along a whole trajectory: the cost of each step, and its error.

    python benchmarks/trajectory.py                # CIFAR-10 train (n = 50,000), 100 steps, B = 64, 256
    python benchmarks/trajectory.py --batches 64 --steps 20 --n 5000
    python benchmarks/trajectory.py --synthetic --n 2000 --D 48 --batches 8 --steps 10  # no data (tests)

Euler steps x <- x + h u(x, t) from t = 0 to ``--t1`` (default 0.99) with the exact velocity of
the support, as a user samples from the closed form. At every step each method evaluates the
velocity at the same state (the state advances with ``field``'s result), so the per-step
times compare like with like along the run, through the regimes the posterior goes through
(all points weighted at t = 0, one point from t of about 0.3 on CIFAR-10):

- ``field``: ``nwflow.EmpiricalField(X, screen=True).velocity``, the field built once, its
  carried screen on (rows whose weight sits on a few candidates are screened from the
  previous step's trail);
- ``field_full``: the same with ``screen=False``, the default (every step the full pass);
- ``field_half_off``: ``field`` with ``reduced_precision=False``, only where the device's default
  turns the reduced-precision screen on (CUDA), so that what it buys is measured in the same run;
- ``two_gemm_pre``: logits by one ``addmm`` with cached key norms, ``softmax``, a second product;
- ``sdpa_pre``: torch's ``scaled_dot_product_attention`` with the cached key norms as a mask.

Subnormal numbers are flushed to zero for every method (``torch.set_flush_denormal``, set before
any thread starts; ``--keep-denormals`` turns it off). Once rows collapse, the two-GEMM's softmax
leaves a share of its weights below float32's smallest normal (12.8% at t = 0.3 on CIFAR-10), and
its second product multiplies them on the CPU's slow path: on a 2-core Xeon with AMX one step of
B = 64 took 3.0 s instead of 0.37 s, at B = 256 12.5 s against 0.9 s at t = 0.1, and on an AMD
EPYC 2 to 3.4 times its time at t = 0. A reference slowed that way flatters every ratio to it; a weight
below 1.2e-38 of the largest changes no result.

At ``--checks`` evenly spaced steps every method's result is compared with a float64
EmpiricalField without the screen (max over rows of ||u - u64|| / ||u64||); ``screened_rows``
counts the rows of each step the carried screen answered, ``reduced_rows`` those the
reduced-precision screen answered. Writes JSON with provenance (per-step
times and n_eff, totals, ratios ``field/two_gemm_pre`` and ``field/sdpa_pre``, errors) to
``benchmarks/out/`` (ignored by git). Data: ``NWFLOW_DATA_DIR`` or ``--root`` (see
:func:`nwflow.data.load_cifar10`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from velocity import sdpa, two_gemm  # noqa: E402  (the single-evaluation references, shared)

from nwflow import EmpiricalField  # noqa: E402
from nwflow._io import write_json_atomic  # noqa: E402
from nwflow._precision import exact_matmul  # noqa: E402
from nwflow.data import load_cifar10  # noqa: E402
from nwflow.provenance import cpu_model, provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent


def support(args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        return torch.rand(args.n, args.D, generator=g) * 2 - 1, f"uniform [-1, 1]^{args.D}"
    images, _ = load_cifar10(args.root, "train", limit=args.n)
    return images.reshape(len(images), -1), f"CIFAR-10 train, first {len(images)} images (loader's source)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(X: torch.Tensor, B: int, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, X.shape[1], generator=g).to(X.device)
    field, full = EmpiricalField(X, screen=True), EmpiricalField(X, screen=False)
    exact = EmpiricalField(X.double(), screen=False)
    norms = torch.linalg.vector_norm(X, dim=1).square()
    fns = {"field": lambda x, t: field.velocity(x, t), "field_full": lambda x, t: full.velocity(x, t),
           "two_gemm_pre": lambda x, t: two_gemm(x, t, X, norms),
           "sdpa_pre": lambda x, t: sdpa(x, t, X, norms)}
    if field.reduced_precision is not None:
        half_off = EmpiricalField(X, screen=True, reduced_precision=False)
        fns["field_half_off"] = lambda x, t: half_off.velocity(x, t)
    methods = tuple(fns)
    grid = torch.linspace(0.0, args.t1, args.steps + 1, dtype=torch.float64).tolist()
    checks = {round(i * (args.steps - 1) / max(args.checks - 1, 1)) for i in range(args.checks)}
    steps, errors = [], []
    with exact_matmul():
        for fn in fns.values():  # warm-up
            fn(x, 0.5)
        for k, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
            step = {"t": t, "time_s": {}}
            ref = exact.velocity(x.double(), t) if k in checks else None  # every method's same state
            for name, fn in fns.items():
                sync(X.device)
                start = time.perf_counter()
                u = fn(x, t)
                sync(X.device)
                step["time_s"][name] = time.perf_counter() - start
                if name == "field":
                    u_field = u
                if ref is not None:
                    err = float(((u.double() - ref).norm(dim=1) / ref.norm(dim=1)).max())
                    errors.append({"step": k, "t": t, "method": name, "max_rel_error": err})
            step["screened_rows"] = field.screened_rows
            step["reduced_rows"] = field.reduced_rows
            step["median_n_eff"] = float(full.effective_neighbours(x, t).median())
            steps.append(step)
            x = x + (t_next - t) * u_field
            print(f"B={B} step {k + 1}/{args.steps} t={t:.3f} screened={step['screened_rows']} " + " ".join(
                f"{m}={s * 1e3:.0f}ms" for m, s in step["time_s"].items()), flush=True)
    totals = {m: sum(s["time_s"][m] for s in steps) for m in methods}
    ratios = {f"{m}/{ref}": totals[m] / totals[ref] for m in methods if m.startswith("field")
              for ref in ("two_gemm_pre", "sdpa_pre")}
    return {"B": B, "reduced_precision": str(field.reduced_precision), "steps": steps, "totals_s": totals,
            "ratios": ratios,
            "errors": errors, "worst_error": {m: max(e["max_rel_error"] for e in errors if e["method"] == m)
                                              for m in methods}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--D", type=int, default=3072, help="with --synthetic only")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--t1", type=float, default=0.99)
    p.add_argument("--checks", type=int, default=5, help="steps compared with float64")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--synthetic", action="store_true", help="uniform data instead of CIFAR-10")
    p.add_argument("--root", default=None, help="CIFAR-10 folder (default NWFLOW_DATA_DIR)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush subnormals to zero (the two-GEMM then slows once rows collapse)")
    args = p.parse_args(argv)
    if not (0.0 < args.t1 < 1.0) or args.steps < 2 or args.checks < 1:
        p.error("--t1 must lie in (0, 1), --steps be at least 2 and --checks at least 1")
    # Before any parallel region: worker threads started later inherit the flush-to-zero mode.
    flush = not args.keep_denormals and torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    X, data = support(args)
    X = X.to(args.device)
    results = [run_batch(X, B, args) for B in args.batches]
    config = {k: getattr(args, k) for k in ("n", "batches", "steps", "t1", "checks", "synthetic")}
    config["flush_denormal"] = bool(flush)
    record = {"data": data, "n": len(X), "D": X.shape[1], "device": str(X.device), "cpu_model": cpu_model(),
              "threads": torch.get_num_threads(), "results": results,
              "provenance": provenance(config, device=X.device, wall_time_s=time.time() - start)}
    out = args.out or ROOT / "out" / f"trajectory-{X.device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(out, record)
    for r in results:
        print(f"B={r['B']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
              + "; worst error vs float64 " + ", ".join(f"{m} {e:.1e}" for m, e in r["worst_error"].items()))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
