"""Metrics against independent float64 references (numpy / scipy) and closed forms."""

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist, pdist

from nwflow.metrics import (
    cosine_similarity,
    frechet_distance,
    gaussian_frechet_distance,
    leave_one_out_distance,
    median_distance,
    memorisation_rate,
    memorised,
    mmd2_unbiased,
    nearest_neighbour_distance,
    nearest_neighbours,
    nn_distance_ratio,
)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _ref_dists(x, train):
    """Brute-force float64 distance matrix (B, n) on flattened rows."""
    return cdist(x.double().reshape(len(x), -1).numpy(), train.double().reshape(len(train), -1).numpy())


# -- nearest neighbours ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_nearest_neighbour_matches_brute_force(dtype, chunk_size):
    x, train = _rand(40, 3, 4, 4, seed=1, dtype=dtype), _rand(333, 3, 4, 4, seed=2, dtype=dtype)
    dist, idx = nearest_neighbour_distance(x, train, chunk_size=chunk_size)
    ref = _ref_dists(x, train)
    assert dist.shape == (40,) and idx.shape == (40,) and dist.dtype == dtype and idx.dtype == torch.int64
    np.testing.assert_array_equal(idx.numpy(), ref.argmin(1))
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(dist.double().numpy(), ref.min(1), rtol=rtol)


def test_k_nearest_sorted_and_chunk_independent():
    x, train = _rand(25, 10, seed=3), _rand(101, 10, seed=4)
    ref = _ref_dists(x, train)
    order = np.argsort(ref, axis=1)[:, :3]
    for chunk in (None, 2, 10):
        dist, idx = nearest_neighbours(x, train, k=3, chunk_size=chunk)
        np.testing.assert_array_equal(idx.numpy(), order)
        np.testing.assert_allclose(dist.double().numpy(), np.take_along_axis(ref, order, 1), rtol=1e-6)


def test_near_copies_far_from_origin_are_exact():
    """Where the GEMM form cancels (||x||^2 ~ 4e4, true d^2 ~ 5e-5), the distance is still exact."""
    train = 30.0 + _rand(200, 48, seed=5, dtype=torch.float64)
    x = train[:20] + 1e-3 * _rand(20, 48, seed=6, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        dist, idx = nearest_neighbour_distance(x.to(dtype), train.to(dtype))
        ref = _ref_dists(x.to(dtype), train.to(dtype))   # the same rounded inputs, in float64
        np.testing.assert_array_equal(idx.numpy(), np.arange(20))
        np.testing.assert_allclose(dist.double().numpy(), ref.min(1), rtol=1e-6)
    # Exact copies are at distance exactly 0 (the GEMM form gives rounding noise, maybe negative).
    dist0, _ = nearest_neighbour_distance(train[:5].float(), train.float())
    assert torch.equal(dist0, torch.zeros(5))


def test_leave_one_out_distance():
    train = _rand(120, 6, seed=7, dtype=torch.float64)
    ref = _ref_dists(train, train)
    np.fill_diagonal(ref, np.inf)
    np.testing.assert_allclose(leave_one_out_distance(train, chunk_size=13).numpy(), ref.min(1), rtol=1e-12)
    dup = torch.cat([train, train[:3]])
    loo = leave_one_out_distance(dup)
    assert torch.equal(loo[:3], torch.zeros(3, dtype=torch.float64)) and (loo[3:120] > 0).all()


def test_memorisation_criterion_against_reference():
    train = _rand(300, 3, 8, 8, seed=8)
    copies = train[:30] + 0.01 * _rand(30, 3, 8, 8, seed=9)   # d1 ~ 0.14 << d2 ~ 15
    fresh = _rand(70, 3, 8, 8, seed=10)
    samples = torch.cat([copies, fresh])
    ref = np.sort(_ref_dists(samples, train), axis=1)
    d1, d2 = ref[:, 0], ref[:, 1]
    np.testing.assert_allclose(nn_distance_ratio(samples, train).double().numpy(), d1 / d2, rtol=1e-5)
    for ratio in (1 / 3, 0.9):
        expected = d1 < ratio * d2
        np.testing.assert_array_equal(memorised(samples, train, ratio=ratio).numpy(), expected)
        assert memorisation_rate(samples, train, ratio=ratio, chunk_size=17) == pytest.approx(expected.mean())
    assert memorisation_rate(samples, train) == pytest.approx(0.3)   # exactly the 30 copies
    # An exact copy of a duplicated training point (d1 = d2 = 0) counts as memorised.
    dup = torch.cat([train, train[:1]])
    assert memorised(train[:1], dup).item() and nn_distance_ratio(train[:1], dup).item() == 0.0


def test_neighbour_bad_inputs():
    x, train = _rand(4, 5), _rand(10, 5)
    with pytest.raises(ValueError, match="same sample size"):
        nearest_neighbour_distance(x, _rand(10, 6))
    with pytest.raises(TypeError, match="dtype"):
        nearest_neighbour_distance(x, train.double())
    with pytest.raises(TypeError, match="floating-point"):
        nearest_neighbour_distance(x.long(), train)
    with pytest.raises(TypeError, match="torch.Tensor"):
        nearest_neighbour_distance(x.numpy(), train)
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbour_distance(x, train.index_fill(0, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_neighbour_distance(x, train, chunk_size=0)
    with pytest.raises(ValueError, match=r"^train must have shape \(N, \*S\) with N >= 1, got shape \(0,"):
        nearest_neighbour_distance(x, train[:0])
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(x, train, k=11)
    with pytest.raises(ValueError, match="k must be"):
        memorisation_rate(x, train[:1])
    with pytest.raises(ValueError, match="ratio"):
        memorisation_rate(x, train, ratio=0.0)
    with pytest.raises(ValueError, match="ratio"):
        memorised(x, train, ratio=1.5)


# -- cosine similarity ------------------------------------------------------------------
def test_cosine_similarity():
    a, b = _rand(50, 3, 4, 4, seed=11), _rand(50, 3, 4, 4, seed=12)
    an, bn = a.double().reshape(50, -1).numpy(), b.double().reshape(50, -1).numpy()
    ref = (an * bn).sum(1) / (np.linalg.norm(an, axis=1) * np.linalg.norm(bn, axis=1))
    np.testing.assert_allclose(cosine_similarity(a, b).double().numpy(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cosine_similarity(a, 3 * a), torch.ones(50))
    torch.testing.assert_close(cosine_similarity(a, -a), -torch.ones(50))
    z = a.clone()
    z[0] = 0
    assert cosine_similarity(z, b)[0].item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        cosine_similarity(a, b[:10])
    with pytest.raises(ValueError, match="same shape"):
        cosine_similarity(a, b.reshape(50, 48))


# -- MMD -------------------------------------------------------------------------------
def _ref_mmd2(x, y, h):
    x, y = x.double().reshape(len(x), -1).numpy(), y.double().reshape(len(y), -1).numpy()
    m, n = len(x), len(y)
    kxx = np.exp(-cdist(x, x, "sqeuclidean") / (2 * h * h))
    kyy = np.exp(-cdist(y, y, "sqeuclidean") / (2 * h * h))
    kxy = np.exp(-cdist(x, y, "sqeuclidean") / (2 * h * h))
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_mmd_matches_reference_and_median_heuristic():
    x, y = _rand(60, 2, 3, seed=13), 0.5 + _rand(45, 2, 3, seed=14)
    pooled = np.concatenate([x.double().reshape(60, -1).numpy(), y.double().reshape(45, -1).numpy()])
    h_med = np.median(pdist(pooled))
    assert median_distance(torch.cat([x, y])) == pytest.approx(h_med, rel=1e-6)
    assert mmd2_unbiased(x, y) == pytest.approx(_ref_mmd2(x, y, h_med), rel=1e-6, abs=1e-9)
    for h in (0.3, 2.0):
        assert mmd2_unbiased(x, y, bandwidth=h, chunk_size=7) == pytest.approx(_ref_mmd2(x, y, h), rel=1e-9)


def test_median_distance_subsamples_evenly():
    z = _rand(300, 4, seed=15, dtype=torch.float64)
    rows = torch.linspace(0, 299, 50).round().long()
    assert median_distance(z, max_points=50) == pytest.approx(np.median(pdist(z[rows].numpy())), rel=1e-12)
    assert median_distance(z) == pytest.approx(np.median(pdist(z.numpy())), rel=1e-12)


def _population_mmd2(mu_norm2, s, h, d):
    """MMD^2 between N(0, s^2 I_d) and N(mu, s^2 I_d) under k = exp(-|a - b|^2 / (2 h^2))."""
    c = (h * h / (h * h + 2 * s * s)) ** (d / 2)
    return 2 * c * (1 - np.exp(-mu_norm2 / (2 * (h * h + 2 * s * s))))


@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_mmd_is_unbiased(shift):
    """The mean over independent draws matches the population MMD^2 (0 when equal), within 4 s.e."""
    g = torch.Generator().manual_seed(16)
    d, h, m = 3, 1.5, 12
    vals = np.array([mmd2_unbiased(torch.randn(m, d, generator=g, dtype=torch.float64),
                                   shift + torch.randn(m, d, generator=g, dtype=torch.float64), bandwidth=h)
                     for _ in range(400)])
    target = _population_mmd2(d * shift**2, 1.0, h, d)
    se = vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(vals.mean() - target) < 4 * se
    if shift == 0.0:
        assert (vals < 0).mean() > 0.3   # unbiased estimates of 0 are often negative
    else:
        assert target > 10 * se          # and the shifted case is clearly non-zero


def test_mmd_bad_inputs():
    x = _rand(10, 3)
    with pytest.raises(ValueError, match=r"^x must have shape \(N, \*S\) with N >= 2, got shape \(1, "):
        mmd2_unbiased(x[:1], x)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2_unbiased(x, x, bandwidth=0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2_unbiased(x, x, bandwidth=float("inf"))
    with pytest.raises(ValueError, match="same sample size"):
        mmd2_unbiased(x, _rand(10, 4))
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        mmd2_unbiased(torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="max_points"):
        median_distance(x, max_points=1)


# -- Frechet distance ---------------------------------------------------------------------
def test_gaussian_frechet_closed_form_commuting():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = gaussian_frechet_distance(torch.tensor(mu_a), torch.diag(torch.tensor(a)),
                                    torch.tensor(mu_b), torch.diag(torch.tensor(b)))
    assert got == pytest.approx(expected, rel=1e-12)


def _ref_frechet(mu1, c1, mu2, c2):
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * covmean)


def test_gaussian_frechet_non_commuting_against_scipy():
    rng = np.random.default_rng(0)
    a1, a2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a1 @ a1.T + 0.1 * np.eye(6), a2 @ a2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    got = gaussian_frechet_distance(*map(torch.tensor, (mu1, c1, mu2, c2)))
    assert got == pytest.approx(_ref_frechet(mu1, c1, mu2, c2), rel=1e-9)
    assert gaussian_frechet_distance(*map(torch.tensor, (mu1, c1, mu1, c1))) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_features():
    fa, fb = _rand(400, 8, seed=17), 0.3 + 1.5 * _rand(300, 8, seed=18)
    a, b = fa.double().numpy(), fb.double().numpy()
    ref = _ref_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(fa, fb) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)
    # Large samples from N(0, I) and N(mu, 4 I) approach the closed form |mu|^2 + d (2 - 1)^2.
    g = torch.Generator().manual_seed(19)
    d, mu = 4, torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    big_a = torch.randn(50_000, d, generator=g, dtype=torch.float64)
    big_b = mu + 2.0 * torch.randn(50_000, d, generator=g, dtype=torch.float64)
    assert frechet_distance(big_a, big_b) == pytest.approx(float(mu @ mu) + d, rel=0.02)


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match=r"^feats_a must have shape \(N, D\) with N >= 2, got shape \(10, 2"):
        frechet_distance(_rand(10, 2, 2), _rand(10, 2, 2))
    with pytest.raises(ValueError, match="same feature size"):
        frechet_distance(_rand(10, 3), _rand(10, 4))
    with pytest.raises(ValueError, match=r"^feats_a must have shape \(N, D\) with N >= 2, got shape \(1,"):
        frechet_distance(_rand(1, 3), _rand(10, 3))
    with pytest.raises(ValueError, match="covariance"):
        gaussian_frechet_distance(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        gaussian_frechet_distance(np.zeros(3), np.eye(3), torch.zeros(3), torch.eye(3))


def _fake_torchmetrics(monkeypatch, fid_class):
    import sys
    import types

    pkg, image, mod = (types.ModuleType(n) for n in ("torchmetrics", "torchmetrics.image",
                                                     "torchmetrics.image.fid"))
    mod.FrechetInceptionDistance = fid_class
    pkg.image, image.fid = image, mod
    for name, m in (("torchmetrics", pkg), ("torchmetrics.image", image), ("torchmetrics.image.fid", mod)):
        monkeypatch.setitem(sys.modules, name, m)


def test_inception_fid_names_the_missing_package(monkeypatch):
    import sys

    from nwflow.metrics import inception_fid

    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics raises ImportError
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(ImportError, match=r"pip install 'torchmetrics\[image\]'"):
        inception_fid(torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1)


def test_inception_fid_names_the_missing_weights(monkeypatch):
    from nwflow.metrics import inception_fid

    class Offline:
        def __init__(self, **kwargs):
            raise OSError("could not download pt_inception weights")

    _fake_torchmetrics(monkeypatch, Offline)
    with pytest.raises(RuntimeError, match="pt_inception-2015-12-05"):
        inception_fid(torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1)


def test_inception_fid_feeds_the_implementation_images_in_unit_range(monkeypatch):
    from nwflow.metrics import inception_fid

    seen = []

    class Recorder:
        def __init__(self, feature, normalize):
            assert feature == 2048 and normalize is True

        def update(self, x, real):
            seen.append((real, x.clone()))

        def compute(self):
            # the FID of the recorded sets, in pixel space (the real one is Inception's)
            real = torch.cat([x for r, x in seen if r]).flatten(1)
            fake = torch.cat([x for r, x in seen if not r]).flatten(1)
            return torch.tensor(frechet_distance(fake, real))

    _fake_torchmetrics(monkeypatch, Recorder)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, 3, 2, 2, generator=g) * 2 - 1, torch.rand(5, 3, 2, 2, generator=g) * 2 - 1
    got = inception_fid(a, b, batch_size=3)
    assert [len(x) for r, x in seen if r] == [3, 2] and [len(x) for r, x in seen if not r] == [3, 3, 1]
    assert all(float(x.min()) >= 0 and float(x.max()) <= 1 for _, x in seen)
    assert got == pytest.approx(frechet_distance(((a + 1) / 2).flatten(1), ((b + 1) / 2).flatten(1)))
    with pytest.raises(ValueError, match="RGB"):
        inception_fid(torch.rand(4, 1, 8, 8), torch.rand(4, 3, 8, 8))
