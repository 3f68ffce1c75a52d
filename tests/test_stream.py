"""nwflow._stream: the online log-sum-exp against explicit float64 softmax sums, for any split."""

import pytest
import torch

from nwflow import _stream
from nwflow._stream import (
    Block,
    kept_softmax,
    largest,
    online_softmax,
    softmax_mean,
    take_rows,
    value_product,
)

F64 = torch.float64


def _problem(B=5, n=53, D=4, scale=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, n, generator=g, dtype=F64)
    return (logits, torch.randn(n, D, generator=g, dtype=F64), torch.randn(B, n, generator=g, dtype=F64),
            torch.rand(n, generator=g, dtype=F64))


def _blocks(logits, values, factor, scalars, edges):
    for s, e in zip(edges[:-1], edges[1:], strict=True):
        yield Block(logits[:, s:e].clone(), values[s:e], factor[:, s:e], scalars[s:e], start=s)


@pytest.mark.parametrize("edges", [[0, 53], [0, 1, 53], [0, 10, 20, 30, 40, 50, 53], list(range(54))])
def test_every_accumulator_matches_the_explicit_softmax_for_any_split(edges):
    logits, V, F, s = _problem()
    w = torch.softmax(logits, dim=1)
    acc = online_softmax(_blocks(logits, V, F, s, edges), squares=True, top_k=7)
    torch.testing.assert_close(acc.mean, (w * F) @ V, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(acc.factor_mean, (w * F).sum(1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(acc.square, w.square().sum(1), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(acc.scalar, w @ s, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(acc.row_max, logits.amax(1), rtol=0.0, atol=0.0)
    top = torch.topk(logits, 7, dim=1)
    assert torch.equal(acc.top_index, top.indices) and torch.equal(acc.top_logits, top.values)


def test_blocks_with_far_apart_maxima_are_rescaled_not_added():
    """A later block whose logits are 1000 above the first: a pass that did not rescale what it
    had summed (or that added per-block log-sum-exps) would weigh the first block by e^1000."""
    logits, V, _, _ = _problem(B=3, n=20)
    logits[:, 10:] += 1000.0
    acc = online_softmax(Block(logits[:, s:s + 10].clone(), V[s:s + 10], start=s) for s in (0, 10))
    torch.testing.assert_close(acc.mean, torch.softmax(logits, 1) @ V, rtol=1e-13, atol=1e-13)
    assert bool(torch.isfinite(acc.mean).all())


def test_fp32_logits_of_size_1e4_do_not_overflow():
    logits, V, _, _ = _problem(scale=1e4)
    m = softmax_mean(logits.float(), V.float())
    assert m.dtype == torch.float32
    torch.testing.assert_close(m.double(), torch.softmax(logits, 1) @ V, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_kept_softmax_is_the_softmax_over_each_rows_own_keys(layout):
    """Each row's sums over its kept keys alone, as the explicit softmax with the other logits at
    -inf: rows keeping one key, all keys and a random share, from the engine's transposed (n, B)
    block as well as a row-major one. A wrong row pointer or maximum would mix rows' weights."""
    logits, V, _, s = _problem(B=6, n=53)
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(6, 53, generator=g) < torch.tensor([0.0, 1.0, 0.1, 0.3, 0.6, 0.9])[:, None]
    keep[0, 17] = True                        # a single key
    keep[2, logits[2].argmax()] = True        # the row's best key among a few
    keep[:, 0] |= ~keep.any(dim=1)
    given = logits.T.contiguous().T if layout == "transposed" else logits
    acc = kept_softmax(given.clone(), keep.T.contiguous().T if layout == "transposed" else keep, V, s)
    masked = logits.masked_fill(~keep, -torch.inf)
    w = torch.softmax(masked, dim=1)
    torch.testing.assert_close(acc.mean, w @ V, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(acc.scalar, w @ s, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(acc.row_max, masked.amax(1), rtol=0.0, atol=0.0)
    torch.testing.assert_close(acc.total, torch.exp(masked - masked.amax(1, keepdim=True)).sum(1),
                               rtol=1e-14, atol=0.0)
    torch.testing.assert_close(acc.mean[0], V[17], rtol=0.0, atol=0.0)
    # The same sums as the dense pass when every key is kept, in float32 too.
    everything = torch.ones_like(keep)
    dense = online_softmax([Block(logits.float().clone(), V.float(), scalars=s.float())])
    sparse = kept_softmax(logits.float(), everything, V.float(), s.float())
    torch.testing.assert_close(sparse.mean, dense.mean, rtol=1e-5, atol=1e-6)
    assert sparse.scalar is not None and kept_softmax(logits, keep, V).scalar is None


def test_kept_softmax_sums_in_short_runs(monkeypatch):
    """Rows keeping thousands of keys, values far from the origin, in float32: summed in runs of
    at most RUN, the mean is as close to float64 as the dense product's; summed in one run per
    row (RUN beyond n) the rounding of the long sequential sums is several times larger."""
    import nwflow._stream as stream

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(8, 6000, generator=g, dtype=F64)
    V = 100.0 + torch.rand(6000, 16, generator=g, dtype=F64)
    keep = torch.rand(8, 6000, generator=g) < 0.8
    want = torch.softmax(logits.masked_fill(~keep, -torch.inf), dim=1) @ V
    l32, V32 = logits.float(), V.float()

    def error(mean):
        return float(((mean.double() - want).norm(dim=1) / want.norm(dim=1)).max())

    dense = error(online_softmax([Block(l32.masked_fill(~keep, -torch.inf), V32)]).mean)
    short = error(kept_softmax(l32, keep, V32).mean)
    monkeypatch.setattr(stream, "RUN", 10**6)
    long = error(kept_softmax(l32, keep, V32).mean)
    eps = torch.finfo(torch.float32).eps
    assert short <= max(4 * dense, 4 * eps) and long > 4 * short, (dense, short, long)


def test_softmax_mean_leaves_its_input_and_checks_shapes():
    logits, V, _, _ = _problem()
    kept = logits.clone()
    torch.testing.assert_close(softmax_mean(logits, V), torch.softmax(kept, 1) @ V, rtol=1e-14, atol=1e-14)
    assert torch.equal(logits, kept)
    with pytest.raises(ValueError, match="must agree on n"):
        softmax_mean(logits, V[:-1])
    with pytest.raises(ValueError, match="no keys"):
        softmax_mean(torch.empty(2, 0), torch.empty(0, 3))
    with pytest.raises(ValueError, match="blocks is empty"):
        online_softmax([])


def test_softmax_mean_takes_one_value_set_per_task_and_is_differentiable():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 9, generator=g, dtype=F64, requires_grad=True)   # 4 tasks, 3 queries, 9 keys
    values = torch.randn(4, 9, 2, generator=g, dtype=F64, requires_grad=True)
    ref = torch.softmax(logits, -1) @ values
    torch.testing.assert_close(softmax_mean(logits, values), ref, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(softmax_mean, (logits, values))
    # A shared value set broadcasts over the tasks.
    torch.testing.assert_close(softmax_mean(logits, values[0]), torch.softmax(logits, -1) @ values[0],
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("n", [16 * 40, 16 * 40 + 7, 1000])
@pytest.mark.parametrize("k", [1, 8, 39])
def test_largest_has_topks_values_on_the_transposed_layout_with_ties_and_infinities(n, k):
    g = torch.Generator().manual_seed(n + k)
    blocks = [torch.randn(n, 12, generator=g),
              torch.randint(-3, 4, (n, 12), generator=g).float(),   # heavy ties, across groups
              torch.full((n, 12), -torch.inf)]
    blocks[2][n - 1, 3] = 2.0                                       # the maximum in the trailing keys
    blocks[2][5, 4] = 1.0
    for block in blocks:
        logits = block.T                                            # (r, n) view of an (n, r) block
        values, index = largest(logits, k)
        expected = torch.topk(logits, k, dim=1).values
        assert torch.equal(values, expected)
        assert torch.equal(logits.gather(1, index), values)
        assert all(len(set(row.tolist())) == k for row in index)   # k distinct keys per row
    # The planted maximum is found, also past the last whole group (n = 647).
    assert largest(blocks[2].T, k)[1][3, 0] == n - 1


def test_largest_on_a_row_major_block_is_topk():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    values, index = largest(logits, 7)
    reference = torch.topk(logits, 7, dim=1)
    assert torch.equal(values, reference.values) and torch.equal(index, reference.indices)


def test_take_rows_is_indexing_and_keeps_a_transposed_block_transposed():
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([4, 0, 7, 7])
    for block in (torch.randn(50, 9, generator=g).T, torch.randn(9, 50, generator=g),
                  torch.rand(50, 9, generator=g).T > 0.5):
        part = take_rows(block, rows)
        assert torch.equal(part, block[rows])
        assert part.T.is_contiguous() == (not block.is_contiguous())


@pytest.mark.parametrize("rows, n", [(5, 10_000), (64, 9_000), (65, 10_000), (7, 8_192), (3, 100)])
def test_value_product_is_the_matrix_product_in_either_layout(monkeypatch, rows, n):
    """Split into batches of keys (few rows, many keys: n = 10,000 is two batches of 4,096 and a
    remainder) or not, both layouts of the weights (the engine's is a transposed block): the
    product of float64 references to float32 rounding, and differentiable in both factors."""
    assert _stream._SPLIT_KEYS == 4096
    g = torch.Generator().manual_seed(9)
    p64 = torch.rand(rows, n, generator=g, dtype=torch.float64)
    v64 = torch.randn(n, 12, generator=g, dtype=torch.float64)
    ref = p64 @ v64
    scale = p64 @ v64.abs()
    for p in (p64.float(), p64.float().T.contiguous().T):
        got = value_product(p, v64.float()).double()
        assert got.shape == ref.shape
        assert float(((got - ref).abs() / scale).max()) < 1e-5
    split = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: split.append(a[0].shape) or real(*a))
    p = p64.float().requires_grad_()
    v = v64.float().requires_grad_()
    value_product(p, v).sum().backward()
    assert torch.allclose(p.grad.double(), v64.sum(dim=1).expand(rows, n), rtol=1e-5, atol=1e-4)
    assert torch.allclose(v.grad.double(), p64.sum(dim=0)[:, None].expand(n, 12), rtol=1e-5)
    assert bool(split) == (rows <= 64 and n > 2 * 4096), split
