"""nwflow.conditioner: the batched exact head, the learned cross-attention field, its training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import nwflow
from nwflow import conditioner as C

SM = 0.01


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread avoids OpenMP overhead on a busy machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**kw) -> C.TaskConfig:
    base = dict(dim=3, support_size=12, query_size=8)
    base.update(kw)
    return C.TaskConfig(**base)


# -- the exact head ------------------------------------------------------------------------
@pytest.mark.parametrize("t_kind", ["number", "per_task", "per_query"])
def test_support_field_matches_nwflow_per_task(t_kind):
    g = torch.Generator().manual_seed(0)
    T, N, m, d = 3, 5, 7, 4
    x = torch.randn(T, N, d, generator=g, dtype=torch.float64)
    support = 2 * torch.randn(T, m, d, generator=g, dtype=torch.float64)
    if t_kind == "number":
        t = 0.63
        rows = [torch.full((N,), 0.63, dtype=torch.float64) for _ in range(T)]
    elif t_kind == "per_task":
        t = torch.tensor([0.1, 0.5, 0.97], dtype=torch.float64)
        rows = [torch.full((N,), float(v), dtype=torch.float64) for v in t]
    else:
        t = torch.rand(T, N, generator=g, dtype=torch.float64) * 0.99
        rows = list(t)
    w = C.support_posterior(x, t, support, SM)
    v = C.support_velocity(x, t, support, SM)
    for i in range(T):
        w_ref = nwflow.posterior_weights(x[i], rows[i], support[i], sigma_min=SM)
        v_ref = nwflow.velocity(x[i], rows[i], support[i], sigma_min=SM)
        assert torch.allclose(w[i], w_ref, atol=1e-12)
        assert torch.allclose(v[i], v_ref, atol=1e-10, rtol=1e-10)


def test_support_logits_equal_the_distance_form_in_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, generator=g)
    support = torch.randn(2, 6, 3, generator=g)
    t = 0.8
    s = 1 - (1 - SM) * t
    ref = -((x.double()[:, :, None, :] - t * support.double()[:, None, :, :]) ** 2).sum(-1) / (2 * s * s)
    assert torch.allclose(C.support_logits(x, t, support, SM), ref, atol=1e-9)


def test_support_velocity_at_time_zero_points_at_the_support_mean():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    support = torch.randn(2, 5, 2, generator=g, dtype=torch.float64) + 4
    v = C.support_velocity(x, 0.0, support, SM)
    assert torch.allclose(v, support.mean(1, keepdim=True) - (1 - SM) * x, atol=1e-12)


def test_support_field_rejects_bad_input():
    x = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="share T and d"):
        C.support_velocity(x, 0.5, torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="singular"):
        C.support_velocity(x, 1.0, torch.zeros(2, 4, 2), sigma_min=0.0)
    with pytest.raises(ValueError, match="t must"):
        C.support_velocity(x, torch.zeros(5), torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match=r"^t must be in \[0, 1\], got values in"):
        C.support_velocity(x, 1.5, torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match=r"^support must have shape \(T, \*, d\), got shape \(4, 2\)"):
        C.support_velocity(x, 0.5, torch.zeros(4, 2))


# -- tasks ---------------------------------------------------------------------------------
def test_sample_tasks_shapes_determinism_and_families():
    cfg = small_config()
    a = C.sample_tasks(cfg, 6, 20, torch.Generator().manual_seed(3))
    b = C.sample_tasks(cfg, 6, 20, torch.Generator().manual_seed(3))
    assert a[0].shape == (6, 12, 3) and a[1].shape == (6, 20, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert set(a[2]) <= {"mixture", "shells"}
    support, heldout, fams = C.sample_tasks(C.TaskConfig(dim=6, support_size=300, shell_noise=0.05), 4, 300,
                                            torch.Generator().manual_seed(4), family="shells")
    assert fams == ["shells"] * 4
    radii = torch.linalg.vector_norm(torch.cat([support, heldout], 1), dim=-1)
    # Radii lie in [1, 5]; noise 0.05 in 6 dims moves a norm by a few tenths at most.
    assert float(radii.min()) > 0.6 and float(radii.max()) < 5.4
    # 2 to 5 shells: the sorted norms of one task form 2..5 tight groups.
    for task in radii:
        r = torch.sort(task).values
        groups = 1 + int((r[1:] - r[:-1] > 0.25).sum())
        assert 1 <= groups <= 5


def test_task_config_validation():
    with pytest.raises(ValueError, match="families"):
        C.TaskConfig(families=("moons",))
    with pytest.raises(ValueError, match="dim"):
        C.TaskConfig(dim=0)
    with pytest.raises(ValueError, match="mean_radius"):
        C.TaskConfig(mean_radius=(3.0, 1.0))
    with pytest.raises(ValueError, match="n_tasks"):
        C.sample_tasks(C.TaskConfig(), 0, 5, torch.Generator())
    with pytest.raises(ValueError, match="family"):
        C.sample_tasks(C.TaskConfig(), 1, 5, torch.Generator(), family="rings")


def test_flow_matching_batch_is_the_gaussian_path():
    cfg = small_config(query_size=400, families=("shells",), shell_noise=0.0)
    packed, t, target = C.flow_matching_batch(cfg, 5, torch.Generator().manual_seed(5), sigma_min=SM)
    assert packed.shape == (5, 400 + 12, 3) and t.shape == (5, 400) and target.shape == (5, 400, 3)
    xt = packed[:, :400]
    # x_t = sigma_t x0 + t x1 and target = x1 - (1 - sigma_min) x0 give x0 = x_t - t target.
    x0 = xt - t[..., None] * target
    x1 = target + (1 - SM) * x0
    assert abs(float(x0.mean())) < 0.05 and abs(float(x0.std()) - 1) < 0.05
    norms = torch.linalg.vector_norm(x1, dim=-1)                      # noiseless shells: radii in [1, 5]
    assert float(norms.min()) > 1 - 1e-4 and float(norms.max()) < 5 + 1e-4
    assert float(t.min()) >= 0 and float(t.max()) < 1


# -- the learned field ---------------------------------------------------------------------
def test_model_shapes_and_support_permutation_invariance():
    torch.manual_seed(0)
    model = C.SupportConditionedVelocity(3, width=16, heads=2, layers=2, exact_head=True).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    support = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    t = torch.rand(2, 5, generator=g, dtype=torch.float64)
    v = model(x, t, support)
    assert v.shape == (2, 5, 3)
    perm = torch.randperm(7, generator=g)
    assert torch.allclose(model(x, t, support[:, perm]), v, atol=1e-12)
    # Queries do not interact: changing one leaves the others' velocities unchanged.
    x2 = x.clone()
    x2[:, 0] += 1.0
    v2 = model(x2, t, support)
    assert torch.allclose(v2[:, 1:], v[:, 1:], atol=1e-12) and not torch.allclose(v2[:, 0], v[:, 0])
    # A scalar t equals the same t given per query.
    assert torch.allclose(model(x, 0.3, support), model(x, torch.full((2, 5), 0.3, dtype=torch.float64),
                                                        support), atol=1e-12)


def test_attention_logits_are_what_the_layer_uses():
    torch.manual_seed(1)
    model = C.SupportConditionedVelocity(2, width=8, heads=2, layers=1, exact_head=False).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 2, generator=g, dtype=torch.float64)
    support = torch.randn(1, 4, 2, generator=g, dtype=torch.float64)
    (logits,) = model.attention_logits(x, 0.4, support)
    assert logits.shape == (1, 2, 3, 4)
    # Recompute the layer by hand: softmax(logits) @ V, heads concatenated, output projection.
    block = model.blocks[0]
    temb = model.embed(torch.full((3,), 0.4, dtype=torch.float64))[None]
    h = model.query_in(torch.cat([x, temb], -1))
    s = model.support_in(support)
    q = block.attn.q(block.norm1(h)).reshape(1, 3, 2, 4).transpose(1, 2)
    k = block.attn.k(s).reshape(1, 4, 2, 4).transpose(1, 2)
    assert torch.allclose(logits, q @ k.transpose(-1, -2) / 2.0, atol=1e-12)


def test_exact_head_feeds_the_plug_in_numerator():
    torch.manual_seed(2)
    model = C.SupportConditionedVelocity(2, width=8, heads=2, layers=1, exact_head=True).double()
    # Make the output depend only on the exact-head input: identity on its 2 columns.
    with torch.no_grad():
        first, last = model.head[0], model.head[2]
        first.weight.zero_()
        first.bias.fill_(0.0)
        first.weight[:2, 8:] = torch.eye(2, dtype=torch.float64)
        first.bias[:2] = 10.0                                   # keep GELU in its near-linear range
        last.weight.zero_()
        last.bias.zero_()
        last.weight[:, :2] = torch.eye(2, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    x = 0.1 * torch.randn(1, 4, 2, generator=g, dtype=torch.float64)
    support = 0.1 * torch.randn(1, 5, 2, generator=g, dtype=torch.float64)
    t = 0.5
    gelu = torch.nn.functional.gelu
    numer = (1 - (1 - SM) * t) * C.support_velocity(x, t, support, SM)
    assert torch.allclose(model(x, t, support), gelu(numer + 10.0), atol=1e-12)


def test_model_argument_checks():
    with pytest.raises(ValueError, match="sigma_min"):
        C.SupportConditionedVelocity(2, sigma_min=0.0)
    with pytest.raises(ValueError, match="width"):
        C.SupportConditionedVelocity(2, width=10, heads=4)
    model = C.SupportConditionedVelocity(2, width=8, heads=2)
    with pytest.raises(ValueError, match="features"):
        model(torch.zeros(1, 2, 3), 0.5, torch.zeros(1, 4, 3))


def test_packed_tasks_unpacks_queries_and_support():
    torch.manual_seed(3)
    model = C.SupportConditionedVelocity(3, width=8, heads=2, layers=1)
    packed, t, _ = C.flow_matching_batch(small_config(), 2, torch.Generator().manual_seed(9))
    out = C.PackedTasks(model)(packed, t)
    assert torch.equal(out, model(packed[:, :8], t, packed[:, 8:]))


# -- training ------------------------------------------------------------------------------
def test_training_resumes_exactly_from_its_checkpoint(tmp_path):
    cfg = small_config()

    def fresh():
        torch.manual_seed(4)
        return C.SupportConditionedVelocity(3, width=8, heads=2, layers=1)

    straight = fresh()
    h_straight = C.train_conditioner(straight, cfg, 8, n_tasks=2, progress=False)
    path = tmp_path / "cond.pt"
    resumed = fresh()
    C.train_conditioner(resumed, cfg, 4, n_tasks=2, progress=False, checkpoint=path)
    resumed = fresh()
    h_resumed = C.train_conditioner(resumed, cfg, 8, n_tasks=2, progress=False, checkpoint=path)
    assert h_resumed["step"] == list(range(8))
    np.testing.assert_allclose(h_resumed["loss"], h_straight["loss"], rtol=1e-5)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="config"):
        C.train_conditioner(fresh(), small_config(support_size=13), 9, n_tasks=2, progress=False,
                            checkpoint=path)


def test_cached_training_batches_are_those_of_a_fresh_draw():
    """train_conditioner draws each batch once per (config, n_tasks, sigma_min, generator state):
    a second model trained with the same seed sees the same batches, and its training equals a
    training with the cache emptied first; the cache stays within its byte bound."""
    cfg = small_config()

    def trained():
        torch.manual_seed(4)
        model = C.SupportConditionedVelocity(3, width=8, heads=2, layers=1)
        return model, C.train_conditioner(model, cfg, 6, n_tasks=2, seed=3, progress=False)

    C._BATCH_CACHE.clear()
    C._batch_cache_bytes = 0
    fresh_model, fresh_hist = trained()
    assert len(C._BATCH_CACHE) == 6
    cached_model, cached_hist = trained()                  # every batch from the cache
    assert len(C._BATCH_CACHE) == 6
    assert cached_hist["loss"] == fresh_hist["loss"]
    for a, b in zip(fresh_model.parameters(), cached_model.parameters(), strict=True):
        assert torch.equal(a, b)
    # A cached batch and the generator state after it equal a fresh draw's.
    g = torch.Generator().manual_seed(3)
    first = C.flow_matching_batch(cfg, 2, g, SM)
    g_cached = torch.Generator().manual_seed(3)
    hit = C._cached_batch(cfg, 2, g_cached, SM)
    assert all(torch.equal(a, b) for a, b in zip(first, hit, strict=True))
    assert torch.equal(g.get_state(), g_cached.get_state())
    assert C._batch_cache_bytes == sum(v[2] for v in C._BATCH_CACHE.values()) <= C._BATCH_CACHE_LIMIT


def test_a_briefly_trained_field_beats_the_plug_in_late_but_not_early():
    """The collapse regime: at t = 0.95 the plug-in points at single support points, a trained
    net does not; at t = 0.05 the plug-in (the support mean) is already near-optimal."""
    cfg = C.TaskConfig(dim=2, support_size=10, query_size=32, families=("mixture",))
    torch.manual_seed(5)
    model = C.SupportConditionedVelocity(2, width=32, heads=2, layers=1)
    hist = C.train_conditioner(model, cfg, 150, n_tasks=8, lr=3e-3, progress=False)
    assert np.mean(hist["loss"][-20:]) < np.mean(hist["loss"][:20])
    support, heldout, _ = C.sample_tasks(cfg, 32, 64, torch.Generator().manual_seed(10))

    def plug(x, t, s):
        return C.support_velocity(x, t, s, SM)

    learned = C.fm_error_over_t(model, support, heldout, [0.05, 0.95], torch.Generator().manual_seed(11))
    plugin = C.fm_error_over_t(plug, support, heldout, [0.05, 0.95], torch.Generator().manual_seed(11))
    assert learned[1] < 0.5 * plugin[1]
    assert plugin[0] < 1.2 * learned[0]


# -- evaluation helpers --------------------------------------------------------------------
def test_fm_error_at_time_zero_is_the_distance_to_the_support_mean():
    g = torch.Generator().manual_seed(12)
    support = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    heldout = torch.randn(3, 50, 2, generator=g, dtype=torch.float64) + 1

    def plug(x, t, s):
        return C.support_velocity(x, t, s, SM)

    err = C.fm_error_over_t(plug, support, heldout, [0.0], torch.Generator().manual_seed(13))
    # At t = 0: u = mean(S) - (1 - sigma_min) x0 and target = x1 - (1 - sigma_min) x0.
    ref = (support.mean(1, keepdim=True) - heldout).square().sum(-1).mean()
    assert err.shape == (1,) and math.isclose(err[0], float(ref), rel_tol=1e-9)


def test_plug_in_samples_land_on_the_support():
    g = torch.Generator().manual_seed(14)
    support = 3 * torch.randn(2, 20, 2, generator=g)

    def plug(x, t, s):
        return C.support_velocity(x, t, s, SM)

    samples = C.sample_field(plug, support, 200, torch.Generator().manual_seed(15), steps=200)
    dist = torch.cdist(samples, support).min(-1).values
    # The exact flow ends at the support blurred by sigma_min = 0.01; Euler adds a little.
    assert float(dist.quantile(0.95)) < 0.1


def test_rank_correlation_matches_scipy_with_ties():
    g = np.random.default_rng(0)
    a = g.normal(size=(4, 30))
    b = a + 0.7 * g.normal(size=(4, 30))
    b[0, :10] = 0.0                                   # ties, as in underflowed weights
    rho = C.rank_correlation(a, b)
    for i in range(4):
        assert math.isclose(rho[i], spearmanr(a[i], b[i]).statistic, rel_tol=1e-12)
    # Broadcasting one reference row against several.
    rho_b = C.rank_correlation(a[:1], b)
    assert math.isclose(rho_b[2], spearmanr(a[0], b[2]).statistic, rel_tol=1e-12)


def test_average_ranks_match_scipy_rankdata_on_many_ties():
    from scipy.stats import rankdata

    g = np.random.default_rng(1)
    x = g.integers(0, 4, size=(3, 5, 17)).astype(np.float64)   # heavy ties, 3-d
    assert np.array_equal(C._average_ranks(x), rankdata(x, axis=-1))
    y = g.normal(size=(2, 9))
    assert np.array_equal(C._average_ranks(y), rankdata(y, axis=-1))
    assert np.array_equal(C._average_ranks(np.zeros((1, 4))), np.full((1, 4), 2.5))
