"""Claims about the scan (python viz.py --scan): every example's self-influence from runs on random
halves of the training set, on generated scan stores built with the real Store API."""

import re

import numpy as np
import pytest
from scipy import stats as sps

import stats
import viz
import viz_io
import viz_scan
from conftest import body, report, written
from planted_stores import logits_with_margins
from store import SCAN_SEED_BASE, Store, keep_for, seed_for
from store import margins as kept_margins

HELD = {'random': [0, 1, 2], 'easy': [150, 151]}


def scan_settings(n_train, held_out=HELD, arms=('scan',)):
    return dict(trainer='toy', hyp={}, held_out=held_out, n_train=n_train, data_fingerprint='toy',
                seed_base=SCAN_SEED_BASE, arms=list(arms))


def included_in(seed, n_train, held_out=HELD):
    """(n_train,) bool: the examples a scan run with this seed trains on, as the trainers draw them."""
    mask = np.zeros(n_train, dtype=bool)
    mask[keep_for('scan', seed, n_train, held_out)] = True
    return mask


def make_scan_store(path, n_train, runs, effect=None, seed=0, noise=0.5):
    """A scan store of `runs` runs: example i has a base margin in [1, 6], run-to-run noise (sd `noise`)
    and, in the runs that include it, its planted effect[i] (margin units). Held-out examples: those of
    HELD below n_train. Returns (store, margins (runs, n_train) as planted, before float16)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n_train)
    held_out = {name: [i for i in ix if i < n_train] for name, ix in HELD.items()}
    store = Store.create(path, scan_settings(n_train, {k: v for k, v in held_out.items() if v}), labels)
    base = rng.uniform(1, 6, n_train)
    effect = np.zeros(n_train) if effect is None else effect
    margins = np.empty((runs, n_train))
    for run in range(runs):
        s = seed_for(run, SCAN_SEED_BASE)
        shift = np.where(included_in(s, n_train, store.settings['held_out']), effect, 0.0)
        margins[run] = base + rng.normal(0, noise, n_train) + shift
        store.save_run('scan', run, s, logits_with_margins(margins[run], labels), seconds=1.0, test_acc=0.9)
    return store, margins


def welch_direct(margins, included):
    """Per example: scipy's Welch test of the included runs against the excluded ones."""
    out = [sps.ttest_ind(margins[inc, j], margins[~inc, j], equal_var=False)
           for j, inc in enumerate(included.T)]
    return np.array([r.statistic for r in out]), np.array([r.pvalue for r in out]), np.array([r.df for r in out])


# ---- the masks ----

def test_masks_are_reproducible_from_the_seeds_and_include_each_example_about_half_the_time():
    m, n = 200, 500
    seeds = [seed_for(run, SCAN_SEED_BASE) for run in range(m)]
    masks = np.array([included_in(s, n) for s in seeds])
    again = np.array([included_in(s, n) for s in seeds])
    np.testing.assert_array_equal(masks, again)
    assert np.all(masks.sum(1) == n // 2)                   # every run: exactly half
    assert len({row.tobytes() for row in masks}) == m       # and a different half each
    counts = masks.sum(0)  # runs per example: Binomial(200, 1/2), mean 100, sd 7.07
    assert counts.mean() == m / 2                           # exact: each run includes n / 2 examples
    assert 100 - 5 * 7.08 < counts.min() and counts.max() < 100 + 5 * 7.08  # 5 sd: p < 1e-6 per example
    assert 35 < counts.var() < 65                           # binomial variance 50


def test_viz_recomputes_the_masks_of_the_stored_runs(tmp_path):
    store, _ = make_scan_store(tmp_path / 's', n_train=60, runs=5)
    _, run_info = store.load('scan')
    assert list(run_info['seed']) == [SCAN_SEED_BASE + r for r in range(5)]
    np.testing.assert_array_equal(viz_scan.scan_masks(store, run_info['seed']),
                                  [included_in(s, 60) for s in run_info['seed']])


# ---- the streaming estimator ----

def random_scan(m=40, n=9, seed=3):
    rng = np.random.default_rng(seed)
    included = rng.random((m, n)) < 0.5
    margins = rng.normal(3.0, 1.0, (m, n)) + included * np.linspace(-1, 1, n) + rng.normal(0, 0.5, (m, n)) * included
    return margins, included


@pytest.mark.parametrize('sizes', [[40], [1, 4, 13, 2, 20], [7, 0, 33]])
def test_streaming_scan_test_matches_scipy_whatever_the_chunks(sizes):
    margins, included = random_scan()
    edges = np.cumsum([0, *sizes])
    got = stats.scan_test((margins[a:b], included[a:b]) for a, b in zip(edges[:-1], edges[1:]))
    t, p, df = welch_direct(margins, included)
    np.testing.assert_allclose(got['stat'], t, rtol=1e-10)
    np.testing.assert_allclose(got['p'], p, rtol=1e-9)
    np.testing.assert_allclose(got['df'], df, rtol=1e-10)
    mean_in = [margins[inc, j].mean() for j, inc in enumerate(included.T)]
    mean_out = [margins[~inc, j].mean() for j, inc in enumerate(included.T)]
    np.testing.assert_allclose(got['mean_in'], mean_in, rtol=1e-12)
    np.testing.assert_allclose(got['mean_out'], mean_out, rtol=1e-12)
    np.testing.assert_allclose(got['diff'], np.subtract(mean_in, mean_out), rtol=1e-10)
    np.testing.assert_array_equal(got['n_in'], included.sum(0))
    np.testing.assert_array_equal(got['n_out'], (~included).sum(0))


def test_streaming_scan_test_stays_exact_far_from_zero():
    margins, included = random_scan()
    far = 1e4 + 1e-2 * margins  # mean^2 / var = 1e12: plain sums of squares would keep 4 digits
    got = stats.scan_test([(far[:10], included[:10]), (far[10:], included[10:])])
    t, p, df = welch_direct(far, included)
    np.testing.assert_allclose(got['stat'], t, rtol=1e-7)
    np.testing.assert_allclose(got['df'], df, rtol=1e-7)


def test_example_never_excluded_gets_no_test():
    margins, included = random_scan(m=10, n=3)
    included[:, 0] = True       # never excluded
    included[:, 1] = False      # never included
    included[:, 2] = [True] + [False] * 9  # included once: no variance on that side
    got = stats.scan_test([(margins, included)])
    assert np.all(np.isnan(got['p'])) and np.all(np.isnan(got['se']))
    assert list(got['n_in']) == [10, 0, 1]


def test_viz_scan_equals_a_direct_computation_on_the_store(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kept_margins, "CHUNK", 7)  # 23 runs: chunks of 7, 7, 7, 2
    store, _ = make_scan_store(tmp_path / 's', n_train=160, runs=23)
    res, _, _ = report(['--scan', tmp_path / 's'], capsys)
    logits, run_info = store.load('scan')
    margins = stats.margins(np.asarray(logits), store.labels)  # (23, 160): small enough to hold
    included = viz_scan.scan_masks(store, run_info['seed'])
    t, p, df = welch_direct(margins, included)
    np.testing.assert_allclose(res['stat'], t, rtol=1e-9)
    np.testing.assert_allclose(res['p'], p, rtol=1e-8)
    np.testing.assert_allclose(res['p_bh'], stats.benjamini_hochberg(p), rtol=1e-8)
    assert res['runs'] == 23 and res['tested'].all()


# ---- the report ----

N_TRAIN, RUNS, DELTA = 200, 200, 0.6
DOWN = [11, 47, 150]       # planted negative self-influence (150 is a held-out 'easy' one)
UP = [5, 88, 120, 199]     # planted positive


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    effect = np.zeros(N_TRAIN)
    effect[DOWN], effect[UP] = -DELTA, DELTA
    path = tmp_path_factory.mktemp('scan') / 'store'
    make_scan_store(path, N_TRAIN, RUNS, effect, seed=1)
    return path


def section(lines, title_start):
    """The rows of the list whose title starts with title_start, up to the next blank line."""
    start = next(k for k, line in enumerate(lines) if line.startswith(title_start))
    rows = []
    for line in lines[start + 2:]:  # title, column head
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_report_puts_the_planted_examples_at_the_top_of_their_lists(planted, capsys):
    res, lines, _ = report(['--scan', planted, '--top', '10'], capsys)
    negative = [int(r[1]) for r in section(lines, '10 most negative')]
    positive = [int(r[1]) for r in section(lines, '10 most positive')]
    assert len(negative) == len(positive) == 10
    assert set(negative[:len(DOWN)]) == set(DOWN)
    assert set(positive[:len(UP)]) == set(UP)
    assert set(np.flatnonzero(res['p_bh'] < 0.01)) == set(DOWN) | set(UP)
    assert body(lines)[4] == f'BH p < 0.01: {len(DOWN) + len(UP)} examples, {len(DOWN)} negative and {len(UP)} positive. ' \
                       'Rank 1 = most negative.'
    head = ' '.join(lines[:lines.index('')])
    assert head.startswith(f'Answer: {len(DOWN) + len(UP)} of {N_TRAIN} tested examples have BH p < 0.01 '
                           f'({len(DOWN)} negative, {len(UP)} positive); split halves correlate at r = ')
    assert 'beyond what no effect gives' in head


def test_default_lists_ten_while_the_noise_check_compares_twenty(planted, capsys):
    """The lists are cut to one screen (LISTED); the noise check keeps its k (TOP), so its figures are those
    of a report with --top 20; --top N sets both."""
    res, lines, _ = report(['--scan', planted], capsys)
    assert len(section(lines, '10 most negative')) == len(section(lines, '10 most positive')) == 10
    assert len(section(lines, 'Most negative among high-margin')) == 10
    assert res['reliability']['overlap_k'] == 20 and len(res['reliability']['extremes']['most negative']['observed']) == 20
    res20, lines20, _ = report(['--scan', planted, '--top', '20'], capsys)
    assert lines[-8:] == lines20[-8:]  # the noise section, line for line
    assert len(section(lines20, '20 most negative')) == 20


def test_header_gives_the_runs_and_the_spread_of_inclusions(planted, capsys):
    res, lines, _ = report(['--scan', planted], capsys)
    counts = res['n_in']
    assert body(lines)[0] == f'Scan {planted} (trainer toy): {RUNS} runs, {N_TRAIN} examples, each run trained on a random half.'
    assert body(lines)[1].startswith(f'Runs that included an example: min {counts.min()}, median {np.median(counts):g}, '
                               f'max {counts.max()}')


def test_high_margin_list_is_the_top_quartile_sorted_by_self_influence(planted, capsys):
    res, lines, _ = report(['--scan', planted], capsys)
    rows = section(lines, 'Most negative among high-margin')
    threshold = np.quantile(res['mean_in'], 0.75)
    high = np.flatnonzero(res['mean_in'] >= threshold)
    want = high[np.argsort(res['self_influence'][high])][:viz_scan.LISTED]  # 10 by default
    assert [int(r[1]) for r in rows] == list(want)
    assert all(float(r[3]) >= round(threshold, 3) for r in rows)


def test_held_out_examples_are_placed_among_all(planted, capsys):
    """One short line per group: index: rank (self-influence, * where BH p < alpha)."""
    res, lines, _ = report(['--scan', planted], capsys)
    easy = next(line for line in lines if line.startswith('Easy:'))
    items = re.findall(r'(\d+): (\d+) \(([-+]\d+\.\d+)(\*?)\)', easy)
    assert [int(i) for i, _, _, _ in items] == HELD['easy']
    index, rank, effect, star = items[0]
    assert rank == f'{res["rank"][150]:.0f}' and int(rank) <= len(DOWN)  # planted: near the top
    assert effect == f'{res["self_influence"][150]:+.3f}' and star == ('*' if res['p_bh'][150] < 0.01 else '')


def test_csv_and_json_hold_the_numbers_printed(planted, capsys, tmp_path):
    res, lines, _ = report(['--scan', planted, '--csv', tmp_path / 'scan.csv', '--json', tmp_path / 'scan.json'],
                           capsys)
    from_csv, doc = written(tmp_path / 'scan.csv', tmp_path / 'scan.json')
    assert len(from_csv) == len(doc['examples']) == N_TRAIN and doc['runs'] == RUNS
    printed = section(lines, '10 most negative') + section(lines, '10 most positive')
    head = lines[next(k for k, line in enumerate(lines) if line.startswith('10 most negative')) + 1].split('  ')
    assert [h.strip() for h in head if h.strip()][3:5] == ['mean margin in', 'mean margin out']  # named as what they hold
    for r in printed:
        row, ex = from_csv[int(r[1])], doc['examples'][int(r[1])]
        assert int(row['index']) == ex['index'] == int(r[1])
        assert [f'{float(row[k]):.0f}' for k in ('rank', 'label')] == r[0:1] + r[2:3]
        assert f'{float(row["mean_in"]):.3f}' == r[3] and f'{float(row["mean_out"]):.3f}' == r[4]
        assert f'{float(row["self_influence"]):+.3f}' == r[5] == f'{ex["self_influence"]:+.3f}'
        assert [f'{float(row["ci_low"]):+.3f},', f'{float(row["ci_high"]):+.3f}]'] == [r[6][1:], r[7]]
        assert viz_io.ptext(float(row['p'])) == r[8] == viz_io.ptext(ex['p'])
        assert viz_io.ptext(float(row['p_bh'])) == r[9] == viz_io.ptext(ex['p_bh'])


def test_trainer_option_reads_its_scan_folder(tmp_path, capsys, monkeypatch):
    make_scan_store(tmp_path / 'runs' / 'madry-scan', n_train=40, runs=12)
    monkeypatch.chdir(tmp_path)
    res, lines, _ = report(['--scan', '--trainer', 'madry'], capsys)
    assert res['path'] == 'runs/madry-scan' and res['runs'] == 12


# ---- refusals and left-out examples ----

def test_experiment_store_is_not_a_scan_and_says_how_to_make_one(tmp_path):
    settings = {**scan_settings(200, arms=('with', 'without')), 'seed_base': 0}
    Store.create(tmp_path / 's', settings, np.zeros(200, np.int64))
    with pytest.raises(SystemExit) as e:
        viz.main(['--scan', str(tmp_path / 's')])
    assert "no 'scan' arm" in str(e.value) and 'python trainer_toy.py --scan' in str(e.value)


def test_scan_store_without_scan_flag_says_to_pass_it(tmp_path):
    make_scan_store(tmp_path / 's', n_train=20, runs=3)
    with pytest.raises(SystemExit) as e:
        viz.main([str(tmp_path / 's')])
    assert 'is a scan store' in str(e.value) and f'python viz.py --scan {tmp_path / "s"}' in str(e.value)


def test_one_run_is_refused_with_a_reason(tmp_path):
    make_scan_store(tmp_path / 's', n_train=20, runs=1)
    with pytest.raises(SystemExit) as e:
        viz.main(['--scan', str(tmp_path / 's')])
    assert '1 finished scan run(s)' in str(e.value) and 'at least 2' in str(e.value)


def test_examples_never_included_or_never_excluded_are_named_and_left_out(tmp_path, capsys):
    runs, n = 5, 100
    make_scan_store(tmp_path / 's', n_train=n, runs=runs)
    counts = sum(included_in(seed_for(r, SCAN_SEED_BASE), n).astype(int) for r in range(runs))
    never_in, never_out = np.flatnonzero(counts == 0), np.flatnonzero(counts == runs)
    assert len(never_in) and len(never_out)  # 5 runs: 2 and 3 of 100 with these seeds
    res, lines, err = report(['--scan', tmp_path / 's'], capsys)
    assert f'{len(never_in)} never included ({", ".join(map(str, never_in))})' in err
    assert f'{len(never_out)} never excluded ({", ".join(map(str, never_out))})' in err
    left = (counts < 2) | (counts > runs - 2)
    np.testing.assert_array_equal(res['tested'], ~left)
    assert np.all(np.isnan(res['rank'][left])) and np.all(np.isnan(res['p_bh'][left]))
    assert sorted(res['rank'][~left]) == list(range(1, (~left).sum() + 1))
    listed = [int(r[1]) for r in section(lines, f'{min(10, (~left).sum())} most negative')]
    assert not set(listed) & set(np.flatnonzero(left))


def test_diverged_run_is_named_and_left_out(tmp_path, capsys):
    store, margins = make_scan_store(tmp_path / 's', n_train=40, runs=12)
    s = seed_for(12, SCAN_SEED_BASE)
    logits = logits_with_margins(margins[0], store.labels)
    logits[7, 3] = np.nan
    store.save_run('scan', 12, s, logits, seconds=1.0, test_acc=0.1)
    res, _, err = report(['--scan', tmp_path / 's'], capsys)
    assert '1 scan run(s) with non-finite logits left out of every statistic: runs 12.' in err
    assert res['runs'] == 12 and res['n_in'].sum() + res['n_out'].sum() == 12 * 40


# ---- is it more than noise: split halves, extremes against no effect, the easy-set rule ----

@pytest.fixture(scope='module')
def effect_and_null(tmp_path_factory):
    """Two scans of 200 examples x 160 runs: every example with a planted effect (sd 0.3), and none."""
    root = tmp_path_factory.mktemp('reliability')
    effect = np.random.default_rng(9).normal(0, 0.3, 200)
    make_scan_store(root / 'effect', 200, 160, effect, seed=4)
    make_scan_store(root / 'null', 200, 160, None, seed=5)
    return root / 'effect', root / 'null'


def test_split_halves_are_the_even_and_odd_runs_estimated_alone(effect_and_null, capsys):
    res, _, _ = report(['--scan', effect_and_null[0]], capsys)
    store = Store(effect_and_null[0])
    logits, run_info = store.load('scan')
    margins = stats.margins(np.asarray(logits), store.labels)
    included = viz_scan.scan_masks(store, run_info['seed'])
    for name, rows in (('even', run_info['run'] % 2 == 0), ('odd', run_info['run'] % 2 == 1)):
        m, inc = margins[rows], included[rows]
        want = [m[inc[:, j], j].mean() - m[~inc[:, j], j].mean() for j in range(200)]
        np.testing.assert_allclose(res[f'self_influence_{name}'], want, rtol=1e-9, atol=1e-12)


def test_split_half_reliability_is_high_with_effects_and_near_zero_without(effect_and_null, capsys):
    r, _, n = report(['--scan', effect_and_null[0]], capsys)[0]['reliability']['split_half']
    assert n == 200 and r > 0.75  # expected about 0.88: effect variance 0.09 against 0.0125 of noise per half
    res, lines, _ = report(['--scan', effect_and_null[1]], capsys)
    r, _, n = res['reliability']['split_half']
    assert abs(r) < 4 / np.sqrt(n)  # no effect: r has sd about 1 / sqrt(n)
    text = ' '.join(lines)
    assert f'Split halves: r = {r:.2f} over {n} tested' in text


def extremes_rows(lines):
    start = lines.index(next(line for line in lines if line.startswith('list ')))
    return [line for line in lines[start + 1:] if line.strip()]


def test_extremes_are_beyond_no_effect_only_where_effects_are_planted(effect_and_null, capsys):
    res, lines, _ = report(['--scan', effect_and_null[0], '--top', '10'], capsys)
    rows = [row for row in extremes_rows(lines) if not row.startswith('most negative high-margin')]
    assert len(rows) == 4 and all(row.endswith('beyond: more extreme than no effect gives') for row in rows)
    e = res['reliability']['extremes']['most negative']
    assert e['observed'][0] == res['self_influence'][res['order'][0]] and len(e['observed']) == 10
    res, lines, _ = report(['--scan', effect_and_null[1], '--top', '10'], capsys)
    rows = extremes_rows(lines)
    assert len(rows) == 6 and sum(row.endswith('within what no effect gives') for row in rows) >= 5
    for e in res['reliability']['extremes'].values():  # the null draws' spread: medians of 200 draws, ordered
        assert np.all(np.diff(np.abs(e['null_median'])) <= 0)


def test_easy_candidates_are_the_printed_high_margin_list(effect_and_null, capsys):
    res, lines, _ = report(['--scan', effect_and_null[0], '--top', '12'], capsys)
    printed = [int(r[1]) for r in section(lines, 'Most negative among high-margin')]
    np.testing.assert_array_equal(viz_scan.easy_candidates(res, 12), printed)
    high = np.flatnonzero(res['high_margin'])
    assert len(high) == 50 and set(printed) <= set(high)
    assert max(res['self_influence'][printed]) <= min(np.delete(res['self_influence'], printed)[
        np.isin(np.delete(np.arange(200), printed), high)])
    two = viz_scan.easy_candidates(res, 12, per_class=2)
    assert len(two) == 12 and max(np.bincount(res['label'][two])) == 2
    ranked = high[np.argsort(res['self_influence'][high])]  # every high-margin example, most negative first
    skipped = [j for j in ranked[:list(ranked).index(two[-1])] if j not in two]
    assert skipped and all(np.sum(res['label'][two] == res['label'][j]) == 2 for j in skipped)  # its label was full
    assert list(two) == [j for j in ranked if j in set(two)]


def test_json_holds_the_reliability(effect_and_null, capsys, tmp_path):
    res, _, _ = report(['--scan', effect_and_null[0], '--json', tmp_path / 's.json', '--csv', tmp_path / 's.csv'],
                       capsys)
    rows, doc = written(tmp_path / 's.csv', tmp_path / 's.json')
    rel = doc['reliability']
    assert rel['split_half_r'] == res['reliability']['split_half'][0]
    assert rel['extremes']['most negative']['observed'] == res['reliability']['extremes']['most negative']['observed'].tolist()
    assert float(rows[7]['self_influence_odd']) == res['self_influence_odd'][7]
