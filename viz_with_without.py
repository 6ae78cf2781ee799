"""viz_with_without.py: the report of a with/without store (arms `with` and `without`; python viz.py PATH).

    python viz.py                          # runs/airbench, Welch t-test, p < 0.01, 50 controls per example
    python viz.py runs/whatever --test z   # the original's normal p-value
    python viz.py --all --csv si.csv --json si.json --plot si.png
    python viz.py --controls 0             # no controls: the raw shift, said so in the answer

Self-influence of held-out example i = mean margin over `with` runs - mean margin over `without` runs, tested
per example with Welch's t-test (or the original's z-test).

The report: first the answer (per group, the control-adjusted effect with its CI and p, in words), then the
original's table, in its published layout (significant examples only, per group, with
the selection-biased average of the listed ones); then what an honest reading needs: the mean over all
examples of each group with its 95% CI, counts of significant positive/negative examples, the paired test
on seed-matched runs, and the runs per arm each example needs. Everything up to here is the report printed
before controls were added (tests/golden/viz_default.txt, under its --controls 0 answer). Then the controls (viz_controls.py): removing all
held-out examples at once can move every example, not only the removed ones (cross-influence). For each
held-out example, up to K training examples never held out, with its label and the nearest mean margin over
both arms: both arms train on them, so their shift (the control shift) is what the removal does to an
example like it. Control-adjusted self-influence = shift - control shift, tested on the per-run difference
example - control value (paired by seed; Welch when no runs are seed-matched), per group and per example.
--all lists every held-out example with its CI, Holm and Benjamini-Hochberg adjusted p-values (over all
held-out examples), raw and control-adjusted.

How: margins are read from the margins kept beside each arm's pack (store/margins.py: computed once per
pack, float64, (runs, n_train), with each example's sum over all runs), a chunk of runs at a time: the
held-out columns (viz_io.read_margins), every example's mean margin from the kept sums (viz_io.mean_margins)
and the controls' columns of both arms. Runs with a non-finite logit at a held-out example (a diverged net)
are left out of every statistic, with a note on stderr naming the runs and examples.
"""
import numpy as np

import stats
import viz_controls
from store import StoreError
from viz_io import (LEVEL, controls_intro, drop_nonfinite, example_head, example_line, group_summary, group_title,
                    headline, held_out_groups, listed, mean_margins, note, note_progress, per_group, positions_of,
                    read_margins, wrap_items)

POWER = 0.8     # for "runs per arm needed": chance of reaching p < alpha if the observed effect is real
MIN_RUNS = 10   # runs per arm (or seed-matched pairs) below which no run count is planned from their spread


############################################
#                analysis                  #
############################################

def check(store):
    """Refuse a store of another design, naming the command that reports it."""
    if 'scan' in store.arms:
        raise StoreError(f'{store.path} is a scan store (arms: {", ".join(store.arms)}), not the with/without '
                         f'experiment. Analyse it with: python viz.py --scan {store.path}')
    if 'with' not in store.arms:
        raise StoreError(f'{store.path} is not a with/without store (arms: {", ".join(store.arms)}). '
                         f'Report it with: python viz.py {store.path}')


def analyse(store, test='welch', alpha=0.01, controls=viz_controls.CONTROLS):
    """Every statistic of the report, with notes on stderr about the store's progress. -> dict: per-example
    (m,) arrays (index, group, mean_with, ...), 'groups' [(name, positions)], per-group summaries, counts,
    the paired results if any and, with controls > 0, the control-adjusted results (see analyse_controls)."""
    check(store)
    groups = held_out_groups(store)
    note_progress(store)
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
    meta['group_summary'] = group_summary(positions, res, two_sample, a, b)
    for name, pos in positions:
        sig, si = res['significant'][pos], res['self_influence'][pos]
        meta['group_summary'][name]['significant_mean'] = si[sig].mean() if sig.any() else np.nan

    meta['n_pairs'] = analyse_pairs(res, a, b, info_with, info_without, alpha)
    res.update(meta)
    res['control_k'] = controls
    if controls:
        analyse_controls(store, res, a, b, info_with, info_without)
    return res


def analyse_pairs(res, a, b, info_with, info_without, alpha):
    """The paired design on seed-matched runs (run k of both arms trained with the same seed), added to res
    where 2 or more runs are matched: paired_self_influence, paired_p, its CI, correlation, pairing_ratio,
    runs_saved and runs_needed_paired (NaN from fewer than MIN_RUNS pairs). -> the number of pairs."""
    _, ia, ib = np.intersect1d(info_with['seed'], info_without['seed'], return_indices=True)
    if len(ia) < 2:
        return len(ia)
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
            res[key] = np.full(a.shape[1], np.nan)
    return len(ia)


def analyse_controls(store, res, a, b, info_with, info_without):
    """Controls of each held-out example (viz_controls): up to res['control_k'] training examples never held
    out, with its label and the nearest mean margin over both arms (from the sums kept with each arm's
    margins, then only the controls' columns); a run's control value is the line through their margins at
    the example's mean margin. Tested on per-run differences example - control value: paired t-test over
    seed-matched runs when there are 2 or more, Welch otherwise. Adds to res what viz_controls.analyse lists.

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


COLUMNS = ['group', 'index', 'mean_with', 'mean_without', 'self_influence', 'se', 'df', 'stat', 'p', 'ci_low',
           'ci_high', 'p_holm', 'p_bh', 'significant', 'sd_with', 'sd_without', 'runs_needed', 'paired_self_influence',
           'paired_p', 'paired_ci_low', 'paired_ci_high', 'correlation', 'pairing_ratio', 'runs_saved',
           'runs_needed_paired', *viz_controls.COLUMNS]  # per example, in CSV and JSON


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


def summary(res, every=False):
    """After the table: all-example group means with CIs, paired design, runs needed (each example's with
    every=True, else each group's median)."""
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

    return lines + paired_table(res) + runs_needed_lines(res, every)


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


def runs_needed_lines(res, every=False):
    """Runs per arm each example needs for the report's test at POWER, and, where runs are seed-matched and
    the number differs, the pairs the paired t-test needs: each group's median, each example's with every."""
    title = f'Runs per arm needed for p < {res["alpha"]:g}'
    if np.isnan(res['runs_needed']).all():
        return ['', f'{title}: not estimated from {res["n_with"]} runs with and {res["n_without"]} without; at '
                    f'least {MIN_RUNS} per arm are needed to plan from their spread.']
    title += f' with {POWER:.0%} power at the observed effect and spread'
    paired = 'runs_needed_paired' in res and np.isfinite(res['runs_needed_paired']).any()
    if not every:  # one line a group: the median example (each example's in --all, --csv and --json)
        lines = ['', title + (', median over each group (in brackets, seed-matched pairs for the paired t-test; '
                              'each example with --all):' if paired else ', median over each group (each example '
                              'with --all):')]
        for name, pos in res['groups']:
            item = runs_text(np.ceil(np.median(res['runs_needed'][pos])))  # a median of two rounded up
            if paired:
                item += f' ({runs_text(np.ceil(np.median(res["runs_needed_paired"][pos])))})'
            lines.append(f'{name.capitalize() + ":":<8}{item}')
        return lines
    lines = ['', title, f'(index: runs for {describe_test(res).split(" (")[0]}' +
             ('; in brackets, seed-matched pairs for the paired t-test where that differs):' if paired else '):')]
    for name, pos in res['groups']:
        items = [f'{res["index"][j]}: {runs_text(res["runs_needed"][j])}' for j in pos]
        if paired:
            items = [item + (f' ({runs_text(q)})' if runs_text(q) != runs_text(n) else '')
                     for item, n, q in zip(items, res['runs_needed'][pos], res['runs_needed_paired'][pos])]
        lines += wrap_items(items, first=f'{name.capitalize() + ":":<8}', width=100)
    return lines


def runs_text(n):
    """Runs per arm as printed: beyond a million (an effect near zero) the number says nothing more; NaN
    (not estimated: too few runs, or no effect and no spread) is '-'."""
    return '-' if np.isnan(n) else 'never' if not np.isfinite(n) else '>1e6' if n > 1e6 else f'{n:.0f}'


def all_examples(res):
    """--all: every held-out example with its CI, adjusted p-values and a significance mark."""
    paired = 'paired_p' in res
    head = example_head('with', 'without') + f'  {"runs":>7}' + (f'  {"paired p":>8}    {"r":>5}' if paired else '')
    marks = (f'* marks p < {res["alpha"]:g} by the test whose p it follows: p, {describe_test(res).split(" (")[0]}'
             + ('; paired p, the paired t-test over seed-matched runs' if paired else ''))

    def row(j):
        line = example_line(res, j, 'mean_with', 'mean_without') + f'  {runs_text(res["runs_needed"][j]):>7}'
        if paired:
            star = '*' if res['paired_p'][j] < res['alpha'] else ' '
            line += f'  {res["paired_p"][j]:>8.4f} {star}  {res["correlation"][j]:>5.2f}'
        return line
    return ['', f'All held-out examples. {marks}. Holm and BH: p adjusted over all {len(res["index"])} examples; '
                f'runs: runs per arm needed at {POWER:.0%} power' + ('; r: over seed-matched runs.' if paired else '.'),
            head, *per_group(res, row)]


def controls_section(res):
    """Below the summary: what the held-out examples' controls shifted, and the control-adjusted
    self-influence, per group and per example (those with control-adjusted p < alpha)."""
    if 'control_adjusted' not in res:
        return viz_controls.section(res, '')
    test = (f'paired t-test over {res["control_runs"]} seed-matched runs' if res['control_test'] == 'paired'
            else "Welch's t-test, {} runs with and {} without".format(*res['control_runs']))
    return viz_controls.section(res, controls_intro(res, test))


def answer(res):
    """The headline (viz_io.headline) and the runs it rests on."""
    if res.get('control_test') == 'paired':
        sample = f'paired t-test over {res["control_runs"]} seed-matched runs'
    elif res.get('control_test') == 'welch':
        sample = "Welch's t-test, {} runs with and {} without".format(*res['control_runs'])
    else:
        sample = f'{describe_test(res).split(" (")[0]}, {res["n_with"]} runs with and {res["n_without"]} without'
    return headline(res, sample)


def lines(res, every=False):
    """The printed report: the answer, the original's table, the summary (secondary tests), the controls;
    every=True (--all) adds every held-out example, raw and control-adjusted."""
    out = answer(res)[0] + faithful_table(res) + ['', 'Details (every test but the answer above is secondary):'] \
        + summary(res, every) + controls_section(res)
    return out + (all_examples(res) + viz_controls.all_rows(res) if every else [])


def json_doc(res):
    """Settings of the analysis and group summaries (viz_io.write_json adds the per-example rows)."""
    return dict(store=res['path'], trainer=res['trainer'], test=res['test'], alpha=res['alpha'], level=LEVEL,
                power=POWER, n_with=res['n_with'], n_without=res['n_without'], n_pairs=res['n_pairs'],
                controls_per_example=res['control_k'], control_test=res.get('control_test'),
                headline=answer(res)[1], groups=res['group_summary'])


def plot_labels(res):
    """x label and title of the forest plot (viz_io.write_plot; diamonds: the control-adjusted estimates)."""
    return ('self-influence = mean margin with - without; diamonds: control-adjusted',
            f'{res["trainer"]}: {res["n_with"]} runs with, {res["n_without"]} without')
