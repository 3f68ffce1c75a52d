"""Tests for nwflow.efm against independent float64 (numpy) re-derivations.

The EFM-M estimator (Bertrand et al. 2025, eq. 8 / Algorithm 2):
    u_M(x, t) = sum_j lambda_j (b_j - c x) / s,  lambda = softmax(-||x - t b_j||^2 / (2 s^2)),
    s = 1 - c t, c = 1 - sigma_min, b_1 = the point that generated x.
Proposition 2 is checked EXACTLY by enumerating every reference tuple of a tiny support.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import nwflow
from nwflow.efm import TargetSampler, alignment, efm_target, field_error, hybrid_field, hybrid_samples
from nwflow.solvers import integrate


def ref_target(x, t, b, sigma_min):
    """numpy float64: x (D,), b (M, D) with b[0] the generating point."""
    c = 1.0 - sigma_min
    s = 1.0 - c * t
    logits = -((x[None, :] - t * b) ** 2).sum(1) / (2 * s * s)
    lam = np.exp(logits - logits.max())
    lam /= lam.sum()
    return (lam[:, None] * (b - c * x[None, :])).sum(0) / s


def ref_posterior(x, t, support, sigma_min):
    c = 1.0 - sigma_min
    s = 1.0 - c * t
    logits = -((x[None, :] - t * support) ** 2).sum(1) / (2 * s * s)
    w = np.exp(logits - logits.max())
    return w / w.sum()


def ref_closed_form(x, t, support, sigma_min):
    c = 1.0 - sigma_min
    s = 1.0 - c * t
    w = ref_posterior(x, t, support, sigma_min)
    return (w[:, None] * (support - c * x[None, :])).sum(0) / s


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("per_row_t", [False, True])
def test_shared_references_match_reference(sigma_min, per_row_t):
    g = torch.Generator().manual_seed(0)
    B, K, S = 5, 7, (2, 3, 3)
    x = torch.randn(B, *S, generator=g)
    x1 = torch.randn(B, *S, generator=g)
    refs = torch.randn(K, *S, generator=g)
    t = torch.rand(B, generator=g) * 0.9 if per_row_t else 0.63
    out = efm_target(x, t, x1, refs, sigma_min=sigma_min)
    assert out.shape == x.shape and out.dtype == torch.float32
    tt = t.double().numpy() if per_row_t else np.full(B, 0.63)
    xn, x1n, rn = (a.double().numpy().reshape(a.shape[0], -1) for a in (x, x1, refs))
    for i in range(B):
        want = ref_target(xn[i], tt[i], np.vstack([x1n[i:i + 1], rn]), sigma_min)
        np.testing.assert_allclose(out[i].reshape(-1).double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_per_row_references_match_reference_float64():
    g = torch.Generator().manual_seed(1)
    B, K, D = 4, 5, 3
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x1 = torch.randn(B, D, generator=g, dtype=torch.float64)
    refs = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.8, 0.99], dtype=torch.float64)
    out = efm_target(x, t, x1, refs)
    for i in range(B):
        b = np.vstack([x1[i:i + 1].numpy(), refs[i].numpy()])
        np.testing.assert_allclose(out[i].numpy(), ref_target(x[i].numpy(), float(t[i]), b, 0.0),
                                   rtol=1e-12, atol=1e-12)


def test_shared_references_match_reference_float64():
    """The shared form mixes the references' kernel mean with the generating point by its
    weight lambda_1 (one softmax split in two); it must agree with the one-softmax reference
    to float64 rounding, also where lambda_1 is nearly 0 or 1."""
    g = torch.Generator().manual_seed(5)
    B, K, D = 6, 9, 3
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x1 = torch.randn(B, D, generator=g, dtype=torch.float64)
    refs = torch.randn(K, D, generator=g, dtype=torch.float64)
    x[0] = 0.95 * refs[2]                  # a reference far closer than x1: lambda_1 ~ 0
    x[1] = 0.95 * x1[1]                    # x on the generating point's line: lambda_1 ~ 1
    t = torch.tensor([0.95, 0.95, 0.0, 0.3, 0.6, 0.8], dtype=torch.float64)
    for sigma_min in (0.0, 0.1):
        out = efm_target(x, t, x1, refs, sigma_min=sigma_min)
        for i in range(B):
            b = np.vstack([x1[i:i + 1].numpy(), refs.numpy()])
            np.testing.assert_allclose(out[i].numpy(), ref_target(x[i].numpy(), float(t[i]), b, sigma_min),
                                       rtol=1e-11, atol=1e-11)


def test_shared_equals_per_row_when_references_repeat():
    g = torch.Generator().manual_seed(2)
    x, x1 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    refs = torch.randn(9, 4, generator=g)
    a = efm_target(x, 0.4, x1, refs)
    b = efm_target(x, 0.4, x1, refs.expand(6, 9, 4).contiguous())
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma_min", [0.0, 0.05])
def test_m_equal_one_is_the_conditional_target(sigma_min):
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g,
                                                                               dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    xt = nwflow.sample_xt(x0, x1, t, sigma_min)
    out = efm_target(xt, t, x1, torch.empty(0, 5, dtype=torch.float64), sigma_min=sigma_min)
    # On the path, (x1 - c x_t) / sigma_t = x1 - c x0.
    torch.testing.assert_close(out, x1 - (1 - sigma_min) * x0, rtol=1e-10, atol=1e-10)


def test_stable_near_t_one():
    # Near t = 1 the generating point takes all the weight and the target is x1 - x0.
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    refs = torch.randn(50, 16, generator=g)
    t = 1.0 - 1e-6
    xt = nwflow.sample_xt(x0.double(), x1.double(), t).float()
    out = efm_target(xt, t, x1, refs)
    assert torch.isfinite(out).all()
    # x_t is rounded to fp32 before the call; the target divides that rounding by sigma_t.
    tol = 4 * 2.0 ** -24 * float(xt.abs().max()) / 1e-6
    torch.testing.assert_close(out, x1 - x0, rtol=0.0, atol=tol)


def _enumerate(x, t, support, M, first, sigma_min=0.0):
    """Exact mean and trace variance of u_M over b_1 ~ first (n,), b_2..M ~ uniform."""
    n, D = support.shape
    tuples = list(itertools.product(range(n), repeat=M))
    probs = np.array([first[i[0]] * n ** -(M - 1) for i in tuples])
    vals = np.array([ref_target(x, t, support[list(i)], sigma_min) for i in tuples])
    mean = (probs[:, None] * vals).sum(0)
    var = (probs * ((vals - mean) ** 2).sum(1)).sum()
    return mean, var, tuples, probs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("M", [2, 3])
def test_unbiased_with_posterior_first_point_exact(seed, M):
    rng = np.random.default_rng(seed)
    n, D = 4, 3
    support = rng.normal(size=(n, D))
    t = float(rng.uniform(0.2, 0.8))
    x = t * support[0] + (1 - t) * rng.normal(size=D)
    post = ref_posterior(x, t, support, 0.0)
    mean, var, tuples, _ = _enumerate(x, t, support, M, post)
    exact = ref_closed_form(x, t, support, 0.0)
    np.testing.assert_allclose(mean, exact, rtol=1e-10, atol=1e-12)
    # The library's field agrees with the independent closed form.
    lib = nwflow.velocity(torch.from_numpy(x)[None], t, torch.from_numpy(support))[0].numpy()
    np.testing.assert_allclose(lib, exact, rtol=1e-10, atol=1e-12)
    # And the library's estimator agrees with the reference on every tuple (per-row form).
    idx = torch.tensor(tuples)
    sup = torch.from_numpy(support)
    xs = torch.from_numpy(x).expand(len(tuples), D).contiguous()
    out = efm_target(xs, t, sup[idx[:, 0]], sup[idx[:, 1:]])
    vals = np.array([ref_target(x, t, support[list(i)], 0.0) for i in tuples])
    np.testing.assert_allclose(out.numpy(), vals, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_biased_with_uniform_first_point_exact(seed):
    rng = np.random.default_rng(seed)
    n, D, M = 4, 3, 2
    support = 2.0 * rng.normal(size=(n, D))
    t = 0.5
    x = t * support[0] + (1 - t) * rng.normal(size=D)
    mean, _, _, _ = _enumerate(x, t, support, M, np.full(n, 1.0 / n))
    exact = ref_closed_form(x, t, support, 0.0)
    assert np.linalg.norm(mean - exact) > 1e-2 * np.linalg.norm(exact)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sigma_min", [0.0, 0.2])
def test_variance_never_above_cfm_exact(seed, sigma_min):
    rng = np.random.default_rng(100 + seed)
    n, D = 4, 2
    support = rng.normal(size=(n, D))
    t = float(rng.uniform(0.05, 0.9))
    x = t * support[1] + (1 - (1 - sigma_min) * t) * rng.normal(size=D)
    post = ref_posterior(x, t, support, sigma_min)
    exact = ref_closed_form(x, t, support, sigma_min)
    c, s = 1 - sigma_min, 1 - (1 - sigma_min) * t
    var_cfm = (post * (((support - c * x) / s - exact) ** 2).sum(1)).sum()
    var1 = _enumerate(x, t, support, 1, post, sigma_min)[1]
    np.testing.assert_allclose(var1, var_cfm, rtol=1e-10)      # M = 1 is CFM
    for M in (2, 3, 4):
        mean, var, _, _ = _enumerate(x, t, support, M, post, sigma_min)
        np.testing.assert_allclose(mean, exact, rtol=1e-9, atol=1e-12)
        # (an absolute slack for rounding when the posterior has collapsed and both are ~0)
        assert var <= var_cfm * (1 + 1e-12) + 1e-20


def test_sampler_cfm_and_efm_on_a_single_point_agree_with_the_path():
    # With n = 1 every reference is x1, so EFM-M and CFM both give x1 - c x0.
    sup = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    for m in (None, 1, 8):
        sampler = TargetSampler(sup, batch_size=64, m=m, sigma_min=0.1)
        xt, t, target = sampler(0, torch.Generator().manual_seed(5))
        assert xt.shape == (64, 3) and t.shape == (64,) and target.shape == (64, 3)
        assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
        x0 = (xt - t[:, None] * sup) / (1 - 0.9 * t[:, None])
        torch.testing.assert_close(target, sup - 0.9 * x0, rtol=1e-9, atol=1e-9)


def test_sampler_is_reproducible_and_respects_t_max():
    g = torch.Generator().manual_seed(6)
    sup = torch.randn(100, 2, 2, generator=g)
    sampler = TargetSampler(sup, batch_size=32, m=16, t_max=0.5)
    a = sampler(0, torch.Generator().manual_seed(7))
    b = sampler(0, torch.Generator().manual_seed(7))
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert float(a[1].max()) < 0.5
    assert a[0].shape == (32, 2, 2) and a[2].shape == (32, 2, 2)


def test_sampler_efm_target_is_the_closed_form_when_m_is_huge():
    # With many references the self-normalised average approaches the closed form.
    g = torch.Generator().manual_seed(8)
    sup = torch.randn(20, 2, generator=g, dtype=torch.float64)
    xt, t, target = TargetSampler(sup, batch_size=16, m=20_000)(0, torch.Generator().manual_seed(9))
    u = nwflow.velocity(xt, t.clamp_max(0.95), sup)
    keep = t < 0.95
    torch.testing.assert_close(target[keep], u[keep], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_sampler_batch_references_is_the_closed_form_of_batch_plus_draws(sigma_min):
    # The authors' released scheme, re-derived in numpy float64 from the same random draws:
    # R = [x1 of every row, then m uniform draws], and row i's target is u_R(x_t^i, t_i).
    g = torch.Generator().manual_seed(21)
    n, B, m = 40, 6, 5
    sup = torch.randn(n, 2, 2, generator=g, dtype=torch.float64)
    xt, t, target = TargetSampler(sup, B, m=m, sigma_min=sigma_min, references="batch")(
        0, torch.Generator().manual_seed(22))
    # The draws, in the sampler's order: rows of x1, x0, t, then the m references.
    r = torch.Generator().manual_seed(22)
    idx = torch.randint(n, (B,), generator=r)
    x0 = torch.randn((B, 2, 2), generator=r, dtype=torch.float64)
    tt = torch.rand(B, generator=r, dtype=torch.float64)
    ref = torch.randint(n, (m,), generator=r)
    np.testing.assert_allclose(t.numpy(), tt.numpy(), rtol=0, atol=0)
    c = 1.0 - sigma_min
    xt_ref = (1 - c * tt)[:, None, None] * x0 + tt[:, None, None] * sup[idx]
    np.testing.assert_allclose(xt.numpy(), xt_ref.numpy(), rtol=1e-12, atol=1e-12)
    R = np.concatenate([sup[idx].numpy(), sup[ref].numpy()]).reshape(B + m, -1)
    for i in range(B):
        want = ref_closed_form(xt_ref[i].numpy().ravel(), float(tt[i]), R, sigma_min)
        np.testing.assert_allclose(target[i].numpy().ravel(), want, rtol=1e-9, atol=1e-9)
        # ... which is EFM with b^(1) = x1^(i) and the B - 1 + m other points as references.
        others = np.delete(R, i, axis=0)
        b = np.concatenate([sup[idx[i]].numpy().reshape(1, -1), others])
        np.testing.assert_allclose(target[i].numpy().ravel(), ref_target(xt_ref[i].numpy().ravel(),
                                   float(tt[i]), b, sigma_min), rtol=1e-9, atol=1e-9)


def test_batch_set_target_keeps_its_precision_near_t_1():
    # The batch scheme's target against the float64 closed form of its set, for t from 0.3 up to
    # sigma_t = 1e-6 (row i's own point is column i of the set).
    from nwflow.efm import _batch_set_target

    g = torch.Generator().manual_seed(25)
    B, m = 4, 3
    pts = torch.randn(B + m, 12, generator=g, dtype=torch.float64) * 3 + 5
    t = torch.tensor([0.3, 0.9, 1 - 1e-4, 1 - 1e-6], dtype=torch.float64)
    x = (1 - t)[:, None] * torch.randn(B, 12, generator=g, dtype=torch.float64) + t[:, None] * pts[:B]
    got = _batch_set_target(x, t, pts, 0.0).numpy()
    for i in range(B):
        want = ref_closed_form(x[i].numpy(), float(t[i]), pts.numpy(), 0.0)
        np.testing.assert_allclose(got[i], want, rtol=1e-7, atol=1e-7)


def test_sampler_batch_references_differs_from_uniform_and_is_checked():
    g = torch.Generator().manual_seed(23)
    sup = torch.randn(50, 3, generator=g)
    a = TargetSampler(sup, 16, m=4, references="uniform")(0, torch.Generator().manual_seed(24))
    b = TargetSampler(sup, 16, m=4, references="batch")(0, torch.Generator().manual_seed(24))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)       # same x_t and t ...
    assert not torch.allclose(a[2], b[2], atol=1e-3)               # ... another reference set
    assert "batch" in repr(TargetSampler(sup, 16, m=4, references="batch"))
    with pytest.raises(ValueError, match="references"):
        TargetSampler(sup, 16, m=4, references="all")
    with pytest.raises(TypeError, match="references"):
        TargetSampler(sup, 16, m=4, references=1)


def test_hybrid_field_switches_at_tau():
    first = lambda x, t: torch.ones_like(x)  # noqa: E731
    second = lambda x, t: -torch.ones_like(x)  # noqa: E731
    f = hybrid_field(first, second, 0.4)
    x = torch.zeros(2, 3)
    assert bool((f(x, torch.tensor(0.39)) == 1).all()) and bool((f(x, torch.tensor(0.4)) == -1).all())
    # Euler with 10 steps: 4 steps at +1 then 6 at -1, each of length 0.1.
    out = integrate(f, x, steps=10)
    torch.testing.assert_close(out, torch.full((2, 3), -0.2), rtol=0, atol=1e-6)
    torch.testing.assert_close(integrate(hybrid_field(first, second, 1.0), x, steps=10),
                               torch.ones(2, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(integrate(hybrid_field(first, second, 0.0), x, steps=10),
                               -torch.ones(2, 3), rtol=0, atol=1e-6)


def test_hybrid_samples_match_the_switched_field():
    g = torch.Generator().manual_seed(12)
    sup = torch.randn(15, 3, generator=g, dtype=torch.float64)
    first = lambda x, t: nwflow.velocity(x, t, sup)  # noqa: E731
    second = lambda x, t: -0.5 * x + torch.sin(3 * t)  # noqa: E731
    x0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    taus = [0.0, 0.3, 0.5, 1.0]
    out = hybrid_samples(first, second, x0, taus, steps=20)
    assert out.shape == (4, 7, 3)
    for k, tau in enumerate(taus):
        want = integrate(hybrid_field(first, second, tau), x0, steps=20)
        torch.testing.assert_close(out[k], want, rtol=1e-10, atol=1e-10)
    # tau = 1 follows the closed form to the end: Euler's last step lands on posterior means.
    assert float(nwflow.metrics.nearest_neighbour_distance(out[-1], sup)[0].max()) < 1e-3
    with pytest.raises(ValueError, match="grid"):
        hybrid_samples(first, second, x0, [0.33], steps=20)


def test_alignment_matches_reference():
    rng = np.random.default_rng(10)
    support = rng.normal(size=(30, 4))
    x0 = rng.normal(size=(6, 4))
    index = np.array([0, 3, 3, 7, 29, 11])
    times = np.array([0.0, 0.3, 0.9])
    got = alignment(torch.from_numpy(support), torch.from_numpy(times), torch.from_numpy(x0),
                    torch.from_numpy(index))
    assert got.shape == (3, 6)
    for k, t in enumerate(times):
        for i in range(6):
            x1 = support[index[i]]
            xt = (1 - t) * x0[i] + t * x1
            u = ref_closed_form(xt, t, support, 0.0)
            v = x1 - x0[i]
            want = u @ v / np.linalg.norm(u) / np.linalg.norm(v)
            assert abs(float(got[k, i]) - want) < 1e-10


def test_field_error_of_exact_and_zero_fields():
    g = torch.Generator().manual_seed(11)
    sup = torch.randn(25, 3, generator=g, dtype=torch.float64)
    x0 = torch.randn(10, 3, generator=g, dtype=torch.float64)
    index = torch.randint(25, (10,), generator=g)
    times = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    exact = lambda x, t: nwflow.velocity(x, t, sup)  # noqa: E731
    assert float(field_error(exact, sup, times, x0, index).abs().max()) < 1e-20
    zero = field_error(lambda x, t: torch.zeros_like(x), sup, times, x0, index)
    for k, t in enumerate(times.tolist()):
        xt = ((1 - t) * x0 + t * sup[index]).numpy()
        want = np.mean([np.sum(ref_closed_form(xt[i], t, sup.numpy(), 0.0) ** 2) / 3 for i in range(10)])
        assert abs(float(zero[k]) - want) < 1e-10 * max(1.0, want)


def test_bad_inputs():
    x, x1 = torch.zeros(2, 3), torch.zeros(2, 3)
    refs = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="t"):
        efm_target(x, 1.0, x1, refs)
    with pytest.raises(ValueError, match="references"):
        efm_target(x, 0.5, x1, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="references"):
        efm_target(x, 0.5, x1, refs.double())
    with pytest.raises(ValueError, match="x1"):
        efm_target(x, 0.5, torch.zeros(3, 3), refs)
    with pytest.raises(TypeError, match="x"):
        efm_target(torch.zeros(2, 3, dtype=torch.int64), 0.5, x1, refs)
    with pytest.raises(ValueError, match="m"):
        TargetSampler(refs, 8, m=0)
    with pytest.raises(ValueError, match="batch_size"):
        TargetSampler(refs, 0)
    with pytest.raises(ValueError, match="t_max"):
        TargetSampler(refs, 8, t_max=1.5)
    with pytest.raises(ValueError, match="tau"):
        hybrid_field(lambda x, t: x, lambda x, t: x, 1.5)
