"""viz.py: the self-influence reports of a run store (python viz.py --help).

Self-influence of example i: mean margin over the runs that trained on it - mean margin over the runs
that did not (margin: the correct class's logit minus logsumexp of the other nine). The store's arms pick
the report: `with`/`without` the with/without report (this file), `a`/`b` the factorial report
(viz_factorial.py), `scan` the scan's (viz_scan.py, with --scan).

    python viz.py                          # runs/airbench: the original's table, then the full report
    python viz.py --trainer madry          # runs/madry
    python viz.py runs/whatever --test z   # the original's normal p-value
    python viz.py --all --csv si.csv --json si.json --plot si.png
    python viz.py --controls 0             # no controls: exactly the report printed before controls existed
    python viz.py runs/digits-factorial    # a factorial store
    python viz.py --scan                   # runs/airbench-scan: every example's self-influence

Controls: for each held-out example, --controls K (default 50) training examples never held out, with
its label and the nearest mean margin over both arms; their shift, read at the example's own mean margin
from the line through its controls (viz_controls.py), is what the removal does to an example like it, and
the control-adjusted self-influence is shift - control shift. Runs with a non-finite logit at a held-out
example are left out and named. Notes go to stderr, the report to stdout. What each report estimates:
docs/analysis.md and docs/controls.md; its cost: docs/speed.md.
"""
import argparse
import sys

import numpy as np

import stats
import viz_controls
import viz_factorial
import viz_scan
from store import Store, StoreError
from viz_io import (LEVEL, drop_nonfinite, group_title, held_out_groups, listed, mean_margins, note, note_progress,
                    plot_forest, positions_of, read_margins, rows_of, save_csv, save_json)

POWER = 0.8     # for "runs per arm needed": chance of reaching p < alpha if the observed effect is real
MIN_RUNS = 10   # runs per arm (or seed-matched pairs) below which no run count is planned from their spread


def open_store(path):
    """Store and its held-out groups: [(name, indices (k,) int64)], in the store's order."""
    store = Store(path)
    if 'scan' in store.arms:
        raise StoreError(f'{path} is a scan store (arms: {", ".join(store.arms)}), not the with/without '
                         f'experiment. Analyse it with: python viz.py --scan {path}')
    if 'with' not in store.arms:
        raise StoreError(f'{path} is not a with/without store (arms: {", ".join(store.arms)}). '
                         f'Report it with: python viz.py {path}')
    groups = held_out_groups(store)
    note_progress(store)
    return store, groups


############################################
#                analysis                  #
############################################

def analyse(store, groups, test='welch', alpha=0.01, controls=viz_controls.CONTROLS):
    """Every statistic of the report. -> dict: per-example (m,) arrays (index, group, mean_with, ...),
    'groups' [(name, positions)], per-group summaries, counts, the paired results if any and, with
    controls > 0, the control-adjusted results (see analyse_controls)."""
    idx = np.concatenate([ix for _, ix in groups])
    a, info_with = drop_nonfinite('with', *read_margins(store, 'with', idx), idx)
    b, info_without = drop_nonfinite('without', *read_margins(store, 'without', idx), idx)
    if len(a) < 2 or len(b) < 2:
        raise StoreError(f'{store.path} holds {len(a)} usable run(s) with and {len(b)} without; '
                         'a two-sample test needs at least 2 in each arm. Let the trainer finish more runs.')
    if len(a) != len(b):
        note(f'the arms hold different numbers of runs (with {len(a)}, without {len(b)}); '
             'Welch\'s test allows it, pairing uses the seed-matched runs only.')
    two_sample = stats.welch_test if test == 'welch' else stats.z_test
    res = two_sample(a, b)
    res['self_influence'] = res.pop('diff')
    res['ci_low'], res['ci_high'] = stats.confidence_interval(res['self_influence'], res['se'], res['df'], LEVEL)
    res['p_holm'] = stats.holm(res['p'])
    res['p_bh'] = stats.benjamini_hochberg(res['p'])
    res['significant'] = res['p'] < alpha
    res['sd_with'], res['sd_without'] = a.std(0, ddof=1), b.std(0, ddof=1)
    res['runs_needed'] = stats.runs_needed(res['self_influence'], res['sd_with'], res['sd_without'], alpha, POWER)
    if min(len(a), len(b)) < MIN_RUNS:  # a spread from 2-9 runs is too uncertain to plan from
        res['runs_needed'] = np.full(len(idx), np.nan)
    res['index'] = idx
    res['group'] = np.array([name for name, ix in groups for _ in ix])

    positions = positions_of(groups)
    meta = dict(path=store.path, trainer=store.settings.get('trainer', '?'), test=test, alpha=alpha,
                n_with=len(a), n_without=len(b), groups=positions)
    # Group mean over all its examples: test the per-run average margin of the group, so that the
    # correlation between examples within one run is accounted for. The CI is for these k examples.
    meta['group_summary'] = {}
    for name, pos in positions:
        g = two_sample(a[:, pos].mean(1, keepdims=True), b[:, pos].mean(1, keepdims=True))
        low, high = stats.confidence_interval(g['diff'], g['se'], g['df'], LEVEL)
        sig = res['significant'][pos]
        si = res['self_influence'][pos]
        meta['group_summary'][name] = dict(
            examples=len(pos), mean=g['diff'][0], ci_low=low[0], ci_high=high[0], p=g['p'][0],
            significant_positive=int((sig & (si > 0)).sum()), significant_negative=int((sig & (si < 0)).sum()),
            significant_mean=si[sig].mean() if sig.any() else np.nan)

    # Seed-matched pairs: run k of both arms is trained with the same seed.
    _, ia, ib = np.intersect1d(info_with['seed'], info_without['seed'], return_indices=True)
    meta['n_pairs'] = len(ia)
    if len(ia) >= 2:
        pa, pb = a[ia], b[ib]
        paired = stats.paired_test(pa, pb)
        res['paired_self_influence'], res['paired_p'] = paired['diff'], paired['p']
        res['paired_ci_low'], res['paired_ci_high'] = stats.confidence_interval(
            paired['diff'], paired['se'], paired['df'], LEVEL)
        res['correlation'] = stats.paired_correlation(pa, pb)
        res['pairing_ratio'] = stats.pairing_ratio(pa, pb)
        res['runs_saved'] = len(ia) * (1 - res['pairing_ratio'])  # per arm, at the same standard error
        # Pairs for the paired t-test: n pairs give se^2 = s_d^2 / n, which is the unpaired formula with a
        # spread of s_d / sqrt(2) in each arm.
        sd_half = (pa - pb).std(0, ddof=1) / np.sqrt(2)
        res['runs_needed_paired'] = stats.runs_needed(paired['diff'], sd_half, sd_half, alpha, POWER)
        if len(ia) < MIN_RUNS:
            for key in ('runs_saved', 'runs_needed_paired'):
                res[key] = np.full(len(idx), np.nan)
    res.update(meta)
    res['control_k'] = controls
    if controls:
        analyse_controls(store, res, a, b, info_with, info_without)
    return res


def analyse_controls(store, res, a, b, info_with, info_without):
    """Controls of each held-out example (viz_controls): up to res['control_k'] training examples never held
    out, with its label and the nearest mean margin over both arms (one streamed pass over each arm, then
    only the controls' columns); a run's control value is the line through their margins at the example's
    mean margin. Tested on per-run differences example - control value: paired t-test over seed-matched
    runs when there are 2 or more, Welch otherwise. Adds to res what viz_controls.analyse lists.

    Why both arms: a control's mean margin in `with` shares its noise with its shift with - without, so
    controls and line weights chosen on it lean the shift (by about the noise variance of a mean margin /
    the controls' margin variance x the gap: -0.011 on the planted store of docs/controls.md). The
    mean of both arms' means shares none with it where the arms hold as many runs of equal spread."""
    mean_with = mean_margins(store, 'with', info_with['run'])  # (n_train,)
    mean_without = mean_margins(store, 'without', info_without['run'])
    matched = viz_controls.match(store, (mean_with + mean_without) / 2, res['index'], res['mean_with'],
                                 res['control_k'], shift=mean_with - mean_without)
    ca = viz_controls.per_run_values(store, 'with', matched, info_with['run'])  # (n_with, m)
    cb = viz_controls.per_run_values(store, 'without', matched, info_without['run'])
    has = np.array([len(c) > 0 for c in matched['controls']])
    # A run diverged at a control but not at a held-out example: left out of the control analysis only.
    ok_a, ok_b = np.isfinite(ca[:, has]).all(1), np.isfinite(cb[:, has]).all(1)
    for arm, ok, run_info in (('with', ok_a, info_with), ('without', ok_b, info_without)):
        if not ok.all():
            note(f'{arm} arm: {(~ok).sum()} run(s) with non-finite logits at a control example, left out of the '
                 f'control analysis: runs {listed(run_info["run"][~ok].tolist())}.')
    a, b, ca, cb = a[ok_a], b[ok_b], ca[ok_a], cb[ok_b]
    _, pa, pb = np.intersect1d(info_with['seed'][ok_a], info_without['seed'][ok_b], return_indices=True)
    if len(pa) >= 2:
        compare = lambda x, y: stats.paired_test(x[pa], y[pb])
        res['control_test'], res['control_runs'] = 'paired', len(pa)
    elif len(a) >= 2 and len(b) >= 2:
        compare = stats.welch_test
        res['control_test'], res['control_runs'] = 'welch', (len(a), len(b))
    else:
        res['control_skipped'] = (f'{len(a)} run(s) with and {len(b)} without are left once runs with '
                                  'non-finite control margins are out; at least 2 per arm are needed.')
        return
    viz_controls.analyse(res, compare, a, b, ca, cb, matched)


EXAMPLE_COLUMNS = ['group', 'index', 'mean_with', 'mean_without', 'self_influence', 'se', 'df', 'stat', 'p',
                   'ci_low', 'ci_high', 'p_holm', 'p_bh', 'significant', 'sd_with', 'sd_without', 'runs_needed',
                   'paired_self_influence', 'paired_p', 'paired_ci_low', 'paired_ci_high', 'correlation',
                   'pairing_ratio', 'runs_saved', 'runs_needed_paired', *viz_controls.COLUMNS]


############################################
#                 report                   #
############################################

def tabbed(*fields):
    """The original printed tab-separated fields; expanding the tabs to 8-column stops gives the
    published layout in spaces. Empty fields are extra tabs."""
    return '\t'.join(fields).expandtabs(8)


def faithful_table(res):
    """The original's report, line by line, in its published layout."""
    lines = [f'Showing examples whose estimated self-influence is statistically-significantly different '
             f'from zero (p < {res["alpha"]:g}):',
             '',
             'Example index      margin               self-influence                  p-value',
             '                with    without']
    for name, pos in res['groups']:
        lines += ['', group_title(name)]
        listed = [j for j in pos if res['significant'][j]]
        for j in listed:
            lines.append(tabbed(str(res['index'][j]), '', f'{res["mean_with"][j]:.3f}', f'{res["mean_without"][j]:.3f}',
                                '', f'{res["self_influence"][j]:+.3f}', '', '', '', f'{res["p"][j]:.4f}'))
        average = f'{np.mean(res["self_influence"][listed]):+.3f}' if listed else '(none significant)'
        lines.append(tabbed('Average:', '', '', '', average))
    return lines


def describe_test(res):
    return ("Welch's t-test (Welch-Satterthwaite df)" if res['test'] == 'welch'
            else "z-test (Welch's statistic, normal p-value)")


def summary(res):
    """After the table: all-example group means with CIs, paired design, runs needed."""
    pct = f'{LEVEL:.0%}'
    lines = ['', f'Store {res["path"]} (trainer {res["trainer"]}): {res["n_with"]} runs with, '
                 f'{res["n_without"]} without; {describe_test(res)}, alpha {res["alpha"]:g}.',
             '', 'Mean self-influence over ALL examples of each group (the table above averages only the listed ones):',
             f'{"group":<12}{"examples":>8}  {"mean":>7}  {pct + " CI":<18}  {"sig. +":>6}  {"sig. -":>6}  '
             f'{"significant-only mean":>21}']
    for name, g in res['group_summary'].items():
        ci = f'[{g["ci_low"]:+.3f}, {g["ci_high"]:+.3f}]'
        sig_mean = f'{g["significant_mean"]:+.3f}' if np.isfinite(g['significant_mean']) else 'none'
        lines.append(f'{name.capitalize():<12}{g["examples"]:>8}  {g["mean"]:>+7.3f}  {ci:<18}  '
                     f'{g["significant_positive"]:>6}  {g["significant_negative"]:>6}  {sig_mean:>21}')

    return lines + paired_table(res) + runs_needed_lines(res)


def paired_table(res):
    """The paired design: significant counts by the paired t-test, and the pairs that give the standard
    error of the unpaired design (only from MIN_RUNS pairs on: from fewer, the spread says too little)."""
    n = res['n_pairs']
    if 'paired_p' not in res:
        return ['', f'Paired design: {n} seed-matched run(s) in both arms, at least 2 needed; no paired test.']
    lines = ['', f'Paired design ({n} seed-matched runs per arm; paired t-test of with - without, p < {res["alpha"]:g}):',
             f'{"group":<12}{"sig. +":>6}  {"sig. -":>6}  {"median r":>8}  {"runs for the same error":>23}  '
             f'{"saved per arm":>13}']
    for name, pos in res['groups']:
        sig = res['paired_p'][pos] < res['alpha']
        si = res['paired_self_influence'][pos]
        same, saved = '-', '-'
        if n >= MIN_RUNS:
            fewer = max(2, round(n * np.nanmedian(res['pairing_ratio'][pos])))  # a paired test needs 2 pairs
            same, saved = f'{n} -> {fewer}', f'{n - fewer}'
        lines.append(f'{name.capitalize():<12}{int((sig & (si > 0)).sum()):>6}  {int((sig & (si < 0)).sum()):>6}  '
                     f'{np.nanmedian(res["correlation"][pos]):>8.2f}  {same:>23}  {saved:>13}')
    lines.append('(r: correlation of the two arms\' margins over matched seeds; "runs for the same error": '
                 'pairs giving the standard error of the unpaired design, median over the group)')
    if n < MIN_RUNS:
        lines.append(f'(runs for the same error: not estimated from {n} pairs; at least {MIN_RUNS} are needed)')
    return lines


def runs_needed_lines(res):
    """Runs per arm each example needs for the report's test at POWER, and, where runs are seed-matched and
    the number differs, the pairs the paired t-test needs."""
    head = (f'Runs per arm needed for p < {res["alpha"]:g} with {POWER:.0%} power at the observed effect and '
            f'spread\n(index: runs for {describe_test(res).split(" (")[0]}')
    paired = 'runs_needed_paired' in res and np.isfinite(res['runs_needed_paired']).any()
    if np.isnan(res['runs_needed']).all():
        return ['', f'Runs per arm needed for p < {res["alpha"]:g}: not estimated from {res["n_with"]} runs with and '
                    f'{res["n_without"]} without; at least {MIN_RUNS} per arm are needed to plan from their spread.']
    lines = ['', *(head + ('; in brackets, seed-matched pairs for the paired t-test where that differs):'
                           if paired else '):')).split('\n')]
    for name, pos in res['groups']:
        items = [f'{res["index"][j]}: {runs_text(res["runs_needed"][j])}' for j in pos]
        if paired:
            items = [item + (f' ({runs_text(q)})' if runs_text(q) != runs_text(n) else '')
                     for item, n, q in zip(items, res['runs_needed'][pos], res['runs_needed_paired'][pos])]
        lines += wrap_items(items, first=f'{name.capitalize() + ":":<8}', width=100)
    return lines


def wrap_items(items, first, width):
    """Join items with two spaces into lines of at most `width` characters, never splitting an item."""
    lines, line = [], first
    for item in items:
        if len(line) + len(item) > width and line.strip():
            lines.append(line.rstrip())
            line = ' ' * len(first)
        line += item + '  '
    return lines + [line.rstrip()]


def runs_text(n):
    """Runs per arm as printed: beyond a million (an effect near zero) the number says nothing more; NaN
    (not estimated: too few runs, or no effect and no spread) is '-'."""
    return '-' if np.isnan(n) else 'never' if not np.isfinite(n) else '>1e6' if n > 1e6 else f'{n:.0f}'


def all_examples(res):
    """--all: every held-out example with its CI, adjusted p-values and a significance mark."""
    pct = f'{LEVEL:.0%}'
    paired = 'paired_p' in res
    head = (f'{"index":>6}  {"with":>7}  {"without":>7}  {"self-infl":>9}  {pct + " CI":<18}  {"p":>6}    '
            f'{"Holm":>6}  {"BH":>6}  {"runs":>7}')
    if paired:
        head += f'  {"paired p":>8}    {"r":>5}'
    marks = (f'* marks p < {res["alpha"]:g} by the test whose p it follows: p, {describe_test(res).split(" (")[0]}'
             + ('; paired p, the paired t-test over seed-matched runs' if paired else ''))
    lines = ['', f'All held-out examples. {marks}. Holm and BH: p adjusted over all {len(res["index"])} examples; '
                 f'runs: runs per arm needed at {POWER:.0%} power' + ('; r: over seed-matched runs.' if paired else '.'),
             head]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        for j in pos:
            ci = f'[{res["ci_low"][j]:+.3f}, {res["ci_high"][j]:+.3f}]'
            mark = '*' if res['significant'][j] else ' '
            line = (f'{res["index"][j]:>6}  {res["mean_with"][j]:>7.3f}  {res["mean_without"][j]:>7.3f}  '
                    f'{res["self_influence"][j]:>+9.3f}  {ci:<18}  {res["p"][j]:>6.4f} {mark}  '
                    f'{res["p_holm"][j]:>6.4f}  {res["p_bh"][j]:>6.4f}  {runs_text(res["runs_needed"][j]):>7}')
            if paired:
                star = '*' if res['paired_p'][j] < res['alpha'] else ' '
                line += f'  {res["paired_p"][j]:>8.4f} {star}  {res["correlation"][j]:>5.2f}'
            lines.append(line)
    return lines


def controls_section(res):
    """Below the summary: what the held-out examples' controls shifted, and the control-adjusted
    self-influence, per group and per example (those with control-adjusted p < alpha)."""
    if 'control_adjusted' not in res:
        return viz_controls.section(res, '')
    test = (f'paired t-test over {res["control_runs"]} seed-matched runs' if res['control_test'] == 'paired'
            else "Welch's t-test, {} runs with and {} without".format(*res['control_runs']))
    return viz_controls.section(res, viz_controls.describe(res) + (
        ' Both arms train on them, so their shift with - without is no self-influence: it is what removing the '
        'held-out set does to an example like it (cross-influence). Control-adjusted self-influence = shift - '
        f'control shift, tested on the per-run difference example - the line through its controls ({test}, {LEVEL:.0%} CI):'))


def write_csv(res, path):
    rows = rows_of(res, EXAMPLE_COLUMNS)
    save_csv(rows, list(rows[0]), path)


def write_json(res, path):
    """Settings of the analysis, group summaries and per-example rows (with each example's controls)."""
    doc = dict(store=res['path'], trainer=res['trainer'], test=res['test'], alpha=res['alpha'], level=LEVEL,
               power=POWER, n_with=res['n_with'], n_without=res['n_without'], n_pairs=res['n_pairs'],
               controls_per_example=res['control_k'], control_test=res.get('control_test'),
               groups=res['group_summary'])
    save_json(doc, viz_controls.add_to_json_rows(res, rows_of(res, EXAMPLE_COLUMNS)), path)


def write_plot(res, path):
    """Forest plot of self-influence, with the control-adjusted estimate as a second marker per row."""
    plot_forest(res, path, 'self-influence = mean margin with - without; diamonds: control-adjusted',
                f'{res["trainer"]}: {res["n_with"]} runs with, {res["n_without"]} without')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('store', nargs='?', help='store folder (default: runs/<trainer>, runs/<trainer>-scan with --scan)')
    parser.add_argument('--trainer', default='airbench', help='reads runs/<trainer> when no store is given')
    parser.add_argument('--test', choices=('welch', 'z'), default='welch',
                        help="welch: Welch's t-test; z: the original's normal p-value")
    parser.add_argument('--alpha', type=float, default=0.01,
                        help='significance threshold of the tables (with --scan: of BH p)')
    parser.add_argument('--all', action='store_true', help='also list every held-out example with its CI '
                                                           '(factorial: and every cross-influence passing BH)')
    parser.add_argument('--csv', metavar='FILE', help='write per-example statistics as CSV')
    parser.add_argument('--json', metavar='FILE', help='write per-example statistics and group summaries as JSON')
    parser.add_argument('--plot', metavar='FILE.png', help='write a forest plot of self-influence with CIs')
    parser.add_argument('--controls', type=int, metavar='K',
                        help=f'controls per held-out example (default {viz_controls.CONTROLS}; 0: none, and no pass '
                             'over all examples)')
    parser.add_argument('--scan', action='store_true',
                        help='report a scan store (trainer --scan): the self-influence of every training example')
    parser.add_argument('--top', type=int, help='with --scan: examples per list (default 20); factorial store: '
                                                 'cross-influences listed (default 10)')
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f'--alpha {args.alpha}: expected a probability between 0 and 1, e.g. 0.01')
    if args.scan and (args.all or args.plot or args.test != 'welch' or args.controls is not None):
        parser.error('--all, --plot, --controls and --test z belong to the with/without and factorial reports; '
                     'with --scan use --top, --alpha, --csv and --json')
    if args.controls is not None and args.controls < 0:
        parser.error(f'--controls {args.controls}: expected a number of controls per example, 0 or more')
    if args.controls is None:
        args.controls = viz_controls.CONTROLS
    if args.top is not None and args.top < 1:
        parser.error(f'--top {args.top}: expected a number of examples, 1 or more')

    if args.scan:
        path = args.store or f'runs/{args.trainer}-scan'
        try:
            res = viz_scan.analyse(viz_scan.open_scan(path), args.alpha, args.top or 20)
        except StoreError as e:
            sys.exit(f'viz: {e}')
        print('\n'.join(viz_scan.report(res, args.top or 20)))
        writers = ((viz_scan.write_csv, args.csv), (viz_scan.write_json, args.json))
    else:
        path = args.store or f'runs/{args.trainer}'
        try:
            factorial = viz_factorial.is_factorial(Store(path))
            if factorial and args.test != 'welch':
                parser.error('--test z belongs to the with/without report; the factorial report uses paired t-tests')
            if not factorial and args.top is not None:
                parser.error('--top belongs to the scan (--scan) and factorial reports; the with/without report '
                             'lists every held-out example (--all)')
            if factorial:
                res = viz_factorial.analyse_factorial(*viz_factorial.open_factorial(path), args.alpha, args.controls)
            else:
                res = analyse(*open_store(path), args.test, args.alpha, args.controls)
        except StoreError as e:
            sys.exit(f'viz: {e}')
        if factorial:
            lines = viz_factorial.report(res, args.top or viz_factorial.TOP, args.all)
            writers = ((viz_factorial.write_csv, args.csv), (viz_factorial.write_json, args.json),
                       (viz_factorial.write_plot, args.plot))
        else:
            lines = (faithful_table(res) + summary(res) + controls_section(res)
                     + (all_examples(res) + viz_controls.all_rows(res) if args.all else []))
            writers = ((write_csv, args.csv), (write_json, args.json), (write_plot, args.plot))
        print('\n'.join(lines))
    for write, out in writers:
        if out:
            try:
                write(res, out)
            except OSError as e:
                sys.exit(f'viz: could not write {out} ({e}); the report above is complete. '
                         'Pass a path in a writable folder.')
    return res

if __name__ == '__main__':
    main()
