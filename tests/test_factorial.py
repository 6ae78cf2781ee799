"""Claims about the factorial report (python viz.py PATH on a store with arms a and b): self-influence and
cross-influence recovered from planted stores written in the store format, intervals that cover at
their nominal rate, and the pairs it leaves out."""

import numpy as np
import pytest
from scipy import stats as sps

import viz
import viz_factorial
import viz_io
from conftest import body, report, written
from planted_stores import write_arms
from store import Store, factorial_split, held_out_indices, keep_for

N, PAIRS = 300, 60
HELD = {'random': [0, 25, 50, 75, 100, 125], 'easy': [153, 178, 203, 228, 253, 278]}
M = 12
SELF = np.linspace(-0.5, 0.5, M)        # planted self-influence of each held-out example, margin units
STRONG = {(0, 5): 0.8, (3, 10): -0.7, (8, 9): 0.6}  # (j, i): cross-influence of held-out j on held-out i
GENERIC = {2: 0.4, 7: -0.4}             # held-out j: adding it moves EVERY example's margin by this much


def planted_beta():
    """(M, N) effect of adding held-out example j on the margin of every training example."""
    idx = held_out_indices(HELD)
    beta = np.zeros((M, N))
    for j, g in GENERIC.items():
        beta[j] += g
    beta[np.arange(M), idx] += SELF
    for (j, i), b in STRONG.items():
        beta[j, idx[i]] += b
    return beta


def factorial_margins(beta, pairs, rng, labels_n=N, seed_base=0):
    """(pairs, N) margins of runs a and b: base + noise per pair and example (both runs), per run (all
    examples alike) and independent, plus the planted effects of the held-out examples each run kept
    (the coins of the pair with seed seed_base + k)."""
    base = rng.uniform(1, 9, labels_n)
    out = {'a': np.empty((pairs, labels_n)), 'b': np.empty((pairs, labels_n))}
    for k in range(pairs):
        kept_a = ~factorial_split(seed_base + k, M)
        pair_noise = rng.normal(0, 0.3, labels_n)
        for arm, kept in (('a', kept_a), ('b', ~kept_a)):
            out[arm][k] = base + pair_noise + rng.normal(0, 0.3) + rng.normal(0, 0.15, labels_n) + kept @ beta
    return out


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp('factorial') / 'store'
    write_arms(path, HELD, np.arange(N) % 10, factorial_margins(planted_beta(), PAIRS, np.random.default_rng(3)))
    return path


def truth():
    """Planted self-influence (adding i moves i: its own effect and its generic effect), control shift
    (adding i moves its controls: the generic effect) and cross-influence (M, M) among held-out examples."""
    beta = planted_beta()
    idx = held_out_indices(HELD)
    generic = np.array([GENERIC.get(j, 0.0) for j in range(M)])
    return beta[np.arange(M), idx], generic, beta[:, idx]


def test_pairs_use_the_coins_the_store_trained_with(planted):
    store = Store(planted)
    idx = held_out_indices(HELD)
    _, _, kept_in_a, runs = viz_factorial.read_pairs(store, idx)
    for row, seed in zip(kept_in_a, runs['seed']):
        np.testing.assert_array_equal(row, np.isin(idx, keep_for('a', int(seed), N, HELD)))
        assert not np.isin(idx[row], keep_for('b', int(seed), N, HELD)).any()  # each removed from exactly one run
    assert 0.3 < kept_in_a.mean() < 0.7


def test_report_recovers_planted_self_and_cross_influences(planted, capsys):
    res, lines, _ = report([planted, '--controls', '20'], capsys)
    self_truth, generic, cross_truth = truth()
    covered = lambda low, high, t: int(((low <= t) & (t <= high)).sum())
    assert covered(res['ci_low'], res['ci_high'], self_truth) >= M - 2
    assert covered(res['control_shift_ci_low'], res['control_shift_ci_high'], generic) >= M - 2
    assert covered(res['control_adjusted_ci_low'], res['control_adjusted_ci_high'], SELF) >= M - 2
    # Where the generic effect is planted, the raw estimate carries it and the control-adjusted one does not.
    for j in GENERIC:
        assert not res['ci_low'][j] <= SELF[j] <= res['ci_high'][j]
        assert res['control_adjusted_ci_low'][j] <= SELF[j] <= res['control_adjusted_ci_high'][j]
    # Cross-influences passing BH at 0.01: the strong pairs and the generic examples' effect on the others.
    passing = set(zip(*np.nonzero(np.nan_to_num(res['cross_p_bh'], nan=1) < 0.01)))
    planted_pairs = set(STRONG) | {(j, i) for j in GENERIC for i in range(M) if i != j}
    assert passing == planted_pairs
    c = res['cross']
    q = sps.t.ppf(0.975, c['df'])
    off = ~np.eye(M, dtype=bool)
    assert covered((c['beta'] - q * c['se'])[off], (c['beta'] + q * c['se'])[off], cross_truth[off]) >= 0.9 * M * (M - 1)
    np.testing.assert_allclose(res['regression_self_influence'], self_truth, atol=0.15)
    # The printed list starts with the strong pairs (largest |t|), as held-out indices j -> i.
    start = lines.index(next(line for line in lines if line.startswith('The 10 with the smallest p')))
    top = [tuple(int(v) for v in line.split()[:2]) for line in lines[start + 2:start + 5]]
    idx = held_out_indices(HELD)
    assert set(top) == {(idx[j], idx[i]) for j, i in STRONG}
    assert f'{len(planted_pairs)} pass BH p < 0.01' in ' '.join(lines)


def test_report_lists_every_example_with_all_and_the_group_means(planted, capsys):
    res, lines, _ = report([planted, '--controls', '0', '--all'], capsys)
    assert 'control_adjusted' not in res and not any(line.startswith('Controls:') for line in lines)
    assert body(lines)[1].startswith(f'Factorial design, store {planted} (trainer toy): {PAIRS} pairs of runs')
    start = lines.index('Random examples:')
    rows = [line.split() for line in lines[start:] if line.strip()[:1].isdigit()][:M]
    assert [int(r[0]) for r in rows] == list(held_out_indices(HELD))
    for r, j in zip(rows, range(M)):
        assert r[3] == f'{res["self_influence"][j]:+.3f}' and (r[7] == '*') == bool(res['p'][j] < 0.01)
    _, default, _ = report([planted, '--controls', '0'], capsys)  # without --all: only those with p < alpha
    assert any(line.startswith('Held-out examples with p < 0.01 (every one: --all)') for line in default)
    start = default.index('Random examples:')
    rows = [line.split() for line in default[start:default.index('', start)] if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [i for i, p in zip(held_out_indices(HELD), res['p']) if p < 0.01]
    self_truth, _, _ = truth()
    for name, pos in res['groups']:
        g = res['group_summary'][name]
        np.testing.assert_allclose(g['mean'], res['self_influence'][pos].mean(), rtol=1e-12)
        assert g['ci_low'] <= self_truth[pos].mean() <= g['ci_high']


def test_intervals_cover_at_the_nominal_rate():
    """60 repetitions of 60 pairs x 12 held-out examples with planted self-, cross- and generic effects:
    720 self-influence intervals (pair means and regression) and 7920 cross-influence intervals. Each
    coverage must be 95% within 4 binomial standard errors (for the cross ones, twice that: the intervals of
    one repetition share its noise)."""
    rng = np.random.default_rng(11)
    beta = planted_beta()
    idx = held_out_indices(HELD)
    self_truth, _, cross_truth = truth()
    positions = viz_io.positions_of([(k, np.asarray(v)) for k, v in HELD.items()])
    hits = {'pair means': [], 'regression': [], 'cross': []}
    q = sps.t.ppf(0.975, PAIRS - M - 1)
    off = ~np.eye(M, dtype=bool)
    for rep in range(60):
        seeds = range(rep * PAIRS, (rep + 1) * PAIRS)  # new coins each time: the design's randomness too
        m = factorial_margins(beta[:, idx], PAIRS, rng, labels_n=M, seed_base=seeds[0])  # held-out columns only
        kept_in_a = ~np.array([factorial_split(s, M) for s in seeds])
        res = viz_factorial.estimate(m['a'], m['b'], kept_in_a, positions)
        hits['pair means'] += list((res['ci_low'] <= self_truth) & (self_truth <= res['ci_high']))
        c = res['cross']
        low, high = c['beta'] - q * c['se'], c['beta'] + q * c['se']
        hits['regression'] += list(np.diag((low <= cross_truth) & (cross_truth <= high)))
        hits['cross'] += list(((low <= cross_truth) & (cross_truth <= high))[off])
    for name, h in hits.items():
        sd = np.sqrt(0.95 * 0.05 / len(h)) * (2 if name == 'cross' else 1)
        assert abs(np.mean(h) - 0.95) < 4 * sd, (name, np.mean(h), len(h))


def test_incomplete_and_diverged_pairs_are_left_out_with_a_note(tmp_path, capsys):
    margins = factorial_margins(planted_beta(), 20, np.random.default_rng(5))
    margins['b'][4] = np.nan         # run 4 of b never finished: pair 4 has one half
    margins['a'][9, 50] = np.inf     # pair 9 diverged at held-out example 50
    write_arms(tmp_path / 's', HELD, np.arange(N) % 10, margins)
    res, _, err = report([tmp_path / 's', '--controls', '5'], capsys)
    assert '1 run(s) of arm a without the run of arm b that shares their seed' in err and 'runs 4.' in err
    assert '1 pair(s) with non-finite logits at held-out examples' in err and 'seed 9 at example(s) 50' in err
    assert res['pairs'] == 18


def test_too_few_pairs_for_the_regression_says_so(tmp_path, capsys):
    write_arms(tmp_path / 's', HELD, np.arange(N) % 10,
               factorial_margins(planted_beta(), M + 1, np.random.default_rng(6)))
    res, lines, _ = report([tmp_path / 's', '--controls', '5'], capsys)
    assert 'cross' not in res and res['pairs'] == M + 1
    assert f'Cross-influences: not estimated; {M + 1} pairs for {M} examples: the regression needs more than ' \
           f'm + 1 = {M + 1} pairs.' in lines
    assert f'(no regression estimate: {M + 1} pairs for {M} examples: the regression needs more than m + 1 = ' \
           f'{M + 1} pairs)' in lines  # the reason where the column is missing
    assert np.all(np.isfinite(res['self_influence']))


def test_csv_json_and_plot_hold_the_numbers(planted, capsys, tmp_path):
    res, _, _ = report([planted, '--controls', '20', '--all', '--csv', tmp_path / 'f.csv',
                        '--json', tmp_path / 'f.json', '--plot', tmp_path / 'f.png'], capsys)
    rows, doc = written(tmp_path / 'f.csv', tmp_path / 'f.json')
    assert len(rows) == len(doc['examples']) == M and doc['pairs'] == PAIRS and doc['design'] == 'factorial'
    for j, (row, ex) in enumerate(zip(rows, doc['examples'])):
        for k in ('self_influence', 'p_bh', 'control_adjusted', 'control_shift', 'regression_self_influence'):
            assert float(row[k]) == ex[k] == res[k][j]
        assert ex['controls'] == res['controls'][j].tolist()
    cross = doc['cross_influences']
    assert len(cross) == M * (M - 1) and cross[0]['p'] == min(c['p'] for c in cross)
    idx = list(held_out_indices(HELD))
    first = cross[0]
    assert first['effect'] == res['cross']['beta'][idx.index(first['from']), idx.index(first['to'])]
    with open(tmp_path / 'f.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_with_without_options_are_refused_on_a_factorial_store(planted):
    with pytest.raises(SystemExit):
        viz.main([str(planted), '--test', 'z'])


def test_the_answer_is_each_groups_control_adjusted_pair_mean(planted, capsys):
    res, lines, _ = report([planted], capsys)
    assert lines[0].startswith(f'Answer (95% CI, p; significant if p < 0.01; paired t-test over {PAIRS} pairs')
    for k, (name, g) in enumerate(res['group_summary'].items()):
        assert lines[1 + k].startswith(f'  {name} examples: {g["control_adjusted"]:+.3f} [{g["control_adjusted_ci_low"]:+.3f}, '
                                       f'{g["control_adjusted_ci_high"]:+.3f}], p {g["control_adjusted_p"]:.4f}, control-adjusted; ')
        assert ('; significant: ' in lines[1 + k]) == (g['control_adjusted_p'] < 0.01)
