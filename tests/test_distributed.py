"""nwflow.distributed.ShardedField: two gloo ranks on 127.0.0.1 against one EmpiricalField over the
concatenated support (fp64 within 1e-12, fp32 within 1e-5), layout mismatches, a dead peer."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nwflow import EmpiricalField
from nwflow.distributed import ShardedField

F64 = torch.float64
SIZES = (37, 91)  # shards of different sizes, neither a multiple of the chunk size used


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int, timeout_s: float = 30.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _problem(dtype):
    """A mixture away from the origin, and queries on its path at per-row times that mix the
    regimes: spread weights (small t), collapsed weights (t near 1), near-ties between copies."""
    g = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(6, 5, generator=g, dtype=F64) + 4.0
    n = sum(SIZES)
    X = centres[torch.randint(0, 6, (n,), generator=g)] + 0.4 * torch.randn(n, 5, generator=g, dtype=F64)
    X[5] = X[100]                                            # a duplicated point, on the two ranks
    t = torch.tensor([0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 0.995, 0.999, 0.5, 0.7], dtype=F64)
    k = torch.randint(0, len(X), (len(t),), generator=g)
    x = (1 - t)[:, None] * torch.randn(len(t), 5, generator=g, dtype=F64) + t[:, None] * X[k]
    x[-1] = 0.999 * X[100] + 0.001 * torch.randn(5, generator=g, dtype=F64)  # the duplicated point's tie
    t[-1] = 0.999
    return X.to(dtype), x.to(dtype), t.to(dtype)


def _rel(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max())


def _agreement(rank, port):
    _init(rank, port)
    try:
        for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
            for sigma_min in (0.0, 0.05):
                X, x, t = _problem(dtype)
                shard = X[:SIZES[0]] if rank == 0 else X[SIZES[0]:]
                sharded = ShardedField(shard, sigma_min=sigma_min, chunk_size=16)
                whole = EmpiricalField(X, sigma_min=sigma_min)
                exact = EmpiricalField(X.double(), sigma_min=sigma_min)  # the float64 truth
                assert sharded.n == len(X) and sharded.rank == rank
                for name in ("velocity", "posterior_mean", "score"):
                    got = getattr(sharded, name)(x, t)
                    assert _rel(got, getattr(whole, name)(x, t)) <= tol, (name, dtype, sigma_min)
                    assert _rel(got, getattr(exact, name)(x.double(), t.double())) <= tol, (name, dtype)
                neff = sharded.effective_neighbours(x, t)
                assert _rel(neff[:, None], whole.effective_neighbours(x, t)[:, None]) <= tol
                assert float(neff[-1]) == pytest.approx(2.0, rel=1e-3)  # the duplicate: two equal weights
        # Gradients in x: the exact vector-Jacobian product is combined across ranks too.
        X, x, t = _problem(F64)
        shard = X[:SIZES[0]] if rank == 0 else X[SIZES[0]:]
        xg, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
        ShardedField(shard).velocity(xg, t).square().sum().backward()
        EmpiricalField(X).velocity(xw, t).square().sum().backward()
        assert _rel(xg.grad, xw.grad) <= 1e-10
        with pytest.raises(NotImplementedError, match="posterior weights"):
            ShardedField(shard).posterior_weights(x, t)
    finally:
        dist.destroy_process_group()


def _mismatch(rank, port):
    _init(rank, port)
    try:
        X = torch.randn(10, 3, dtype=F64)
        other = torch.randn(10, 4 if rank else 3, dtype=F64)
        cases = [({"local_support": other}, "trailing shape.*rank 1: \\(4,\\)"),
                 ({"local_support": X.float() if rank else X}, "dtype.*rank 1: torch.float32"),
                 ({"local_support": X, "sigma_min": 0.1 * rank}, "sigma_min.*rank 1: 0.1"),
                 ({"local_support": X[:0] if rank else X}, "rank 1: ValueError: local_support is empty"),
                 ({"local_support": torch.full_like(X, float("nan")) if rank else X}, "rank 1: .*NaN")]
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):  # on every rank, naming the faulty one
                ShardedField(**kwargs)
    finally:
        dist.destroy_process_group()


def _dead_peer(rank, port, flag):
    _init(rank, port, timeout_s=10.0)
    field = ShardedField(torch.randn(20, 3, dtype=F64))
    if rank == 1:
        os._exit(0)  # dies without a word to its peer
    start = time.monotonic()
    try:
        field.velocity(torch.randn(4, 3, dtype=F64), 0.5)
    except RuntimeError:
        with open(flag, "w") as fh:
            fh.write(f"{time.monotonic() - start:.2f}")
        os._exit(0)  # the group cannot be shut down cleanly without its peer
    os._exit(3)


def test_sharded_field_equals_one_field_over_the_concatenated_support():
    mp.spawn(_agreement, args=(_free_port(),), nprocs=2, join=True)


def test_mismatched_shards_raise_on_every_rank_naming_the_rank():
    mp.spawn(_mismatch, args=(_free_port(),), nprocs=2, join=True)


def test_without_a_process_group_the_error_says_what_to_call():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedField(torch.randn(5, 2))


def test_a_dead_peer_ends_in_an_error_not_a_hang(tmp_path):
    flag = tmp_path / "raised"
    context = mp.spawn(_dead_peer, args=(_free_port(), str(flag)), nprocs=2, join=False)
    deadline = time.monotonic() + 60.0
    while not context.join(timeout=1.0):
        assert time.monotonic() < deadline, "rank 0 still waiting on its dead peer after 60 s"
    assert flag.exists(), "rank 0 did not raise"
    assert float(flag.read_text()) < 30.0  # within the group's timeout (10 s) plus slack
