"""nwflow._accuracy: the rounding bounds hold on real fp32 logits, and coverage means what it says."""

import math

import pytest
import torch

from nwflow import _accuracy, empirical
from nwflow.empirical import EmpiricalField

F64 = torch.float64


def _fp32_and_exact_logits(X64, x64, t):
    """The engine's streamed fp32 logits and the same logits in float64, for one t."""
    field = EmpiricalField(X64.float())
    xf, tt = field._query(x64.float(), t)
    q, a = field._scaled_query(xf, tt, torch.float32)
    fp32 = field._logits(q, a, field.support, field.key_norms).double()
    q64, a64 = field._scaled_query(xf, tt, F64)
    norms64 = (field.support.double() - field.center.double()).square().sum(1)
    exact = q64 @ field.support.double().T - a64[:, None] * norms64
    bound = _accuracy.logit_error_bound(q, a, field._eps, field._raw_max, field._centred_max2)
    return fp32, exact, bound


@pytest.mark.parametrize("n, B", [(500, 32), (2500, 5), (2500, 21)])
def test_the_a_priori_bound_holds_on_fp32_logits_from_t_0_to_0_999(n, B):
    # n = 2,500: the CPU product takes the keys in three blocks of _PRODUCT_KEYS, the last one
    # partial; B = 5 and 21: rows padded to 16 and 24 (a block left unwritten or a padding row
    # left in would miss the float64 logits by far more than the bound).
    assert n < empirical._PRODUCT_KEYS or 2 * empirical._PRODUCT_KEYS < n < 3 * empirical._PRODUCT_KEYS
    g = torch.Generator().manual_seed(0)
    X64 = 3.0 * torch.randn(n, 16, generator=g, dtype=F64) + 20.0  # away from the origin
    x64 = 3.0 * torch.randn(B, 16, generator=g, dtype=F64) + 20.0
    for t in (0.1, 0.5, 0.9, 0.99, 0.999):
        fp32, exact, bound = _fp32_and_exact_logits(X64, t * x64, t)
        assert fp32.shape == (B, n)
        err = (fp32 - exact).abs().amax(dim=1)
        assert bool((err <= bound).all()), (t, float((err / bound).max()))
        # ... and it is not vacuous: within a few hundred times the error actually made.
        assert float((bound / err.clamp_min(1e-30)).median()) < 1e3


def test_covered_rows_have_negligible_weight_outside_their_candidates():
    n, eps = 1000, torch.finfo(torch.float32).eps
    error = torch.full((2,), 1.0, dtype=F64)
    margin = 2.0 + math.log(n) + math.log(1 / eps) + 2.0
    gap = torch.tensor([[0.0, -1.0, -2.0, -(margin + 0.5), -(margin + 1.0)],   # a clear gap after 3
                        [0.0, -1.0, -2.0, -3.0, -4.0]], dtype=F64)             # no gap inside K
    covered, inside = _accuracy.covered(error, gap, n, eps)
    assert covered.tolist() == [True, False] and int(inside[0]) == 3
    # Worst case for the covered row: every other point at the K-th logit, every logit off by
    # the bound in the unfavourable direction; their total weight stays below eps.
    worst = (n - 3) * math.exp(float(gap[0, 3]) + 2 * float(error[0]))
    assert worst / math.exp(0.0) < eps
    # With all n points among the candidates every tracked row is covered; untracked rows never.
    assert bool(_accuracy.covered(error, gap, 5, eps)[0].all())
    assert not bool(_accuracy.covered(torch.zeros(2, dtype=F64), gap, n, eps)[0].any())


def test_relative_error_bounds_an_adversarial_perturbation_of_the_logits():
    """Shift each logit by +-delta (the sign that moves the mean most along one direction) and
    check the change of y = (m - x) stays within the estimate."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 3, generator=g, dtype=F64)
    logits = torch.randn(4, 200, generator=g, dtype=F64)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    delta = torch.full((4,), 1e-4, dtype=F64)
    w = torch.softmax(logits, 1)
    m = w @ X
    center = X.mean(0)
    spread = w @ (X - center).square().sum(1)
    one, zero = torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64)
    est_u = _accuracy.relative_error(delta, 1e-16, m, x, spread, center, one, one)   # y = m - x
    est_m = _accuracy.relative_error(delta, 1e-16, m, x, spread, center, one, zero)  # y = m
    for k in range(3):
        sign = torch.sign(X[:, k] - m[:, k, None])
        m2 = torch.softmax(logits + delta[:, None] * sign, 1) @ X
        assert bool(((m2 - m).norm(dim=1) / (m - x).norm(dim=1) <= est_u).all())
        assert bool(((m2 - m).norm(dim=1) / m.norm(dim=1) <= est_m).all())


def _worst_excluded(logits, keep, slack):
    """The largest weight the dropped keys can have when every logit is off by up to ``slack``
    in the unfavourable direction (dropped ones up, kept ones down), in float64."""
    lw = logits.double()
    up = torch.where(keep, lw - slack[:, None], lw + slack[:, None])
    return (torch.softmax(up, dim=1) * (~keep)).sum(dim=1)


def _margin_count(logits, slack, n, eps):
    """Keys within the a-priori margin of the maximum (what the tail cut refines)."""
    return (logits.double() >= logits.double().amax(1, keepdim=True)
            - _accuracy.screen_margin(slack, n, eps)[:, None]).sum(dim=1)


def test_tail_cut_leaves_out_less_than_eps_e2_under_adversarial_rounding():
    g = torch.Generator().manual_seed(3)
    eps = torch.finfo(torch.float32).eps
    n = 5003  # no multiple of anything
    rows = [
        10.0 * torch.randn(n, generator=g),                             # Gaussian logits
        torch.cat([torch.zeros(1), torch.full((n - 1,), -19.0)]),       # a wall just below the max
        torch.cat([torch.zeros(3), -torch.rand(n - 3, generator=g) * 40]),  # three tied maxima, flat tail
        torch.linspace(0.0, -60.0, n),                                  # a steady fall
        torch.zeros(n),                                                 # all tied: keep all
    ]
    logits = torch.stack(rows).float()
    for slack in (0.0, 1e-4, 0.5, 3.0):
        s = torch.full((len(rows),), slack, dtype=F64)
        keep = _accuracy.tail_cut(logits, s, eps)
        assert bool((_worst_excluded(logits, keep, s) < eps * math.exp(-2)).all()), slack
        # The kept keys are the row's largest: a cut, not a scatter.
        kept_min = torch.where(keep, logits, math.inf).amin(dim=1)
        dropped_max = torch.where(keep, -math.inf, logits).amax(dim=1)
        assert bool((dropped_max < kept_min).all())
        # Never more than the a-priori margin keeps.
        assert bool((keep.sum(dim=1) <= _margin_count(logits, s, n, eps)).all())
        assert int(keep[4].sum()) == n
    # At a typical fp32 slack the Gaussian row keeps fewer keys than the margin (529 of 774).
    s = torch.full((len(rows),), 1e-4, dtype=F64)
    kept = int(_accuracy.tail_cut(logits, s, eps)[0].sum())
    margin = int(_margin_count(logits, s, n, eps)[0])
    assert kept < 0.75 * margin, (kept, margin)
    # The engine's layout (a transposed block) gives the same cut as a row-major copy.
    transposed = logits.T.contiguous().T
    assert torch.equal(_accuracy.tail_cut(transposed, s, eps), _accuracy.tail_cut(logits, s, eps))


def test_kept_keys_cuts_the_tail_of_middle_rows_alike_in_both_layouts():
    """Rows whose margin keeps more than ``low`` and at most ``high`` keys get the tail cut (never
    more keys, as safe), the others the margin; a transposed block (the engine's layout) gives the
    same mask and counts as a row-major copy."""
    g = torch.Generator().manual_seed(4)
    eps = torch.finfo(torch.float32).eps
    n = 3001
    logits = torch.stack([10.0 * torch.randn(n, generator=g),        # margin keeps hundreds
                          torch.linspace(0.0, -60.0, n),             # a steady fall: about 1,100
                          torch.zeros(n),                            # all tied: n, above high
                          torch.cat([torch.zeros(1), torch.full((n - 1,), -200.0)])]).float()  # one
    s = torch.full((4,), 1e-4, dtype=F64)
    margin = _margin_count(logits, s, n, eps)
    low, high = 8, 2000
    middle = (margin > low) & (margin <= high)
    assert middle.tolist() == [True, True, False, False]
    for block in (logits, logits.T.contiguous().T):
        keep, count = _accuracy.kept_keys(block, s, n, eps, low, high)
        assert torch.equal(count.long(), keep.sum(dim=1))
        cut = _accuracy.tail_cut(logits[middle], s[middle], eps)
        assert torch.equal(keep[middle], cut)
        assert bool((count[middle] < margin[middle]).all())            # the cut kept fewer keys
        assert torch.equal(count[~middle].long(), margin[~middle])     # the others: the margin
        assert bool((_worst_excluded(logits, keep, s) < eps * math.exp(-2)).all())


def test_candidate_floor_bounds_gamma_off_the_candidates_under_adversarial_rounding():
    """Re-derived from the definition: Gamma_i(y) = ||y - x^(i)||^2 - ||y - x^(b)||^2 in float64 for
    every key off the candidates, against the floor from logits perturbed by up to s either way."""
    g = torch.Generator().manual_seed(6)
    X = torch.rand(400, 8, generator=g, dtype=F64) * 2 - 1
    t = torch.tensor([0.6, 0.9, 0.97], dtype=F64)
    s2 = (1 - t) ** 2
    x = t[:, None] * X[:3] + (1 - t)[:, None] * 0.3 * torch.randn(3, 8, generator=g, dtype=F64)
    exact = -(x[:, None, :] - t[:, None, None] * X[None]).square().sum(-1) / (2 * s2[:, None])
    slack = torch.tensor([1e-3, 0.5, 2.0], dtype=F64)
    noisy = exact + slack[:, None] * (2 * torch.rand(exact.shape, generator=g, dtype=F64) - 1)
    top, index = torch.topk(noisy, 6, dim=1)
    count = torch.tensor([1, 3, 5])
    floor = _accuracy.candidate_floor(top, count, slack, t, 1 - t, 400)
    y = x / t[:, None]
    for r in range(3):
        C = index[r, :count[r]]
        gamma = (y[r] - X).square().sum(1) - (y[r] - X[C[0]]).square().sum()
        off = torch.ones(400, dtype=torch.bool)
        off[C] = False
        assert float(floor[r]) <= float(gamma[off].min())
    assert float(floor.max()) > 0                                  # not vacuous on these rows
    # Every key a candidate: nothing is off them; the largest left out not in top: unknown.
    whole = _accuracy.candidate_floor(top, torch.tensor([400, 6, 2]), slack, t, 1 - t, 400)
    assert whole[0] == torch.inf and whole[1] == -torch.inf and torch.isfinite(whole[2])


def test_top_corrected_mean_is_the_softmax_with_the_exact_top_logits():
    """Re-derived directly: the softmax over all keys with the K largest logits replaced by
    their exact values, against the formula that patches the streamed sums."""
    g = torch.Generator().manual_seed(4)
    n, D, K = 400, 5, 16
    X = torch.randn(n, D, generator=g, dtype=F64)
    streamed = 4.0 * torch.randn(3, n, generator=g, dtype=F64)
    exact = streamed.clone()
    top = torch.topk(streamed, K, dim=1).indices
    exact.scatter_(1, top, streamed.gather(1, top) + 1e-3 * torch.randn(3, K, generator=g, dtype=F64))
    M = streamed.amax(dim=1)
    total = torch.exp(streamed - M[:, None]).sum(dim=1)
    mean = torch.softmax(streamed, dim=1) @ X
    corrected, tail = _accuracy.top_corrected(total, mean, M, streamed.gather(1, top), exact.gather(1, top),
                                              X[top], torch.full((3,), 1e-3, dtype=F64), 1e-16)
    assert torch.allclose(corrected, torch.softmax(exact, dim=1) @ X, rtol=0, atol=1e-13)
    # The tail bound covers the weight of the keys outside the top K and is tight: the bound is
    # their weight against the top's alone, T / S_K = W / (1 - W), times e^s.
    w = torch.softmax(exact, dim=1)
    true_tail = 1.0 - w.gather(1, top).sum(dim=1)
    assert bool((tail >= true_tail).all())
    assert bool((tail <= 1.01 * true_tail / (1.0 - true_tail)).all())


def test_sq_distances_keep_every_digit_where_the_gram_form_cancels():
    """||x - t x^(k)||^2 next to a key far from the origin: the explicit differences are off by no
    more than rounding the inputs makes (eps ||x|| per coordinate, so 8 eps ||x|| d + D eps d^2;
    rational arithmetic as the reference), where the expanded form
    ||x||^2 - 2 t <x, x^(k)> + t^2 ||x^(k)||^2 loses every digit; a t = 0 row gives ||x||^2."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(3)
    cand = 1e3 + torch.randn(3, 5, 8, generator=g, dtype=F64)
    t = torch.tensor([0.999, 0.5, 0.0], dtype=F64)
    x = t[:, None] * cand[:, 0] + 1e-6 * torch.randn(3, 8, generator=g, dtype=F64)
    got = _accuracy.sq_distances(x, t, cand)
    for r in range(3):
        for k in range(5):
            tr = Fraction(float(t[r]))
            exact = sum((Fraction(float(x[r, i])) - tr * Fraction(float(cand[r, k, i]))) ** 2
                        for i in range(8))
            eps, xn = 2.0**-52, float(x[r].norm())
            allowed = 8 * eps * xn * math.sqrt(float(exact)) + 8 * eps * float(exact)
            assert abs(float(got[r, k]) - float(exact)) <= allowed, (r, k)
    gram = (x.square().sum(1)[:, None] - 2 * t[:, None] * torch.einsum("rd,rkd->rk", x, cand)
            + t[:, None] ** 2 * cand.square().sum(2))
    assert float((gram[0, 0] - got[0, 0]).abs() / got[0, 0]) > 1e-3   # the expanded form cancels


def test_carried_floor_bounds_the_gap_after_a_step_towards_the_candidate():
    # Gamma_i(y) = ||y - x_i||^2 - ||y - x_b||^2, recomputed in float64 at both queries: the
    # carried floor never exceeds the new minimum over the keys off the candidate, whatever the
    # step (mu in [0, 1]) and residual; without the residual's term it does.
    g = torch.Generator().manual_seed(31)
    X = torch.randn(400, 20, generator=g, dtype=torch.float64)
    b = 0

    def gap_floor(y: torch.Tensor) -> torch.Tensor:
        gamma = (y[:, None, :] - X[None]).square().sum(-1) - (y - X[b]).square().sum(-1)[:, None]
        return gamma[:, 1:].min(dim=1).values

    y0 = X[b] + 0.3 * torch.randn(64, 20, generator=g, dtype=torch.float64)
    mu = torch.rand(64, generator=g, dtype=torch.float64)
    size = torch.logspace(-6, 0, 64, dtype=torch.float64)[:, None]
    r = torch.randn(64, 20, generator=g, dtype=torch.float64) * size
    y1 = X[b] + mu[:, None] * (y0 - X[b]) + r
    reach = torch.full((64,), float((X - X[b]).norm(dim=1).max()), dtype=torch.float64)
    zero = torch.zeros(64, dtype=torch.float64)
    before, after = gap_floor(y0), gap_floor(y1)
    carried = _accuracy.carried_floor(before, mu, r.norm(dim=1), reach, zero)
    assert bool((carried <= after).all())
    assert bool((carried > 0).sum() > 16)                       # and is not vacuous
    assert bool((_accuracy.carried_floor(before, mu, zero, reach, zero) > after).any())
    inf = torch.full((64,), torch.inf, dtype=torch.float64)    # every key a candidate: stays so
    assert bool(torch.isinf(_accuracy.carried_floor(inf, mu, r.norm(dim=1), reach, zero)).all())


def _cut_error(logits, X, x, b_coef, slack, keep, eps):
    """Re-derived in float64: with every logit off by up to ``slack`` the way that makes the dropped
    keys heaviest, how far leaving them out moves y = m - b x, against eps ||y||."""
    lw = logits.double()
    true = torch.where(keep, lw - slack[:, None], lw + slack[:, None])
    w = torch.softmax(true, dim=1)
    m = w @ X
    wk = w * keep
    m_kept = (wk / wk.sum(dim=1, keepdim=True)) @ X
    y = m - b_coef * x
    return (m - m_kept).norm(dim=1), eps * y.norm(dim=1)


def test_tail_cut_with_room_moves_the_output_by_at_most_eps_of_its_size():
    """The mean output's allowance (tail_cut's ``room``), re-derived from the weights in float64:
    the dropped keys on the far side of the ball from the largest one, where the bound is nearly
    tight; and a row whose second cluster carries 40% of the weight, so that y is smaller than
    x^(b) - x suggests (the e^{2s} rho term keeps that row at the weight-only cut)."""
    g = torch.Generator().manual_seed(12)
    eps = torch.finfo(torch.float32).eps
    n, D = 5003, 3
    e1, e2 = torch.eye(D, dtype=F64)[0], torch.eye(D, dtype=F64)[1]
    X = e1.repeat(n, 1)                 # every key at +e1 (R = 1 about c = 0) but the largest
    X[0] = -e1
    far = torch.cat([torch.zeros(1, dtype=F64), -15.0 - 30.0 * torch.rand(n - 1, generator=g, dtype=F64)])
    near = far.clone()
    near[1:2001] = math.log(0.4 / 0.6 / 2000)  # 2,000 keys at +e1 with 40% of the weight
    logits = torch.stack([far, far, near]).float()
    m_true = torch.softmax(logits.double(), dim=1) @ X
    # y = m - x: about 1 and 2 for the first rows (room 0.5 and 1), 0.3 for the third (room 0.43).
    x = torch.stack([X[0] + e2, X[0] + 2.0 * e2, m_true[2] + 0.3 * e2])
    room = (X[0] - x).norm(dim=1) / 2.0             # a = b = 1, x^(b) = X[0], R = 1
    for slack in (0.0, 1e-4, 0.5):
        s = torch.full((3,), slack, dtype=F64)
        keep = _accuracy.tail_cut(logits, s, eps, room)
        moved, allowed = _cut_error(logits, X, x, 1.0, s, keep, eps)
        assert bool((moved <= allowed).all()), (slack, (moved / allowed).tolist())
        strict = _accuracy.tail_cut(logits, s, eps)
        assert bool((keep.sum(dim=1) <= strict.sum(dim=1)).all())       # never more keys
        if slack == 1e-4:
            # Not vacuous: the first rows keep fewer keys than the weight-only cut and come within
            # a factor 10 of the allowance, so an allowance 10 times larger would break them.
            assert bool((keep[:2].sum(dim=1) < strict[:2].sum(dim=1)).all())
            assert bool((moved[:2] > allowed[:2] / 10).all()), (moved / allowed).tolist()
            # The third row: room alone would allow eps * 0.43 of the weight, which at +e1 (1.2
            # from m) would move y by 0.52 eps, more than eps ||y|| = 0.3 eps; rho (0.67 there)
            # takes the allowance below the weight-only one, so the row keeps that cut.
            assert torch.equal(keep[2], strict[2])
            naive = _accuracy.tail_cut(logits[2:], s[2:], eps * float(room[2]) * math.exp(2.0))
            assert int(naive.sum()) < int(strict[2].sum())
