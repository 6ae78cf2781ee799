"""Claims about viz.py, on small stores built with the real Store API and planted effects."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

import viz
import viz_with_without
from conftest import body, report
from store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 100


def make_store(path, held_out, margins_with, margins_without, runs_with=None, runs_without=None, seed=0):
    """A store whose held-out examples have the given margins: (runs, m) per arm, columns in the order
    of the held-out lists. Label logit = margin, one other class at 0, the other eight at -30, so the
    stored margin is the given one (to float16 precision, 1e-12 from the far classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, N_TRAIN)
    settings = dict(trainer='toy', hyp={}, held_out=held_out, n_train=N_TRAIN, data_fingerprint='toy', seed_base=0)
    store = Store.create(path, settings, labels)
    idx = np.concatenate([ix for ix in held_out.values()])
    for arm, margins, runs in (('with', margins_with, runs_with), ('without', margins_without, runs_without)):
        for k, run in enumerate(range(len(margins)) if runs is None else runs):
            logits = rng.normal(0, 2, (N_TRAIN, 10))
            logits[idx] = -30.0
            logits[idx, (labels[idx] + 1) % 10] = 0.0
            logits[idx, labels[idx]] = margins[k]
            store.save_run(arm, run, seed=run, logits=logits.astype(np.float16), seconds=1.0, test_acc=0.9)
    return store


HELD = {'random': list(range(20)), 'easy': list(range(60, 80))}
UP = {2: 1.0, 7: 0.6, 63: 0.8}               # planted positive self-influence, margin units
DOWN = {5: -0.7, 61: -1.0, 70: -0.5, 79: -0.6}  # planted negative


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    """30 seed-matched runs per arm, 40 held-out examples. Each seed shares noise between the arms
    (as paired trainings do) plus independent noise; the planted examples are shifted in `with`."""
    rng = np.random.default_rng(1)
    runs, idx = 30, HELD['random'] + HELD['easy']
    base = rng.uniform(2, 8, len(idx))
    shared = rng.normal(0, 0.4, (runs, len(idx)))
    shift = np.array([{**UP, **DOWN}.get(i, 0.0) for i in idx])
    with_ = base + shift + shared + rng.normal(0, 0.2, (runs, len(idx)))
    without = base + shared + rng.normal(0, 0.2, (runs, len(idx)))
    path = tmp_path_factory.mktemp('planted') / 'store'
    make_store(path, HELD, with_, without)
    return path


def table_rows(lines):
    """{group title: [(index, self-influence text, p text)]} from the faithful table."""
    rows, group = {}, None
    for line in lines:
        if line.endswith('examples:') and not line.startswith(' '):
            group = line
            rows[group] = []
        elif group and line[:1].isdigit():
            f = line.split()
            rows[group].append((int(f[0]), f[3], f[4]))
        elif line.startswith('Average:') and group == 'Easy examples:':
            break
    return rows


@pytest.mark.parametrize('test', ['welch', 'z'])
def test_report_flags_exactly_the_planted_examples_with_their_signs(planted, capsys, test):
    _, lines, _ = report([planted, '--test', test], capsys)
    rows = table_rows(lines)
    assert list(rows) == ['Random examples:', 'Easy examples:']
    flagged = {i: si[0] for g in rows.values() for i, si, _ in g}
    assert flagged == {**{i: '+' for i in UP}, **{i: '-' for i in DOWN}}
    assert [i for i, _, _ in rows['Random examples:']] == [2, 5, 7]  # held-out order, not sorted by p
    assert [i for i, _, _ in rows['Easy examples:']] == [61, 63, 70, 79]


def test_paired_test_finds_the_planted_examples_and_saves_runs(planted, capsys):
    res, lines, _ = report([planted], capsys)
    planted_ix = set(UP) | set(DOWN)
    assert {int(i) for i in res['index'][res['paired_p'] < 0.01]} == planted_ix
    assert np.all(res['correlation'] > 0.5)  # shared seed noise sd 0.4 against independent 0.2
    assert np.all(res['runs_saved'] > 0)
    assert any(line.startswith('Paired design (30 seed-matched runs per arm') for line in lines)


def test_runs_needed_follow_the_paired_test_where_runs_are_seed_matched(planted, capsys):
    res, lines, _ = report([planted], capsys)
    z2 = (sps.norm.ppf(1 - 0.01 / 2) + sps.norm.ppf(0.8)) ** 2
    with np.errstate(divide='ignore'):  # example 64: no effect at all in float16
        welch = z2 * (res['sd_with'] ** 2 + res['sd_without'] ** 2) / res['self_influence'] ** 2  # unrounded
    finite = np.isfinite(welch)
    # n pairs: se^2 = s_d^2 / n = (s1^2 + s2^2) x pairing ratio / n
    np.testing.assert_array_equal(res['runs_needed_paired'][finite],
                                  np.maximum(2, np.ceil(welch * res['pairing_ratio'])[finite]))
    assert np.all(res['runs_needed_paired'][finite] < res['runs_needed'][finite])  # shared seed noise: r 0.8
    # by default each group's median example; every example with --all
    start = next(k for k, line in enumerate(lines) if line.startswith('Runs per arm needed'))
    for line, (name, pos) in zip(lines[start + 1:start + 3], res['groups']):
        median = [np.ceil(np.median(res[key][pos])) for key in ('runs_needed', 'runs_needed_paired')]
        assert line.split() == [name.capitalize() + ':', f'{median[0]:.0f}', f'({median[1]:.0f})']
    _, lines, _ = report([planted, '--all'], capsys)
    start = next(k for k, line in enumerate(lines) if line.startswith('Runs per arm needed'))
    assert lines[start + 1] == ("(index: runs for Welch's t-test; in brackets, seed-matched pairs for the paired "
                                't-test where that differs):')
    assert '61: 8 (2)' in ' '.join(lines[start:])


def test_two_to_four_runs_give_no_run_estimates_and_never_zero(tmp_path, capsys):
    rng = np.random.default_rng(12)
    shared = rng.normal(3, 1, (3, 2))
    make_store(tmp_path / 's', {'random': [0], 'easy': [9]}, shared + rng.normal(0, 0.01, (3, 2)), shared)
    res, lines, _ = report([tmp_path / 's', '--controls', '0'], capsys)
    rows = [line.split() for line in lines if line.startswith(('Random ', 'Easy ')) and line[-1] in '-0123456789']
    assert [r[-2:] for r in rows] == [['-', '-'], ['-', '-']]
    assert '(runs for the same error: not estimated from 3 pairs; at least 10 are needed)' in lines
    assert lines[-1] == ('Runs per arm needed for p < 0.01: not estimated from 3 runs with and 3 without; at least '
                         '10 per arm are needed to plan from their spread.')
    assert not any('-> 0' in line for line in lines)
    assert np.isnan(res['runs_needed']).all() and np.isnan(res['runs_saved']).all()


def test_all_marks_each_p_by_its_own_test(planted, capsys):
    res, lines, _ = report([planted, '--all', '--controls', '0'], capsys)
    start = next(k for k, line in enumerate(lines) if line.startswith('All held-out examples.'))
    assert "* marks p < 0.01 by the test whose p it follows: p, Welch's t-test; paired p, the paired t-test" in lines[start]
    rows = [line for line in lines[start:] if line.strip()[:1].isdigit()]
    for row, j in zip(rows, range(40)):
        assert row[57:63] == f'{res["p"][j]:.4f}' and row[92:100].strip() == f'{res["paired_p"][j]:.4f}'
        assert (row[64] == '*') == (res['p'][j] < 0.01) and (row[101] == '*') == (res['paired_p'][j] < 0.01)


def test_plot_axis_label_fits_in_the_figure(planted, capsys, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, 'close', figures.append)  # keep the figure to measure it
    report([planted, '--plot', tmp_path / 'forest.png'], capsys)
    fig = figures[0]
    fig.canvas.draw()
    label = fig.axes[0].xaxis.label
    box = label.get_window_extent(fig.canvas.get_renderer())
    assert 'control-adjusted' in label.get_text()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0


# The published sample (RECIPE.md), rows kept verbatim: the formatter must reproduce them.
SAMPLE_ROW = '0               4.741   4.074           +0.667                          0.0000'
SAMPLE_EASY_ROW = '45114           10.635  10.881          -0.246                          0.0000'
SAMPLE_AVERAGE = 'Average:                                +0.467'


def test_row_format_reproduces_the_published_sample():
    row = lambda i, w, wo, si, p: viz_with_without.tabbed(i, '', w, wo, '', si, '', '', '', p)
    assert row('0', '4.741', '4.074', '+0.667', '0.0000') == SAMPLE_ROW
    assert row('45114', '10.635', '10.881', '-0.246', '0.0000') == SAMPLE_EASY_ROW
    assert viz_with_without.tabbed('Average:', '', '', '', '+0.467') == SAMPLE_AVERAGE


def test_table_matches_the_published_layout_line_by_line(tmp_path, capsys):
    held = {'random': [0, 1, 2], 'easy': [97, 93, 95]}
    # (5 runs, 6) margins, columns 0, 1, 2, 97, 93, 95, multiples of 1/8 (exact in float16), so every
    # mean is a multiple of 0.025 and prints without rounding ties. Column 1 is the same in both arms.
    with_ = np.array([[4.75, 3.0, 2.0, 10.5, 9.0, 7.0],
                      [4.875, 3.5, 2.25, 10.625, 9.125, 7.5],
                      [5.0, 4.0, 2.0, 10.5, 9.0, 8.0],
                      [4.875, 3.5, 2.25, 10.625, 9.125, 7.5],
                      [4.625, 3.25, 2.125, 10.75, 9.25, 7.0]])
    without = np.array([[4.0, 3.0, 2.5, 10.75, 8.625, 7.25],
                        [4.125, 3.5, 2.75, 10.875, 8.75, 7.5],
                        [4.25, 4.0, 2.625, 10.875, 8.5, 7.75],
                        [4.0, 3.5, 2.5, 11.0, 8.75, 7.0],
                        [4.25, 3.25, 2.75, 10.75, 8.625, 8.0]])
    make_store(tmp_path / 's', held, with_, without)
    _, lines, _ = report([tmp_path / 's'], capsys)
    # Welch p-values (scipy): 3.8e-5, 1, 2.3e-4, 5.4e-3, 1.4e-4, 0.71; 1 and 95 are not listed.
    golden = [
        'Showing examples whose estimated self-influence is statistically-significantly different from zero (p < 0.01):',
        '',
        'Example index      margin               self-influence                  p-value',
        '                with    without',
        '',
        'Random examples:',
        '0               4.825   4.125           +0.700                          0.0000',
        '2               2.125   2.625           -0.500                          0.0002',
        'Average:                                +0.100',
        '',
        'Easy examples:',
        '97              10.600  10.850          -0.250                          0.0054',
        '93              9.100   8.650           +0.450                          0.0001',
        'Average:                                +0.100',
        '',
    ]
    assert body(lines)[:len(golden)] == golden


def test_group_without_significant_examples_says_so(tmp_path, capsys):
    rng = np.random.default_rng(5)
    held = {'random': [0, 1], 'easy': [50, 51]}
    a = rng.normal(3, 1, (6, 4))
    make_store(tmp_path / 's', held, a, a[::-1].copy())  # same values per arm: nothing significant
    _, lines, _ = report([tmp_path / 's'], capsys)
    assert body(lines)[5:8] == ['Random examples:', 'Average:                                (none significant)', '']


def test_summary_gives_the_mean_over_all_examples_of_each_group(planted, capsys):
    res, lines, _ = report([planted], capsys)
    for name, pos in res['groups']:
        g = res['group_summary'][name]
        np.testing.assert_allclose(g['mean'], res['self_influence'][pos].mean(), rtol=1e-12)
        assert g['ci_low'] < g['mean'] < g['ci_high']
    easy = next(line for line in lines if line.startswith('Easy ') and '[' in line)
    g = res['group_summary']['easy']
    assert easy.split()[1:3] == ['20', f'{g["mean"]:+.3f}']
    assert easy.split()[-3:] == ['1', '3', f'{g["significant_mean"]:+.3f}']  # 63 up; 61, 70, 79 down


def test_csv_and_json_hold_the_numbers_of_the_table(planted, capsys, tmp_path):
    _, lines, _ = report([planted, '--csv', tmp_path / 'si.csv', '--json', tmp_path / 'si.json'], capsys)
    shown = {i: (si, p) for g in table_rows(lines).values() for i, si, p in g}
    with open(tmp_path / 'si.csv') as f:
        from_csv = list(csv.DictReader(f))
    with open(tmp_path / 'si.json') as f:
        doc = json.load(f)
    assert len(from_csv) == len(doc['examples']) == 40
    for row, ex in zip(from_csv, doc['examples']):
        assert int(row['index']) == ex['index']
        assert float(row['self_influence']) == ex['self_influence'] and float(row['p']) == ex['p']
        assert (row['significant'] == 'True') == ex['significant'] == (ex['index'] in shown)
        if ex['index'] in shown:
            assert shown[ex['index']] == (f'{ex["self_influence"]:+.3f}', f'{ex["p"]:.4f}')
    assert doc['n_with'] == doc['n_without'] == doc['n_pairs'] == 30 and doc['test'] == 'welch'


def test_all_lists_every_example_with_its_interval_and_mark(planted, capsys):
    res, lines, _ = report([planted, '--all'], capsys)
    start = lines.index(next(line for line in lines if line.startswith('All held-out examples.')))
    end = lines.index(next(line for line in lines if line.startswith('All held-out examples, control-adjusted')))
    rows = [line for line in lines[start:end] if line.strip()[:1].isdigit()]
    assert len(rows) == 40
    for row, j in zip(rows, range(40)):
        f = row.split()
        assert int(f[0]) == res['index'][j]
        assert f[4:6] == [f'[{res["ci_low"][j]:+.3f},', f'{res["ci_high"][j]:+.3f}]']
        assert (f[7] == '*') == bool(res['significant'][j])
    assert all(res['p_holm'] >= res['p_bh']) and all(res['p_bh'] >= res['p'])


def test_plot_writes_a_png(planted, capsys, tmp_path):
    report([planted, '--plot', tmp_path / 'forest.png'], capsys)
    with open(tmp_path / 'forest.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_matplotlib_is_imported_only_for_plot(planted):
    code = f'import sys, viz; viz.main([{str(planted)!r}]); print("matplotlib" in sys.modules, file=sys.stderr)'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == 'False'


def test_trainer_option_reads_its_runs_folder(tmp_path, capsys, monkeypatch):
    a = np.random.default_rng(0).normal(0, 1, (3, 2))
    make_store(tmp_path / 'runs' / 'madry', {'random': [0], 'easy': [9]}, a, a + 1)
    monkeypatch.chdir(tmp_path)
    res, lines, _ = report(['--trainer', 'madry'], capsys)
    assert res['path'] == 'runs/madry' and res['n_with'] == 3


def test_missing_store_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        viz.main([str(tmp_path / 'nowhere')])
    assert 'no run store' in str(e.value) and 'Run a trainer script first' in str(e.value)


def test_empty_store_is_refused_with_a_reason(tmp_path, capsys):
    make_store(tmp_path / 's', {'random': [0], 'easy': [9]}, np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(SystemExit) as e:
        viz.main([str(tmp_path / 's')])
    assert '0 usable run(s) with and 0 without' in str(e.value) and 'at least 2' in str(e.value)


def test_unequal_arms_are_allowed_and_said(tmp_path, capsys):
    rng = np.random.default_rng(2)
    make_store(tmp_path / 's', {'random': [0], 'easy': [9]}, rng.normal(0, 1, (5, 2)), rng.normal(0, 1, (3, 2)))
    res, lines, err = report([tmp_path / 's'], capsys)
    assert 'different numbers of runs (with 5, without 3)' in err
    assert (res['n_with'], res['n_without'], res['n_pairs']) == (5, 3, 3)


def test_no_seed_matched_runs_means_no_paired_test(tmp_path, capsys):
    rng = np.random.default_rng(3)
    make_store(tmp_path / 's', {'random': [0], 'easy': [9]}, rng.normal(0, 1, (4, 2)), rng.normal(0, 1, (4, 2)),
               runs_with=range(4), runs_without=range(4, 8))
    res, lines, _ = report([tmp_path / 's'], capsys)
    assert 'paired_p' not in res
    assert 'Paired design: 0 seed-matched run(s) in both arms, at least 2 needed; no paired test.' in lines


def test_nan_runs_are_named_and_left_out(tmp_path, capsys):
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, (6, 2)), rng.normal(0, 1, (6, 2))
    a[3, 1] = np.nan  # run 3 of `with`, example 9
    make_store(tmp_path / 's', {'random': [0], 'easy': [9]}, a, b)
    res, lines, err = report([tmp_path / 's'], capsys)
    assert 'with arm: 1 run(s) with non-finite logits' in err and 'run 3 at example(s) 9' in err
    assert res['n_with'] == 5 and res['n_pairs'] == 5
    np.testing.assert_allclose(res['mean_with'], np.delete(a, 3, 0).mean(0), atol=2e-3)  # float16 storage


def test_store_being_written_is_said_and_analysed(planted, capsys):
    store = Store(planted)
    assert store.claim('with', 999)  # this live process is training run 999
    try:
        res, _, err = report([planted], capsys)
    finally:
        store.release('with', 999)
    assert 'still being written (1 run(s) in progress)' in err and res['n_with'] == 30


# ---- controls (more in test_controls.py) ----

GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'viz_default.txt')


def test_default_report_is_unchanged_above_the_controls(planted, capsys):
    """tests/golden/viz_default.txt is the --controls 0 report of the planted store (the report printed before
    controls existed, under its headline): --controls 0 prints it byte for byte, and the default report
    prints the same below its own headline, then the controls."""
    with open(GOLDEN) as f:
        golden = f.read().replace('{store}', str(planted))
    viz.main([str(planted), '--controls', '0'])
    assert capsys.readouterr().out == golden
    viz.main([str(planted)])
    out, below = capsys.readouterr().out, golden.split('\n\n', 1)[1]
    assert out.split('\n\n', 1)[1].startswith(below) and out.split('\n\n', 1)[1][len(below):].startswith('\nControls (method: docs/analysis.md): ')


def test_the_headline_is_the_control_adjusted_group_effect_in_words(planted, capsys, tmp_path):
    """The report's first lines give each group's control-adjusted mean with its CI and p, the same figures
    as the controls' group table and the JSON's 'headline'; with --controls 0 the raw shift, said to be so."""
    res, lines, _ = report([planted, '--json', tmp_path / 'h.json'], capsys)
    assert lines[0].startswith('Answer (95% CI, p; significant if p < 0.01; paired t-test over 30 seed-matched runs')
    with open(tmp_path / 'h.json') as f:
        doc = json.load(f)['headline']
    for k, (name, g) in enumerate(res['group_summary'].items()):
        words = 'not significant: no evidence' if g['control_adjusted_p'] >= 0.01 else 'significant: '
        assert lines[1 + k] == (f'  {name} examples: {g["control_adjusted"]:+.3f} [{g["control_adjusted_ci_low"]:+.3f}, '
                                f'{g["control_adjusted_ci_high"]:+.3f}], p {g["control_adjusted_p"]:.4f}, control-adjusted; '
                                ) + lines[1 + k].split('control-adjusted; ')[1]
        assert words in lines[1 + k]
        assert doc['groups'][k]['group'] == name and doc['groups'][k]['control_adjusted']
        assert doc['groups'][k]['estimate'] == pytest.approx(g['control_adjusted'])
    raw, lines, _ = report([planted, '--controls', '0'], capsys)
    assert all('raw shift, NOT control-adjusted' in line for line in lines[1:3]) and '--controls 0' in lines[3]
    assert lines[1].startswith(f'  random examples: {raw["group_summary"]["random"]["mean"]:+.3f} ')


def test_few_candidates_are_said_and_used(planted, capsys):
    res, _, err = report([planted], capsys)  # 100 examples in 10 labels: about 6 candidates per example
    assert 'fewer than 50 controls' in err
    store = Store(planted)
    for i, c in zip(res['index'], res['controls']):
        candidates = (store.labels == store.labels[i]) & ~np.isin(np.arange(N_TRAIN), res['index'])
        assert len(c) == candidates.sum() and candidates[c].all()


def test_controls_option_is_checked(planted):
    with pytest.raises(SystemExit):
        viz.main([str(planted), '--controls', '-1'])


def test_help_is_one_screen_of_options_and_two_examples():
    out = subprocess.run([sys.executable, 'viz.py', '--help'], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) <= 25 and max(map(len, lines)) <= 120
    assert sum(line.startswith('  python viz.py ') for line in lines) == 2
    for option in ('--alpha', '--controls', '--scan', '--plot', '--seed-folders'):
        assert sum(line.lstrip().startswith(option) for line in lines) == 1, option


@pytest.mark.parametrize('argv', [['--scan', '--controls', '5'], ['--scan', '--all'], ['--scan', '--test', 'z'],
                                  ['--top', '5']])
def test_options_of_another_report_are_refused(planted, argv, capsys):
    with pytest.raises(SystemExit) as e:
        viz.main([str(planted), *argv])
    assert e.value.code == 2 and 'belong' in capsys.readouterr().err


@pytest.mark.parametrize('argv', [['--plot', 'p.txt'], ['--alpha', '2'], ['--no-such-option'], ['--controls', 'x']])
def test_a_mistake_in_the_options_is_one_line_and_exit_2(planted, capsys, argv):
    """Refused before anything is computed or printed: nothing on stdout, one line on stderr."""
    with pytest.raises(SystemExit) as e:
        viz.main([str(planted), *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ''
    assert len(err.strip().splitlines()) == 1 and err.startswith('viz: ')
    if argv[0] == '--plot':
        assert '.png' in err and '.pdf' in err and '.svg' in err
