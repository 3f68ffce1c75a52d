"""Toy data sets: determinism, the geometry each sampler promises, statistics, bad input."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import kstest, multivariate_normal, uniform

from nwflow.data import (
    GaussianMixture,
    circle,
    gaussian_mixture,
    random_rotation,
    spherical_shells,
    two_moons,
)

SAMPLERS = [
    lambda **kw: gaussian_mixture(200, d=3, k=4, layout="random", anisotropy=5.0, **kw),
    lambda **kw: spherical_shells(200, 5, **kw),
    lambda **kw: two_moons(200, **kw),
    lambda **kw: circle(200, dim=3, noise=0.1, **kw),
]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_deterministic_given_seed_or_generator(sampler):
    a = sampler(seed=3)
    assert torch.equal(a, sampler(seed=3))
    assert torch.equal(a, sampler(generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, sampler(seed=4))
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    # float64 draws the same numbers (drawn in float64, then cast).
    b = sampler(seed=3, dtype=torch.float64)
    assert b.dtype == torch.float64
    torch.testing.assert_close(b.float(), a)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bad_rng_arguments(sampler):
    with pytest.raises(ValueError, match="generator or seed"):
        sampler(seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed"):
        sampler(seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        sampler(seed=-1)
    with pytest.raises(TypeError, match="generator"):
        sampler(generator=1)
    with pytest.raises(TypeError, match="dtype"):
        sampler(seed=0, dtype=torch.int64)


def test_bad_sizes():
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"^n must be a positive int, got -?\d"):
            two_moons(bad)
    with pytest.raises(TypeError, match="n must be an int"):
        circle(2.0)
    with pytest.raises(TypeError, match="d must be an int"):
        spherical_shells(10, "3")
    with pytest.raises(ValueError, match="noise"):
        two_moons(10, noise=-0.1)
    with pytest.raises(ValueError, match="noise"):
        spherical_shells(10, 2, noise=float("nan"))


# -- Gaussian mixture -----------------------------------------------------------------------
def test_mixture_circle_layout_and_component_statistics():
    x, labels, gm = gaussian_mixture(40_000, d=2, k=4, radius=3.0, scales=0.2, seed=0,
                                     return_labels=True, return_mixture=True, dtype=torch.float64)
    angles = 2 * np.pi * np.arange(4) / 4
    np.testing.assert_allclose(gm.means.numpy(), 3.0 * np.stack([np.cos(angles), np.sin(angles)], 1),
                               atol=1e-12)
    np.testing.assert_allclose(gm.covariances.numpy(), np.broadcast_to(0.04 * np.eye(2), (4, 2, 2)))
    xn, ln = x.numpy(), labels.numpy()
    for c in range(4):
        pts = xn[ln == c]
        # ~10,000 points per component: the sample mean is within a few 0.2 / 100 of mu_c.
        np.testing.assert_allclose(pts.mean(0), gm.means[c].numpy(), atol=0.01)
        np.testing.assert_allclose(np.cov(pts.T), 0.04 * np.eye(2), atol=0.004)
    np.testing.assert_allclose(np.bincount(ln, minlength=4) / len(ln), 0.25, atol=0.01)


def test_mixture_anisotropy_and_weights():
    scales = torch.tensor([1.0, 0.5, 2.0])
    x, labels, gm = gaussian_mixture(30_000, d=4, k=3, layout="random", radius=10.0, scales=scales,
                                     anisotropy=20.0, weights=[1, 2, 7], seed=1, return_labels=True,
                                     return_mixture=True, dtype=torch.float64)
    np.testing.assert_allclose(torch.linalg.vector_norm(gm.means, dim=1).numpy(), 10.0)
    for c in range(3):
        eig = np.linalg.eigvalsh(gm.covariances[c].numpy())
        # Standard deviations run geometrically from scale to scale / 20.
        np.testing.assert_allclose(np.sqrt(eig[::-1]), scales[c].item() * 20.0 ** -np.linspace(0, 1, 4),
                                   rtol=1e-10)
        # Randomly rotated: the long axis is not a coordinate axis.
        assert np.abs(np.linalg.eigh(gm.covariances[c].numpy())[1][:, -1]).max() < 0.999
    np.testing.assert_allclose(gm.weights.numpy(), [0.1, 0.2, 0.7])
    np.testing.assert_allclose(np.bincount(labels.numpy()) / 30_000, [0.1, 0.2, 0.7], atol=0.01)
    pts = x.numpy()[labels.numpy() == 2]
    np.testing.assert_allclose(np.cov(pts.T), gm.covariances[2].numpy(), atol=0.15)


def test_mixture_held_out_sampling_and_log_prob():
    x, gm = gaussian_mixture(500, d=3, k=5, layout="random", anisotropy=3.0, seed=2,
                             return_mixture=True, dtype=torch.float64)
    held = gm.sample(500, seed=99, dtype=torch.float64)
    assert held.shape == (500, 3) and not torch.equal(held[:10], x[:10])
    assert torch.equal(held, gm.sample(500, seed=99, dtype=torch.float64))
    # An independent float64 reference: scipy densities and a log-sum-exp over components.
    ref = logsumexp(np.stack([np.log(gm.weights[c].item())
                              + multivariate_normal(gm.means[c].numpy(), gm.covariances[c].numpy()).logpdf(
                                  held.numpy()) for c in range(5)], 1), axis=1)
    np.testing.assert_allclose(gm.log_prob(held).numpy(), ref, rtol=1e-10, atol=1e-10)
    # Held-out points have the same typical log-likelihood as the training points.
    assert abs(gm.log_prob(held).mean() - gm.log_prob(x).mean()) < 0.3


def test_mixture_explicit_means_and_covariances():
    means = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    x, labels = gaussian_mixture(20_000, d=2, means=means, covariances=cov, seed=4, return_labels=True,
                                 dtype=torch.float64)
    for c in range(2):
        pts = x.numpy()[labels.numpy() == c]
        np.testing.assert_allclose(pts.mean(0), means[c].numpy(), atol=0.05)
        np.testing.assert_allclose(np.cov(pts.T), cov.numpy(), atol=0.05)


def test_mixture_bad_arguments():
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_mixture(10, d=2, k=2, covariances=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        gaussian_mixture(10, d=2, k=2, covariances=torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="not both"):
        gaussian_mixture(10, d=2, k=2, covariances=torch.eye(2), scales=1.0)
    with pytest.raises(ValueError, match="means must have shape"):
        gaussian_mixture(10, d=3, means=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="weights must have shape"):
        gaussian_mixture(10, d=2, k=3, weights=[1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_mixture(10, d=2, k=2, weights=[1, -1])
    with pytest.raises(ValueError, match="scales must be positive"):
        gaussian_mixture(10, d=2, k=2, scales=[1.0, 0.0])
    with pytest.raises(ValueError, match="anisotropy"):
        gaussian_mixture(10, d=2, anisotropy=0.5)
    with pytest.raises(ValueError, match="layout"):
        gaussian_mixture(10, d=2, layout="grid")
    with pytest.raises(ValueError, match="d >= 2"):
        gaussian_mixture(10, d=1)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_mixture(10, d=2, means=torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture(torch.zeros(2, 2), torch.eye(2).expand(3, 2, 2), None)
    gm = GaussianMixture(torch.zeros(1, 2), torch.eye(2)[None], None)
    with pytest.raises(ValueError, match=r"^x must have shape \(B, 2\), got shape \(3, 3\)"):
        gm.log_prob(torch.zeros(3, 3))


# -- shells, moons, circle ---------------------------------------------------------------
def test_shells_radii_and_directions():
    x, labels = spherical_shells(30_000, 6, radii=(0.5, 2.0), noise=0.0, seed=0, return_labels=True,
                                 dtype=torch.float64)
    r = torch.linalg.vector_norm(x, dim=1)
    torch.testing.assert_close(r, torch.tensor([0.5, 2.0], dtype=torch.float64)[labels])
    # Uniform directions: mean direction ~ 0, second moment of u is I / d.
    u = (x / r[:, None]).numpy()
    np.testing.assert_allclose(u.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(u.T @ u / len(u), np.eye(6) / 6, atol=0.01)
    np.testing.assert_allclose(np.bincount(labels.numpy()) / 30_000, 0.5, atol=0.01)
    # With noise the radial deviation has the noise's standard deviation (for noise << r).
    xn, ln = spherical_shells(20_000, 6, radii=(3.0,), noise=0.05, seed=1, return_labels=True)
    dev = torch.linalg.vector_norm(xn, dim=1) - 3.0
    assert abs(dev.std().item() - 0.05) < 0.003 and (ln == 0).all()


def test_shells_bad_radii():
    with pytest.raises(ValueError, match="radii must be positive"):
        spherical_shells(10, 2, radii=(1.0, -1.0))
    with pytest.raises(ValueError, match="radii must be a non-empty"):
        spherical_shells(10, 2, radii=())


def test_two_moons_geometry():
    x, labels = two_moons(2_000, noise=0.0, seed=0, return_labels=True, dtype=torch.float64)
    up, lo = x[labels == 0].numpy(), x[labels == 1].numpy()
    np.testing.assert_allclose(np.hypot(up[:, 0], up[:, 1]), 1.0)
    assert (up[:, 1] >= 0).all()
    np.testing.assert_allclose(np.hypot(1 - lo[:, 0], 0.5 - lo[:, 1]), 1.0)
    assert (lo[:, 1] <= 0.5).all()
    assert abs(len(up) / 2_000 - 0.5) < 0.04
    # The angle is uniform on [0, pi]: its mean is pi / 2.
    assert abs(np.arctan2(up[:, 1], up[:, 0]).mean() - math.pi / 2) < 0.1


def test_circle_plane_and_tilted():
    x, theta = circle(500, radius=2.0, seed=0, return_angles=True, dtype=torch.float64)
    torch.testing.assert_close(x, 2.0 * torch.stack([torch.cos(theta), torch.sin(theta)], 1))
    assert x.shape == (500, 2) and theta.min() >= 0 and theta.max() < 2 * math.pi
    rot = random_rotation(3, seed=5)
    x3, th3 = circle(500, radius=2.0, dim=3, rotation=rot, seed=0, return_angles=True,
                     dtype=torch.float64)
    plane = torch.stack([2.0 * torch.cos(th3), 2.0 * torch.sin(th3), torch.zeros_like(th3)], 1)
    torch.testing.assert_close(x3 @ rot, plane)
    # A random tilt: still radius 2 and a plane through 0 (third singular value 0), not the x-y plane.
    xr = circle(500, radius=2.0, dim=5, seed=1, dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.vector_norm(xr, dim=1),
                               torch.full((500,), 2.0, dtype=torch.float64))
    sv = torch.linalg.svdvals(xr)
    assert sv[2] < 1e-10 * sv[0] and xr[:, 2:].abs().max() > 0.1
    # Noise is off the manifold: the radial spread is the noise level.
    xn = circle(20_000, noise=0.02, seed=2)
    assert abs((torch.linalg.vector_norm(xn, dim=1) - 1).std().item() - 0.02) < 0.002


def test_circle_bad_arguments():
    with pytest.raises(ValueError, match=r"^dim must be an int >= 2, got 1"):
        circle(10, dim=1)
    with pytest.raises(ValueError, match="radius"):
        circle(10, radius=0.0)
    with pytest.raises(ValueError, match="orthogonal"):
        circle(10, dim=3, rotation=2 * torch.eye(3))
    with pytest.raises(ValueError, match="rotation must have shape"):
        circle(10, dim=3, rotation=torch.eye(4))
    with pytest.raises(ValueError, match="dim > 2"):
        circle(10, dim=2, rotation=torch.eye(2))


def test_random_rotation():
    q = random_rotation(7, seed=0)
    torch.testing.assert_close(q @ q.T, torch.eye(7, dtype=torch.float64))
    assert abs(torch.linalg.det(q).item() - 1.0) < 1e-12
    assert not torch.equal(q, random_rotation(7, seed=1))
    # Haar in 3-D: each column is uniform on the sphere, so an entry is uniform on [-1, 1]
    # (Archimedes); an un-corrected QR fails this.
    g = torch.Generator().manual_seed(0)
    entries = np.array([random_rotation(3, generator=g)[0, 0].item() for _ in range(100)])
    assert kstest(entries, uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
