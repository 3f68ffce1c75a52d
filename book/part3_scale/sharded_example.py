"""One support split over two processes: nwflow.distributed.ShardedField, run by torchrun.

    torchrun --standalone --nproc_per_node=2 sharded_example.py OUT.json

Every rank builds the same float64 problem from one seed and keeps only its shard of the
support (shards of different sizes); the queries are replicated. Rank 0 compares the
sharded velocity, posterior mean, score and effective number of neighbours with one
EmpiricalField over the whole support and writes the largest relative differences to
OUT.json (through a temporary file and a rename). Chapter 9 runs this file and checks the
numbers; on several machines, pass torchrun's --nnodes and --rdzv-endpoint instead of
--standalone (each rank then brings its own memory for its shard).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from nwflow import EmpiricalField
from nwflow._io import write_json_atomic
from nwflow.distributed import ShardedField

N, D, B, TIMES = 1001, 16, 64, (0.2, 0.7, 0.95)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over rows of |a - b| / |b| (rows of vectors) or |a - b| / |b| (scalars)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    # 91 tight clusters of 11 points each, off the origin: the weights stay spread over a
    # cluster late in t, and a cluster is cut between the shards
    centres = 3 * torch.randn(N // 11, D, generator=g, dtype=torch.float64) + 1.0
    support = centres.repeat_interleave(11, 0) + 0.05 * torch.randn(N, D, generator=g, dtype=torch.float64)
    queries = torch.randn(B, D, generator=g, dtype=torch.float64)
    bounds = [0, *[round((r + 1) * N / (world + 1)) for r in range(world - 1)], N]   # unequal shards
    sharded = ShardedField(support[bounds[rank]:bounds[rank + 1]])
    whole = EmpiricalField(support)
    sizes = [bounds[r + 1] - bounds[r] for r in range(world)]
    report = {"world_size": world, "shard_sizes": sizes, "rows": []}
    for t in TIMES:
        x = (1 - t) * queries + t * support[torch.arange(B) * 7 % N]
        row = {"t": t, "median_n_eff": float(whole.effective_neighbours(x, t).median())}
        for name in ("velocity", "posterior_mean", "score", "effective_neighbours"):
            row[name] = relative(getattr(sharded, name)(x, t), getattr(whole, name)(x, t))
        report["rows"].append(row)
    if rank == 0:
        write_json_atomic(out, report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
