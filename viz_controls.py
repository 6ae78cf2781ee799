"""viz_controls.py: controls of the held-out examples, shared by the with/without report (viz.py) and the
factorial report (viz_factorial.py): choosing them, their per-run mean margins, their statistics and
their lines in the printed report.

The controls of a held-out example are up to K training examples that are never held out, with its
label and the nearest mean margin. Every run trains on them, so a control's shift between the two sides
of a comparison (with - without; kept - removed) holds no self-influence: it is what the removal does
to an example like it. The control-adjusted self-influence is the example's shift minus its controls'
mean shift, tested on the per-run difference example - mean of its controls, so that noise shared by
the examples of one run cancels.
"""
import textwrap

import numpy as np

import stats
from viz_io import LEVEL, group_title, listed, note, read_margins

CONTROLS = 50  # controls per held-out example (--controls)
COLUMNS = ['shift', 'control_shift', 'control_shift_ci_low', 'control_shift_ci_high', 'control_shift_p',
           'control_adjusted', 'control_adjusted_ci_low', 'control_adjusted_ci_high', 'control_adjusted_p',
           'control_adjusted_p_holm', 'control_adjusted_p_bh', 'control_count', 'control_gap']


def pick(store, mean_margin, idx, target, k):
    """For each held-out example idx[j]: the k training examples that are never held out, have its label
    and the mean margin nearest to target[j] (stats.matched_controls); a note on stderr where fewer than
    k exist. mean_margin (n_train,) -> list of (<= k,) int64 arrays."""
    controls = stats.matched_controls(mean_margin, store.labels, idx, target, k)
    short = [(int(i), len(c)) for i, c in zip(idx, controls) if len(c) < k]
    if short:
        note(f'fewer than {k} controls (same label, never held out, finite margins) for '
             f'{len(short)} held-out example(s): {listed([f"{i} ({n})" for i, n in short])}; '
             'using those there are.')
    return controls


def per_run_means(store, arm, controls, run_numbers):
    """Per run, the mean margin of each held-out example's controls, reading only their columns.
    controls: list of m index arrays; run_numbers: the runs wanted (stored runs of `arm`), in any order.
    -> (len(run_numbers), m) float64 (NaN where an example has no controls or a control's margin is not finite)."""
    columns = np.unique(np.concatenate([*controls, np.zeros(0, np.int64)]))
    margins, run_info = read_margins(store, arm, columns)
    margins = margins[np.searchsorted(run_info['run'], run_numbers)]  # (len(run_numbers), columns); stored runs are sorted
    out = np.full((len(run_numbers), len(controls)), np.nan)
    for j, c in enumerate(controls):
        if len(c):
            out[:, j] = margins[:, np.searchsorted(columns, c)].mean(1)
    return out


def analyse(res, compare, a, b, ca, cb, controls, gap):
    """The control statistics, added to res. a, b: (runs, m) margins of the held-out examples on the two
    sides compared (with / without; kept / removed), ca, cb: the same runs' control means (per_run_means);
    compare(x, y) -> a test dict (diff, se, df, p) of side x against side y, e.g. stats.paired_test.
    gap (m,): each example's largest |mean margin difference| to one of its controls.

    Adds per example (m,): shift (a - b, by `compare`), control_shift, control_adjusted = shift -
    control_shift (tested on a - ca against b - cb), their CIs and p-values, Holm and BH of
    control_adjusted_p, control_count, control_gap, controls (list of index arrays); per group of
    res['group_summary']: shift, control_shift and control_adjusted from per-run group averages, with CIs,
    p and counts of significant positive and negative examples."""
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
    res['control_gap'] = np.asarray(gap, dtype=np.float64)
    res['controls'] = controls
    has = res['control_count'] > 0
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


def section(res, explanation):
    """The report's control section: `explanation` (a paragraph, wrapped here), then per group (all its
    examples with controls) and per example (those with control-adjusted p < alpha)."""
    if not res['control_k']:
        return []
    if 'control_adjusted' not in res:
        return ['', f'Controls: none analysed; {res["control_skipped"]}']
    pct, alpha = f'{LEVEL:.0%}', res['alpha']
    lines = ['', *textwrap.wrap(explanation, 110),
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
    lines += ['', f'Control-adjusted self-influence different from zero (p < {alpha:g}):', head()]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        lines += [row(res, j) for j in pos if res['control_adjusted_p'][j] < alpha] or ['(none)']
    return lines


def describe(res, where):
    """The opening of the explanation: how many controls, matched where, how close."""
    count, gap = res['control_count'], res['control_gap']
    per = f'{count.min()}' if count.min() == count.max() else f'{count.min()} to {count.max()}'
    return (f'Controls: for each held-out example, up to {res["control_k"]} training examples never held out, with '
            f'its label and the nearest mean margin {where} ({per} per example; margin gap to the farthest: '
            f'median {np.nanmedian(gap):.3f}, max {np.nanmax(gap):.3f}).')


def head(adjusted_p=False):
    pct = f'{LEVEL:.0%}'
    line = (f'{"index":>6}  {"shift":>7}  {"control shift":>13}  {pct + " CI":<18}  {"adjusted":>8}  '
            f'{pct + " CI":<18}  {"p":>6}')
    return line + (f'    {"Holm":>6}  {"BH":>6}  {"controls":>8}  {"gap":>6}' if adjusted_p else '')


def row(res, j, adjusted_p=False):
    cs = f'[{res["control_shift_ci_low"][j]:+.3f}, {res["control_shift_ci_high"][j]:+.3f}]'
    ca = f'[{res["control_adjusted_ci_low"][j]:+.3f}, {res["control_adjusted_ci_high"][j]:+.3f}]'
    line = (f'{res["index"][j]:>6}  {res["shift"][j]:>+7.3f}  {res["control_shift"][j]:>+13.3f}  {cs:<18}  '
            f'{res["control_adjusted"][j]:>+8.3f}  {ca:<18}  {res["control_adjusted_p"][j]:>6.4f}')
    if adjusted_p:
        mark = '*' if res['control_adjusted_p'][j] < res['alpha'] else ' '
        line += (f' {mark}  {res["control_adjusted_p_holm"][j]:>6.4f}  {res["control_adjusted_p_bh"][j]:>6.4f}  '
                 f'{res["control_count"][j]:>8}  {res["control_gap"][j]:>6.3f}')
    return line


def all_rows(res, where):
    """--all: every held-out example's control-adjusted self-influence, with Holm and BH."""
    if 'control_adjusted' not in res:
        return []
    lines = ['', f'All held-out examples, control-adjusted. * marks p < {res["alpha"]:g}; Holm and BH: adjusted over '
                 f'all {len(res["index"])} examples; controls: how many; gap: largest |mean margin difference {where}| '
                 'to one of them.', head(adjusted_p=True)]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        lines += [row(res, j, adjusted_p=True) for j in pos]
    return lines


def add_to_json_rows(res, rows):
    """Each example's controls (index list) in its JSON row."""
    if 'controls' in res:
        for r, c in zip(rows, res['controls']):
            r['controls'] = c.tolist()
    return rows
