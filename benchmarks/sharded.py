"""One rank against two: nwflow.distributed.ShardedField on a support split over gloo ranks.

    python benchmarks/sharded.py                       # runs torchrun with 1 and then 2 ranks, writes JSON
    python benchmarks/sharded.py --n 20000 --D 3072 --B 64 --times 0.1 0.5 0.9
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/sharded.py --worker  # one size

Every configuration uses the same cores in all (``--cores``, default all of this machine's):
one rank with all of them as torch threads, or two ranks with half each, so the ratio says what
sharding costs or gains on one machine (on several machines each rank brings its own cores and
memory, which is what sharding is for). Each rank builds the same data from one seed and keeps
its shard; queries are replicated. Times are medians of ``--repeats`` calls of
``field.velocity`` after a warm-up, taken on rank 0 after a barrier; the result of each world
size is checked against one EmpiricalField over the whole support. Writes JSON with provenance
to ``benchmarks/out/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nwflow import EmpiricalField
from nwflow._io import write_json_atomic
from nwflow.distributed import ShardedField
from nwflow.provenance import cpu_model, provenance

ROOT = Path(__file__).resolve().parent


def problem(n: int, D: int, B: int, t: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, D, generator=g) * 2 - 1
    x = (1 - t) * torch.randn(B, D, generator=g) + t * X[torch.randint(0, n, (B,), generator=g)]
    return X, x


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, args.cores // world))
    rows = []
    for t in args.times:
        X, x = problem(args.n, args.D, args.B, t)
        bounds = [round(r * args.n / world) for r in range(world + 1)]
        field = ShardedField(X[bounds[rank]:bounds[rank + 1]].clone())
        u = field.velocity(x, t)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            field.velocity(x, t)
            times.append(time.perf_counter() - start)
        if rank == 0:
            ref = EmpiricalField(X.double()).velocity(x.double(), t)
            err = float(((u.double() - ref).norm(dim=1) / ref.norm(dim=1)).max())
            rows.append({"t": t, "median_s": statistics.median(times), "all_s": times,
                         "max_rel_error_vs_float64": err})
    if rank == 0:
        out = args.out or ROOT / "out" / f"sharded-w{world}.json"
        threads = torch.get_num_threads()
        write_json_atomic(out, {"world_size": world, "threads_per_rank": threads, "results": rows})
    dist.destroy_process_group()


def run(world: int, args: argparse.Namespace, out: Path) -> dict:
    # The worker's options go after the script, where torchrun's own parser would take
    # abbreviations of them (--n for --nnodes): they travel as arguments of --worker-args.
    worker_args = json.dumps({**vars(args), "out": str(out)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__).resolve()), "--worker", f"--worker-args={worker_args}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.cores // world))}
    subprocess.run(cmd, check=True, env=env, timeout=3600)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--D", type=int, default=3072)
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--times", type=float, nargs="+", default=[0.1, 0.5, 0.9, 0.999])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help="run as one torchrun rank")
    p.add_argument("--worker-args", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.worker_args:
            vars(args).update(json.loads(args.worker_args))
        worker(args)
        return
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {w: run(w, args, Path(tmp) / f"w{w}.json") for w in (1, 2)}
    ratios = {str(r1["t"]): r2["median_s"] / r1["median_s"]
              for r1, r2 in zip(runs[1]["results"], runs[2]["results"], strict=True)}
    config = {k: getattr(args, k) for k in ("n", "D", "B", "times", "repeats", "cores")}
    record = {"runs": {str(w): r for w, r in runs.items()}, "ratio_2_ranks_over_1": ratios,
              "cpu_model": cpu_model(), "provenance": provenance(config, wall_time_s=time.time() - start)}
    out = Path(args.out) if args.out else ROOT / "out" / f"sharded-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(out, record)
    for t, r in ratios.items():
        print(f"t = {t}: 2 ranks / 1 rank = {r:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
