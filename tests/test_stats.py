"""Claims about stats.py: each statistic equals scipy's (or a hand computation) on fixed data."""
import numpy as np
import pytest
from scipy import stats as sps

import stats


def reference_margin(row, label):
    """One example, plain float64 Python: logit of the label minus log of the summed exp of the rest."""
    others = [float(v) for k, v in enumerate(row) if k != label]
    return float(row[label]) - np.log(sum(np.exp(v) for v in others))


def test_margins_match_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(3, 7, 10)).astype(np.float16)  # (runs, examples, classes)
    labels = rng.integers(0, 10, size=7)
    got = stats.margins(logits, labels)
    assert got.shape == (3, 7) and got.dtype == np.float64
    want = [[reference_margin(logits[r, i], labels[i]) for i in range(7)] for r in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_margins_are_stable_for_huge_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(5, 10))
    labels = rng.integers(0, 10, size=5)
    shifted = stats.margins(logits + 1e4, labels)  # exp(1e4) overflows a naive logsumexp
    assert np.all(np.isfinite(shifted))
    np.testing.assert_allclose(shifted, stats.margins(logits, labels), atol=1e-9)


def test_margins_read_a_float16_memmap_slice(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(0, 3, size=(4, 50, 10)).astype(np.float16)
    mm = np.lib.format.open_memmap(tmp_path / 'x.npy', mode='w+', dtype=np.float16, shape=data.shape)
    mm[:] = data
    mm.flush()
    mm = np.load(tmp_path / 'x.npy', mmap_mode='r')
    idx = [3, 0, 41]
    labels = rng.integers(0, 10, size=50)
    np.testing.assert_array_equal(stats.margins(mm[:, idx, :], labels[idx]),
                                  stats.margins(data[:, idx, :].astype(np.float64), labels[idx]))


def test_margin_of_a_nan_logit_is_not_finite():
    logits = np.zeros((2, 10))
    logits[1, 3] = np.nan
    assert list(np.isfinite(stats.margins(logits, np.array([0, 0])))) == [True, False]


def two_arms(seed=3, n_with=40, n_without=25, m=6):
    rng = np.random.default_rng(seed)
    a = rng.normal(1.0, 1.5, size=(n_with, m)) + np.linspace(0, 1, m)
    b = rng.normal(1.0, 0.7, size=(n_without, m))
    return a, b


def test_welch_matches_scipy():
    a, b = two_arms()
    got = stats.welch_test(a, b)
    want = sps.ttest_ind(a, b, equal_var=False)
    np.testing.assert_allclose(got['stat'], want.statistic, rtol=1e-12)
    np.testing.assert_allclose(got['p'], want.pvalue, rtol=1e-10)
    np.testing.assert_allclose(got['df'], want.df, rtol=1e-12)
    np.testing.assert_allclose(got['diff'], a.mean(0) - b.mean(0), rtol=1e-12)


def test_welch_interval_matches_scipy():
    a, b = two_arms()
    got = stats.welch_test(a, b)
    low, high = stats.confidence_interval(got['diff'], got['se'], got['df'])
    want = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    np.testing.assert_allclose(low, want.low, rtol=1e-10)
    np.testing.assert_allclose(high, want.high, rtol=1e-10)


def test_z_test_is_the_welch_statistic_with_normal_p():
    a, b = two_arms()
    got = stats.z_test(a, b)
    t = sps.ttest_ind(a, b, equal_var=False).statistic
    np.testing.assert_allclose(got['stat'], t, rtol=1e-12)
    np.testing.assert_allclose(got['p'], 2 * sps.norm.sf(np.abs(t)), rtol=1e-12)
    low, high = stats.confidence_interval(got['diff'], got['se'], got['df'])
    np.testing.assert_allclose(high - got['diff'], 1.959963984540054 * got['se'], rtol=1e-12)


def test_paired_matches_scipy():
    a, b = two_arms(n_with=30, n_without=30)
    b = b + 0.8 * a  # seed-matched runs share noise
    got = stats.paired_test(a, b)
    want = sps.ttest_rel(a, b)
    np.testing.assert_allclose(got['stat'], want.statistic, rtol=1e-12)
    np.testing.assert_allclose(got['p'], want.pvalue, rtol=1e-10)
    np.testing.assert_allclose(got['df'], want.df, rtol=1e-12)
    low, high = stats.confidence_interval(got['diff'], got['se'], got['df'])
    ci = want.confidence_interval(0.95)
    np.testing.assert_allclose(low, ci.low, rtol=1e-10)
    np.testing.assert_allclose(high, ci.high, rtol=1e-10)


def test_one_run_per_arm_is_refused_with_a_reason():
    with pytest.raises(ValueError, match='at least 2 runs'):
        stats.welch_test(np.ones((1, 3)), np.ones((5, 3)))


# Fixed p-values and their adjustments worked by hand (m = 4 finite values, the NaN does not count):
# sorted 0.001, 0.02, 0.021, 0.3
# Holm: 4(0.001)=0.004, 3(0.02)=0.06, 2(0.021)=0.042 -> running max 0.06, 1(0.3)=0.3
# BH:   4(0.001)/1=0.004, 4(0.02)/2=0.04, 4(0.021)/3=0.028, 4(0.3)/4=0.3 -> running min from the top:
#       0.004, 0.028, 0.028, 0.3
P = [0.3, 0.02, np.nan, 0.001, 0.021]


def test_holm_matches_hand_computation():
    np.testing.assert_allclose(stats.holm(P), [0.3, 0.06, np.nan, 0.004, 0.06], rtol=1e-12)
    np.testing.assert_allclose(stats.holm([0.6, 0.5]), [1.0, 1.0])


def test_bh_matches_hand_computation():
    np.testing.assert_allclose(stats.benjamini_hochberg(P), [0.3, 0.028, np.nan, 0.004, 0.028], rtol=1e-12)
    np.testing.assert_allclose(stats.benjamini_hochberg([0.9, 0.8]), [0.9, 0.9])


def test_paired_correlation_matches_numpy():
    a, b = two_arms(n_with=30, n_without=30)
    b = b + 0.5 * a
    want = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]
    np.testing.assert_allclose(stats.paired_correlation(a, b), want, rtol=1e-12)


def test_pairing_ratio_is_one_minus_the_shared_noise():
    a, b = two_arms(n_with=30, n_without=30)
    b = b + 0.5 * a
    r = stats.paired_correlation(a, b)
    s1, s2 = a.std(0, ddof=1), b.std(0, ddof=1)
    np.testing.assert_allclose(stats.pairing_ratio(a, b), 1 - 2 * r * s1 * s2 / (s1 ** 2 + s2 ** 2), rtol=1e-12)
    np.testing.assert_allclose(stats.pairing_ratio(a, a + 1.0), 0.0, atol=1e-12)  # identical noise: all saved


def test_runs_needed_at_half_power_is_where_the_effect_reaches_the_threshold():
    d, s1, s2, alpha = np.array([0.3]), np.array([1.2]), np.array([0.9]), 0.01
    n = stats.runs_needed(d, s1, s2, alpha, power=0.5)[0]
    z = lambda k: d[0] / np.sqrt((s1[0] ** 2 + s2[0] ** 2) / k)
    assert 2 * sps.norm.sf(z(n)) <= alpha < 2 * sps.norm.sf(z(n - 1))


def test_runs_needed_gives_the_stated_power():
    rng = np.random.default_rng(4)
    d, s1, s2, alpha = 0.5, 1.0, 1.5, 0.01
    n = int(stats.runs_needed(np.array([d]), np.array([s1]), np.array([s2]), alpha, power=0.8)[0])
    trials = 4000  # one simulated experiment per column
    p = stats.welch_test(rng.normal(d, s1, size=(n, trials)), rng.normal(0, s2, size=(n, trials)))['p']
    assert abs((p < alpha).mean() - 0.8) < 0.03
    assert stats.runs_needed(np.array([0.0]), np.array([1.0]), np.array([1.0]))[0] == np.inf


def test_matched_controls_share_the_label_skip_held_out_and_nonfinite_and_take_the_nearest():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0])
    mean = np.array([5.0, 4.0, 6.5, np.nan, 5.2, 5.0, 5.1, 4.8, 9.0])
    held_out = np.array([0, 1])
    got = stats.matched_controls(mean, labels, held_out, target=np.array([5.0, 4.0]), k=3)
    # label 0, not held out (0, 1), finite (not 3): candidates 2 (6.5), 4 (5.2), 7 (4.8), 8 (9.0)
    assert [c.tolist() for c in got] == [[4, 7, 2], [7, 4, 2]]  # 4 and 7 tie at 0.2 from 5.0: lower index first
    assert [len(c) for c in stats.matched_controls(mean, labels, held_out, [5.0, 4.0], k=10)] == [4, 4]


def test_line_weights_evaluate_the_least_squares_line_at_the_point():
    rng = np.random.default_rng(9)
    x, y = rng.uniform(5, 7, 20), rng.normal(0, 1, 20)
    w = stats.line_weights(x, 7.8)  # beyond every x, as for an example at the top of its class
    fit = sps.linregress(x, y)
    np.testing.assert_allclose(w @ y, fit.intercept + fit.slope * 7.8, rtol=1e-10)
    np.testing.assert_allclose([w.sum(), w @ x], [1.0, 7.8], rtol=1e-12)  # weighted mean margin = the point
    np.testing.assert_allclose(w @ (0.3 - 0.15 * x), 0.3 - 0.15 * 7.8, rtol=1e-12)  # a linear shift, exactly
    np.testing.assert_array_equal(stats.line_weights([1.0, 2.0], 5.0), [0.5, 0.5])  # no line through 2 points
    np.testing.assert_array_equal(stats.line_weights([3.0, 3.0, 3.0], 5.0), np.full(3, 1 / 3))
    assert stats.line_weights([], 1.0).shape == (0,)


def test_cross_influence_matches_scipy_linregress_for_one_example():
    rng = np.random.default_rng(4)
    x = rng.choice([-1.0, 1.0], (30, 1))
    y = 0.3 + 0.7 * x + rng.normal(0, 0.5, (30, 1))
    got = stats.cross_influence(y, x)
    want = sps.linregress(x[:, 0], y[:, 0])
    np.testing.assert_allclose([got['beta'][0, 0], got['se'][0, 0], got['p'][0, 0], got['intercept'][0]],
                               [want.slope, want.stderr, want.pvalue, want.intercept], rtol=1e-10)
    assert got['df'] == 28


def test_cross_influence_fits_every_example_on_every_assignment():
    rng = np.random.default_rng(5)
    pairs, m = 50, 4
    x = rng.choice([-1.0, 1.0], (pairs, m))
    beta = rng.normal(0, 1, (m, m))  # [j, i]
    y = x @ beta + rng.normal(0, 0.1, (pairs, m))
    got = stats.cross_influence(y, x)
    design = np.column_stack([np.ones(pairs), x])
    np.testing.assert_allclose(got['beta'], np.linalg.lstsq(design, y, rcond=None)[0][1:], rtol=1e-10)
    assert np.abs(got['beta'] - beta).max() < 6 * got['se'].max()
    with pytest.raises(ValueError, match='more than m \\+ 1'):
        stats.cross_influence(y[:m + 1], x[:m + 1])


def test_scan_test_halves_equal_scan_test_on_each_half_and_on_all():
    rng = np.random.default_rng(6)
    margins = rng.normal(3, 1, (40, 9))
    included = rng.random((40, 9)) < 0.5
    second = np.arange(40) % 2 == 1
    chunks = [(margins[a:a + 7], included[a:a + 7], second[a:a + 7]) for a in range(0, 40, 7)]
    every, first_half, second_half = stats.scan_test_halves(chunks)
    for got, rows in ((every, slice(None)), (first_half, ~second), (second_half, second)):
        want = stats.scan_test([(margins[rows], included[rows])])
        for key in ('diff', 'se', 'df', 'p', 'n_in'):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-10)


def test_null_extremes_match_the_exact_distribution_of_the_minimum():
    """For M independent N(0, 1): P(min <= x) = 1 - (1 - Phi(x))^M, so the median minimum is
    Phi^-1(1 - 0.5^(1/M))."""
    m = 1000
    draws = stats.null_extremes(np.ones(m), k=5, draws=400, seed=1)
    assert draws.shape == (400, 5) and np.all(np.diff(draws, axis=1) >= 0)
    exact = sps.norm.ppf(1 - 0.5 ** (1 / m))
    assert abs(np.median(draws[:, 0]) - exact) < 0.1  # 400 draws: the median's sd is about 0.02
    scaled = stats.null_extremes(np.full(m, 0.2), k=5, draws=400, seed=1)
    np.testing.assert_allclose(scaled, 0.2 * draws, rtol=1e-12)


def _halves_by_masked_copies(chunks):
    """scan_test_halves' sums as first written (a copy of each half's rows, np.where per side): the
    reference its faster form must equal bit for bit."""
    acc, shift = None, None
    for x, inside, second in chunks:
        if shift is None:
            shift = x.mean(0)
            acc = [{side: [np.zeros(x.shape[1], np.int64), np.zeros(x.shape[1]), np.zeros(x.shape[1])]
                    for side in ('in', 'out')} for _ in range(2)]
        d = x - shift
        for half, rows in zip(acc, (~second, second)):
            if not rows.any():
                continue
            dh, ih = d[rows], inside[rows]
            for side, mask in (('in', ih), ('out', ~ih)):
                count, total, squares = half[side]
                count += mask.sum(0)
                total += np.where(mask, dh, 0.0).sum(0)
                squares += np.where(mask, dh * dh, 0.0).sum(0)
    both = {side: [a + b for a, b in zip(acc[0][side], acc[1][side])] for side in ('in', 'out')}
    return tuple(stats._scan_result(sums, shift) for sums in (both, *acc))


@pytest.mark.parametrize('halves', ['alternate', 'irregular', 'one half'])
def test_scan_test_halves_give_the_same_bits_as_masked_copies(halves):
    rng = np.random.default_rng(8)
    margins = rng.normal(3, 1, (50, 30))
    margins[:, 0] = 2.5  # equal margins: differences of exactly zero, of either sign after a mask
    margins[:, 1] = -np.abs(margins[:, 1])
    included = rng.random((50, 30)) < 0.5
    second = {'alternate': np.arange(50) % 2 == 1, 'irregular': rng.random(50) < 0.5,
              'one half': np.zeros(50, bool)}[halves]
    chunks = [(margins[a:a + 16], included[a:a + 16], second[a:a + 16]) for a in range(0, 50, 16)]
    with np.errstate(invalid='ignore', divide='ignore'):
        got, want = stats.scan_test_halves(chunks), _halves_by_masked_copies(chunks)
    for g, w in zip(got, want):
        for key in w:
            assert np.array_equal(np.asarray(g[key]), np.asarray(w[key]), equal_nan=True), key
            assert np.array_equal(np.signbit(g[key]), np.signbit(w[key])), key
