"""viz.py: the self-influence report of a run store (the analysis of the with/without experiment).

Claim under test: adding an easy training example makes the retrained net *less* confident on it
(negative self-influence), adding a random one makes it more confident. Self-influence of example i =
mean margin over `with` runs - mean margin over `without` runs, tested per example with Welch's t-test.

    python viz.py                          # runs/airbench, Welch t-test, p < 0.01
    python viz.py --trainer madry          # runs/madry
    python viz.py runs/whatever --test z   # the original's normal p-value
    python viz.py --all --csv si.csv --json si.json --plot si.png
    python viz.py --scan                   # runs/airbench-scan: every example's self-influence

Output: first the original's table, in its published layout (significant examples only, per group,
with the selection-biased average of the listed ones); then what an honest reading needs: the mean over
all examples of each group with its 95% CI, counts of significant positive/negative examples, the
paired test on seed-matched runs, and the runs per arm each example needs. --all lists every held-out
example with its CI, Holm and Benjamini-Hochberg adjusted p-values (over all held-out examples).

Cost: reads only the held-out columns of the memory-mapped (runs, n_train, 10) float16 arrays. On
2 arms x 1000 runs x 50000 examples (2 GB, page cache warm, 2-core VM): 0.16 s and 116 MB peak resident
memory, ~100 MB of it numpy and scipy; loading every run into RAM instead took 86 s and 14 GB
(python bench/bench_viz.py). Not included: the store's one-time packing of new runs (9 s there).

Published result (airbench, 1000 runs per arm): random 10 of 20 significant, average +0.467; easy 13 of
20 significant, all negative, average -0.269.

--scan reads a scan store (python trainer_airbench.py --scan: each run trains on a random half of the
training set, drawn from its seed) and estimates every example's self-influence as its mean margin over
the runs that included it minus the mean over the runs that excluded it, Welch's t-test per example and
Benjamini-Hochberg over all. It prints the --top most negative and most positive examples, the most
negative among high-margin ones (mean margin when included in the top quartile: candidates for the easy
held-out set) and where the store's held-out examples rank. It streams over runs, CHUNK at a time:
160 runs x 50000 examples took 2.8 s (17 ms per run, about 3 min for 10,000 runs with the store in page
cache) and 265 MB peak resident memory on the 2-core VM.

Runs with a non-finite logit at a held-out example (a diverged net) are left out of every statistic,
and the report says which runs and examples. Notes about the store go to stderr, the report to stdout.
"""
import argparse
import sys
import textwrap

import numpy as np

import stats
from store import Store, StoreError, keep_for
from viz_io import (CHUNK, LEVEL, column_chunks, control_means, drop_nonfinite, group_title, held_out_groups, listed,
                    mean_margins, note, pick_controls,
                    note_progress, plot_forest, ptext, read_margins, save_csv, save_json)

POWER = 0.8     # for "runs per arm needed": chance of reaching p < alpha if the observed effect is real
CONTROLS = 50   # controls per held-out example (--controls)


def open_store(path):
    """Store and its held-out groups: [(name, indices (k,) int64)], in the store's order."""
    store = Store(path)
    if 'with' not in store.arms:
        raise StoreError(f'{path} is a scan store (arms: {", ".join(store.arms)}), not the with/without '
                         f'experiment. Analyse it with: python viz.py --scan {path}')
    groups = held_out_groups(store)
    note_progress(store)
    return store, groups


############################################
#                analysis                  #
############################################

def analyse(store, groups, test='welch', alpha=0.01, controls=CONTROLS):
    """Every statistic of the report. -> dict: per-example (m,) arrays (index, group, mean_with, ...),
    'groups' [(name, positions)], per-group summaries, counts, the paired results if any and, with
    controls > 0, the control-adjusted results (see analyse_controls)."""
    idx = np.concatenate([ix for _, ix in groups])
    a, runs_a = drop_nonfinite('with', *read_margins(store, 'with', idx), idx)
    b, runs_b = drop_nonfinite('without', *read_margins(store, 'without', idx), idx)
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
    res['index'] = idx
    res['group'] = np.array([name for name, ix in groups for _ in ix])

    positions, start = [], 0
    for name, ix in groups:
        positions.append((name, np.arange(start, start + len(ix))))
        start += len(ix)
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
    _, ia, ib = np.intersect1d(runs_a['seed'], runs_b['seed'], return_indices=True)
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
    res.update(meta)
    res['control_k'] = controls
    if controls:
        analyse_controls(store, res, a, b, runs_a, runs_b)
    return res


def analyse_controls(store, res, a, b, runs_a, runs_b):
    """Controls of each held-out example: up to res['control_k'] training examples that are never held out,
    with its label and the nearest mean margin in `with` (one streamed pass over the `with` arm, then only
    their columns of both arms). Both arms train on them, so their shift with - without is no
    self-influence: it is what removing the held-out set does to an example like it.

    Tested on per-run differences, example margin - its controls' mean margin in the same run, so that
    noise shared by the examples of one run cancels: paired t-test over seed-matched runs when there are
    2 or more, Welch otherwise. Adds to res, per example (m,): shift (with - without on the runs used
    here), control_shift, control_adjusted = shift - control_shift, their CIs and p-values, Holm and BH of
    control_adjusted_p, control_count, control_gap (largest |mean margin difference| to a control) and
    controls (list of index arrays); per group in group_summary: the same from per-run group averages.

    Selecting controls by their `with` mean biases their shift by about se^2 x the slope of the log density
    of mean margins at the target (se: standard error of a mean margin, about 0.03 at 1000 runs): far
    below the effects measured."""
    idx, k = res['index'], res['control_k']
    mean_with = mean_margins(store, 'with', runs_a['run'])  # (n_train,)
    controls = pick_controls(store, mean_with, idx, res['mean_with'], k)
    ca = control_means(store, 'with', controls, runs_a['run'])  # (n_with, m): per run, mean over controls
    cb = control_means(store, 'without', controls, runs_b['run'])
    has = np.array([len(c) > 0 for c in controls])
    # A run diverged at a control but not at a held-out example: left out of the control analysis only.
    ok_a, ok_b = np.isfinite(ca[:, has]).all(1), np.isfinite(cb[:, has]).all(1)
    for arm, ok, runs in (('with', ok_a, runs_a), ('without', ok_b, runs_b)):
        if not ok.all():
            note(f'{arm} arm: {(~ok).sum()} run(s) with non-finite logits at a control example, left out of the '
                 f'control analysis: runs {listed(runs["run"][~ok].tolist())}.')
    a, b, ca, cb = a[ok_a], b[ok_b], ca[ok_a], cb[ok_b]
    _, pa, pb = np.intersect1d(runs_a['seed'][ok_a], runs_b['seed'][ok_b], return_indices=True)
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

    def tested(x, y, name):
        t = compare(x, y)
        low, high = stats.confidence_interval(t['diff'], t['se'], t['df'], LEVEL)
        return {name: t['diff'], f'{name}_ci_low': low, f'{name}_ci_high': high, f'{name}_p': t['p']}

    with np.errstate(invalid='ignore'):  # examples without controls: NaN throughout
        res.update(shift=compare(a, b)['diff'], **tested(ca, cb, 'control_shift'),
                   **tested(a - ca, b - cb, 'control_adjusted'))
    res['control_adjusted_p_holm'] = stats.holm(res['control_adjusted_p'])
    res['control_adjusted_p_bh'] = stats.benjamini_hochberg(res['control_adjusted_p'])
    res['control_count'] = np.array([len(c) for c in controls])
    res['control_gap'] = np.array([np.abs(mean_with[c] - res['mean_with'][j]).max() if len(c) else np.nan
                                   for j, c in enumerate(controls)])
    res['controls'] = controls
    for name, pos in res['groups']:
        pos = pos[has[pos]]
        g = res['group_summary'][name]
        if not len(pos):
            continue
        mean = lambda x: x[:, pos].mean(1, keepdims=True)  # per-run group average
        g['shift'] = compare(mean(a), mean(b))['diff'][0]
        g.update({k: v[0] for k, v in tested(mean(ca), mean(cb), 'control_shift').items()})
        g.update({k: v[0] for k, v in tested(mean(a - ca), mean(b - cb), 'control_adjusted').items()})
        sig = res['control_adjusted_p'][pos] < res['alpha']
        adjusted = res['control_adjusted'][pos]
        g['control_adjusted_positive'] = int((sig & (adjusted > 0)).sum())
        g['control_adjusted_negative'] = int((sig & (adjusted < 0)).sum())


EXAMPLE_COLUMNS = ['group', 'index', 'mean_with', 'mean_without', 'self_influence', 'se', 'df', 'stat', 'p',
                   'ci_low', 'ci_high', 'p_holm', 'p_bh', 'significant', 'sd_with', 'sd_without', 'runs_needed',
                   'paired_self_influence', 'paired_p', 'paired_ci_low', 'paired_ci_high', 'correlation',
                   'pairing_ratio', 'runs_saved', 'shift', 'control_shift', 'control_shift_ci_low',
                   'control_shift_ci_high', 'control_shift_p', 'control_adjusted', 'control_adjusted_ci_low',
                   'control_adjusted_ci_high', 'control_adjusted_p', 'control_adjusted_p_holm', 'control_adjusted_p_bh',
                   'control_count', 'control_gap']


def example_rows(res):
    """One dict per held-out example, plain Python values (NaN/inf kept as floats)."""
    columns = [c for c in EXAMPLE_COLUMNS if c in res]
    return [{c: res[c][j].item() for c in columns} for j in range(len(res['index']))]


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

    n = res['n_pairs']
    lines.append('')
    if 'paired_p' in res:
        lines += [f'Paired design ({n} seed-matched runs per arm; paired t-test of with - without, '
                  f'p < {res["alpha"]:g}):',
                  f'{"group":<12}{"sig. +":>6}  {"sig. -":>6}  {"median r":>8}  {"runs for the same error":>23}  '
                  f'{"saved per arm":>13}']
        for name, pos in res['groups']:
            sig = res['paired_p'][pos] < res['alpha']
            si = res['paired_self_influence'][pos]
            ratio = np.nanmedian(res['pairing_ratio'][pos])
            lines.append(f'{name.capitalize():<12}{int((sig & (si > 0)).sum()):>6}  {int((sig & (si < 0)).sum()):>6}  '
                         f'{np.nanmedian(res["correlation"][pos]):>8.2f}  {f"{n} -> {n * ratio:.0f}":>23}  '
                         f'{n * (1 - ratio):>13.0f}')
        lines.append('(r: correlation of the two arms\' margins over matched seeds; "runs for the same error": '
                     'pairs giving the standard error of the unpaired design, median over the group)')
    else:
        lines.append(f'Paired design: {n} seed-matched run(s) in both arms, at least 2 needed; no paired test.')

    lines += ['', f'Runs per arm needed for p < {res["alpha"]:g} with {POWER:.0%} power at the observed effect and '
                  f'spread (index: runs):']
    for name, pos in res['groups']:
        items = [f'{res["index"][j]}: {runs_text(res["runs_needed"][j])}' for j in pos]
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
    """Runs per arm as printed: beyond a million (an effect near zero) the number says nothing more."""
    return 'never' if not np.isfinite(n) else '>1e6' if n > 1e6 else f'{n:.0f}'


def all_examples(res):
    """--all: every held-out example with its CI, adjusted p-values and a significance mark."""
    pct = f'{LEVEL:.0%}'
    paired = 'paired_p' in res
    head = (f'{"index":>6}  {"with":>7}  {"without":>7}  {"self-infl":>9}  {pct + " CI":<18}  {"p":>6}    '
            f'{"Holm":>6}  {"BH":>6}  {"runs":>7}')
    if paired:
        head += f'  {"paired p":>8}  {"r":>5}'
    lines = ['', f'All held-out examples. * marks p < {res["alpha"]:g}; Holm and BH: p adjusted over all '
                 f'{len(res["index"])} examples; runs: runs per arm needed at {POWER:.0%} power'
                 + ('; paired p and r: seed-matched runs.' if paired else '.'), head]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        for j in pos:
            ci = f'[{res["ci_low"][j]:+.3f}, {res["ci_high"][j]:+.3f}]'
            mark = '*' if res['significant'][j] else ' '
            line = (f'{res["index"][j]:>6}  {res["mean_with"][j]:>7.3f}  {res["mean_without"][j]:>7.3f}  '
                    f'{res["self_influence"][j]:>+9.3f}  {ci:<18}  {res["p"][j]:>6.4f} {mark}  '
                    f'{res["p_holm"][j]:>6.4f}  {res["p_bh"][j]:>6.4f}  {runs_text(res["runs_needed"][j]):>7}')
            if paired:
                line += f'  {res["paired_p"][j]:>8.4f}  {res["correlation"][j]:>5.2f}'
            lines.append(line)
    return lines


def controls_section(res):
    """Below the summary: what the held-out examples' controls shifted, and the control-adjusted
    self-influence, per group (all examples) and per example (those with control-adjusted p < alpha)."""
    if not res['control_k']:
        return []
    if 'control_adjusted' not in res:
        return ['', f'Controls: none analysed; {res["control_skipped"]}']
    pct, alpha = f'{LEVEL:.0%}', res['alpha']
    test = (f'paired t-test over {res["control_runs"]} seed-matched runs' if res['control_test'] == 'paired'
            else "Welch's t-test, {} runs with and {} without".format(*res['control_runs']))
    count, gap = res['control_count'], res['control_gap']
    text = (f'Controls: for each held-out example, up to {res["control_k"]} training examples never held out, with its '
            f'label and the nearest mean margin in `with` ({count.min()} to {count.max()} per example; margin gap to '
            f'the farthest: median {np.nanmedian(gap):.3f}, max {np.nanmax(gap):.3f}). Both arms train on them, so '
            'their shift with - without is no self-influence: it is what removing the held-out set does to an '
            'example like it (cross-influence). Control-adjusted self-influence = shift - control shift, tested on '
            f'the per-run difference example - mean of its controls ({test}, {pct} CI):')
    lines = ['', *textwrap.wrap(text, 110),
             f'{"group":<12}{"examples":>8}  {"shift":>7}  {"control shift":>13}  {pct + " CI":<18}  {"adjusted":>8}  '
             f'{pct + " CI":<18}  {"p":>6}  {"sig. +":>6}  {"sig. -":>6}']
    for name, g in res['group_summary'].items():
        if 'control_adjusted' not in g:
            lines.append(f'{name.capitalize():<12}  (no example of the group has controls)')
            continue
        cs = f'[{g["control_shift_ci_low"]:+.3f}, {g["control_shift_ci_high"]:+.3f}]'
        ca = f'[{g["control_adjusted_ci_low"]:+.3f}, {g["control_adjusted_ci_high"]:+.3f}]'
        lines.append(f'{name.capitalize():<12}{g["examples"]:>8}  {g["shift"]:>+7.3f}  {g["control_shift"]:>+13.3f}  '
                     f'{cs:<18}  {g["control_adjusted"]:>+8.3f}  {ca:<18}  {g["control_adjusted_p"]:>6.4f}  '
                     f'{g["control_adjusted_positive"]:>6}  {g["control_adjusted_negative"]:>6}')
    lines += ['', f'Control-adjusted self-influence different from zero (p < {alpha:g}):', control_head()]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        listed_here = [j for j in pos if res['control_adjusted_p'][j] < alpha]
        lines += [control_row(res, j) for j in listed_here] or ['(none)']
    return lines


def control_head(adjusted_p=False):
    pct = f'{LEVEL:.0%}'
    head = (f'{"index":>6}  {"shift":>7}  {"control shift":>13}  {pct + " CI":<18}  {"adjusted":>8}  '
            f'{pct + " CI":<18}  {"p":>6}')
    return head + (f'    {"Holm":>6}  {"BH":>6}  {"controls":>8}  {"gap":>5}' if adjusted_p else '')


def control_row(res, j, adjusted_p=False):
    cs = f'[{res["control_shift_ci_low"][j]:+.3f}, {res["control_shift_ci_high"][j]:+.3f}]'
    ca = f'[{res["control_adjusted_ci_low"][j]:+.3f}, {res["control_adjusted_ci_high"][j]:+.3f}]'
    line = (f'{res["index"][j]:>6}  {res["shift"][j]:>+7.3f}  {res["control_shift"][j]:>+13.3f}  {cs:<18}  '
            f'{res["control_adjusted"][j]:>+8.3f}  {ca:<18}  {res["control_adjusted_p"][j]:>6.4f}')
    if adjusted_p:
        mark = '*' if res['control_adjusted_p'][j] < res['alpha'] else ' '
        line += (f' {mark}  {res["control_adjusted_p_holm"][j]:>6.4f}  {res["control_adjusted_p_bh"][j]:>6.4f}  '
                 f'{res["control_count"][j]:>8}  {res["control_gap"][j]:>5.3f}')
    return line


def all_controls(res):
    """--all: every held-out example's control-adjusted self-influence, with Holm and BH."""
    if 'control_adjusted' not in res:
        return []
    lines = ['', f'All held-out examples, control-adjusted. * marks p < {res["alpha"]:g}; Holm and BH: adjusted over '
                 f'all {len(res["index"])} examples; controls: how many; gap: largest |mean margin difference in '
                 '`with`| to one of them.', control_head(adjusted_p=True)]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        lines += [control_row(res, j, adjusted_p=True) for j in pos]
    return lines


CONTROL_COLUMNS = ['shift', 'control_shift', 'control_shift_ci_low', 'control_shift_ci_high', 'control_shift_p',
                   'control_adjusted', 'control_adjusted_ci_low', 'control_adjusted_ci_high', 'control_adjusted_p',
                   'control_adjusted_p_holm', 'control_adjusted_p_bh', 'control_count', 'control_gap']


def write_csv(res, path):
    rows = example_rows(res)
    save_csv(rows, list(rows[0]), path)


def write_json(res, path):
    """Settings of the analysis, group summaries and per-example rows (with each example's controls)."""
    doc = dict(store=res['path'], trainer=res['trainer'], test=res['test'], alpha=res['alpha'], level=LEVEL,
               power=POWER, n_with=res['n_with'], n_without=res['n_without'], n_pairs=res['n_pairs'],
               controls_per_example=res['control_k'], control_test=res.get('control_test'),
               groups=res['group_summary'])
    rows = example_rows(res)
    if 'controls' in res:
        for row, c in zip(rows, res['controls']):
            row['controls'] = c.tolist()
    save_json(doc, rows, path)


def write_plot(res, path):
    """Forest plot of self-influence, with the control-adjusted estimate as a second marker per row."""
    plot_forest(res, path, 'self-influence = mean margin with - without; diamonds: control-adjusted',
                f'{res["trainer"]}: {res["n_with"]} runs with, {res["n_without"]} without')


############################################
#   scan: every example's self-influence   #
############################################

def open_scan(path):
    """The scan store at `path`; refuses a with/without store, saying how to make a scan."""
    store = Store(path)
    if 'scan' not in store.arms:
        trainer = store.settings.get('trainer', 'X')
        raise StoreError(f'{path} is not a scan store: it has no \'scan\' arm (arms: {", ".join(store.arms)}). '
                         f'Make one with python trainer_{trainer}.py --scan (it writes runs/{trainer}-scan), '
                         f'then run python viz.py --scan.')
    note_progress(store)
    return store


def scan_masks(store, seeds):
    """(k, n_train) bool: the examples each run trained on, recomputed from its seed as the trainer drew them."""
    n_train, held_out = store.settings['n_train'], store.settings['held_out']
    included = np.zeros((len(seeds), n_train), dtype=bool)
    for row, seed in zip(included, seeds):
        row[keep_for('scan', int(seed), n_train, held_out)] = True
    return included


def scan_chunks(store, logits, runs, left_out):
    """Yield (margins (k, n_train) float64, included (k, n_train) bool), CHUNK runs of logits
    (N, n_train, 10) at a time. Runs with a non-finite margin are skipped; their run numbers are
    appended to left_out."""
    every = np.arange(store.settings['n_train'])
    for lo, chunk in column_chunks(logits, every):
        seeds, numbers = runs['seed'][lo:lo + len(chunk)], runs['run'][lo:lo + len(chunk)]
        m = stats.margins(chunk, store.labels)
        ok = np.isfinite(m).all(1)
        left_out += [int(r) for r in numbers[~ok]]
        yield m[ok], scan_masks(store, seeds[ok])


def analyse_scan(store, alpha=0.01):
    """Every statistic of the scan report. -> dict: per-example (n_train,) arrays (index, label, n_in,
    mean_in, ..., rank, high_margin, tested) and the scan's summary (runs, counts, threshold)."""
    logits, runs = store.load('scan')  # (N, n_train, 10) float16, memory-mapped
    if len(logits) < 2:
        raise StoreError(f'{store.path} holds {len(logits)} finished scan run(s); comparing runs that '
                         'included an example with runs that excluded it needs at least 2 (in practice '
                         'hundreds). Let the trainer finish more runs.')
    left_out = []
    try:
        res = stats.scan_test(scan_chunks(store, logits, runs, left_out))
    except ValueError:
        if len(left_out) < len(logits):
            raise
        raise StoreError(f'{store.path}: all {len(logits)} scan runs have non-finite logits (diverged); '
                         'nothing to analyse. Check the trainer\'s settings.') from None
    usable = len(logits) - len(left_out)
    if left_out:
        note(f'{len(left_out)} scan run(s) with non-finite logits left out of every statistic: runs '
             f'{listed(left_out)}. Such runs diverged; retrain them if they are many.')
    if usable < 2:
        raise StoreError(f'{store.path} holds {usable} usable scan run(s) (of {len(logits)}); at least 2 '
                         'are needed. Let the trainer finish more runs.')

    n = len(res['n_in'])
    tested = (res['n_in'] >= 2) & (res['n_out'] >= 2)  # a variance on both sides
    if not tested.any():
        raise StoreError(f'{store.path}: with {usable} runs no example was both included in 2 or more runs '
                         'and excluded from 2 or more; let the trainer finish more runs (hundreds are usual).')
    never_in, never_out = np.flatnonzero(res['n_in'] == 0), np.flatnonzero(res['n_out'] == 0)
    once = np.flatnonzero(~tested & (res['n_in'] > 0) & (res['n_out'] > 0))
    if len(never_in) or len(never_out) or len(once):
        parts = [f'{len(ix)} {what} ({listed(ix)})' for ix, what in
                 ((never_in, 'never included'), (never_out, 'never excluded'),
                  (once, 'included or excluded only once')) if len(ix)]
        note(f'example(s) left out of every statistic and ranking, no variance on one side: '
             f'{"; ".join(parts)}. More runs fix this.')

    res['self_influence'] = res.pop('diff')
    res['ci_low'], res['ci_high'] = stats.confidence_interval(res['self_influence'], res['se'], res['df'], LEVEL)
    res['p_bh'] = stats.benjamini_hochberg(np.where(tested, res['p'], np.nan))
    order = np.flatnonzero(tested)[np.argsort(res['self_influence'][tested], kind='stable')]
    res['rank'] = np.full(n, np.nan)  # 1 = most negative self-influence among the tested examples
    res['rank'][order] = np.arange(1, len(order) + 1)
    # High margin: mean margin when included in the top quartile of the tested examples; the easy
    # examples of the experiment are the negative self-influence ones among these.
    threshold = np.quantile(res['mean_in'][tested], 0.75)
    res['high_margin'] = tested & (res['mean_in'] >= threshold)
    res['tested'] = tested
    res['index'] = np.arange(n)
    res['label'] = np.asarray(store.labels)
    res.update(path=store.path, trainer=store.settings.get('trainer', '?'), runs=usable, left_out_runs=left_out,
               alpha=alpha, order=order, high_margin_threshold=threshold,
               groups=[(name, np.asarray(ix, dtype=np.int64)) for name, ix in store.settings['held_out'].items()])
    return res


SCAN_COLUMNS = ['index', 'label', 'n_in', 'n_out', 'mean_in', 'mean_out', 'self_influence', 'se', 'df', 'stat',
                'p', 'ci_low', 'ci_high', 'p_bh', 'rank', 'high_margin', 'tested']


def scan_rows(res):
    """One dict per training example, plain Python values (NaN kept as float)."""
    return [{c: res[c][j].item() for c in SCAN_COLUMNS} for j in range(len(res['index']))]


def scan_head():
    return (f'{"rank":>6}  {"index":>6}  {"label":>5}  {"included":>8}  {"excluded":>8}  {"self-infl":>9}  '
            f'{f"{LEVEL:.0%} CI":<18}  {"p":>9}  {"BH p":>9}')


def scan_row(res, j):
    if not res['tested'][j]:
        return (f'{"-":>6}  {j:>6}  {res["label"][j]:>5}  left out: included in {res["n_in"][j]} run(s), '
                f'excluded from {res["n_out"][j]}')
    ci = f'[{res["ci_low"][j]:+.3f}, {res["ci_high"][j]:+.3f}]'
    return (f'{res["rank"][j]:>6.0f}  {j:>6}  {res["label"][j]:>5}  {res["mean_in"][j]:>8.3f}  '
            f'{res["mean_out"][j]:>8.3f}  {res["self_influence"][j]:>+9.3f}  {ci:<18}  '
            f'{ptext(res["p"][j]):>9}  {ptext(res["p_bh"][j]):>9}')


def scan_report(res, top=20):
    """The scan's printed report: header, the top-k lists and the store's held-out examples."""
    tested, order = res['tested'], res['order']
    counts = res['n_in']
    significant = tested & (res['p_bh'] < res['alpha'])
    si = res['self_influence']
    lines = [f'Scan {res["path"]} (trainer {res["trainer"]}): {res["runs"]} runs, {len(si)} examples, '
             f'each run trained on a random half.',
             f'Runs that included an example: min {counts.min()}, median {np.median(counts):g}, max {counts.max()}'
             + (f'; {len(si) - tested.sum()} example(s) left out, too rarely in or out (see above).'
                if not tested.all() else '.'),
             'Self-influence = mean margin over the runs that included the example - mean over the runs that '
             'excluded it;',
             f"Welch's t-test per example, {LEVEL:.0%} CI, BH p: adjusted over all {tested.sum()} tested examples.",
             f'BH p < {res["alpha"]:g}: {significant.sum()} examples, {(significant & (si < 0)).sum()} negative and '
             f'{(significant & (si > 0)).sum()} positive. Rank 1 = most negative.',
             '', f'{min(top, len(order))} most negative self-influence:', scan_head()]
    lines += [scan_row(res, j) for j in order[:top]]
    lines += ['', f'{min(top, len(order))} most positive self-influence:', scan_head()]
    lines += [scan_row(res, j) for j in order[::-1][:top]]
    high = [j for j in order if res['high_margin'][j]]
    lines += ['', f'Most negative among high-margin examples (mean margin when included >= '
                  f'{res["high_margin_threshold"]:.3f}, the top quartile; {len(high)} examples), '
                  f'the candidates for an "easy" held-out set:', scan_head()]
    lines += [scan_row(res, j) for j in high[:top]]
    lines += ['', f'Held-out examples of the store, where they fall among the {tested.sum()} tested:']
    if not res['groups']:
        lines.append('(the store lists none)')
    for name, ix in res['groups']:
        lines += [group_title(name), scan_head()] + [scan_row(res, j) for j in ix]
    return lines


def write_scan_csv(res, path):
    save_csv(scan_rows(res), SCAN_COLUMNS, path)


def write_scan_json(res, path):
    """The scan's summary and one row per training example."""
    doc = dict(store=res['path'], trainer=res['trainer'], runs=res['runs'], left_out_runs=res['left_out_runs'],
               level=LEVEL, alpha=res['alpha'], high_margin_threshold=float(res['high_margin_threshold']),
               high_margin_rule='mean margin when included in the top quartile of the tested examples',
               held_out={name: ix.tolist() for name, ix in res['groups']})
    save_json(doc, scan_rows(res), path)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Self-influence report of a run store.')
    parser.add_argument('store', nargs='?', help='store folder (default: runs/<trainer>, runs/<trainer>-scan with --scan)')
    parser.add_argument('--trainer', default='airbench', help='reads runs/<trainer> when no store is given')
    parser.add_argument('--test', choices=('welch', 'z'), default='welch',
                        help="welch: Welch's t-test; z: the original's normal p-value")
    parser.add_argument('--alpha', type=float, default=0.01, help='significance threshold of the table (with --scan: of BH p)')
    parser.add_argument('--all', action='store_true', help='also list every held-out example with its CI')
    parser.add_argument('--csv', metavar='FILE', help='write per-example statistics as CSV')
    parser.add_argument('--json', metavar='FILE', help='write per-example statistics and group summaries as JSON')
    parser.add_argument('--plot', metavar='FILE.png', help='write a forest plot of self-influence with CIs')
    parser.add_argument('--controls', type=int, metavar='K',
                        help=f'controls per held-out example (default {CONTROLS}; 0: none, and no pass over all '
                             'examples)')
    parser.add_argument('--scan', action='store_true',
                        help='report a scan store (trainer --scan): the self-influence of every training example')
    parser.add_argument('--top', type=int, default=20, help='with --scan: examples per list (default 20)')
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f'--alpha {args.alpha}: expected a probability between 0 and 1, e.g. 0.01')
    if args.scan and (args.all or args.plot or args.test != 'welch' or args.controls is not None):
        parser.error('--all, --plot, --controls and --test z belong to the with/without report; with --scan use '
                     '--top, --alpha, --csv and --json')
    if args.controls is not None and args.controls < 0:
        parser.error(f'--controls {args.controls}: expected a number of controls per example, 0 or more')
    if args.controls is None:
        args.controls = CONTROLS
    if args.top < 1:
        parser.error(f'--top {args.top}: expected a number of examples, 1 or more')

    if args.scan:
        path = args.store or f'runs/{args.trainer}-scan'
        try:
            res = analyse_scan(open_scan(path), args.alpha)
        except StoreError as e:
            sys.exit(f'viz: {e}')
        print('\n'.join(scan_report(res, args.top)))
        writers = ((write_scan_csv, args.csv), (write_scan_json, args.json))
    else:
        path = args.store or f'runs/{args.trainer}'
        try:
            store, groups = open_store(path)
            res = analyse(store, groups, args.test, args.alpha, args.controls)
        except StoreError as e:
            sys.exit(f'viz: {e}')
        lines = (faithful_table(res) + summary(res) + controls_section(res)
                 + (all_examples(res) + all_controls(res) if args.all else []))
        print('\n'.join(lines))
        writers = ((write_csv, args.csv), (write_json, args.json), (write_plot, args.plot))
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
