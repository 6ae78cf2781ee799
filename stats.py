"""stats.py: the statistics of the with/without experiment (numpy and scipy only, no torch).

Conventions: a margin array is (runs, examples) float64, one row per trained model; `a` is the `with`
arm, `b` the `without` arm, so every difference is with - without (self-influence, positive when
having the example in training raises the model's confidence on it). All tests are two-sided and work
column by column: one test per held-out example. A scan (runs on random halves of the training set)
is tested the same way, streaming over runs: scan_test, included - excluded.
"""
import numpy as np
from scipy import stats as sps


def margins(logits, labels):
    """Log-odds of the correct class: its logit minus logsumexp of the other nine.

    logits (..., n, 10) any float dtype (a float16 memmap slice is fine), labels (n,) ints
    -> (..., n) float64. Stable for any logit scale: logsumexp subtracts the max before exp.
    """
    x = np.array(logits, dtype=np.float64)  # a copy: overwritten in place below
    labels = np.asarray(labels)
    if x.shape[-1] != 10 or x.shape[-2] != labels.shape[0]:
        raise ValueError(f'logits of shape {x.shape} and labels of shape {labels.shape}: '
                         'expected logits (..., n, 10) with labels (n,)')
    # logsumexp by hand: scipy's is 4x slower here, which a scan of 10,000 x 50,000 examples feels.
    # A NaN/inf logit gives a non-finite margin (NaN through max or inf - inf); callers check.
    at_label = np.broadcast_to(labels[:, None], (*x.shape[:-1], 1))
    correct = np.take_along_axis(x, at_label, -1)[..., 0]
    np.put_along_axis(x, at_label, -np.inf, -1)
    top = x.max(-1, keepdims=True)
    with np.errstate(invalid='ignore'):
        x -= top
    np.exp(x, out=x)
    return correct - top[..., 0] - np.log(x.sum(-1))


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
    return _welch(*_moments(a), *_moments(b))


def _welch(n1, m1, v1, n2, m2, v2):
    """Welch's test from each arm's run count, mean and sample variance (scalars or (m,) arrays)."""
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


def scan_test(chunks):
    """Welch's t-test per example of a scan, streaming over runs: each run trained on a subset of
    the training set, and example i's self-influence is its mean margin over the runs that included
    it minus its mean margin over the runs that excluded it.

    chunks: iterable of (margins (k, n), included (k, n) bool), k consecutive runs at a time (any k,
    chunk to chunk). Only per-example counts and sums are kept, so the runs never need to fit in
    memory at once. -> dict of (n,) arrays: n_in, n_out (int), mean_in, mean_out, diff (in - out),
    se, stat (t), df, p; the same numbers as scipy.stats.ttest_ind(in, out, equal_var=False) per
    example. An example with fewer than 2 runs on either side has no variance there: NaN statistics.
    """
    return scan_test_halves((m, inside, np.zeros(len(m), bool)) for m, inside in chunks)[0]


def scan_test_halves(chunks):
    """scan_test on all runs and on each of two disjoint halves of them, in the same pass.

    chunks: iterable of (margins (k, n), included (k, n) bool, second (k,) bool: the run belongs to the
    second half). -> (all runs, first half, second half): three dicts as scan_test returns.
    """
    acc, shift = None, None  # per half, per side: count, sum and sum of squares of (margin - shift), (n,) each
    for margins, included, second in chunks:
        x = np.asarray(margins, dtype=np.float64)
        inside = np.asarray(included, dtype=bool)
        second = np.asarray(second, dtype=bool)
        if x.ndim != 2 or x.shape != inside.shape or (acc is not None and x.shape[1] != len(shift)):
            expected = 'a (runs, examples) pair' if acc is None else f'(runs, {len(shift)}) like the first chunk'
            raise ValueError(f'margins of shape {x.shape} and included of shape {inside.shape}: expected {expected}')
        if not len(x):
            continue
        if not np.all(np.isfinite(x)):
            raise ValueError('non-finite margins in a chunk: leave out the runs that diverged before the scan test')
        if acc is None:
            # Plain float64 sums of squares would do for margins of O(1-20) with spreads of O(0.1-1):
            # var = (sum x^2 - (sum x)^2 / n) / (n - 1) loses about log10(mean^2 / var), i.e. 3-4 of
            # 16 digits. Summing margin - shift, shift near the mean, makes that loss negligible at
            # any scale, for free: the first chunk's mean per example is close enough.
            shift = x.mean(0)
            acc = [{side: [np.zeros(x.shape[1], np.int64), np.zeros(x.shape[1]), np.zeros(x.shape[1])]
                    for side in ('in', 'out')} for _ in range(2)]
        d = x - shift
        # d * mask, not np.where(mask, d, 0): the same sums to the last bit (d is finite, so a left-out term
        # is +0.0 or -0.0, and x + -0.0 == x + 0.0 for every running sum but -0.0, which the float64
        # accumulators, started at +0.0, never hold), without a copy per mask
        d_in = d * inside
        d_out = d - d_in  # d where excluded, +0.0 where included
        for half, rows in zip(acc, (~second, second)):
            if not rows.any():
                continue
            pick = _rows(rows)  # a strided view where the half's rows are evenly spaced (alternate run numbers)
            n_in = inside[pick].sum(0)
            for side, part, n_side in (('in', d_in, n_in), ('out', d_out, rows.sum() - n_in)):
                count, total, squares = half[side]
                count += n_side
                ph = part[pick]
                total += ph.sum(0)
                squares += (ph * d[pick]).sum(0)
    if acc is None:
        raise ValueError('no runs in the scan: expected at least one chunk of margins')
    both = {side: [a + b for a, b in zip(acc[0][side], acc[1][side])] for side in ('in', 'out')}
    return tuple(_scan_result(sums, shift) for sums in (both, *acc))


def _rows(rows):
    """rows (k,) bool -> an index of the True rows: a slice (a view, no copy) where they are evenly spaced."""
    at = np.flatnonzero(rows)
    step = at[1] - at[0] if len(at) > 1 else 1
    if np.all(np.diff(at) == step):
        return slice(at[0], at[-1] + 1, step)
    return at


def _scan_result(acc, shift):
    """Welch's test from a scan's per-side counts and sums of (margin - shift)."""
    moments = []
    for side in ('in', 'out'):
        count, total, squares = acc[side]
        n = np.where(count >= 2, count, np.nan)  # NaN, not a division by 0, where no variance exists
        with np.errstate(divide='ignore', invalid='ignore'):
            mean = total / count
        var = np.maximum(0.0, squares - total * mean) / (n - 1)  # rounding can give -1e-17 for equal margins
        moments.append((n, shift + mean, var))
    res = _welch(*moments[0], *moments[1])
    res['mean_in'], res['mean_out'] = res.pop('mean_with'), res.pop('mean_without')
    res['n_in'], res['n_out'] = acc['in'][0], acc['out'][0]
    return res


def null_extremes(se, k, draws=200, seed=0):
    """The k most negative of M estimates when no example has an effect: each draw is M independent
    normal estimates with mean 0 and standard deviations se (M,) (the observed standard errors), and
    keeps its k smallest, sorted. The most positive ones are the same with the sign flipped (the null
    is symmetric). -> (draws, k): row d = the k most negative of draw d, most negative first."""
    se = np.asarray(se, dtype=np.float64)
    k = min(k, len(se))
    rng = np.random.default_rng(seed)
    out = np.empty((draws, k))
    block = max(1, 2_000_000 // max(1, len(se)))  # draws at a time: about 16 MB of normals
    for lo in range(0, draws, block):
        z = rng.standard_normal((min(block, draws - lo), len(se))) * se
        out[lo:lo + len(z)] = np.sort(np.partition(z, k - 1, axis=1)[:, :k], axis=1)
    return out


def split_half(first, second):
    """Split-half reliability of per-example estimates made on two disjoint halves of the runs:
    Pearson r over the examples finite in both, and the Spearman-Brown reliability of estimates on all
    runs, 2r / (1 + r). (n,) arrays -> (r, spearman_brown, examples used)."""
    ok = np.isfinite(first) & np.isfinite(second)
    if ok.sum() < 3:
        return np.nan, np.nan, int(ok.sum())
    r = np.corrcoef(first[ok], second[ok])[0, 1]
    return r, 2 * r / (1 + r), int(ok.sum())


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
    with np.errstate(divide='ignore', invalid='ignore'):  # 0 / 0 (no effect, no spread): NaN
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


def matched_controls(mean_margin, labels, held_out, target, k):
    """Controls of each held-out example: the k training examples with its label, not held out, whose
    mean margin is nearest to its target margin (ties: lower index first). Examples with a non-finite
    mean margin are never controls.

    mean_margin (n_train,), labels (n_train,), held_out (m,) indices, target (m,) margins
    -> list of m int64 arrays of up to k indices, nearest first (fewer where fewer candidates exist)."""
    mean_margin, labels = np.asarray(mean_margin, dtype=np.float64), np.asarray(labels)
    eligible = np.isfinite(mean_margin)
    eligible[np.asarray(held_out, dtype=np.int64)] = False
    out = []
    for i, t in zip(held_out, target):
        candidates = np.flatnonzero(eligible & (labels == labels[i]))
        order = np.argsort(np.abs(mean_margin[candidates] - t), kind='stable')
        out.append(candidates[order[:k]])
    return out


def line_weights(x, x0):
    """Weights w (k,) that evaluate at x0 the least-squares line through k points (x_c, y_c): the fitted
    value there is sum_c w_c y_c for any y. w_c = 1/k + (x0 - mean x)(x_c - mean x) / sum (x_c - mean x)^2,
    so sum w = 1 and sum w x = x0: the weighted mean of x is x0 itself, and any y linear in x is
    reproduced exactly at x0. With fewer than 3 points or a spread of x below 1e-9, the plain mean (1/k).
    x (k,) float, x0 float -> (k,) float64."""
    x = np.asarray(x, dtype=np.float64)
    k = len(x)
    if k == 0:
        return np.zeros(0)
    d = x - x.mean()
    spread = (d * d).sum()
    if k < 3 or spread <= 1e-9 * k:
        return np.full(k, 1.0 / k)
    return 1.0 / k + (x0 - x.mean()) * d / spread


def cross_influence(y, x):
    """Least squares, per example i, of y[:, i] on an intercept and every column of x: the factorial
    design's regression of an example's margin difference between the two runs of a pair on which run
    kept each held-out example.

    y (pairs, m): margin in run a - margin in run b; x (pairs, m): +1 where example j was kept in run a,
    -1 where in run b. With margin = base + sum_j beta[j, i] kept_j + noise in each run, the difference is
    y_i = sum_j beta[j, i] x_j + noise: beta[j, i] is the change of i's margin when j is added
    (cross-influence of j on i; beta[i, i] its self-influence). Standard errors from each example's
    residuals, t-test with pairs - m - 1 degrees of freedom. Needs pairs > m + 1 and x of full rank.
    -> dict: beta, se, stat, p (m, m) indexed [j, i]; intercept (m,); df (int)."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    pairs, m = y.shape
    if x.shape != y.shape:
        raise ValueError(f'y of shape {y.shape} and x of shape {x.shape}: expected both (pairs, examples)')
    df = pairs - m - 1
    if df < 1:
        raise ValueError(f'{pairs} pairs for {m} examples: the regression needs more than m + 1 = {m + 1} pairs')
    design = np.column_stack([np.ones(pairs), x])  # (pairs, m + 1)
    if np.linalg.matrix_rank(design) < m + 1:
        raise ValueError(f'the assignments of the {m} examples over {pairs} pairs are collinear; more pairs are needed')
    inverse = np.linalg.inv(design.T @ design)
    coef = inverse @ design.T @ y                          # (m + 1, m)
    residual_var = ((y - design @ coef) ** 2).sum(0) / df  # (m,)
    se = np.sqrt(np.diag(inverse)[:, None] * residual_var[None, :])
    with np.errstate(divide='ignore', invalid='ignore'):
        t = coef / se
    p = 2 * sps.t.sf(np.abs(t), df)
    return dict(beta=coef[1:], se=se[1:], stat=t[1:], p=p[1:], intercept=coef[0], df=df)


############################################
#       Sizing a confirmation in advance     #
############################################

def sd_from_interval(low, high, n, level=0.95):
    """Standard deviation of the per-pair differences behind a reported paired t interval (low, high)
    over n pairs: the half-width is t_{(1 + level) / 2, n - 1} sd / sqrt(n)."""
    return (high - low) / 2 / sps.t.ppf((1 + level) / 2, n - 1) * np.sqrt(n)


def paired_power(n, sd, effect, alpha=0.05):
    """Probability that a two-sided paired t-test at level alpha over n pairs rejects, when the per-pair
    differences have mean `effect` and standard deviation sd: noncentral t, df n - 1, noncentrality
    effect sqrt(n) / sd."""
    df, nc = n - 1, abs(effect) * np.sqrt(n) / sd
    critical = sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(critical, df, nc) + sps.nct.cdf(-critical, df, nc))


def pairs_for_power(sd, effect, alpha=0.05, power=0.8):
    """The fewest pairs at which paired_power reaches `power`; starts from the normal approximation
    n = ((z_{1 - alpha/2} + z_power) sd / effect)^2, which the t distribution can only raise."""
    z = sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)
    n = max(2, int(np.ceil((z * sd / effect) ** 2)))
    while paired_power(n, sd, effect, alpha) < power:
        n += 1
    return n
