"""The carried screen of EmpiricalField (Part III, performance): along Euler trajectories every
step is compared with a float64 field without the screen, on inputs chosen to break the bound
(near-ties, duplicates, data far from the origin, ragged chunks, t near 0 and 1, sigma_min > 0,
(B,) t mixing regimes), and each run checks that the screen actually answered rows. Shrinking
the bound on purpose must be caught by the same comparison."""

from __future__ import annotations

import pytest
import torch

from nwflow import _accuracy
from nwflow.empirical import EmpiricalField

TOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def euler(field: EmpiricalField, ref: EmpiricalField, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
          steps: int) -> tuple[float, int]:
    """Euler steps from t0 to t1 (per row) with field.velocity; the worst relative error against
    ``ref`` over the steps, and how many rows the screen answered."""
    worst, screened = 0.0, 0
    for k in range(steps):
        t = t0 + (t1 - t0) * k / steps
        h = (t1 - t0) / steps
        u = field.velocity(x, t)  # t in float64 for both: its fp32 rounding moves sigma_t near 1
        want = ref.velocity(x.double(), t)
        err = ((u.double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)).max()
        worst = max(worst, float(err))
        screened += field.screened_rows
        x = x + h.to(x.dtype)[:, None] * u
    return worst, screened


def cloud(n: int, d: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1 + offset


def start(X: torch.Tensor, B: int, t0: float, seed: int) -> torch.Tensor:
    """x_t0 = t0 x1 + (1 - t0) z for support points x1."""
    g = torch.Generator().manual_seed(seed)
    x1 = X[torch.randint(0, len(X), (B,), generator=g)]
    return t0 * x1 + (1 - t0) * torch.randn(B, X.shape[1], generator=g, dtype=torch.float64)


def fields(X: torch.Tensor, dtype: torch.dtype, **kw) -> tuple[EmpiricalField, EmpiricalField]:
    """The screened field in ``dtype`` and its float64 reference without the screen, over the
    same (rounded) support."""
    Xd = X.to(dtype)
    return EmpiricalField(Xd, screen=True, **kw), EmpiricalField(Xd.double(), screen=False, **kw)


CASES = {
    # name: (support, B, t0, t1, steps, field keywords)
    "uniform": (cloud(1500, 24, 0), 12, 0.0, 0.999, 60, {}),
    "far_from_origin": (cloud(1200, 24, 1, offset=300.0), 8, 0.2, 0.999, 40, {}),
    "ragged_chunks": (cloud(1001, 16, 2), 9, 0.0, 0.99, 40, {"chunk_size": 97}),
    "sigma_min": (cloud(900, 16, 3), 8, 0.0, 1.0, 40, {"sigma_min": 0.05}),
    "duplicates": (torch.cat([cloud(400, 16, 4)] * 3), 8, 0.0, 0.995, 40, {}),
    "near_one": (cloud(800, 16, 5), 8, 0.99, 0.99999, 30, {}),
    "near_zero": (cloud(800, 16, 6), 8, 1e-6, 0.3, 30, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_screened_trajectory_matches_float64(case, dtype):
    X, B, t0, t1, steps, kw = CASES[case]
    field, ref = fields(X, dtype, **kw)
    x = start(X, B, t0, seed=7).to(dtype)
    tt0, tt1 = torch.full((B,), t0, dtype=torch.float64), torch.full((B,), t1, dtype=torch.float64)
    worst, screened = euler(field, ref, x, tt0, tt1, steps)
    assert worst <= TOL[dtype], (case, worst)
    # Near t = 0 the weights are spread: the full pass answers every row. Far from the origin
    # fp32 logits are only known to ~4 eps max||x^(i)||^2 t / sigma_t^2, more than the slack a
    # carried row may have: exact, through the full pass.
    if case != "near_zero" and not (case == "far_from_origin" and dtype == torch.float32):
        assert screened > 0, case


def tied_pairs(gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of support points ``gap`` apart along the first axis, and six queries at t = 0.5 on
    the plane equidistant from both points of a pair."""
    base = cloud(300, 12, seed)
    step = torch.zeros(12, dtype=torch.float64)
    step[0] = gap
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(6, 12, generator=g, dtype=torch.float64)
    noise[:, 0] = 0.0
    return torch.cat([base + step, base - step]), 0.5 * base[:6] + 0.5 * noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_ties_stay_split_and_exact(dtype):
    # Pairs of support points 1e-3 apart and queries on the plane equidistant from both: the
    # weight stays split between two candidates all the way to t = 1.
    X, x = tied_pairs(1e-3, 8)
    field, ref = fields(X, dtype)
    x = x.to(dtype)
    worst, screened = euler(field, ref, x, torch.full((6,), 0.5, dtype=torch.float64),
                            torch.full((6,), 0.999, dtype=torch.float64), 40)
    assert worst <= TOL[dtype] and screened > 0
    w = ref.posterior_weights(x.double(), 0.9)
    assert float(w.max()) < 0.999  # the test is about ties: no single point holds the weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_row_times_mixing_regimes(dtype):
    X = cloud(1000, 16, 10)
    field, ref = fields(X, dtype)
    B = 9
    t0 = torch.linspace(0.0, 0.96, B, dtype=torch.float64)  # spread, collapsing and collapsed rows
    x = torch.stack([start(X, 1, float(t), seed=11 + i)[0] for i, t in enumerate(t0)]).to(dtype)
    worst, screened = euler(field, ref, x, t0, t0 + 0.035, 30)
    assert worst <= TOL[dtype] and screened > 0


def test_queries_off_the_span_take_the_full_pass():
    X = cloud(800, 16, 12)
    field, ref = fields(X, torch.float32)
    g = torch.Generator().manual_seed(13)
    for _ in range(4):  # fresh queries of the same batch size: not combinations of the last ones
        x = torch.randn(6, 16, generator=g)
        u = field.velocity(x, 0.9)
        assert field.screened_rows == 0
        want = ref.velocity(x.double(), 0.9)
        assert float(((u.double() - want).norm(dim=1) / want.norm(dim=1)).max()) <= 1e-5


def test_a_shrunken_margin_is_caught(monkeypatch):
    # Keep only the keys within 1e-3 of the best: near ties lose a point, and the comparison
    # with float64 must see it (the screen's guarantee rests on the margin).
    # The Gram-column screen alone: the floor screen would answer these rows first.
    monkeypatch.setattr(EmpiricalField, "_floor_screen", lambda self, xw, tt: None)
    X, x0 = tied_pairs(0.05, 8)
    t0, t1 = torch.full((6,), 0.5, dtype=torch.float64), torch.full((6,), 0.95, dtype=torch.float64)
    honest, screened = euler(*fields(X, torch.float64), x0.clone(), t0, t1, 20)
    assert honest <= 1e-9 and screened > 0
    # The screen's count only: the reference's own pass uses the same tail cut.
    monkeypatch.setattr(_accuracy, "screened", lambda logits, slack, n, eps, limit: (
        logits >= logits.amax(1, keepdim=True) - 1e-3).sum(1))
    broken, screened = euler(*fields(X, torch.float64), x0.clone(), t0, t1, 20)
    assert screened > 0 and broken > 1e-3


def test_an_ignored_residual_is_caught(monkeypatch):
    # Claim every query lies exactly in the span of the last query and mean: fresh queries then
    # get the previous products, and the results are wrong.
    X = cloud(800, 16, 14)
    field, ref = fields(X, torch.float64)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    field.velocity(x, 0.9)
    real = _accuracy.span_fit
    monkeypatch.setattr(_accuracy, "span_fit", lambda x, basis: (real(x, basis)[0], torch.zeros(len(x))))
    y = torch.randn(6, 16, generator=g, dtype=torch.float64)
    u = field.velocity(y, 0.9)
    assert field.screened_rows > 0
    want = ref.velocity(y, 0.9)
    assert float(((u - want).norm(dim=1) / want.norm(dim=1)).max()) > 1e-3


def test_gram_cache_overflow_and_switch(monkeypatch):
    import nwflow.empirical as empirical

    monkeypatch.setattr(empirical, "_GRAM_BYTES", 3 * 700 * 8)  # three columns
    X = cloud(700, 16, 16)
    field, ref = fields(X, torch.float64)
    x = start(X, 8, 0.0, seed=17)
    worst, screened = euler(field, ref, x, torch.zeros(8, dtype=torch.float64),
                            torch.full((8,), 0.99, dtype=torch.float64), 40)
    assert worst <= 1e-9 and screened > 0
    for off in (EmpiricalField(X, screen=False), EmpiricalField(X)):  # off by default for small supports
        off.velocity(x, 0.5)
        assert off._trail is None
    monkeypatch.setattr(empirical, "SCREEN_FROM", X.numel())
    assert EmpiricalField(X).screen and not EmpiricalField(X, screen=False).screen
    with pytest.raises(TypeError, match="screen"):
        EmpiricalField(X, screen=1)


def floor_rows(field: EmpiricalField) -> int:
    """Rows of the last call the floor screen answered, recounted from the trail: screened rows
    that hand on no inner products (the property must agree)."""
    tr = field._trail
    count = int((tr.screened & (tr.inner_pos < 0) & (tr.logit_pos < 0)).sum())
    assert field.floor_rows == count
    return count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collapsed_rows_are_answered_without_a_pass(dtype, monkeypatch):
    # Once each row's floor covers the margin, a call reads no support row beyond the candidates:
    # with every product against the support made to fail, the results still match float64.
    X = cloud(1500, 24, 18)
    field, ref = fields(X, dtype)
    B = 10
    x = start(X, B, 0.3, seed=19).to(dtype)
    t0, t1 = torch.full((B,), 0.3, dtype=torch.float64), torch.full((B,), 0.9, dtype=torch.float64)
    worst, _ = euler(field, ref, x, t0, t1, 30)
    assert worst <= TOL[dtype] and floor_rows(field) == B
    x = field._trail.x.to(dtype)
    monkeypatch.setattr(field, "_solve", no_pass)  # this field's own: the reference still runs
    monkeypatch.setattr(field, "_screen", no_pass)
    worst, _ = euler(field, ref, x, torch.full((B,), 0.9, dtype=torch.float64),
                     torch.full((B,), 0.999, dtype=torch.float64), 20)
    assert worst <= TOL[dtype] and floor_rows(field) == B


def collapsed(X: torch.Tensor, B: int) -> tuple[EmpiricalField, EmpiricalField, torch.Tensor]:
    """A float64 field whose B rows the floor screen answers at t = 0.9, and the reference."""
    field, ref = fields(X, torch.float64)
    x = start(X, B, 0.5, seed=21)
    x = field._trail.x if euler(field, ref, x, torch.full((B,), 0.5, dtype=torch.float64),
                                torch.full((B,), 0.9, dtype=torch.float64), 25)[0] <= 1e-9 else None
    assert x is not None and floor_rows(field) == B
    return field, ref, x


def test_a_floor_that_ignores_the_residual_is_caught(monkeypatch):
    # Move each collapsed query next to another support point: the residual off the line to its
    # candidate is large, so the honest floor fails and the row is redone; a floor that drops the
    # residual's term keeps the old candidate, and the answer is wrong.
    X = cloud(900, 16, 20)
    B = 6
    for broken in (False, True):
        field, ref, x = collapsed(X, B)
        if broken:
            monkeypatch.setattr(_accuracy, "carried_floor",
                                lambda previous, mu, residual, reach, rounding: previous)
        moved = 0.91 * X[torch.arange(B) * 7 + 3]
        u, want = field.velocity(moved, 0.91), ref.velocity(moved, 0.91)
        err = float(((u - want).norm(dim=1) / want.norm(dim=1)).max())
        if broken:
            assert floor_rows(field) == B and err > 1e-3
        else:
            assert floor_rows(field) == 0 and err <= 1e-9


def no_pass(*args, **kwargs):
    raise AssertionError("a pass over the support ran")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_the_full_pass_finds_collapsed_start_the_floor_screen(dtype, monkeypatch):
    # One call, no trail: the full pass answers the collapsed rows from their candidates and hands
    # on a floor from its own logits, so the next Euler step needs no product, not even the
    # Gram-column screen's.
    X = cloud(900, 16, 23)
    B = 6
    field, ref = fields(X, dtype)
    x = start(X, B, 0.9, seed=24).to(dtype)
    u = field.velocity(x, 0.9)
    assert field.screened_rows == 0 and bool((field._trail.floor > 0).all())
    assert torch.equal(field._trail.ref, field._trail.index[:, 0])
    monkeypatch.setattr(field, "_solve", no_pass)
    monkeypatch.setattr(field, "_screen", no_pass)
    x = x + 0.005 * u
    worst, _ = euler(field, ref, x, torch.full((B,), 0.905, dtype=torch.float64),
                     torch.full((B,), 0.95, dtype=torch.float64), 5)
    assert worst <= TOL[dtype] and floor_rows(field) == B


def test_a_floor_the_full_pass_overstates_is_caught(monkeypatch):
    # After one full pass, move each query next to another support point: the honest floor cannot
    # cover the move and the row is redone; a floor a million times too large keeps the old
    # candidate, and the answer is wrong.
    X = cloud(900, 16, 23)
    B = 6
    real = _accuracy.candidate_floor
    for broken in (False, True):
        if broken:
            monkeypatch.setattr(_accuracy, "candidate_floor", lambda *a: 1e6 * real(*a).abs())
        field, ref = fields(X, torch.float64)
        field.velocity(start(X, B, 0.9, seed=24), 0.9)
        moved = 0.91 * X[torch.arange(B) * 7 + 3]
        u, want = field.velocity(moved, 0.91), ref.velocity(moved, 0.91)
        err = float(((u - want).norm(dim=1) / want.norm(dim=1)).max())
        if broken:
            assert floor_rows(field) > 0 and err > 1e-3
        else:
            assert floor_rows(field) == 0 and err <= 1e-9


def test_the_gram_screen_is_tried_only_where_it_can_spare_the_pass_work(monkeypatch):
    # 20 collapsed rows beside 20 spread ones, the floor screen off: the spread rows take the full
    # pass anyway, and fewer than 32 carried rows could leave it, so the Gram-column screen is not
    # tried; with every row carried it is. Both calls stay exact.
    monkeypatch.setattr(EmpiricalField, "_floor_screen", lambda self, xw, tt: None)
    calls = []
    real = EmpiricalField._screen
    monkeypatch.setattr(EmpiricalField, "_screen", lambda self, *a: calls.append(1) or real(self, *a))
    X = cloud(1200, 16, 25)
    field, ref = fields(X, torch.float64)
    t = torch.cat([torch.full((20,), 0.9), torch.full((20,), 0.05)]).double()
    x = start(X, 40, 0.9, seed=26)
    x[20:] = start(X, 20, 0.05, seed=27)
    for k in range(2):
        u, want = field.velocity(x, t + 0.002 * k), ref.velocity(x, t + 0.002 * k)
        assert float(((u - want).norm(dim=1) / want.norm(dim=1)).max()) <= 1e-9
        x = x + 0.002 * u
    assert int(field._trail.carried.sum()) == 20 and calls == []
    t = torch.full((40,), 0.9, dtype=torch.float64)
    x = start(X, 40, 0.9, seed=28)
    u = field.velocity(x, t)                              # every row collapsed: all carried
    assert bool(field._trail.carried.all())
    y = x + 0.002 * u
    want = ref.velocity(y, t + 0.002)
    assert float(((field.velocity(y, t + 0.002) - want).norm(dim=1) / want.norm(dim=1)).max()) <= 1e-9
    assert calls and field.screened_rows > 0


def test_candidates_are_dropped_only_below_the_floor(monkeypatch):
    # Near ties stay split to t = 1: the second point of each pair must stay a candidate. Dropping
    # every candidate but the first is caught; the honest rule keeps the pair and is exact.
    X, x0 = tied_pairs(1e-3, 22)
    t0, t1 = torch.full((6,), 0.5, dtype=torch.float64), torch.full((6,), 0.999, dtype=torch.float64)
    field, ref = fields(X, torch.float64)
    honest, _ = euler(field, ref, x0.clone(), t0, t1, 40)
    assert honest <= 1e-9 and floor_rows(field) > 0
    assert bool((field._trail.count[field._trail.screened] >= 2).all())
    real = EmpiricalField._shrink

    def first_only(self, e, xw, tt, floor):
        out = real(self, e, xw, tt, floor)
        out.index, out.weights, out.count = out.index[:, :1], out.weights[:, :1], torch.ones_like(out.count)
        return out

    monkeypatch.setattr(EmpiricalField, "_shrink", first_only)
    broken, _ = euler(*fields(X, torch.float64), x0.clone(), t0, t1, 40)
    assert broken > 1e-3
