"""stats.py: the statistics of the with/without experiment (numpy and scipy only, no torch).

Conventions: a margin array is (runs, examples) float64, one row per trained model; `a` is the `with`
arm, `b` the `without` arm, so every difference is with - without (self-influence, positive when
having the example in training raises the model's confidence on it). All tests are two-sided and work
column by column: one test per held-out example.
"""
import numpy as np
from scipy import special
from scipy import stats as sps


def margins(logits, labels):
    """Log-odds of the correct class: its logit minus logsumexp of the other nine.

    logits (..., n, 10) any float dtype (a float16 memmap slice is fine), labels (n,) ints
    -> (..., n) float64. Stable for any logit scale: logsumexp subtracts the max before exp.
    """
    x = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if x.shape[-1] != 10 or x.shape[-2] != labels.shape[0]:
        raise ValueError(f'logits of shape {x.shape} and labels of shape {labels.shape}: '
                         'expected logits (..., n, 10) with labels (n,)')
    is_label = np.arange(10) == labels[:, None]  # (n, 10), broadcasts over the leading run axes
    correct = np.where(is_label, x, 0.0).sum(-1)
    with np.errstate(invalid='ignore'):  # a NaN/inf logit gives a non-finite margin; callers check
        others = special.logsumexp(np.where(is_label, -np.inf, x), axis=-1)
    return correct - others


def _moments(a):
    """(runs, examples) -> n, mean (examples,), sample variance with ddof=1 (examples,)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f'margins of shape {a.shape}: expected (runs, examples) with at least 2 runs')
    return a.shape[0], a.mean(0), a.var(0, ddof=1)


def welch_test(a, b):
    """Welch's unequal-variance t-test per example, Welch-Satterthwaite degrees of freedom.

    a (n_with, m), b (n_without, m) -> dict of (m,) arrays: mean_with, mean_without, diff, se,
    stat (t), df, p. Same numbers as scipy.stats.ttest_ind(a, b, equal_var=False).
    """
    n1, m1, v1 = _moments(a)
    n2, m2, v2 = _moments(b)
    q1, q2 = v1 / n1, v2 / n2  # squared standard errors of the two means
    se = np.sqrt(q1 + q2)
    with np.errstate(divide='ignore', invalid='ignore'):  # zero spread in both arms: t and df undefined
        df = (q1 + q2) ** 2 / (q1 ** 2 / (n1 - 1) + q2 ** 2 / (n2 - 1))
        t = (m1 - m2) / se
    p = 2 * sps.t.sf(np.abs(t), df)
    return dict(mean_with=m1, mean_without=m2, diff=m1 - m2, se=se, stat=t, df=df, p=p)


def z_test(a, b):
    """The original's test: the Welch statistic with a two-sided normal p-value (df = inf).

    Same inputs and outputs as welch_test; stat is z. Slightly too small p-values for few runs.
    """
    out = welch_test(a, b)
    out['df'] = np.full_like(out['diff'], np.inf)
    out['p'] = 2 * sps.norm.sf(np.abs(out['stat']))
    return out


def paired_test(a, b):
    """Paired t-test on seed-matched runs: row k of `a` and of `b` were trained with the same seed.

    a, b (pairs, m) -> dict of (m,) arrays: diff (mean of a - b), se, stat (t), df (pairs - 1), p.
    Same numbers as scipy.stats.ttest_rel(a, b).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f'paired margins of shapes {a.shape} and {b.shape}: expected equal (pairs, examples)')
    n, d, v = _moments(a - b)
    se = np.sqrt(v / n)
    with np.errstate(divide='ignore', invalid='ignore'):
        t = d / se
    df = np.full_like(d, n - 1.0)
    return dict(diff=d, se=se, stat=t, df=df, p=2 * sps.t.sf(np.abs(t), df))


def confidence_interval(diff, se, df, level=0.95):
    """Two-sided interval diff +- q * se, q the t quantile with df degrees of freedom (normal for
    df = inf). (m,) arrays -> low (m,), high (m,)."""
    q = sps.t.ppf(0.5 + level / 2, df)
    return diff - q * se, diff + q * se


def holm(p):
    """Holm step-down adjusted p-values (family-wise error). p (m,) -> (m,).

    Sorted ascending, the k-th smallest (k = 0..m-1) becomes max over j <= k of min(1, (m - j) p_(j)).
    NaN p-values stay NaN and do not count in m.
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind='stable')]
    m = len(order)
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def benjamini_hochberg(p):
    """Benjamini-Hochberg adjusted p-values (false discovery rate). p (m,) -> (m,).

    Sorted ascending, the k-th smallest (rank k + 1) becomes min over j >= k of min(1, m p_(j) / (j + 1)).
    NaN p-values stay NaN and do not count in m.
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind='stable')]
    m = len(order)
    scaled = m * p[order] / np.arange(1, m + 1)
    out[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return out


def paired_correlation(a, b):
    """Pearson correlation across seed-matched runs of the two arms' margins, per example.
    a, b (pairs, m) -> (m,). Positive: a seed that gives a high margin with the example also gives
    a high margin without it, and pairing removes that shared part of the noise."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, db = a - a.mean(0), b - b.mean(0)
    with np.errstate(divide='ignore', invalid='ignore'):
        return (da * db).sum(0) / np.sqrt((da ** 2).sum(0) * (db ** 2).sum(0))


def runs_needed(diff, sd_with, sd_without, alpha=0.01, power=0.8):
    """Runs per arm for a two-sided test at level alpha to detect an effect of size diff with the
    given probability (power), if the spreads are as observed. (m,) arrays -> (m,) float (inf for
    diff = 0).

    Normal approximation, equal runs n per arm: the test statistic is d / sqrt((s1^2 + s2^2) / n), so
        n = (z_{1 - alpha/2} + z_power)^2 (s1^2 + s2^2) / d^2,   rounded up, at least 2.
    power=0.5 gives z_power = 0: the n at which the observed effect would just reach p = alpha.
    """
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    with np.errstate(divide='ignore'):
        n = z ** 2 * (np.square(sd_with) + np.square(sd_without)) / np.square(diff)
    return np.maximum(2.0, np.ceil(n))


def pairing_ratio(a, b):
    """Runs needed by the paired design over runs needed by the unpaired one, for the same standard
    error of the difference. a, b (pairs, m) seed-matched margins -> (m,).

    Unpaired with n runs per arm: se^2 = (s1^2 + s2^2) / n. Paired with n pairs: se^2 = s_d^2 / n, where
    s_d^2 = s1^2 + s2^2 - 2 r s1 s2 is the variance of the paired differences. So the ratio is
    s_d^2 / (s1^2 + s2^2); pairing saves n (1 - ratio) runs per arm (negative if r < 0).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide='ignore', invalid='ignore'):
        return (a - b).var(0, ddof=1) / (a.var(0, ddof=1) + b.var(0, ddof=1))
