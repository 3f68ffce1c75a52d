"""Tests for nwflow.rectified against independent float64 references (numpy / scipy / loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import nwflow
from nwflow import rectified as rf
from nwflow.models import VelocityMLP


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_gen(seed), dtype=torch.float64)
    return a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)


# -- Gaussian-to-Gaussian transport ---------------------------------------------------
def test_sqrtm_psd_matches_scipy_and_squares_back():
    m = _spd(4, 1)
    root = rf.sqrtm_psd(m)
    ref = scipy.linalg.sqrtm(m.numpy()).real
    np.testing.assert_allclose(root.numpy(), ref, atol=1e-12)
    torch.testing.assert_close(root @ root, m, atol=1e-12, rtol=0)
    assert root.dtype == torch.float64


def test_sqrtm_psd_rejects_bad_input():
    with pytest.raises(ValueError, match="symmetric"):
        rf.sqrtm_psd(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        rf.sqrtm_psd(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="cov"):
        rf.sqrtm_psd(torch.ones(2, 3))
    with pytest.raises(TypeError, match="cov"):
        rf.sqrtm_psd(torch.eye(2, dtype=torch.int64))


def test_rotation_matrix():
    r = rf.rotation_matrix(3, 0.7, plane=(0, 2))
    c, s = math.cos(0.7), math.sin(0.7)
    ref = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    np.testing.assert_allclose(r.numpy(), ref, atol=1e-15)
    assert torch.equal(rf.rotation_matrix(2, math.pi), -torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="plane"):
        rf.rotation_matrix(2, 0.1, plane=(0, 0))
    with pytest.raises(ValueError, match="dim"):
        rf.rotation_matrix(1, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_ot_velocity_matches_the_closed_form(dtype):
    d = 3
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    cov = _spd(d, 2)
    x = torch.randn(6, d, generator=_gen(3), dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.4, 0.5, 0.9, 1.0], dtype=torch.float64)
    # Reference: theta + Theta (I + t Theta)^{-1} (x - t theta), Theta = M^{1/2} - I, with scipy.
    theta_mat = scipy.linalg.sqrtm(cov.numpy()).real - np.eye(d)
    ref = np.stack([mean.numpy() + theta_mat @ np.linalg.solve(np.eye(d) + ti * theta_mat,
                                                              xi - ti * mean.numpy())
                    for xi, ti in zip(x.numpy(), t.numpy(), strict=True)])
    out = rf.gaussian_ot_velocity(x.to(dtype), t.to(dtype), mean.to(dtype), cov.to(dtype))
    assert out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(out.double().numpy(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("angle", [0.0, 1.0, 2.5])
def test_affine_fields_generate_straight_lines_with_zero_loss(angle):
    d = 2
    mean = torch.tensor([3.0, -1.0], dtype=torch.float64)
    cov = _spd(d, 4)
    rot = rf.rotation_matrix(d, angle)
    z = torch.randn(50, d, generator=_gen(5), dtype=torch.float64)
    # Independent end point: T(z) = mean + M^{1/2} R z with scipy's square root.
    tz = mean.numpy() + z.numpy() @ (scipy.linalg.sqrtm(cov.numpy()).real @ rot.numpy()).T
    tz = torch.from_numpy(tz)
    t = torch.rand(50, generator=_gen(6), dtype=torch.float64)
    xt = (1 - t[:, None]) * z + t[:, None] * tz
    v = rf.rotated_ot_velocity(xt, t, mean, cov, rot)
    torch.testing.assert_close(v, tz - z, atol=1e-11, rtol=0)
    # Zero regression loss on its own pairs; positive on independently re-paired ones.
    field = lambda x, s: rf.rotated_ot_velocity(x, s, mean, cov, rot)  # noqa: E731
    assert rf.pair_loss(field, z, tz, t) < 1e-20
    assert rf.pair_loss(field, z, tz[torch.randperm(50, generator=_gen(7))], t) > 0.1
    # Euler is exact on straight lines (the velocity is constant along each trajectory).
    x = z.clone()
    steps = 7
    for k in range(steps):
        x = x + field(x, k / steps) / steps
    torch.testing.assert_close(x, tz, atol=1e-10, rtol=0)


def test_rotated_field_pushes_standard_normal_to_the_same_gaussian():
    mean = torch.tensor([0.5, 0.0], dtype=torch.float64)
    cov = _spd(2, 8)
    b, m = rf.gaussian_ot_map(mean, cov, rf.rotation_matrix(2, 1.3))
    torch.testing.assert_close(b, mean)
    torch.testing.assert_close(m @ m.T, cov, atol=1e-12, rtol=0)  # covariance of mean + B z
    b0, m0 = rf.gaussian_ot_map(mean, cov)
    torch.testing.assert_close(m0, m0.T)  # OT: symmetric PSD matrix (a gradient of a convex map)
    with pytest.raises(ValueError, match="orthogonal"):
        rf.gaussian_ot_map(mean, cov, 2 * torch.eye(2, dtype=torch.float64))


def test_affine_velocity_refuses_the_crossing_time():
    r180 = rf.rotation_matrix(2, math.pi)
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular at t = 0.5"):
        rf.rotated_ot_velocity(x, 0.5, torch.full((2,), 5.0, dtype=torch.float64),
                               torch.eye(2, dtype=torch.float64), r180)
    # Just off the crossing the field is defined: v = 5 - 2 (x - 5t) / (1 - 2t), by hand.
    x = torch.randn(4, 2, generator=_gen(9), dtype=torch.float64)
    v = rf.rotated_ot_velocity(x, 0.3, torch.full((2,), 5.0, dtype=torch.float64),
                               torch.eye(2, dtype=torch.float64), r180)
    torch.testing.assert_close(v, 5 - 2 * (x - 1.5) / 0.4, atol=1e-12, rtol=0)


def test_affine_velocity_input_checks():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shift"):
        rf.affine_velocity(x, 0.5, torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="x must have shape"):
        rf.affine_velocity(torch.zeros(2, 2), 0.5, torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match=r"^t must be in \[0, 1\], got values in"):
        rf.affine_velocity(x, 1.5, torch.zeros(3), torch.eye(3))


# -- interpolant and training batches -------------------------------------------------
def test_interpolant_matches_definition_and_library_path():
    x0 = torch.randn(8, 3, generator=_gen(10), dtype=torch.float64)
    x1 = torch.randn(8, 3, generator=_gen(11), dtype=torch.float64)
    eps = torch.randn(8, 3, generator=_gen(12), dtype=torch.float64)
    t = torch.rand(8, generator=_gen(13), dtype=torch.float64)
    ref = (1 - t[:, None]) * x0 + t[:, None] * x1 + 0.05 * eps
    torch.testing.assert_close(rf.interpolant(x0, x1, t, 0.05, eps), ref, atol=1e-15, rtol=0)
    torch.testing.assert_close(rf.interpolant(x0, x1, t), nwflow.sample_xt(x0, x1, t, 0.0))
    with pytest.raises(ValueError, match="noise is required"):
        rf.interpolant(x0, x1, t, 0.05)
    with pytest.raises(ValueError, match="sigma"):
        rf.interpolant(x0, x1, t, -0.1, eps)
    with pytest.raises(TypeError, match="sigma"):
        rf.interpolant(x0, x1, t, "0.1", eps)


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_pair_batch_fn_draws_points_of_the_interpolant(sigma):
    x0 = torch.randn(5, 2, generator=_gen(14), dtype=torch.float64)
    x1 = torch.randn(5, 2, generator=_gen(15), dtype=torch.float64) + 10.0
    fn = rf.pair_batch_fn(x0, x1, batch_size=64, sigma=sigma)
    x, t, target = fn(0, _gen(16))
    assert x.shape == (64, 2) and t.shape == (64,) and target.shape == (64, 2)
    # Every target is one pair's displacement; x - that pair's line point is sigma * N(0, I).
    d = x1 - x0
    idx = torch.cdist(target, d).argmin(dim=1)
    torch.testing.assert_close(target, d[idx], atol=0, rtol=0)
    off = x - ((1 - t[:, None]) * x0[idx] + t[:, None] * x1[idx])
    if sigma == 0.0:
        assert float(off.abs().max()) < 1e-12
    else:
        assert 0.2 < float(off.std()) < 0.4
    assert bool(((t >= 0) & (t <= 1)).all())
    # Reproducible given the generator state.
    again = fn(0, _gen(16))
    for a, b in zip((x, t, target), again, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch_size"):
        rf.pair_batch_fn(x0, x1, 0)


# -- the pair-optimal field -----------------------------------------------------------
def _pair_field_reference(x, t, x0, x1, sigma):
    """Independent numpy float64 Nadaraya-Watson over the moving centres."""
    x, t, x0, x1 = (np.asarray(a, dtype=np.float64) for a in (x, t, x0, x1))
    out_w, out_v = [], []
    for xi, ti in zip(x, t, strict=True):
        c = (1 - ti) * x0 + ti * x1
        logit = -((xi - c) ** 2).sum(axis=1) / (2 * sigma**2)
        w = np.exp(logit - logit.max())
        w /= w.sum()
        out_w.append(w)
        out_v.append(w @ (x1 - x0))
    return np.array(out_w), np.array(out_v)


@pytest.mark.parametrize("sigma", [0.05, 0.4, 3.0])
def test_pair_field_matches_nadaraya_watson_reference(sigma):
    n, d = 37, 3
    x0 = torch.randn(n, d, generator=_gen(17), dtype=torch.float64)
    x1 = torch.randn(n, d, generator=_gen(18), dtype=torch.float64) * 2 + 1
    # Queries near the lines (where the weights are informative) and far away.
    t = torch.rand(12, generator=_gen(19), dtype=torch.float64)
    i = torch.randint(n, (12,), generator=_gen(20))
    x = (1 - t[:, None]) * x0[i] + t[:, None] * x1[i] + 0.3 * torch.randn(12, d, generator=_gen(21),
                                                                            dtype=torch.float64)
    w_ref, v_ref = _pair_field_reference(x, t, x0, x1, sigma)
    w = rf.pair_weights(x, t, x0, x1, sigma)
    v = rf.pair_velocity(x, t, x0, x1, sigma)
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-12)
    np.testing.assert_allclose(v.numpy(), v_ref, atol=1e-10)
    # Scalar t and float32 as well.
    w_ref, v_ref = _pair_field_reference(x, np.full(12, 0.37), x0, x1, sigma)
    v32 = rf.pair_velocity(x.float(), 0.37, x0.float(), x1.float(), sigma)
    assert v32.dtype == torch.float32
    np.testing.assert_allclose(v32.double().numpy(), v_ref, atol=2e-4, rtol=1e-4)


def test_pair_field_of_one_pair_is_its_displacement_everywhere():
    """Ported from the removed ot.pair_field test: with one pair every weight is 1."""
    x0 = torch.randn(1, 2, generator=_gen(15), dtype=torch.float64)
    x1 = 2 * torch.randn(1, 2, generator=_gen(16), dtype=torch.float64)
    x = 2 * torch.randn(9, 2, generator=_gen(17), dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 9, dtype=torch.float64)
    for times in (0.4, t):                       # one shared time (the engine), per-row times
        v = rf.pair_velocity(x, times, x0, x1, 0.3)
        np.testing.assert_allclose(v.numpy(), np.broadcast_to((x1[0] - x0[0]).numpy(), (9, 2)), atol=1e-12)
    # Per-row times in fp32 take the float64 logits and return fp32.
    v32 = rf.pair_velocity(x.float(), t.float(), x0.float(), x1.float(), 0.3)
    assert v32.dtype == torch.float32


def test_pair_field_limits():
    n = 9
    x0 = torch.randn(n, 2, generator=_gen(22), dtype=torch.float64)
    x1 = torch.randn(n, 2, generator=_gen(23), dtype=torch.float64) + 3
    d = x1 - x0
    t = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    on_line = (1 - t[:, None]) * x0 + t[:, None] * x1
    # sigma = 0: one-hot weights, exactly the pair's own displacement on its own line.
    w0 = rf.pair_weights(on_line, t, x0, x1, 0.0)
    torch.testing.assert_close(w0, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(rf.pair_velocity(on_line, t, x0, x1, 0.0), d, atol=0, rtol=0)
    # Off the lines sigma = 0 picks the nearest centre (numpy argmin reference).
    q = torch.randn(20, 2, generator=_gen(24), dtype=torch.float64) * 3
    c = 0.6 * x0 + 0.4 * x1
    nearest = np.argmin(((q.numpy()[:, None] - c.numpy()[None]) ** 2).sum(-1), axis=1)
    torch.testing.assert_close(rf.pair_velocity(q, 0.4, x0, x1, 0.0), d[torch.from_numpy(nearest)])
    # Huge sigma: uniform weights, the mean displacement everywhere.
    torch.testing.assert_close(rf.pair_velocity(q, 0.4, x0, x1, 1e4),
                               d.mean(0).expand(20, 2), atol=1e-6, rtol=0)


def test_pair_field_uses_the_closed_form_engine_at_tau():
    """The identity behind pair_weights: posterior weights at tau = 1/(1+sigma) on tau x."""
    sigma = 0.2
    x0 = torch.randn(11, 2, generator=_gen(25), dtype=torch.float64)
    x1 = torch.randn(11, 2, generator=_gen(26), dtype=torch.float64)
    x = torch.randn(5, 2, generator=_gen(27), dtype=torch.float64)
    tau = 1 / (1 + sigma)
    assert nwflow.bandwidth(tau) == pytest.approx(sigma, rel=1e-14)
    c = 0.3 * x0 + 0.7 * x1
    torch.testing.assert_close(rf.pair_weights(x, 0.7, x0, x1, sigma),
                               nwflow.posterior_weights(tau * x, tau, c))


def test_pair_field_transports_the_blurred_pairs():
    """With sigma > 0 the pair field moves N(x0_i, sigma^2) mass onto N(x1_i, sigma^2): starting
    at x0_i + sigma eps the RK4 flow ends near x1_i + sigma eps when the lines are far apart."""
    x0 = torch.tensor([[0.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
    x1 = torch.tensor([[6.0, 0.0], [6.0, 6.0]], dtype=torch.float64)
    eps = torch.randn(2, 2, generator=_gen(28), dtype=torch.float64)
    x = x0 + 0.1 * eps
    steps = 40
    for k in range(steps):
        x = x + rf.pair_velocity(x, k / steps, x0, x1, 0.1) / steps
    torch.testing.assert_close(x, x1 + 0.1 * eps, atol=1e-9, rtol=0)


def test_pair_field_input_checks():
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="same shape"):
        rf.pair_velocity(torch.zeros(3, 2), 0.5, x0, torch.zeros(5, 2), 0.1)
    with pytest.raises(ValueError, match="x must have shape"):
        rf.pair_velocity(torch.zeros(3, 3), 0.5, x0, x0, 0.1)
    with pytest.raises(TypeError, match=r"^x must have the dtype of x0 \(torch.float32\), got torch.float64"):
        rf.pair_velocity(torch.zeros(3, 2, dtype=torch.float64), 0.5, x0, x0, 0.1)
    with pytest.raises(ValueError, match="sigma"):
        rf.pair_weights(torch.zeros(3, 2), 0.5, x0, x0, float("nan"))


# -- gradient variance ----------------------------------------------------------------
def test_prediction_gradient_variance_zero_and_closed_form():
    mean = torch.tensor([2.0, -1.0], dtype=torch.float64)
    cov = _spd(2, 29)
    b, m = rf.gaussian_ot_map(mean, cov)
    z = torch.randn(400, 2, generator=_gen(30), dtype=torch.float64)
    tz = rf.affine_map(z, b, m)
    field = lambda x, s: rf.gaussian_ot_velocity(x, s, mean, cov)  # noqa: E731
    # Deterministic regime, own pairs: every residual is 0, so the variance is 0.
    for t in (0.0, 0.3, 0.99):
        assert rf.prediction_gradient_variance(field, z, tz, t) < 1e-22
    # Noisy regime: residual = K_t sigma eps with K_t = Theta (I + t Theta)^{-1}; reference by hand.
    sigma, t = 0.05, 0.6
    eps = torch.randn(400, 2, generator=_gen(31), dtype=torch.float64)
    theta = scipy.linalg.sqrtm(cov.numpy()).real - np.eye(2)
    k = theta @ np.linalg.inv(np.eye(2) + t * theta)
    g = 2 * sigma * eps.numpy() @ k.T
    ref = ((g - g.mean(0)) ** 2).sum() / (len(g) - 1)
    got = rf.prediction_gradient_variance(field, z, tz, t, sigma, eps)
    assert got == pytest.approx(ref, rel=1e-10)
    assert got > 0
    # And the expectation 4 sigma^2 ||K_t||_F^2 within Monte Carlo error (n = 400).
    assert got == pytest.approx(4 * sigma**2 * (k**2).sum(), rel=0.25)


def test_prediction_gradient_variance_of_the_memorising_field_is_zero_only_without_noise():
    x0 = torch.randn(64, 2, generator=_gen(32), dtype=torch.float64)
    x1 = torch.randn(64, 2, generator=_gen(33), dtype=torch.float64) + 4
    eps = torch.randn(64, 2, generator=_gen(34), dtype=torch.float64)
    memorising = lambda x, s: rf.pair_velocity(x, s, x0, x1, 0.0)  # noqa: E731
    assert rf.prediction_gradient_variance(memorising, x0, x1, 0.35) == 0.0
    smoother = lambda x, s: rf.pair_velocity(x, s, x0, x1, 0.3)  # noqa: E731
    assert rf.prediction_gradient_variance(smoother, x0, x1, 0.35, 0.3, eps) > 1e-3
    with pytest.raises(ValueError, match="at least 2"):
        rf.prediction_gradient_variance(memorising, x0[:1], x1[:1], 0.35)


def test_parameter_gradient_variance_matches_a_loop_of_backward_passes():
    torch.manual_seed(0)
    model = VelocityMLP(2, hidden=16, depth=2, time_dim=8).double()
    x0 = torch.randn(10, 2, generator=_gen(35), dtype=torch.float64)
    x1 = torch.randn(10, 2, generator=_gen(36), dtype=torch.float64)
    eps = torch.randn(10, 2, generator=_gen(37), dtype=torch.float64)
    t = torch.rand(10, generator=_gen(38), dtype=torch.float64)
    grads = []
    for i in range(10):
        model.zero_grad()
        xt = (1 - t[i]) * x0[i] + t[i] * x1[i] + 0.05 * eps[i]
        loss = (model(xt[None], t[i : i + 1])[0] - (x1[i] - x0[i])).square().sum()
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(grads)
    ref = float((g - g.mean(0)).square().sum() / 9)
    got = rf.parameter_gradient_variance(model, x0, x1, t, 0.05, eps)
    assert got == pytest.approx(ref, rel=1e-10)
    with pytest.raises(TypeError, match="model"):
        rf.parameter_gradient_variance(lambda x, s: x, x0, x1, t)


def test_pair_separation_matches_brute_force():
    n, d = 12, 3
    x0 = torch.randn(n, d, generator=_gen(40), dtype=torch.float64)
    x1 = torch.randn(n, d, generator=_gen(41), dtype=torch.float64)
    # Two lines that meet at t = 0.25 and one exact duplicate direction (parallel lines).
    x1[1] = x0[0] + 0.25 * (x1[0] - x0[0]) + 3.0 * (x0[0] + 0.25 * (x1[0] - x0[0]) - x0[1])
    x0[5], x1[5] = x0[4] + 0.7, x1[4] + 0.7
    a, b = x0.numpy(), x1.numpy()
    ts = np.linspace(0.0, 1.0, 200001)
    ref = np.empty(n)
    for i in range(n):
        best = np.inf
        for j in range(n):
            if j != i:
                diff = (a[i] - a[j])[None] + ts[:, None] * ((b[i] - a[i]) - (b[j] - a[j]))[None]
                best = min(best, np.sqrt((diff**2).sum(1)).min())
        ref[i] = best
    got = rf.pair_separation(x0, x1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert got[0] < 1e-7 and got[1] < 1e-7                     # the crossing pair
    # Two parallel lines alone: a constant distance 0.7 sqrt(3).
    par = rf.pair_separation(x0[4:6], x1[4:6])
    torch.testing.assert_close(par, torch.full((2,), 0.7 * math.sqrt(3), dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        rf.pair_separation(x0[:1], x1[:1])
