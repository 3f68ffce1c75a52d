"""nwflow.empirical against an independent float64 reference: accuracy, streaming, limits, bad input.

The reference below re-derives every quantity from explicit distances ||x - t x^(j)||^2
(cdist without the matrix-product shortcut) and an explicit log-sum-exp in float64.
"""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nwflow
from nwflow._precision import exact_matmul
from nwflow.empirical import EmpiricalField

REPO = Path(__file__).resolve().parents[1]
T_GRID = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999]


# -- the independent reference -----------------------------------------------------------
def reference(x, t, X, sigma_min):
    """Weights (B, n), mean, velocity, score (B, D) and n_eff (B,) in float64, row by row."""
    x = x.detach().double().flatten(1)
    X = X.detach().double().flatten(1)
    t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
    out = {k: [] for k in ("w", "m", "u", "s", "neff")}
    for i in range(x.shape[0]):
        ti = float(t[i])
        si = 1.0 - (1.0 - sigma_min) * ti
        d2 = torch.cdist(x[i:i + 1], ti * X, compute_mode="donot_use_mm_for_euclid_dist")[0] ** 2
        logits = -d2 / (2.0 * si**2)
        w = torch.exp(logits - torch.logsumexp(logits, 0))
        m = w @ X
        out["w"].append(w)
        out["m"].append(m)
        out["u"].append((m - (1.0 - sigma_min) * x[i]) / si)
        out["s"].append((ti * m - x[i]) / si**2)
        out["neff"].append(1.0 / (w**2).sum())
    return {k: torch.stack(v) for k, v in out.items()}


def worst_rel(a, b):
    """max over rows of ||a - b|| / ||b||."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def mixture(n, d, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(8, d, generator=g, dtype=torch.float64) + offset
    X = centres[torch.randint(0, 8, (n,), generator=g)]
    return X + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64), centres


def queries(X, centres, t, sigma_min, per_t, seed=1):
    """On-path points (from support points) and off-path points (from fresh mixture draws),
    ``per_t`` of each for every time in ``t``; returns (x, t per row) in float64."""
    g = torch.Generator().manual_seed(seed)
    tt = torch.tensor(t, dtype=torch.float64).repeat_interleave(per_t)
    s = (1.0 - (1.0 - sigma_min) * tt)[:, None]
    x0 = torch.randn(2 * tt.numel(), X.shape[1], generator=g, dtype=torch.float64)
    on = X[torch.randint(0, X.shape[0], (tt.numel(),), generator=g)]
    off = centres[torch.randint(0, centres.shape[0], (tt.numel(),), generator=g)]
    off = off + 1.5 * torch.randn(off.shape, generator=g, dtype=torch.float64)
    x = torch.cat([s * x0[:tt.numel()] + tt[:, None] * on, s * x0[tt.numel():] + tt[:, None] * off])
    return x, torch.cat([tt, tt])


# -- accuracy --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
@pytest.mark.parametrize("d,offset", [(2, 0.0), (2, 5.0), (16, 3.0)])
def test_mixture_accuracy(dtype, tol, sigma_min, d, offset):
    X64, centres = mixture(400, d, offset)
    x64, tt = queries(X64, centres, T_GRID, sigma_min, per_t=6)
    # The engine sees t rounded to the dtype; so must the reference.
    X, x, t = X64.to(dtype), x64.to(dtype), tt.to(dtype)
    ref = reference(x, t, X, sigma_min)
    field = EmpiricalField(X, sigma_min=sigma_min)
    assert worst_rel(field.velocity(x, t), ref["u"]) <= tol
    assert worst_rel(field.posterior_mean(x, t), ref["m"]) <= tol
    assert worst_rel(field.score(x, t), ref["s"]) <= tol
    neff = field.effective_neighbours(x, t).double()
    assert float(((neff - ref["neff"]).abs() / ref["neff"]).max()) <= tol
    w = field.posterior_weights(x, t).double()
    assert float((w - ref["w"]).abs().sum(dim=1).max()) <= tol  # total-variation distance per row


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_time_forms_agree(dtype, tol):
    """t as a float, a 0-d tensor and a (B,) tensor give the same answer (and the reference's)."""
    X64, centres = mixture(300, 5, 1.0)
    for t in (0.3, 0.9, 0.999):
        x64, _ = queries(X64, centres, [t], 0.0, per_t=8)
        X, x = X64.to(dtype), x64.to(dtype)
        u_float = nwflow.velocity(x, t, X)
        assert worst_rel(u_float, reference(x, t, X, 0.0)["u"]) <= tol
        # A float64 tensor carries the same t as the Python float: identical results.
        assert torch.equal(nwflow.velocity(x, torch.tensor(t, dtype=torch.float64), X), u_float)
        assert torch.equal(nwflow.velocity(x, torch.full((x.shape[0],), t, dtype=torch.float64), X), u_float)
        # A tensor of x's dtype carries t rounded to that dtype.
        t_r = torch.tensor(t, dtype=dtype)
        u_0d = nwflow.velocity(x, t_r, X)
        assert worst_rel(u_0d, reference(x, t_r, X, 0.0)["u"]) <= tol
        assert torch.equal(nwflow.velocity(x, t_r.expand(x.shape[0]).clone(), X), u_0d)


def _cifar_dir():
    candidates = [os.environ.get("NWFLOW_DATA_DIR", ""), str(REPO.parent / "shared" / "data")]
    for c in candidates:
        if c and (Path(c) / "cifar10-lossless-subset.npz").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def cifar():
    folder = _cifar_dir()
    if folder is None:
        pytest.skip("real CIFAR-10 pixels not found: set NWFLOW_DATA_DIR to a folder holding "
                    "cifar10-lossless-subset.npz (or place it in ../shared/data)")
    with np.load(folder / "cifar10-lossless-subset.npz") as f:
        train, test = f["x_train"][:1200], f["x_test"][:64]

    def to_tensor(a):
        return torch.from_numpy(a).permute(0, 3, 1, 2).double() / 127.5 - 1.0

    return to_tensor(train), to_tensor(test)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_cifar_accuracy(cifar, dtype, tol, sigma_min):
    train, test = cifar
    X64 = train[:1000]
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999], dtype=torch.float64)
    tt = t.repeat(3)
    s = (1.0 - (1.0 - sigma_min) * tt)[:, None, None, None]
    k = t.numel()
    x0 = torch.randn(3 * k, 3, 32, 32, generator=g, dtype=torch.float64)
    x1 = torch.cat([X64[torch.randint(0, 1000, (k,), generator=g)],   # on the path of a support point
                    test[:k],                                          # a held-out image's path
                    train[1000:1000 + k]])                             # another unseen training image
    x = (s * x0 + tt[:, None, None, None] * x1).to(dtype)
    X = X64.to(dtype)
    ref = reference(x, tt.to(dtype), X, sigma_min)
    u = nwflow.velocity(x, tt.to(dtype), X, sigma_min=sigma_min)
    assert u.shape == x.shape and u.dtype == dtype
    assert worst_rel(u, ref["u"]) <= tol
    # Off-path points: pure noise at the marginal's scale.
    xn = (torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    for tn in (0.2, 0.9, 0.999):
        assert worst_rel(nwflow.velocity(xn, tn, X, sigma_min=sigma_min),
                         reference(xn, tn, X, sigma_min)["u"]) <= tol


def _spy(monkeypatch, name):
    """Count the rows EmpiricalField.<name> is asked to recompute."""
    calls = []
    original = getattr(EmpiricalField, name)

    def spy(self, xf, tt, rows, *args, **kwargs):
        calls.append(rows.numel())
        return original(self, xf, tt, rows, *args, **kwargs)

    monkeypatch.setattr(EmpiricalField, name, spy)
    return calls


def test_near_tie_at_small_noise_fp32(monkeypatch):
    """Two support points almost equidistant from x at t = 0.999, far from the origin: the
    matrix-product logits (size ~1e8) cannot resolve their gap of a few units in fp32; the
    rows are recomputed from their candidates in float64."""
    refined = _spy(monkeypatch, "_from_candidates")
    X64 = torch.tensor([[100.0, 100.0], [100.0, 100.002], [103.0, 97.0]], dtype=torch.float64)
    t = 0.999
    s = 1 - t
    x64 = torch.tensor([[100.0, 100.001 + 1e-7 * k] for k in range(-20, 21)], dtype=torch.float64) * t
    x64 = x64 + s * torch.tensor([0.3, 0.0], dtype=torch.float64)
    X, x = X64.float(), x64.float()
    ref = reference(x, t, X, 0.0)
    assert float(ref["w"][:, :2].min()) > 1e-3  # both points carry weight: a genuine near-tie
    assert worst_rel(nwflow.velocity(x, t, X), ref["u"]) <= 1e-4
    assert float((nwflow.posterior_weights(x, t, X).double() - ref["w"]).abs().max()) <= 1e-4
    assert refined and refined[0] == x.shape[0]


def test_near_a_zero_of_the_velocity_fp32(monkeypatch):
    """Queries next to the centre of a symmetric support, where m(x, t) ~ x and u is small:
    fp32 rounding of the soft weights is amplified (a plain fp32 evaluation misses 1e-4
    here), so the rows are recomputed by the float64 pass."""
    wide = _spy(monkeypatch, "_wide_pass")
    g = torch.Generator().manual_seed(0)
    for d in (1, 2, 8):
        half = 0.5 * torch.randn(200, d, generator=g, dtype=torch.float64) + 5.0
        X = torch.cat([half, -half]).float()  # symmetric about 0
        x = (torch.randn(32, d, generator=g, dtype=torch.float64) * 1e-3).float()
        for t in (0.3, 0.5):
            assert worst_rel(nwflow.velocity(x, t, X), reference(x, t, X, 0.0)["u"]) <= 1e-4
            assert worst_rel(nwflow.score(x, t, X), reference(x, t, X, 0.0)["s"]) <= 1e-4
    assert sum(wide) > 0


def test_soft_weights_far_from_origin_fp32():
    """Data offset by 300 with soft weights: centring keeps the fp32 logits small."""
    X64, centres = mixture(300, 3, 300.0, seed=5)
    x64, tt = queries(X64, centres, [0.3, 0.6, 0.8], 0.0, per_t=8)
    X, x = X64.float(), x64.float()
    ref = reference(x, tt.float(), X, 0.0)
    assert worst_rel(nwflow.velocity(x, tt.float(), X), ref["u"]) <= 1e-4
    assert worst_rel(nwflow.score(x, tt.float(), X), ref["s"]) <= 1e-4


# -- streaming ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-6), (torch.float64, 1e-12)])
def test_chunk_invariance(dtype, tol):
    """Any chunk size, n = 1037 not a multiple of it, gives the one-chunk answer up to the
    rounding of the running rescalings (per row, relative: a few fp32 ulps)."""
    X64, centres = mixture(1037, 6, 1.0, seed=3)
    x64, tt = queries(X64, centres, [0.0, 0.2, 0.5, 0.8, 0.95, 0.999], 0.01, per_t=4)
    X, x, t = X64.to(dtype), x64.to(dtype), tt.to(dtype)
    full = EmpiricalField(X, sigma_min=0.01)
    assert full._chunk(x.shape[0]) == X.shape[0]  # the default keeps this problem in one chunk
    names = ("velocity", "posterior_mean", "score", "effective_neighbours", "posterior_weights")
    base = {f: getattr(full, f)(x, t).reshape(x.shape[0], -1) for f in names}
    for chunk in (1, 7, 100, 256, 1000, 1036, 5000):
        field = EmpiricalField(X, sigma_min=0.01, chunk_size=chunk)
        for f in names:
            err = worst_rel(getattr(field, f)(x, t).reshape(x.shape[0], -1), base[f])
            assert err <= tol, (chunk, f, err)
    # chunk_bytes steers the automatic choice the same way.
    small = EmpiricalField(X, sigma_min=0.01, chunk_bytes=x.shape[0] * X.element_size() * 97)
    assert small._chunk(x.shape[0]) == 97
    assert worst_rel(small.velocity(x, t), base["velocity"]) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_collapsed_rows_skip_the_value_product(monkeypatch, dtype, tol):
    """In one block the rows whose weight sits on their candidates are found before the second
    product and left out of it; the batch still matches the reference, collapsed rows and spread
    rows alike, for every output."""
    import nwflow.empirical as empirical

    X64, centres = mixture(900, 8, 1.0, seed=5)
    x64, tt = queries(X64, centres, [0.0, 0.1, 0.999], 0.0, per_t=3)
    X, x, t = X64.to(dtype), x64.to(dtype), tt  # t in float64: its fp32 rounding moves sigma_t near 1
    summed = []
    real = empirical.online_softmax

    def counting(blocks, **kw):
        blocks = list(blocks)
        summed.extend(b.logits.shape[0] for b in blocks if b.values is not None)
        return real(blocks, **kw)

    monkeypatch.setattr(empirical, "online_softmax", counting)
    field = EmpiricalField(X)
    ref = reference(x, tt, X, 0.0)  # of the inputs as the field sees them (rounded to dtype)
    assert worst_rel(field.velocity(x, t), ref["u"]) <= tol
    late = int((tt == 0.999).sum())  # collapsed: covered by their candidates
    assert summed == [x.shape[0] - late]
    assert worst_rel(field.posterior_mean(x, t), ref["m"]) <= tol
    neff = field.effective_neighbours(x, t).double()
    assert float(((neff - ref["neff"]).abs() / ref["neff"]).max()) <= tol
    assert bool((neff[tt == 0.999] < 1.01).all())


@pytest.mark.parametrize("dtype,tol,times", [(torch.float32, 1e-5, [0.7, 0.75]),
                                             (torch.float64, 1e-12, [0.75, 0.8])])
def test_value_product_runs_over_the_kept_keys(monkeypatch, dtype, tol, times):
    """Rows whose weight sits on one cluster (more points than the candidates) are summed over
    the keys within the covering margin of some row, in gathered blocks, and still match the
    reference; without the restriction (all keys kept) the answer is the same."""
    import nwflow.empirical as empirical

    X64, centres = mixture(2400, 8, 0.0, seed=6)
    # Some rows covered, some not (a cluster holds ~300 points, more than the 128 candidates);
    # float64's margin log(1/eps) is wider: later times.
    x64, tt = queries(X64, centres, times, 0.0, per_t=1)
    X, x = X64.to(dtype), x64.to(dtype)
    keys_summed = []
    real = empirical.online_softmax

    def counting(blocks, **kw):
        blocks = list(blocks)
        keys_summed.append(sum(b.values.shape[0] for b in blocks if b.values is not None))
        return real(blocks, **kw)

    monkeypatch.setattr(empirical, "online_softmax", counting)
    monkeypatch.setattr(empirical, "WIDE_BYTES", 40 * 8 * X.element_size())  # gathered 40 rows at a time
    ref = reference(x, tt, X, 0.0)
    u = EmpiricalField(X).velocity(x, tt)
    assert worst_rel(u, ref["u"]) <= tol
    # The first pass is the restricted one (an fp32 row may then take the float64 pass).
    assert 128 < keys_summed[0] <= 0.25 * len(X)
    keys_summed.clear()
    monkeypatch.setattr(empirical, "_SPARSE_FRACTION", 0.0)  # the whole support instead
    assert worst_rel(EmpiricalField(X).velocity(x, tt), u) <= tol and keys_summed[0] == len(X)


@pytest.mark.parametrize("dtype,tol,times", [(torch.float32, 1e-5, [0.7, 0.75]),
                                             (torch.float64, 1e-12, [0.75, 0.8])])
def test_rows_keeping_few_keys_are_summed_over_their_own(monkeypatch, dtype, tol, times):
    """Rows that keep at most _PAIR_FRACTION of the support (here their cluster of ~300 points,
    lifted to a quarter of the support) are summed over their own kept keys in one sparse product
    and still match the reference; with the share at 0 they take the shared product instead and
    give the same answer."""
    import nwflow.empirical as empirical

    X64, centres = mixture(2400, 8, 0.0, seed=6)
    x64, tt = queries(X64, centres, times, 0.0, per_t=1)
    X, x = X64.to(dtype), x64.to(dtype)
    sparse_rows, dense_rows = [], []
    real_sparse, real_dense = empirical.kept_softmax, empirical.online_softmax

    def counting_sparse(logits, keep, values, scalars=None):
        sparse_rows.append(int(keep.shape[0]))
        assert int(keep.sum(dim=1).max()) <= 600
        return real_sparse(logits, keep, values, scalars)

    def counting_dense(blocks, **kw):
        blocks = list(blocks)
        dense_rows.extend(b.logits.shape[0] for b in blocks if b.values is not None)
        return real_dense(blocks, **kw)

    monkeypatch.setattr(empirical, "kept_softmax", counting_sparse)
    monkeypatch.setattr(empirical, "online_softmax", counting_dense)
    monkeypatch.setattr(empirical, "_PAIR_FRACTION", 0.25)
    ref = reference(x, tt, X, 0.0)
    u = EmpiricalField(X).velocity(x, tt)
    assert worst_rel(u, ref["u"]) <= tol
    assert sparse_rows and not dense_rows  # every row not covered was light: none took the dense product
    sparse_rows.clear()
    monkeypatch.setattr(empirical, "_PAIR_FRACTION", 0.0)
    assert worst_rel(EmpiricalField(X).velocity(x, tt), u) <= tol and not sparse_rows and dense_rows


def test_rows_failing_the_test_with_few_keys_are_refined_not_redone(monkeypatch):
    """A float32 row that fails the accuracy test is redone in float64 from the keys its tail cut
    keeps when those are few, by a float64 pass over the support otherwise;
    either way it matches the reference."""
    import nwflow.empirical as empirical
    from nwflow import _accuracy

    X64, centres = mixture(900, 8, 1.0, seed=7)
    x64, tt = queries(X64, centres, [0.0, 0.6, 0.75], 0.0, per_t=2)
    X, x = X64.float(), x64.float()
    monkeypatch.setattr(_accuracy, "FALLBACK_TOL", 0.0)  # every row not covered fails the test
    monkeypatch.setattr(_accuracy, "REFINE_MAX", 300)
    passes = []
    real = empirical.EmpiricalField._wide_pass

    def counting(self, xf, t, rows):
        passes.append(rows.clone())
        return real(self, xf, t, rows)

    monkeypatch.setattr(empirical.EmpiricalField, "_wide_pass", counting)
    field = EmpiricalField(X)
    ref = reference(x, tt, X, 0.0)
    assert worst_rel(field.velocity(x, tt), ref["u"]) <= 1e-5
    redone = torch.cat(passes) if passes else torch.empty(0, dtype=torch.long)
    q, a = field._scaled_query(*field._query(x, tt), field.dtype)
    error = _accuracy.logit_error_bound(q, a, field._eps, field._raw_max, field._centred_max2)
    logits = field._logits(q, a, field.support, field.key_norms)
    kept = _accuracy.tail_cut(logits, error, field._eps).sum(dim=1)
    many = (kept > 300).nonzero().squeeze(1)
    assert many.numel() and set(redone.tolist()) == set(many.tolist())  # t = 0 rows keep all 900
    assert int(((kept > 64) & (kept <= 300)).sum()) > 0  # and some rows were refined from their keys


def long_tails(dtype):
    """Gaussian points in 3,072 dimensions queried on the path at t = 0.075-0.095: the weights
    go from spread over the whole support to a few points with a long tail (kept keys 28-2,656
    of 3,000)."""
    g = torch.Generator().manual_seed(8)
    n, D = 3000, 3072
    X = torch.randn(n, D, generator=g, dtype=torch.float64)
    tt = torch.tensor([0.075, 0.08, 0.085, 0.09, 0.095], dtype=torch.float64).repeat_interleave(4)
    x = tt[:, None] * X[torch.randint(0, n, (20,), generator=g)] + (1 - tt[:, None]) * torch.randn(
        20, D, generator=g, dtype=torch.float64)
    return X.to(dtype), x.to(dtype), tt


def test_rows_failing_the_test_are_rescued_by_their_exact_top_terms(monkeypatch):
    """With the tolerance lowered to 3e-6, float32 rows fail the a-priori test; a row whose
    weight sits on a few points passes once its 64 largest terms are weighed exactly (no float64
    pass), and its actual error is within the lowered tolerance."""
    import nwflow.empirical as empirical
    from nwflow import _accuracy

    X, x, tt = long_tails(torch.float32)
    monkeypatch.setattr(_accuracy, "FALLBACK_TOL", 3e-6)
    monkeypatch.setattr(_accuracy, "REFINE_MAX", 0)  # no refinement from the kept keys
    tried, redone = [], []
    real_top, real_wide = _accuracy.top_corrected, empirical.EmpiricalField._wide_pass

    def top(total, *args):
        tried.append(total.numel())
        return real_top(total, *args)

    def wide(self, xf, t, rows):
        redone.append(rows.numel())
        return real_wide(self, xf, t, rows)

    monkeypatch.setattr(_accuracy, "top_corrected", top)
    monkeypatch.setattr(empirical.EmpiricalField, "_wide_pass", wide)
    u = EmpiricalField(X).velocity(x, tt)
    assert worst_rel(u, reference(x, tt, X, 0.0)["u"]) <= 3e-6
    assert tried and sum(redone) < tried[0]  # some rows tried were accepted, not redone


def test_the_mean_cut_keeps_fewer_keys_and_answers_to_eps_of_the_output(monkeypatch):
    """Gaussian points in 3,072 dimensions queried on the path at t = 0.1-0.13 (float32): with
    the output's allowance (tail_cut's room) the
    rows answered from their candidates keep fewer keys than with the weights' cut alone, and
    are as close to float64: within 2 eps of ||u|| (eps for the cut, eps / 2 for rounding u)."""
    import nwflow.empirical as empirical

    g = torch.Generator().manual_seed(13)
    n, D = 3000, 3072
    X = torch.randn(n, D, generator=g)
    tt = torch.tensor([0.1, 0.11, 0.12, 0.13]).repeat_interleave(6)
    x = tt[:, None] * X[torch.randint(0, n, (24,), generator=g)] + (1 - tt[:, None]) * torch.randn(
        24, D, generator=g)
    ref = reference(x, tt, X, 0.0)["u"]
    eps = torch.finfo(torch.float32).eps
    real = empirical.EmpiricalField._from_candidates
    seen = {}

    def spy(self, xf, t, rows, index, count=None):
        e = real(self, xf, t, rows, index, count)
        seen.setdefault("runs", []).append((rows.clone(), e.count.clone()))
        return e

    monkeypatch.setattr(empirical.EmpiricalField, "_from_candidates", spy)
    results = {}
    for mode in ("room", "weights"):
        if mode == "weights":
            monkeypatch.setattr(empirical.EmpiricalField, "_room",
                                lambda self, logits, xf, a, b: torch.zeros(len(xf), dtype=torch.float64))
        seen.clear()
        u = EmpiricalField(X).velocity(x, tt)
        rows, count = seen["runs"][0]
        rel = (u[rows].double() - ref[rows]).norm(dim=1) / ref[rows].norm(dim=1)
        results[mode] = dict(zip(rows.tolist(), count.tolist(), strict=True)), rel
        assert float(rel.max()) <= 2 * eps, (mode, float(rel.max()) / eps)
    room, weights = results["room"][0], results["weights"][0]
    both = set(room) & set(weights)
    assert set(weights) <= set(room) and len(both) >= 5
    assert all(room[r] <= weights[r] for r in both)
    assert sum(room[r] for r in both) < 0.8 * sum(weights[r] for r in both)


def test_chunked_log_sum_exp_is_not_a_sum_of_chunk_lse():
    """The known bug (adding per-chunk log-sum-exps) gives wrong weights; the streamed
    result is the reference one."""
    X = torch.randn(10, 3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    ref = reference(x, 0.6, X, 0.0)["m"]
    torch.testing.assert_close(nwflow.posterior_mean(x, 0.6, X, chunk_size=3), ref, rtol=1e-12, atol=1e-12)
    logits = -torch.cdist(x, 0.6 * X) ** 2 / (2 * 0.4**2)
    wrong_norm = sum(torch.logsumexp(logits[:, s:s + 3], 1) for s in range(0, 10, 3))
    wrong = torch.exp(logits - wrong_norm[:, None]) @ X
    assert float((wrong - ref).abs().max()) > 1e-2


# -- limits and identities ----------------------------------------------------------------
def test_t_zero_is_the_data_mean():
    X = torch.randn(50, 4, dtype=torch.float64) + 2.0
    x = torch.randn(7, 4, dtype=torch.float64)
    m = nwflow.posterior_mean(x, 0.0, X)
    torch.testing.assert_close(m, X.mean(0).expand(7, 4), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(nwflow.velocity(x, 0.0, X), X.mean(0) - x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(nwflow.effective_neighbours(x, 0.0, X), torch.full((7,), 50.0,
                                                                                 dtype=torch.float64))


def test_a_batch_at_t_zero_takes_no_pass(monkeypatch):
    """At t = 0 the weights are uniform: the mean is the support's float64 mean, rounded once."""
    import nwflow.empirical as empirical

    g = torch.Generator().manual_seed(8)
    X = (torch.randn(3001, 5, generator=g, dtype=torch.float64) + 1e3).float()
    x = torch.randn(4, 5, generator=g)
    monkeypatch.setattr(empirical, "online_softmax", None)  # any pass would fail
    field = EmpiricalField(X)
    mean = X.double().mean(0)
    assert torch.equal(field.posterior_mean(x, 0.0), mean.float().expand(4, 5))
    torch.testing.assert_close(field.velocity(x, torch.zeros(4)).double(), mean - x.double(), rtol=1e-7,
                               atol=1e-4)
    assert torch.equal(field.effective_neighbours(x, 0.0), torch.full((4,), 3001.0))


def test_t_to_one_is_the_nearest_neighbour():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    t = 1.0 - 1e-6
    nearest = torch.cdist(x / t, X).argmin(dim=1)
    torch.testing.assert_close(nwflow.posterior_mean(x, t, X), X[nearest], rtol=0, atol=1e-12)
    w = nwflow.posterior_weights(x, t, X)
    assert torch.equal(w.argmax(dim=1), nearest) and float(w.max(dim=1).values.min()) > 1 - 1e-12
    torch.testing.assert_close(nwflow.effective_neighbours(x, t, X), torch.ones(9, dtype=torch.float64))
    # On the path of support point k the velocity is the conditional one, x1 - x0.
    x0 = torch.randn(9, 3, generator=g, dtype=torch.float64)
    k = torch.arange(9)
    xt = (1 - t) * x0 + t * X[k]
    torch.testing.assert_close(nwflow.velocity(xt, t, X), X[k] - x0, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("sigma_min", [0.0, 0.05])
def test_score_is_the_gradient_of_log_density(sigma_min):
    g = torch.Generator().manual_seed(6)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9, 0.97], dtype=torch.float64)
    s = (1 - (1 - sigma_min) * t)[:, None]
    d = X.shape[1]
    # log p_t(x) = logsumexp_j log N(x; t x^(j), s^2 I) - log n
    log_normal = (-((x[:, None, :] - t[:, None, None] * X[None]) ** 2).sum(-1) / (2 * s**2)
                  - d * torch.log(s) - 0.5 * d * math.log(2 * math.pi))
    log_p = torch.logsumexp(log_normal, dim=1) - math.log(X.shape[0])
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    sc = nwflow.score(x.detach(), t, X, sigma_min=sigma_min)
    torch.testing.assert_close(sc, grad, rtol=1e-10, atol=1e-10)
    # u = x / t + (sigma_t / t) * score when sigma_min = 0 (DESIGN: the score form).
    if sigma_min == 0.0:
        u = nwflow.velocity(x.detach(), t, X)
        torch.testing.assert_close(u, x.detach() / t[:, None] + (s / t[:, None]) * sc, rtol=1e-9, atol=1e-9)


def test_weights_and_effective_neighbours_bounds():
    X, centres = mixture(200, 3, 0.0, seed=7)
    x, tt = queries(X, centres, T_GRID, 0.0, per_t=3)
    w = nwflow.posterior_weights(x, tt, X)
    assert w.shape == (x.shape[0], 200) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(dim=1), torch.ones(x.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    neff = nwflow.effective_neighbours(x, tt, X)
    assert bool((neff >= 1 - 1e-12).all()) and bool((neff <= 200 + 1e-9).all())
    torch.testing.assert_close(neff, 1.0 / (w**2).sum(dim=1), rtol=1e-9, atol=1e-9)
    # n_eff falls from n at t = 0 towards 1 near t = 1 (rows 0.. are t = 0, the last block t = 0.999).
    assert float(neff[0]) == pytest.approx(200.0) and float(neff[38]) == pytest.approx(1.0)


def test_images_keep_their_shape_and_half_precision():
    X = torch.randn(25, 3, 8, 8)
    x = torch.randn(4, 3, 8, 8)
    field = EmpiricalField(X, sigma_min=0.01)
    for f in (field.velocity, field.posterior_mean, field.score):
        assert f(x, 0.7).shape == (4, 3, 8, 8)
    assert field.posterior_weights(x, 0.7).shape == (4, 25)
    assert field.effective_neighbours(x, 0.7).shape == (4,)
    u_flat = nwflow.velocity(x.flatten(1), 0.7, X.flatten(1), sigma_min=0.01)
    torch.testing.assert_close(field.velocity(x, 0.7).flatten(1), u_flat, rtol=0, atol=0)
    # float16 in, float16 out, computed in float32.
    h = nwflow.velocity(x.half(), 0.7, X.half(), sigma_min=0.01)
    assert h.dtype == torch.float16
    ref = reference(x.half().float(), 0.7, X.half().float(), 0.01)["u"]
    assert worst_rel(h, ref) <= 2e-3  # the float16 output rounding


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 5), b=st.integers(1, 6),
       t=st.floats(0.0, 0.999), sigma_min=st.sampled_from([0.0, 0.01, 0.3]),
       scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**16), chunk=st.integers(1, 50))
def test_property_matches_reference(n, d, b, t, sigma_min, scale, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    x = scale * torch.randn(b, d, generator=g, dtype=torch.float64)
    ref = reference(x, t, X, sigma_min)
    field = EmpiricalField(X, sigma_min=sigma_min, chunk_size=chunk)
    assert worst_rel(field.velocity(x, t), ref["u"]) <= 1e-9
    w = field.posterior_weights(x, t)
    torch.testing.assert_close(w.sum(1), torch.ones(b, dtype=torch.float64), rtol=0, atol=1e-12)
    neff = field.effective_neighbours(x, t)
    assert bool((neff >= 1 - 1e-9).all()) and bool((neff <= n * (1 + 1e-9)).all())


# -- precision settings and devices -------------------------------------------------------
def _precision_state():
    try:
        state = {"global": torch.get_float32_matmul_precision()}
    except RuntimeError:  # the backends were set apart with the per-backend API
        state = {"global": "mixed"}
    for name, backend in (("cuda", torch.backends.cuda.matmul),
                          ("mkldnn", getattr(getattr(torch.backends, "mkldnn", None), "matmul", None))):
        if backend is not None and hasattr(backend, "fp32_precision"):
            state[name] = backend.fp32_precision
    return state


def test_exact_matmul_is_highest_inside_and_restores_the_caller():
    before = torch.get_float32_matmul_precision()
    seen = []
    try:
        for setting in ("high", "medium", "highest"):
            torch.set_float32_matmul_precision(setting)
            caller = _precision_state()
            with exact_matmul():
                inside = _precision_state()
                assert inside["global"] == "highest"
                assert all(v == "ieee" for k, v in inside.items() if k != "global"), inside
            assert _precision_state() == caller
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            # A caller of the per-backend API (torch >= 2.9) is restored too.
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            caller = _precision_state()
            with exact_matmul():
                assert _precision_state()["cuda"] == "ieee"
            assert _precision_state() == caller
        torch.set_float32_matmul_precision("high")
        caller = _precision_state()
        field = EmpiricalField(torch.randn(20, 3))
        original = field._logits

        def spy(*args):
            seen.append(_precision_state()["global"])
            return original(*args)

        field._logits = spy
        field.velocity(torch.randn(4, 3), 0.5)
        assert seen and set(seen) == {"highest"}
        assert _precision_state() == caller
        with pytest.raises(ValueError, match="restored on error too"), exact_matmul():
            raise ValueError("restored on error too")
        assert _precision_state() == caller
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    X64, centres = mixture(2000, 32, 1.0)
    x64, tt = queries(X64, centres, [0.0, 0.3, 0.7, 0.95, 0.999], 0.0, per_t=8)
    X, x, t = X64.float(), x64.float(), tt.float()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed by the caller: must not leak in
    try:
        u_gpu = nwflow.velocity(x.cuda(), t.cuda(), X.cuda()).cpu()
        w_gpu = nwflow.posterior_weights(x.cuda(), t.cuda(), X.cuda()).cpu()
    finally:
        torch.set_float32_matmul_precision(before)
    ref = reference(x, t, X, 0.0)
    assert worst_rel(u_gpu, ref["u"]) <= 1e-4
    assert worst_rel(u_gpu, nwflow.velocity(x, t, X)) <= 1e-4
    assert float((w_gpu.double() - ref["w"]).abs().sum(1).max()) <= 1e-4


# -- bad input -------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    X = torch.randn(10, 3)
    x = torch.randn(4, 3)
    dtype_msg = r"^x must have the support's dtype \(torch.float32\), got torch.float64"
    range_msg = r"^sigma_min must be a real number in \[0, 1\), got"
    cases = [
        (ValueError, r"^t must be in \[0, 1\]", lambda: nwflow.velocity(x, 1.5, X)),
        (ValueError, r"^t must be in \[0, 1\]", lambda: nwflow.velocity(x, -0.01, X)),
        (ValueError, r"^t must be in \[0, 1\]",
         lambda: nwflow.velocity(x, torch.tensor([0.1, 0.2, 1.2, 0.3]), X)),
        (ValueError, "^t = 1 with sigma_min = 0", lambda: nwflow.velocity(x, 1.0, X)),
        (ValueError, r"^t must be a number, a 0-d tensor or a \(4,\) tensor .*\(3,\)$",
         lambda: nwflow.velocity(x, torch.rand(3), X)),
        (ValueError, "^t must be a number, a 0-d", lambda: nwflow.velocity(x, torch.rand(4, 1), X)),
        (ValueError, "^t contains NaN", lambda: nwflow.velocity(x, float("nan"), X)),
        (TypeError, "^t must be a number or a tensor", lambda: nwflow.velocity(x, "0.5", X)),
        (TypeError, "^t must be a real tensor, got dtype torch.bool",
         lambda: nwflow.velocity(x, torch.tensor(True), X)),
        (ValueError, "^x contains NaN", lambda: nwflow.velocity(torch.full((2, 3), math.nan), 0.5, X)),
        (ValueError, "^x contains NaN or inf", lambda: nwflow.velocity(torch.full((2, 3), math.inf), 0.5, X)),
        (ValueError, "^support contains NaN", lambda: nwflow.velocity(x, 0.5, torch.full((5, 3), math.nan))),
        (ValueError, "^support contains NaN or inf",
         lambda: nwflow.velocity(x, 0.5, torch.tensor([[0.0, 1.0, -math.inf]]))),
        (ValueError, "^support values are too large",
         lambda: nwflow.velocity(x, 0.5, torch.full((2, 3), 1e30))),
        (ValueError, "^support is empty", lambda: nwflow.velocity(x, 0.5, torch.zeros(0, 3))),
        (ValueError, "^support must have shape", lambda: nwflow.velocity(x, 0.5, torch.zeros(3))),
        (ValueError, "^x must have shape", lambda: nwflow.velocity(torch.randn(4, 2), 0.5, X)),
        (ValueError, "^x must have shape", lambda: nwflow.velocity(torch.randn(4, 3, 1), 0.5, X)),
        (TypeError, dtype_msg, lambda: nwflow.velocity(x.double(), 0.5, X)),
        (ValueError, r"^x must be on the support's device \(cpu\), got meta",
         lambda: nwflow.velocity(x.to("meta"), 0.5, X)),
        (ValueError, r"^t must be on the device of x \(cpu\), got meta",
         lambda: nwflow.velocity(x, torch.rand(4, device="meta"), X)),
        (TypeError, "^x must be a floating-point",
         lambda: nwflow.velocity(torch.ones(4, 3, dtype=torch.int64), 0.5, X)),
        (TypeError, "^x must be a torch.Tensor", lambda: nwflow.velocity(np.zeros((4, 3)), 0.5, X)),
        (TypeError, "^support must be a floating-point",
         lambda: nwflow.velocity(x, 0.5, torch.ones(10, 3, dtype=torch.int32))),
        (TypeError, "^support must be a torch.Tensor", lambda: nwflow.velocity(x, 0.5, [[0.0, 1.0, 2.0]])),
        (ValueError, range_msg, lambda: nwflow.velocity(x, 0.5, X, sigma_min=-0.1)),
        (ValueError, range_msg, lambda: nwflow.velocity(x, 0.5, X, sigma_min=1.0)),
        (TypeError, "^sigma_min must be a real number", lambda: nwflow.velocity(x, 0.5, X, sigma_min="0")),
        (ValueError, "^chunk_size must be a positive int", lambda: nwflow.velocity(x, 0.5, X, chunk_size=0)),
        (ValueError, "^chunk_bytes must be a positive int", lambda: EmpiricalField(X, chunk_bytes=0)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
            pytest.fail(f"no {error.__name__} matching {match!r}")
    # Each public function validates the same way.
    for f in (nwflow.posterior_weights, nwflow.posterior_mean, nwflow.score, nwflow.effective_neighbours):
        with pytest.raises(ValueError, match="^t = 1 with sigma_min = 0"):
            f(x, 1.0, X)
        with pytest.raises(TypeError, match=dtype_msg):
            f(x.double(), 0.5, X)
    # t = 1 is fine once sigma_min > 0.
    assert torch.isfinite(nwflow.velocity(x, 1.0, X, sigma_min=0.01)).all()


def test_empty_batch_and_single_support_point():
    X = torch.randn(5, 3, dtype=torch.float64)
    empty = torch.zeros(0, 3, dtype=torch.float64)
    assert nwflow.velocity(empty, 0.5, X).shape == (0, 3)
    assert nwflow.posterior_weights(empty, 0.5, X).shape == (0, 5)
    assert nwflow.effective_neighbours(empty, 0.5, X).shape == (0,)
    # One support point: the field is the conditional target toward it, n_eff = 1.
    x1 = X[:1]
    y = torch.randn(4, 3, dtype=torch.float64)
    for t in (0.0, 0.5, 0.999):
        torch.testing.assert_close(nwflow.velocity(y, t, x1), (x1 - y) / (1 - t), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(nwflow.effective_neighbours(y, t, x1), torch.ones(4, dtype=torch.float64))


# -- gradients in x ------------------------------------------------------------------------
def _differentiable_reference(x, t, X, sigma_min):
    """Mean, velocity and score (B, D) in float64, recorded by autograd: explicit distances."""
    s = (1.0 - (1.0 - sigma_min) * t)[:, None]
    d2 = ((x[:, None, :] - t[:, None, None] * X[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2.0 * s**2), dim=1)
    m = w @ X
    return {"posterior_mean": m, "velocity": (m - (1.0 - sigma_min) * x) / s,
            "score": (t[:, None] * m - x) / s**2}


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_vector_jacobian_product_matches_autograd_of_the_reference(sigma_min, dtype, tol):
    X, centres = mixture(500, 6, 1.0, seed=21)
    g = torch.Generator().manual_seed(22)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99], dtype=torch.float64)
    x64 = t[:, None] * X[torch.randint(0, 500, (8,), generator=g)] + (1 - t)[:, None] * torch.randn(
        8, 6, generator=g, dtype=torch.float64)
    upstream = torch.randn(8, 6, generator=g, dtype=torch.float64)
    ref_x = x64.clone().requires_grad_(True)
    ref = _differentiable_reference(ref_x, t, X, sigma_min)
    field = EmpiricalField(X.to(dtype), sigma_min=sigma_min, chunk_size=123)  # 5 chunks, the last short
    for name, expected in ref.items():
        (want,) = torch.autograd.grad(expected, ref_x, upstream, retain_graph=True)
        x = x64.to(dtype).requires_grad_(True)
        out = getattr(field, name)(x, t.to(dtype))
        assert out.requires_grad and out.dtype == dtype
        (got,) = torch.autograd.grad(out, x, upstream.to(dtype))
        # Relative to max(|J^T g|, |g|): the mean's Jacobian vanishes at t = 0 and where
        # one point holds the weight, so a bare relative error would divide by zero there.
        scale = torch.maximum(want.norm(dim=1), upstream.norm(dim=1))
        err = float(((got.double() - want).norm(dim=1) / scale).max())
        assert err <= tol, (name, err)
        # The forward value is the exact one, with or without autograd (the repeated call may
        # be screened from the first one's trail: another exact route, equal to rounding).
        again = getattr(field, name)(x.detach(), t.to(dtype))
        rtol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(out.detach(), again, rtol=rtol, atol=0.0)


def test_gradcheck_and_divergence():
    g = torch.Generator().manual_seed(23)
    X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for t in (0.2, 0.8, 0.995):
        for name in ("posterior_mean", "velocity", "score"):
            assert torch.autograd.gradcheck(lambda x, t=t, name=name: getattr(nwflow, name)(x, t, X), (x,))
    # div u = ((t / sigma^2) tr Cov_w(X) - D) / sigma (sigma_min = 0): the trace of the Jacobian.
    t = 0.6
    J = torch.autograd.functional.jacobian(lambda x: nwflow.velocity(x, t, X), x.detach())
    div = torch.stack([torch.diagonal(J[b, :, b]).sum() for b in range(4)])
    w = nwflow.posterior_weights(x.detach(), t, X)
    m = w @ X
    tr_cov = (w * ((X[None] - m[:, None]) ** 2).sum(-1)).sum(1)
    s = 1.0 - t
    torch.testing.assert_close(div, (t / s**2 * tr_cov - 3) / s, rtol=1e-10, atol=1e-10)


def test_images_differentiate_in_their_shape():
    X = torch.randn(20, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    nwflow.velocity(x, 0.5, X).square().sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradients_in_t_or_support_are_refused_with_a_pointer():
    X = torch.randn(10, 3)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="^t requires grad.*GaussianKernelAttention"):
        nwflow.velocity(x, torch.tensor(0.5, requires_grad=True), X)
    with pytest.raises(ValueError, match="^support requires grad.*GaussianKernelAttention"):
        nwflow.velocity(x, 0.5, X.clone().requires_grad_(True))
    with torch.no_grad():  # nothing to differentiate: the same inputs are fine
        nwflow.velocity(x, torch.tensor(0.5, requires_grad=True), X.clone().requires_grad_(True))


def test_centre_is_zero_near_the_origin_and_the_mean_far_from_it():
    """Data whose mean is within 1/16 of their rms radius are not centred (the key norms are then
    plain squared norms); data farther from the origin are, and all give float64's mean."""
    g = torch.Generator().manual_seed(3)
    X = torch.rand(2000, 16, generator=g, dtype=torch.float64) * 2 - 1
    x, t = torch.randn(5, 16, generator=g, dtype=torch.float64), 0.8
    for shift, centred in ((0.0, False), (0.05, True), (0.5, True), (300.0, True)):
        data = X + shift
        field = EmpiricalField(data.float())
        # The rule re-derived: the strided sample's mean against its rms radius.
        sample = data.float()[::2].double()
        share = float(sample.mean(0).norm() / (sample - sample.mean(0)).square().sum(1).mean().sqrt())
        assert (share > 1 / 16) == centred  # shares 0.035, 0.093, 0.87, ~1e2: none near 1/16
        assert bool(field.center.any()) == centred
        query = x + shift
        want = torch.softmax(-torch.cdist(query, t * data) ** 2 / (2 * (1 - t) ** 2), dim=1) @ data
        got = field.posterior_mean(query.float(), t).double()
        assert float(((got - want).norm(dim=1) / want.norm(dim=1)).max()) < 1e-5
        assert torch.allclose(field.key_norms.double(),
                              (data.float().double() - field.center.double()).square().sum(1), rtol=1e-5)


def test_float64_pass_in_blocks_that_do_not_divide_n(monkeypatch):
    """Every row sent to the float64 pass, over 1,001 keys in blocks of 37 (its work-space reused
    from block to block, the last block 2 rows), centred and not: float64's velocity."""
    from nwflow import _accuracy

    monkeypatch.setattr(_accuracy, "FALLBACK_TOL", 0.0)
    monkeypatch.setattr(_accuracy, "REFINE_MAX", 0)
    wide = _spy(monkeypatch, "_wide_pass")
    X64, centres = mixture(1001, 7, seed=11)
    x64, tt = queries(X64, centres, [0.2, 0.5], 0.0, per_t=2)  # 8 rows
    for offset, centred in ((0.0, False), (40.0, True)):
        X, x = (X64 - X64.mean(0) + offset).float(), (x64 - tt[:, None] * (X64.mean(0) - offset)).float()
        field = EmpiricalField(X, chunk_bytes=8 * x.shape[0] * 37)
        assert field._centred == centred
        got = field.velocity(x, tt)
        assert worst_rel(got, reference(x, tt, X, 0.0)["u"]) <= 1e-6
    assert sum(wide) > 0


@pytest.mark.parametrize("rows", [1, 7, 9, 13, 16])
def test_logits_of_any_number_of_rows_match_float64_in_the_transposed_layout(rows):
    """Blocks of rows that are not a multiple of eight go through a padded product: the logits
    must still match float64, and come back as the transposed view of a (n, B) block that the
    rest of the pass reads along its contiguous axis."""
    g = torch.Generator().manual_seed(rows)
    X, q = torch.randn(300, 40, generator=g), torch.randn(rows, 40, generator=g)
    a = torch.rand(rows, generator=g)
    field = EmpiricalField(X)
    with exact_matmul():
        got = field._logits(q, a, field.support, field.key_norms)
    want = q.double() @ X.double().T - a.double()[:, None] * field.key_norms.double()[None, :]
    assert got.shape == (rows, 300) and got.T.is_contiguous()
    assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_one_off_calls_build_no_half_copy_of_the_support(monkeypatch):
    """nwflow.velocity and its siblings build a field per call: the reduced-precision screen's
    half copy of the support could not pay for itself there, so it must not be built even where
    the screen is on by default."""
    from nwflow import _reduced, empirical

    def refuse(*args, **kwargs):
        raise AssertionError("a one-off call built the half-precision keys")

    monkeypatch.setattr(empirical, "reduced_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(_reduced.ReducedKeys, "build", classmethod(refuse))
    X = torch.rand(1100, 4096, generator=torch.Generator().manual_seed(0)) * 2 - 1  # n D >= SCREEN_FROM
    x, t = 0.9 * X[:4] + 0.1 * torch.randn(4, 4096), torch.full((4,), 0.9)
    assert EmpiricalField(X).reduced_precision == torch.bfloat16  # the default, as patched
    for fn in (nwflow.velocity, nwflow.posterior_mean, nwflow.score, nwflow.effective_neighbours):
        fn(x, t, X)
