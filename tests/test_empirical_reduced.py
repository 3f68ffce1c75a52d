"""The reduced-precision screen of EmpiricalField (Part III, chapter 9): its a-priori bound on the
half-precision logits is checked against float64 logits on inputs chosen to break it (data far
from the origin, components that go subnormal in fp16, long samples, t near 1), and every output
it answers is compared with a float64 field without it, on the adversarial cases of the engine
(near-ties, duplicates, ragged supports, t near 0 and 1, sigma_min > 0, (B,) t mixing regimes),
in fp32 and fp64, each run checking that the screen actually answered rows. A bound shrunk on
purpose must be caught by the same comparison."""

from __future__ import annotations

import pytest
import torch

from nwflow import _precision, _reduced
from nwflow._precision import exact_matmul, reduced_dtype
from nwflow.empirical import EmpiricalField

TOL = {torch.float32: 1e-5, torch.float64: 1e-9}
LOW = [torch.bfloat16, torch.float16]


def cloud(n: int, d: int, seed: int, offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1) * scale + offset


def queries(X: torch.Tensor, t: torch.Tensor, seed: int) -> torch.Tensor:
    """x_t = t x1 + sigma_t z for support points x1 (sigma_min = 0), z scaled like the data."""
    g = torch.Generator().manual_seed(seed)
    x1 = X[torch.randint(0, len(X), (len(t),), generator=g)]
    z = torch.randn(len(t), X.shape[1], generator=g, dtype=torch.float64) * X.std()
    return t[:, None] * x1 + (1 - t)[:, None] * z


def exact_centred_logits(field: EmpiricalField, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """<q, x^(j) - c> - a ||x^(j) - c||^2 in float64 from the exact q = t (x - t c) / sigma^2,
    written out here from the definition (independent of the engine's arithmetic)."""
    X, c = field.support.double(), field.center.double()
    s2 = (1 - (1 - field.sigma_min) * t) ** 2
    q = (t / s2)[:, None] * (x.double() - t[:, None] * c)
    K = X - c
    return q @ K.T - (t**2 / (2 * s2))[:, None] * K.square().sum(dim=1)[None, :]


BOUND_CASES = {
    "uniform": cloud(1500, 256, 0),
    "far_from_origin": cloud(1200, 64, 1, offset=300.0, scale=0.01),
    "fp16_subnormal": cloud(900, 64, 2, scale=1e-3) * torch.logspace(0, -12, 64, dtype=torch.float64),
    "long_samples": cloud(300, 8192, 3),
    "tiny_values": cloud(600, 32, 4, scale=1e-30),
}


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("case", sorted(BOUND_CASES))
def test_reduced_logits_within_their_bound(case, low):
    X = BOUND_CASES[case].float()
    field = EmpiricalField(X, reduced_precision=low)
    t = torch.tensor([1e-4, 0.1, 0.5, 0.9, 0.99, 0.9999], dtype=torch.float64).repeat(2)
    x = queries(X.double(), t, 0).float()
    xf, tt = field._query(x, t)
    with exact_matmul():
        q, a = field._scaled_query(xf, tt, field.dtype)
        logits, slack, _ = field._reduced_logits(q, a)
    err = (logits.double() - exact_centred_logits(field, xf, tt)).abs().amax(dim=1)
    assert bool((err <= slack).all()), (err / slack).max()
    # Not vacuous: the rounding actually made reaches a visible share of the bound (values of
    # 1e-30 are the exception: there the underflow allowance is the bound).
    if case != "tiny_values":
        assert float((err / slack).max()) > 0.02


@pytest.mark.parametrize("low", LOW)
def test_the_streamed_form_adds_the_centre_term_within_its_bound(low):
    X = cloud(800, 48, 5, offset=40.0).float()
    field = EmpiricalField(X, reduced_precision=low)
    t = torch.full((6,), 0.97, dtype=torch.float64)
    x = queries(X.double(), t, 1).float()
    rows, _, _, streamed, bound = field._reduced_screen(*field._query(x, t))
    xf, tt = field._query(x, t)
    s2 = (1 - tt) ** 2
    q = (tt / s2)[:, None] * (xf.double() - tt[:, None] * field.center.double())
    want = q @ X.double().T - (tt**2 / (2 * s2))[:, None] * field.key_norms.double()[None, :]
    err = (streamed.double() - want[rows]).abs().amax(dim=1)
    assert rows.numel() == 6 and bool((err <= bound).all())


CASES = {
    # name: (support, t per row, field keywords)
    "uniform": (cloud(1500, 24, 10), torch.linspace(0.3, 0.999, 10), {}),
    "far_from_origin": (cloud(1200, 24, 11, offset=300.0), torch.linspace(0.5, 0.999, 8), {}),
    "ragged": (cloud(1001, 16, 12), torch.linspace(0.6, 0.99, 9), {"chunk_bytes": 3 * 1001 * 4}),
    "sigma_min": (cloud(900, 16, 13), torch.linspace(0.6, 1.0, 8), {"sigma_min": 0.05}),
    "duplicates": (torch.cat([cloud(400, 16, 14)] * 3), torch.linspace(0.6, 0.995, 8), {}),
    "near_one": (cloud(800, 16, 15), 1 - torch.logspace(-2, -6, 8), {}),
    "mixed_t": (cloud(800, 16, 16), torch.tensor([0.0, 1e-6, 0.05, 0.4, 0.8, 0.95, 0.999, 0.99999]), {}),
}


def near_ties(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Support points in pairs mirrored through a plane and queries on that plane: every query is
    equidistant from two points, so the screen must keep both."""
    g = torch.Generator().manual_seed(seed)
    half = torch.rand(n // 2, d, generator=g, dtype=torch.float64) * 2 - 1
    mirror = half.clone()
    mirror[:, 0] = -mirror[:, 0]
    X = torch.cat([half, mirror])
    t = torch.full((8,), 0.95, dtype=torch.float64)
    x = t[:, None] * half[:8]
    x[:, 0] = 0.0
    return X, (x, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("case", sorted(CASES))
def test_reduced_screen_matches_float64(case, low, dtype):
    X, t, kw = CASES[case]
    t = t.double()
    x = queries(X, (1 - kw.get("sigma_min", 0.0)) * t, 2)
    field = EmpiricalField(X.to(dtype), reduced_precision=low, screen=False, **kw)
    ref = EmpiricalField(X.to(dtype).double(), reduced_precision=False, screen=False, **kw)
    for out in ("velocity", "posterior_mean", "score"):
        got = getattr(field, out)(x.to(dtype), t).double()
        assert field.reduced_rows > 0, (case, out)
        want = getattr(ref, out)(x.to(dtype).double(), t)
        err = ((got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)).max()
        assert float(err) <= TOL[dtype], (case, out, float(err))
    neff = field.effective_neighbours(x.to(dtype), t).double()
    assert field.reduced_rows > 0
    want = ref.effective_neighbours(x.to(dtype).double(), t)
    assert float(((neff - want).abs() / want).max()) <= TOL[dtype], case


@pytest.mark.parametrize("low", LOW)
def test_near_ties_keep_both_points(low):
    X, (x, t) = near_ties(600, 12, 3)
    field = EmpiricalField(X.float(), reduced_precision=low, screen=False)
    ref = EmpiricalField(X.float().double(), reduced_precision=False, screen=False)
    got = field.posterior_mean(x.float(), t).double()
    assert field.reduced_rows == 8
    want = ref.posterior_mean(x, t)
    assert float(((got - want).norm(dim=1) / want.norm(dim=1)).max()) <= 1e-5


def test_a_shrunk_bound_is_caught(monkeypatch):
    """With the bound divided by 10^4 the screen drops keys the rounding made look far: the
    comparison with float64 must see it (the screen's guarantee rests on the bound)."""
    X = cloud(2000, 64, 20)
    t = torch.full((16,), 0.999, dtype=torch.float64)
    x = queries(X, t, 4)
    x[:8] = t[:8, None] * (X[:8] + X[8:16]) / 2  # halfway between two points: ties
    ref = EmpiricalField(X, reduced_precision=False, screen=False).posterior_mean(x, t)

    def err() -> float:
        field = EmpiricalField(X, reduced_precision=torch.bfloat16, screen=False)
        got = field.posterior_mean(x, t)
        assert field.reduced_rows > 0
        return float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max())

    assert err() <= 1e-9
    honest = _reduced.logit_error
    monkeypatch.setattr(_reduced, "logit_error", lambda *a, **k: honest(*a, **k) / 1e4)
    assert err() > 1e-3


@pytest.mark.parametrize("low", LOW)
def test_trajectory_with_both_screens_matches_float64(low):
    """Along Euler steps the carried screen starts from rows the reduced screen answered (their
    logits and bound recorded): every step within the fp32 tolerance of float64."""
    X = cloud(1500, 24, 30)
    B, steps = 10, 40
    x = queries(X, torch.zeros(B, dtype=torch.float64), 5).float()
    field = EmpiricalField(X.float(), reduced_precision=low, screen=True)
    ref = EmpiricalField(X.float().double(), reduced_precision=False, screen=False)
    worst, reduced, carried = 0.0, 0, 0
    for k in range(steps):
        t = torch.full((B,), 0.999 * k / steps, dtype=torch.float64)
        u = field.velocity(x, t)
        want = ref.velocity(x.double(), t)
        worst = max(worst, float(((u.double() - want).norm(dim=1) / want.norm(dim=1)).max()))
        reduced, carried = reduced + field.reduced_rows, carried + field.screened_rows
        x = x + (0.999 / steps) * u
    assert worst <= 1e-5 and reduced > 0 and carried > 0, (worst, reduced, carried)


def test_a_trajectory_skips_the_screen_for_rows_its_last_step_found_spread(monkeypatch):
    """Rows whose previous step kept more than _REDUCED_SKIP_FACTOR x SCREEN_MAX keys are not
    tried (a speed rule: the screen could not answer them), a first call or a far jump in t tries
    every row, and the results stay within the fp32 tolerance of float64 either way."""
    from nwflow import empirical
    X = cloud(2000, 16, 31)
    B = 8
    tried = []
    screen = empirical.EmpiricalField._reduced_screen
    monkeypatch.setattr(empirical.EmpiricalField, "_reduced_screen",
                        lambda self, xf, tt: tried.append(len(xf)) or screen(self, xf, tt))
    field = EmpiricalField(X.float(), reduced_precision=torch.bfloat16, screen=True)
    ref = EmpiricalField(X, reduced_precision=False, screen=False)
    x = queries(X, torch.full((B,), 0.3, dtype=torch.float64), 7).float()
    for t in (0.3, 0.31, 0.32, 0.95):
        tried.clear()
        u = field.velocity(x, t)
        want = ref.velocity(x.double(), t)
        assert float(((u.double() - want).norm(dim=1) / want.norm(dim=1)).max()) <= 1e-5
        kept = field._trail.kept
        if t == 0.3:
            assert tried == [B]                                   # nothing known: every row tried
            assert bool((kept > empirical._REDUCED_SKIP_FACTOR * 128).all())
        elif t < 0.5:
            assert tried == []                                    # all spread one step back
        else:
            assert tried == [B]                                   # 0.63 along the path: tried again
        x = x + 0.01 * u


def test_a_call_without_a_trail_probes_the_screen_first(monkeypatch):
    """With no previous call the screen is tried on _PROBE_ROWS rows nearest t = 1 first: where it
    answers none of them the others are not tried (a speed rule), where it answers some the rest
    are tried too; results within the fp32 tolerance of float64 either way."""
    from nwflow import empirical
    X = cloud(2000, 16, 32)
    B, P = 24, empirical._PROBE_ROWS
    tried = []
    screen = empirical.EmpiricalField._reduced_screen
    monkeypatch.setattr(empirical.EmpiricalField, "_reduced_screen",
                        lambda self, xf, tt: tried.append(tt.tolist()) or screen(self, xf, tt))
    field = EmpiricalField(X.float(), reduced_precision=torch.bfloat16, screen=False)
    ref = EmpiricalField(X, reduced_precision=False, screen=False)
    for t, answered in ((torch.full((B,), 0.05), False), (torch.linspace(0.9, 0.99, B), True)):
        tried.clear()
        x = queries(X, t.double(), 8).float()
        u = field.velocity(x, t)
        want = ref.velocity(x.double(), t.double())
        assert float(((u.double() - want).norm(dim=1) / want.norm(dim=1)).max()) <= 1e-5
        assert len(tried[0]) == P and min(tried[0]) >= float(t.sort().values[-P])  # nearest t = 1
        if answered:
            assert field.reduced_rows > 0 and sum(map(len, tried)) == B
        else:
            assert field.reduced_rows == 0 and len(tried) == 1


def test_a_fixed_small_chunk_turns_the_screen_off():
    X = cloud(500, 8, 40)
    t = torch.full((4,), 0.9, dtype=torch.float64)
    x = queries(X, t, 6)
    field = EmpiricalField(X, reduced_precision=torch.bfloat16, chunk_size=64)
    want = EmpiricalField(X, reduced_precision=False).velocity(x, t)
    assert torch.allclose(field.velocity(x, t), want, rtol=1e-12, atol=0) and field.reduced_rows == 0


def test_gradients_flow_through_rows_the_screen_answered():
    X = cloud(600, 8, 41)
    t = torch.full((4,), 0.9, dtype=torch.float64)
    x = queries(X, t, 7).requires_grad_(True)
    field = EmpiricalField(X, reduced_precision=torch.float16)
    (g,) = torch.autograd.grad(field.velocity(x, t).sum(), x)
    assert field.reduced_rows == 4
    x2 = x.detach().requires_grad_(True)
    (want,) = torch.autograd.grad(EmpiricalField(X, reduced_precision=False).velocity(x2, t).sum(), x2)
    assert torch.allclose(g, want, rtol=1e-9, atol=1e-12)


def test_reduced_precision_argument_is_checked():
    X = cloud(100, 4, 50).float()
    assert EmpiricalField(X, reduced_precision=torch.float16).reduced_precision == torch.float16
    assert EmpiricalField(X, reduced_precision=False).reduced_precision is None
    with pytest.raises(ValueError, match="reduced_precision"):
        EmpiricalField(X, reduced_precision=torch.float32)
    with pytest.raises(TypeError, match="reduced_precision"):
        EmpiricalField(X, reduced_precision="bf16")


def test_on_by_default_only_where_the_half_product_pays(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(_precision, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert reduced_dtype(cpu) is None
    big = torch.zeros(2**22 // 64, 64)
    assert EmpiricalField(big).reduced_precision is None
    monkeypatch.setattr(_precision, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert reduced_dtype(cpu) == torch.bfloat16
    assert EmpiricalField(big).reduced_precision == torch.bfloat16
    # Small supports: a full pass costs little more than the screen's bookkeeping.
    assert EmpiricalField(big[:1000]).reduced_precision is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("low", LOW)
def test_reduced_screen_on_cuda_matches_float64(low):
    """On CUDA the product runs on tensor cores, with an fp32 output where torch offers one:
    the bound, the rows answered and every output against float64 on the CPU."""
    X, t, _ = CASES["far_from_origin"]
    t = t.double()
    x = queries(X, t, 8).float()
    field = EmpiricalField(X.float().cuda(), reduced_precision=low, screen=False)
    xf, tt = field._query(x.cuda(), t.cuda())
    with exact_matmul():
        q, a = field._scaled_query(xf, tt, field.dtype)
        logits, slack, _ = field._reduced_logits(q, a)
    err = (logits.double() - exact_centred_logits(field, xf, tt)).abs().amax(dim=1)
    assert bool((err <= slack).all())
    got = field.velocity(x.cuda(), t.cuda()).cpu().double()
    assert field.reduced_rows > 0
    want = EmpiricalField(X.float().double(), reduced_precision=False).velocity(x.double(), t)
    assert float(((got - want).norm(dim=1) / want.norm(dim=1)).max()) <= 1e-5
    assert EmpiricalField(X.float().cuda()).reduced_precision is None  # small: off by default
