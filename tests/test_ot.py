"""Tests for nwflow.ot against independent float64 references.

References: brute-force enumeration of permutations (tiny n), scipy's linear_sum_assignment
and linprog, and a plain numpy Sinkhorn. The field of a set of pairs is
``nwflow.rectified.pair_velocity``, tested in test_rectified.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from nwflow.ot import ot_pairs, ot_plan, squared_distances


def rng_points(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64)


def brute_cost(C):
    """Minimum of sum_i C[i, p(i)] over all permutations p (numpy float64)."""
    n = C.shape[0]
    return min(sum(C[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))


def test_squared_distances_matches_explicit_differences():
    a, b = rng_points(7, 3, 0), rng_points(5, 3, 1)
    ref = ((a.numpy()[:, None, :] - b.numpy()[None, :, :]) ** 2).sum(-1)
    C = squared_distances(a, b)
    assert C.dtype == torch.float64
    np.testing.assert_allclose(C.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert float(squared_distances(a, a).diagonal().abs().max()) < 1e-12
    assert bool((squared_distances(a, a) >= 0).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_plan_is_the_brute_force_optimal_permutation(seed):
    n = 6
    x0, x1 = rng_points(n, 2, seed), rng_points(n, 2, seed + 10, 2.0)
    P = ot_plan(x0, x1)
    C = ((x0.numpy()[:, None] - x1.numpy()[None]) ** 2).sum(-1)
    # a permutation matrix / n
    np.testing.assert_allclose(np.sort(P.numpy().ravel())[-n:], np.full(n, 1.0 / n), rtol=1e-12)
    assert int((P > 0).sum()) == n
    assert abs(float((P.numpy() * C).sum()) - brute_cost(C) / n) < 1e-12


def test_exact_plan_with_weights_matches_linprog():
    x0, x1 = rng_points(5, 2, 3), rng_points(4, 2, 4)
    a = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    b = torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    P = ot_plan(x0, x1, a=a, b=b)
    an, bn = a.numpy() / a.sum().item(), b.numpy() / b.sum().item()
    np.testing.assert_allclose(P.sum(1).numpy(), an, atol=1e-12)
    np.testing.assert_allclose(P.sum(0).numpy(), bn, atol=1e-12)
    C = ((x0.numpy()[:, None] - x1.numpy()[None]) ** 2).sum(-1)
    A_eq = np.vstack([np.kron(np.eye(5), np.ones(4)), np.kron(np.ones(5), np.eye(4))])
    ref = linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([an, bn]), bounds=(0, None), method="highs")
    assert ref.status == 0
    assert abs(float((P.numpy() * C).sum()) - ref.fun) < 1e-10


def numpy_sinkhorn(a, b, C, reg, iters=20000):
    K = np.exp(-C / reg)
    v = np.ones_like(b)
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u[:, None] * K * v[None, :]


def test_sinkhorn_plan_matches_numpy_sinkhorn_and_tends_to_exact():
    n = 6
    x0, x1 = rng_points(n, 2, 5), rng_points(n, 2, 6, 2.0)
    C = ((x0.numpy()[:, None] - x1.numpy()[None]) ** 2).sum(-1)
    a = np.full(n, 1.0 / n)
    P = ot_plan(x0, x1, method="sinkhorn", reg=0.3)
    ref = numpy_sinkhorn(a, a, C / C.mean(), 0.3)
    np.testing.assert_allclose(P.numpy(), ref, atol=1e-7)
    np.testing.assert_allclose(P.sum(1).numpy(), a, atol=1e-6)
    exact = float((ot_plan(x0, x1).numpy() * C).sum())
    costs = [float((ot_plan(x0, x1, method="sinkhorn", reg=r).numpy() * C).sum()) for r in (1.0, 0.3, 0.1)]
    assert costs[0] > costs[1] > costs[2] > exact - 1e-12
    assert costs[2] - exact < 0.25 * (costs[0] - exact)


def test_ot_pairs_with_repeated_data_is_an_optimal_assignment():
    atoms = rng_points(3, 2, 7, 2.0)
    idx = torch.tensor([0, 1, 1, 2, 2, 2, 0])
    x1 = atoms[idx]
    x0 = rng_points(7, 2, 8)
    a, b = ot_pairs(x0, x1)
    assert torch.equal(a, x0)
    # every copy of every atom used exactly its multiplicity
    for j in range(3):
        used = (b == atoms[j]).all(dim=1).sum().item()
        assert used == int((idx == j).sum())
    C = ((x0.numpy()[:, None] - x1.numpy()[None]) ** 2).sum(-1)
    cost = float(((a - b) ** 2).sum())
    assert abs(cost - brute_cost(C)) < 1e-12


def test_ot_pairs_large_batch_matches_linear_sum_assignment():
    atoms = rng_points(5, 2, 9, 2.0)
    g = torch.Generator().manual_seed(10)
    x1 = atoms[torch.randint(0, 5, (300,), generator=g)]
    x0 = rng_points(300, 2, 11)
    _, b = ot_pairs(x0, x1)
    C = ((x0.numpy()[:, None] - x1.numpy()[None]) ** 2).sum(-1)
    r, c = linear_sum_assignment(C)
    assert abs(float(((x0 - b) ** 2).sum()) - C[r, c].sum()) < 1e-9


def test_sinkhorn_pairs_small_reg_recover_the_assignment_on_separated_data():
    x1 = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    x0 = x1 * 0.2 + 0.01
    _, b = ot_pairs(x0, x1, method="sinkhorn", reg=0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b, x1)


def test_bad_inputs_raise_named_errors():
    x = rng_points(4, 2, 0)
    with pytest.raises(ValueError, match="method"):
        ot_plan(x, x, method="greedy")
    with pytest.raises(ValueError, match="reg"):
        ot_plan(x, x, method="sinkhorn", reg=-1.0)
    with pytest.raises(ValueError, match="dimension"):
        ot_plan(x, rng_points(4, 3, 1))
    with pytest.raises(ValueError, match="same number"):
        ot_pairs(x, rng_points(5, 2, 1))
    with pytest.raises(ValueError, match="a must"):
        ot_plan(x, x, a=torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x0"):
        ot_plan(torch.ones(4, 2, dtype=torch.int64), x)
    with pytest.raises(ValueError, match="x1"):
        ot_plan(x, torch.full((4, 2), float("nan"), dtype=torch.float64))
