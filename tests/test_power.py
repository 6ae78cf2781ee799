"""The confirmation's size is computed, not guessed: stats.pairs_for_power gives the pairs at which a paired
t-test reaches the asked power, checked by simulating that many pairs; stats.sd_from_interval recovers the
per-pair spread behind a reported interval."""
import numpy as np
from scipy import stats as sps

import stats


def test_pairs_for_power_reaches_the_power_it_promises_and_no_fewer_pairs_do():
    sd, effect = 0.12, -0.02
    n = stats.pairs_for_power(sd, effect)
    rng = np.random.default_rng(0)
    trials = 4000

    def rejected(pairs):
        diffs = rng.normal(effect, sd, (trials, pairs))  # planted: every pair differs by effect + noise
        return (sps.ttest_1samp(diffs, 0, axis=1).pvalue < 0.05).mean()
    at_n = rejected(n)
    assert abs(at_n - 0.8) < 0.025, f'{n} pairs rejected in {at_n:.3f} of {trials} planted experiments, expected 0.8'
    assert rejected(int(n * 0.7)) < 0.72  # 30% fewer pairs lose a visible share of the power
    assert stats.paired_power(n - 1, sd, effect) < 0.8 <= stats.paired_power(n, sd, effect)


def test_sd_from_interval_recovers_the_spread_behind_a_t_interval():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.03, 0.2, 150)
    ci = sps.ttest_1samp(diffs, 0).confidence_interval(0.95)
    assert np.isclose(stats.sd_from_interval(ci.low, ci.high, 150), diffs.std(ddof=1))
