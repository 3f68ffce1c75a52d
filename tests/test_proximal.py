"""Tests for nwflow.proximal against independent float64 references.

References: the simplex QP solved by enumerating every candidate support (tiny n, exact up to
rounding) and by scipy's SLSQP; prox_{phi / h} solved independently by SLSQP in epigraph form
(for Moreau's identity); the conjugate psi as the lower convex hull of the lifted points
(x^(j), g_j) from scipy's qhull; Monte Carlo cell masses from a fresh generator.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.spatial import ConvexHull

import nwflow
from nwflow.proximal import (
    brenier_map,
    brenier_potential,
    conjugate_potential,
    laguerre_index,
    laguerre_masses,
    prox_conjugate,
    proximal_target,
    proximal_velocity,
    semidiscrete_dual,
    standard_normal_qmc,
)


def problem(n, d, seed, scale=2.0, gscale=0.5):
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = gscale * torch.randn(n, generator=g, dtype=torch.float64)
    return X, w


def qp_objective(lam, X, g, z, h):
    return lam @ g + ((lam @ X - z) ** 2).sum() / (2 * h)


def prox_enumerate(z, h, X, g):
    """min over lambda in the simplex by trying every support S (|S| <= D + 1): on S the
    KKT system is linear; keep feasible (lambda >= 0) solutions, return the best y."""
    n, d = X.shape
    best, best_y = math.inf, None
    for k in range(1, min(n, d + 1) + 1):
        for S in itertools.combinations(range(n), k):
            XS = X[list(S)]
            M = np.zeros((k + 1, k + 1))
            M[:k, :k] = XS @ XS.T / h
            M[:k, k] = 1.0
            M[k, :k] = 1.0
            rhs = np.concatenate([XS @ z / h - g[list(S)], [1.0]])
            try:
                sol = np.linalg.solve(M, rhs)
            except np.linalg.LinAlgError:
                continue
            lam_s = sol[:k]
            if (lam_s < -1e-12).any():
                continue
            lam = np.zeros(n)
            lam[list(S)] = np.clip(lam_s, 0, None)
            val = qp_objective(lam, X, g, z, h)
            if val < best - 1e-14:
                best, best_y = val, lam @ X
    return best_y, best


@pytest.mark.parametrize("seed,d", [(0, 2), (1, 2), (2, 3)])
def test_prox_matches_exhaustive_enumeration(seed, d):
    X, g = problem(6, d, seed)
    gz = torch.Generator().manual_seed(100 + seed)
    Z = 3.0 * torch.randn(40, d, generator=gz, dtype=torch.float64)
    for h in (0.05, 0.7, 5.0):
        y, info = prox_conjugate(Z, h, X, g, return_info=True)
        for i in range(Z.shape[0]):
            ref_y, ref_val = prox_enumerate(Z[i].numpy(), h, X.numpy(), g.numpy())
            assert np.abs(y[i].numpy() - ref_y).max() < 1e-9
            lam = info["weights"][i].numpy()
            assert lam.min() >= 0 and abs(lam.sum() - 1) < 1e-12
            assert abs(qp_objective(lam, X.numpy(), g.numpy(), Z[i].numpy(), h) - ref_val) < 1e-10
        assert float(info["error_bound"].max()) < 1e-6


def test_prox_with_many_tied_atoms_regular_hexagon():
    """Equal weights on a regular hexagon: psi is the indicator of the hexagon, so the prox is
    the projection onto it; inside, all six atoms tie (more than D + 1: degenerate)."""
    ang = 2 * math.pi * torch.arange(6, dtype=torch.float64) / 6
    X = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    g = torch.zeros(6, dtype=torch.float64)
    Z = 2.5 * torch.randn(60, 2, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    y, info = prox_conjugate(Z, 0.6, X, g, return_info=True)
    inside = Z.norm(dim=1) < 2.0 * math.cos(math.pi / 6)
    assert 5 < int(inside.sum()) < 55
    np.testing.assert_allclose(y[inside].numpy(), Z[inside].numpy(), atol=1e-10)
    for i in range(60):
        ref_y, _ = prox_enumerate(Z[i].numpy(), 0.6, X.numpy(), g.numpy())
        assert np.abs(y[i].numpy() - ref_y).max() < 1e-9
    assert float(info["error_bound"].max()) < 1e-6


def test_prox_matches_slsqp_and_accepts_per_row_h():
    X, g = problem(8, 2, 3)
    Z = 2.5 * torch.randn(12, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    y = prox_conjugate(Z, h, X, g)
    Xn, gn = X.numpy(), g.numpy()
    for i in range(12):
        res = minimize(qp_objective, np.full(8, 1 / 8), args=(Xn, gn, Z[i].numpy(), h[i].item()),
                       method="SLSQP", bounds=[(0, 1)] * 8,
                       constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1}],
                       options={"ftol": 1e-10, "maxiter": 1000})
        assert res.success
        assert np.abs(y[i].numpy() - res.x @ Xn).max() < 1e-5


def prox_phi_slsqp(w, h, X, g):
    """prox_{phi / h}(w) = argmin_u phi(u) / h + ||u - w||^2 / 2, solved by SLSQP in epigraph
    form: min_{u, s} s + (h / 2) ||u - w||^2 subject to s >= <u, x^(j)> - g_j for all j."""
    d = X.shape[1]
    A = np.column_stack([-X, np.ones(len(g))])          # A [u; s] + g >= 0

    def f(v):
        return v[d] + 0.5 * h * ((v[:d] - w) ** 2).sum()

    def jac(v):
        return np.concatenate([h * (v[:d] - w), [1.0]])

    v0 = np.concatenate([w, [np.max(X @ w - g) + 1.0]])
    res = minimize(f, v0, jac=jac, method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda v: A @ v + g, "jac": lambda v: A}],
                   options={"ftol": 1e-12, "maxiter": 2000})
    assert res.success
    return res.x[:d]


def test_moreau_identity_with_an_independent_prox_of_phi():
    X, g = problem(7, 2, 5)
    Z = 3.0 * torch.randn(10, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for h in (0.2, 1.5):
        y = prox_conjugate(Z, h, X, g).numpy()
        for i in range(10):
            u = prox_phi_slsqp(Z[i].numpy() / h, h, X.numpy(), g.numpy())
            # prox_{h psi}(z) + h prox_{phi / h}(z / h) = z
            assert np.abs(y[i] + h * u - Z[i].numpy()).max() < 1e-8


def lower_hull_psi(Y, X, g):
    """psi on the hull from the lower facets of the lifted points (x_j, g_j) (qhull)."""
    hull = ConvexHull(np.column_stack([X, g]))
    lower = hull.equations[hull.equations[:, 2] < -1e-12]        # outward normal points down
    # facet: n_x . x + n_g . g + off = 0  ->  g = -(n_x . x + off) / n_g
    vals = -(Y @ lower[:, :2].T + lower[:, 3]) / lower[:, 2]
    return vals.max(axis=1)


def test_conjugate_potential_is_the_lower_convex_hull():
    X, g = problem(9, 2, 7)
    lam = torch.distributions.Dirichlet(torch.ones(9, dtype=torch.float64)).sample((25,))
    Y = lam @ X                                              # points inside the hull
    psi = conjugate_potential(Y, X, g).numpy()
    np.testing.assert_allclose(psi, lower_hull_psi(Y.numpy(), X.numpy(), g.numpy()), atol=1e-9)
    far = X.abs().max() * 10 * torch.ones(1, 2, dtype=torch.float64)
    assert math.isinf(float(conjugate_potential(far, X, g)[0]))


def test_prox_solution_attains_psi():
    """sum_j lambda_j g_j equals psi(y): the optimal weights realise the conjugate."""
    X, g = problem(7, 2, 8)
    Z = 2.0 * torch.randn(15, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y, info = prox_conjugate(Z, 0.5, X, g, return_info=True)
    psi = conjugate_potential(y, X, g)
    np.testing.assert_allclose((info["weights"] @ g).numpy(), psi.numpy(), atol=1e-9)


def test_brenier_potential_map_and_smoothing():
    X, g = problem(6, 2, 10)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    a = x0.numpy() @ X.numpy().T - g.numpy()
    np.testing.assert_allclose(brenier_potential(x0, X, g).numpy(), a.max(1), atol=1e-13)
    np.testing.assert_allclose(brenier_map(x0, X, g).numpy(), X.numpy()[a.argmax(1)], atol=0)
    assert torch.equal(laguerre_index(x0, X, g), torch.from_numpy(a.argmax(1)))
    for eps in (1.0, 0.1):
        phi_eps = brenier_potential(x0, X, g, eps=eps).numpy()
        assert (phi_eps >= a.max(1) - 1e-12).all() and (phi_eps <= a.max(1) + eps * math.log(6) + 1e-12).all()
        w = np.exp((a - a.max(1, keepdims=True)) / eps)
        w /= w.sum(1, keepdims=True)
        np.testing.assert_allclose(brenier_map(x0, X, g, eps=eps).numpy(), w @ X.numpy(), atol=1e-12)
        # at t = 0 the trajectory's end point is the (smoothed) Brenier map of x itself
        np.testing.assert_allclose(proximal_target(x0, 0.0, X, g, eps=eps).numpy(), w @ X.numpy(), atol=1e-12)
    # eps -> 0 recovers the hard map away from cell boundaries
    margin = np.sort(a, axis=1)[:, -1] - np.sort(a, axis=1)[:, -2]
    keep = margin > 0.05
    soft = brenier_map(x0, X, g, eps=1e-3).numpy()
    assert np.abs(soft[keep] - X.numpy()[a.argmax(1)][keep]).max() < 1e-9


def test_nadaraya_watson_mean_is_the_smoothed_voronoi_map():
    """Part I's posterior mean at x is grad phi_eps(x / t) with g_j = ||x^(j)||^2 / 2, eps = h^2."""
    X, _ = problem(10, 2, 12)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    for t in (0.3, 0.8):
        h = (1 - t) / t
        m = nwflow.posterior_mean(x, t, X)
        soft = brenier_map(x / t, X, 0.5 * X.square().sum(1), eps=h * h)
        np.testing.assert_allclose(m.numpy(), soft.numpy(), atol=1e-12)


def test_semidiscrete_dual_equalises_cell_masses():
    X, _ = problem(8, 2, 14)
    res = semidiscrete_dual(X, n_samples=2**14, n_check=2**16, seed=3)
    assert res.g.shape == (8,) and abs(float(res.g.mean())) < 1e-12
    # an independent sample, drawn here with its own generator
    fresh = torch.randn(2**17, 2, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    a = fresh.numpy() @ X.numpy().T - res.g.numpy()
    masses = np.bincount(a.argmax(1), minlength=8) / fresh.shape[0]
    sd = math.sqrt((1 / 8) * (7 / 8) / fresh.shape[0])
    assert np.abs(masses - 1 / 8).max() < 5 * sd + 3e-3
    assert res.max_mass_error < 5 * res.mc_std + 3e-3
    # the start (Voronoi cells) is far from equal masses, so the solver did something
    a0 = fresh.numpy() @ X.numpy().T - 0.5 * (X.numpy() ** 2).sum(1)
    assert np.abs(np.bincount(a0.argmax(1), minlength=8) / fresh.shape[0] - 1 / 8).max() > 0.02


def test_semidiscrete_dual_of_a_regular_polygon_is_constant_and_weights_are_respected():
    k = 6
    ang = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    X = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * 1.5
    res = semidiscrete_dual(X, n_samples=2**14, n_check=2**15)
    assert float(res.g.abs().max()) < 2e-3           # symmetry: equal weights, sectors of mass 1/k
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    Y = torch.tensor([[-2.0, 0.0], [1.0, 1.0], [1.0, -1.5]], dtype=torch.float64)
    res_b = semidiscrete_dual(Y, weights=b, n_samples=2**14, n_check=2**16)
    fresh = torch.randn(2**17, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    np.testing.assert_allclose(laguerre_masses(fresh, Y, res_b.g).numpy(), (b / b.sum()).numpy(), atol=6e-3)


def test_standard_normal_qmc_moments():
    z = standard_normal_qmc(2**14, 3, seed=1)
    assert torch.isfinite(z).all()
    assert float(z.mean(0).abs().max()) < 5e-3
    np.testing.assert_allclose(torch.cov(z.T).numpy(), np.eye(3), atol=1e-2)


def test_proximal_velocity_is_the_ot_velocity_on_trajectories_and_lands_on_data():
    X, _ = problem(10, 2, 15)
    g = semidiscrete_dual(X, n_samples=2**13, n_check=2**12).g
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    T = brenier_map(x0, X, g)
    for t in (0.05, 0.5, 0.95, 0.999):
        xt = (1 - t) * x0 + t * T
        np.testing.assert_allclose(proximal_velocity(xt, t, X, g).numpy(), (T - x0).numpy(), atol=1e-9)
        # the target is exactly the data point: prox_{h psi}(x_j + h x0) = x_j for x0 in L_j
        h = (1 - t) / t
        np.testing.assert_allclose(prox_conjugate(T + h * x0, h, X, g).numpy(), T.numpy(), atol=1e-9)
    # t = 0 is the Brenier map itself
    np.testing.assert_allclose(proximal_velocity(x0, 0.0, X, g).numpy(), (T - x0).numpy(), atol=0)
    # per-row t (including 0) and fp32 round trip
    t = torch.linspace(0.0, 0.9, 300, dtype=torch.float64)
    xt = (1 - t)[:, None] * x0 + t[:, None] * T
    np.testing.assert_allclose(proximal_target(xt, t, X, g).numpy(), T.numpy(), atol=1e-9)
    v32 = proximal_velocity(xt.float(), t.float(), X.float(), g.float())
    assert v32.dtype == torch.float32
    np.testing.assert_allclose(v32.numpy(), (T - x0).numpy(), atol=1e-4)


def entropic_qp(lam, X, g, z, h, eps):
    lam = np.clip(lam, 1e-300, None)
    return lam @ g + eps * (lam * np.log(lam)).sum() + ((lam @ X - z) ** 2).sum() / (2 * h)


def test_smoothed_prox_solves_the_entropic_qp_and_tends_to_the_hard_prox():
    """psi_eps(y) = min {<lambda, g> + eps sum lambda log lambda : X^T lambda = y}, so the smoothed
    prox is X^T lambda for the entropy-regularised simplex QP (solved here by SLSQP)."""
    X, g = problem(7, 2, 17)
    Z = 2.0 * torch.randn(30, 2, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    h = 0.4
    hard = prox_conjugate(Z, h, X, g)
    errs = []
    for eps in (0.3, 0.03, 0.003, 1e-4):
        y, info = prox_conjugate(Z, h, X, g, eps=eps, return_info=True)
        # optimality: y = grad phi_eps(u) at u = (z - y) / h; the check is conditioned like 1 / eps
        np.testing.assert_allclose(brenier_map((Z - y) / h, X, g, eps=eps).numpy(), y.numpy(),
                                   atol=1e-10 / eps)
        if eps >= 0.003:
            for i in range(0, 30, 6):
                args = (X.numpy(), g.numpy(), Z[i].numpy(), h, eps)
                res = minimize(entropic_qp, np.full(7, 1 / 7), args=args,
                               method="SLSQP", bounds=[(0, 1)] * 7,
                               constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1}],
                               options={"ftol": 1e-12, "maxiter": 2000})
                ours = entropic_qp(info["weights"][i].numpy(), X.numpy(), g.numpy(), Z[i].numpy(), h, eps)
                assert ours <= res.fun + 1e-10        # at least as good as SLSQP
                assert np.abs(res.x @ X.numpy() - y[i].numpy()).max() < 1e-4
        errs.append(float((y - hard).norm(dim=1).max()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 < errs[0]


def test_bad_inputs_raise_named_errors():
    X, g = problem(5, 2, 0)
    z = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="h must be positive"):
        prox_conjugate(z, 0.0, X, g)
    with pytest.raises(ValueError, match="g must have shape"):
        prox_conjugate(z, 1.0, X, g[:3])
    with pytest.raises(ValueError, match="z must have shape"):
        prox_conjugate(torch.zeros(3, 3, dtype=torch.float64), 1.0, X, g)
    with pytest.raises(ValueError, match="eps"):
        prox_conjugate(z, 1.0, X, g, eps=-1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        proximal_velocity(z, 1.0, X, g)
    with pytest.raises(ValueError, match=r"^t must be in \[0, 1\], got values in"):
        proximal_velocity(z, -0.1, X, g)
    with pytest.raises(ValueError, match="support must have shape"):
        brenier_map(z, torch.zeros(5, dtype=torch.float64), g)
    with pytest.raises(TypeError, match="support"):
        semidiscrete_dual(torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="weights"):
        semidiscrete_dual(X, weights=-torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_samples"):
        semidiscrete_dual(X, n_samples=0)
