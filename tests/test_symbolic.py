"""nwflow.symbolic: the sympy derivation agrees with itself and with nwflow's numerical code.

Symbolic identities are checked with ``sympy.simplify(a - b) == 0``; every symbolic result
is lambdified and compared, on random inputs in float64, with nwflow (path, empirical) or
with an independent numpy/scipy reference written here.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import nwflow
from nwflow import symbolic as S

D, N = 2, 3
X = S.vector("x", D)
Y = S.support(N, D)


def _zero(expr) -> bool:
    if isinstance(expr, sp.MatrixBase):
        return all(sp.simplify(e) == 0 for e in expr)
    return sp.simplify(expr) == 0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _inputs(rng: np.random.Generator, batch: int = 7):
    xs = rng.normal(size=(batch, D))
    ys = rng.normal(size=(N, D))
    ts = rng.uniform(0.05, 0.9, size=batch)
    return xs, ys, ts


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64)


# -- the path --------------------------------------------------------------------------
def test_conditional_velocity_is_the_time_derivative(rng):
    z = S.vector("z", D)
    v = S.conditional_velocity(z, Y[0])
    assert _zero(v - (Y[0] - (1 - S.sigma_min) * z))
    f = S.lambdify_field(v, z, Y[:1])
    x0, x1 = rng.normal(size=(5, D)), rng.normal(size=(1, D))
    for sm in (0.0, 0.1):
        ref = nwflow.conditional_velocity(_t(x0), _t(np.repeat(x1, 5, axis=0)), sigma_min=sm)
        np.testing.assert_allclose(f(x0, x1, 0.3, sm), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_conditional_target_matches_nwflow(rng):
    u = S.conditional_target(X, Y[0])
    f = S.lambdify_field(u, X, Y[:1])
    xs, x1 = rng.normal(size=(6, D)), rng.normal(size=(1, D))
    ts = rng.uniform(0.0, 0.95, size=6)
    for sm in (0.0, 0.05):
        ref = nwflow.conditional_target(_t(xs), _t(np.repeat(x1, 6, axis=0)), _t(ts), sigma_min=sm)
        np.testing.assert_allclose(f(xs, x1, ts, sm), ref.numpy(), rtol=1e-12)


def test_gaussian_log_likelihood_matches_scipy(rng):
    mean = S.vector("mu", D)
    ll = S.gaussian_log_likelihood(X, mean, S.sigma)
    f = sp.lambdify([*X, *mean, S.sigma], ll)
    for _ in range(5):
        x, mu, s = rng.normal(size=D), rng.normal(size=D), rng.uniform(0.1, 2.0)
        ref = multivariate_normal(mean=mu, cov=s**2 * np.eye(D)).logpdf(x)
        assert f(*x, *mu, s) == pytest.approx(ref, rel=1e-12)


def test_conditional_density_satisfies_continuity():
    x1, y = S.vector("x", 1), S.vector("y", 1)
    log_p = S.gaussian_log_likelihood(x1, S.t * y, S.sigma_t)
    assert _zero(S.continuity_residual(log_p, S.conditional_target(x1, y), x1))
    # A wrong field does not transport the density: the check can fail.
    assert not _zero(S.continuity_residual(log_p, 2 * S.conditional_target(x1, y), x1))


def test_marginal_velocity_satisfies_continuity_for_a_mixture(rng):
    x1, Y3 = S.vector("x", 1), S.support(N, 1)
    log_p = S.log_marginal_density(x1, Y3, S.sigma_t)
    residual = S.lambdify_field(S.continuity_residual(log_p, S.marginal_velocity(x1, Y3), x1), x1, Y3)
    # The prior-weighted (not posterior-weighted) average of the targets is a wrong field.
    naive = sp.Add(*[S.conditional_target(x1, y) for y in Y3]) / N
    wrong = S.lambdify_field(S.continuity_residual(log_p, naive, x1), x1, Y3)
    xs, ys = rng.normal(size=(20, 1)), rng.normal(size=(N, 1))
    ts = rng.uniform(0.1, 0.9, size=20)
    for sm in (0.0, 0.1):
        assert np.abs(residual(xs, ys, ts, sm)).max() < 1e-9
        assert np.abs(wrong(xs, ys, ts, sm)).max() > 1e-2


# -- posterior -------------------------------------------------------------------------
def test_split_drops_the_same_terms_for_every_j():
    kept, dropped = S.split_logits(S.posterior_logits(X, Y, S.sigma), Y)
    ysyms = set().union(*(y.free_symbols for y in Y))
    for j in range(N):
        assert not (dropped[j].free_symbols & ysyms)
        assert _zero(dropped[j] - dropped[0])
        expected = (S.t * S.dot(X, Y[j]) - S.t**2 * S.sqnorm(Y[j]) / 2) / S.sigma**2
        assert _zero(kept[j] - expected)
    assert _zero(dropped[0] - (-S.sqnorm(X) / (2 * S.sigma**2) - sp.log(2 * sp.pi * S.sigma**2) * D / 2
                               - sp.log(N)))


def test_split_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="logits and Y"):
        S.split_logits(S.posterior_logits(X, Y), Y[:2])


def test_posterior_weights_and_mean_match_nwflow(rng):
    fw = S.lambdify_field(S.posterior_weights(X, Y), X, Y)
    fm = S.lambdify_field(S.posterior_mean(X, Y), X, Y)
    xs, ys, ts = _inputs(rng)
    for sm in (0.0, 0.1):
        w = nwflow.posterior_weights(_t(xs), _t(ts), _t(ys), sigma_min=sm).numpy()
        m = nwflow.posterior_mean(_t(xs), _t(ts), _t(ys), sigma_min=sm).numpy()
        np.testing.assert_allclose(fw(xs, ys, ts, sm), w, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(fm(xs, ys, ts, sm), m, rtol=1e-10, atol=1e-12)
        # Independent reference: Bayes with the full Gaussian log-likelihoods.
        logits = -((xs[:, None, :] - ts[:, None, None] * ys[None]) ** 2).sum(-1) / (
            2 * (1 - (1 - sm) * ts[:, None]) ** 2)
        np.testing.assert_allclose(w, np.exp(logits - logsumexp(logits, axis=1, keepdims=True)),
                                   rtol=1e-10, atol=1e-14)


def test_marginal_velocity_equals_the_mean_form():
    Y2 = S.support(2, D)
    vfm = S.velocity_from_mean(X, Y2, S.sigma)
    assert _zero(S.marginal_velocity(X, Y2, S.sigma) - vfm)
    # The affine part read off by sympy is (m - (1 - sigma_min) x) / sigma_t.
    mean_form = (S.posterior_mean(X, Y2, S.sigma) - (1 - S.sigma_min) * X) / S.sigma_t
    assert _zero(vfm - mean_form)


def test_velocity_matches_nwflow(rng):
    f = S.lambdify_field(S.marginal_velocity(X, Y), X, Y)
    xs, ys, ts = _inputs(rng)
    for sm in (0.0, 0.2):
        ref = nwflow.velocity(_t(xs), _t(ts), _t(ys), sigma_min=sm).numpy()
        np.testing.assert_allclose(f(xs, ys, ts, sm), ref, rtol=1e-10, atol=1e-12)


def test_score_tweedie_and_velocity_from_score(rng):
    Y2 = S.support(2, D)
    s2 = S.score(X, Y2, S.sigma)
    assert _zero(S.tweedie_mean(X, s2) - S.posterior_mean(X, Y2, S.sigma))
    s = S.score(X, Y, S.sigma)
    fs = S.lambdify_field(s, X, Y)
    xs, ys, ts = _inputs(rng)
    for sm in (0.0, 0.1):
        ref = nwflow.score(_t(xs), _t(ts), _t(ys), sigma_min=sm).numpy()
        np.testing.assert_allclose(fs(xs, ys, ts, sm), ref, rtol=1e-10, atol=1e-12)
    # u = x / t + (sigma_t / t) s for every sigma_min.
    sv = S.vector("s", D)
    vfs = S.velocity_from_score(X)
    assert _zero(vfs - (X / S.t + S.sigma_t / S.t * sv))
    fv = S.lambdify_field(vfs.subs(dict(zip(sv, S.on_path(s), strict=True))), X, Y)
    for sm in (0.0, 0.1):
        ref = nwflow.velocity(_t(xs), _t(ts), _t(ys), sigma_min=sm).numpy()
        np.testing.assert_allclose(fv(xs, ys, ts, sm), ref, rtol=1e-9, atol=1e-10)


# -- Nadaraya-Watson and attention -----------------------------------------------------
def test_nw_bandwidth_and_rewriting(rng):
    hb = S.nw_bandwidth(D)
    assert _zero(hb - S.sigma / S.t)
    logits = S.posterior_logits(X, Y, S.sigma)
    nw = S.nw_logits(X / S.t, Y, hb)
    # The Gaussian logits and the NW logits at x / t differ by the same amount for every j.
    diffs = [logits[j] - nw[j] for j in range(N)]
    assert all(_zero(dj - diffs[0]) for dj in diffs)
    xs, ys, ts = _inputs(rng)
    fh = S.lambdify_field(hb, X, Y)
    fw = S.lambdify_field(S.softmax(nw), X, Y)
    for sm in (0.0, 0.1):
        np.testing.assert_allclose(fh(xs, ys, ts, sm), nwflow.bandwidth(_t(ts), sm).numpy(), rtol=1e-13)
        ref = nwflow.posterior_weights(_t(xs), _t(ts), _t(ys), sigma_min=sm).numpy()
        np.testing.assert_allclose(fw(xs, ys, ts, sm), ref, rtol=1e-10, atol=1e-14)


def test_attention_logits_are_the_kept_logits(rng):
    att = S.attention_logits(X, Y, S.sigma)
    kept, dropped = S.split_logits(S.posterior_logits(X, Y, S.sigma), Y)
    for j in range(N):
        assert _zero(att[j] - kept[j])
    # What the query-key product leaves out is the ||x||^2 term (plus constants).
    assert _zero(sp.diff(dropped[0], X[0]) + X[0] / S.sigma**2)
    q = S.attention_query(X, S.sigma)
    assert q.shape == (D + 1, 1) and not (q.free_symbols & Y[0].free_symbols)
    fw = S.lambdify_field(S.softmax(S.attention_logits(X, Y)), X, Y)
    xs, ys, ts = _inputs(rng)
    ref = nwflow.posterior_weights(_t(xs), _t(ts), _t(ys)).numpy()
    np.testing.assert_allclose(fw(xs, ys, ts, 0.0), ref, rtol=1e-10, atol=1e-14)


# -- limits ----------------------------------------------------------------------------
def test_limit_t0_is_the_mean(rng):
    assert S.weights_limit_t0(X, Y) == [sp.Rational(1, N)] * N
    mean = sp.Add(*Y, sp.zeros(D, 1)) / N
    assert _zero(S.mean_limit_t0(X, Y) - mean)
    xs, ys, _ = _inputs(rng)
    m = nwflow.posterior_mean(_t(xs), 0.0, _t(ys)).numpy()
    np.testing.assert_allclose(m, np.broadcast_to(ys.mean(0), m.shape), rtol=1e-12)


def test_limit_t1_is_the_nearest_neighbour(rng):
    rate = S.logit_gap_rate_t1(X, Y, 0, 1)
    assert _zero(rate - (S.sqnorm(X - Y[1]) - S.sqnorm(X - Y[0])) / 2)
    xs, ys, _ = _inputs(rng)
    # Independent reference: (1 - t)^2 times the Gaussian logit gap, just below t = 1.
    tt = 1 - 1e-7
    sq = ((xs[:, None, :] - tt * ys[None]) ** 2).sum(-1)
    gap = (sq[:, 1] - sq[:, 0]) / (2 * (1 - tt) ** 2)
    np.testing.assert_allclose(S.lambdify_field(rate, X, Y)(xs, ys, tt, 0.0), (1 - tt) ** 2 * gap,
                               rtol=1e-5, atol=1e-6)
    # So the weights become one-hot on the nearest support point.
    w = nwflow.posterior_weights(_t(xs), 1 - 1e-4, _t(ys)).numpy()
    nearest = ((xs[:, None, :] - ys[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_allclose(w, np.eye(N)[nearest], atol=1e-6)


def test_limit_t1_with_sigma_min_is_finite(rng):
    gap = S.logit_gap_limit_t1(X, Y, 0, 2)
    assert _zero(gap - (S.sqnorm(X - Y[2]) - S.sqnorm(X - Y[0])) / (2 * S.sigma_min**2))
    xs, ys, _ = _inputs(rng)
    f = S.lambdify_field(gap, X, Y)
    sm = 0.3
    w = nwflow.posterior_weights(_t(xs), 1.0, _t(ys), sigma_min=sm).numpy()
    np.testing.assert_allclose(np.log(w[:, 0]) - np.log(w[:, 2]), f(xs, ys, 1.0, sm), rtol=1e-9)


# -- argument checks -------------------------------------------------------------------
def test_bad_arguments():
    with pytest.raises(ValueError, match="d must"):
        S.vector("x", 0)
    with pytest.raises(ValueError, match="^name must be a non-empty str, got ''$"):
        S.vector("", 2)
    with pytest.raises(TypeError, match="^name must be a str, got int$"):
        S.vector(3, 2)
    with pytest.raises(ValueError, match="n must"):
        S.support(0, 2)
    with pytest.raises(ValueError, match="same shape"):
        S.dot(S.vector("a", 2), S.vector("b", 3))
    with pytest.raises(ValueError, match="x and mean"):
        S.gaussian_log_likelihood(S.vector("a", 2), S.vector("b", 3), S.sigma)
    with pytest.raises(ValueError, match="symbols other than"):
        S.lambdify_field(S.vector("s", D), X, Y)
    f = S.lambdify_field(S.posterior_mean(X, Y), X, Y)
    with pytest.raises(ValueError, match="xs must"):
        f(np.zeros((4, 3)), np.zeros((N, D)), 0.5)
    with pytest.raises(ValueError, match="ys must"):
        f(np.zeros((4, D)), np.zeros((N + 1, D)), 0.5)
