"""viz_controls.py: controls of the held-out examples, shared by the with/without report (viz_with_without.py)
and the factorial report (viz_factorial.py): choosing them, their per-run margins, their statistics and
their lines in the printed report.

The controls of a held-out example are up to K training examples that are never held out, with its
label and the nearest mean margin. Every run trains on them, so a control's shift between the two sides
of a comparison (with - without; kept - removed) holds no self-influence: it is what the removal does
to an example like it. The control-adjusted self-influence is the example's shift minus the control
shift, tested on the per-run difference example - control value of the run, so that noise shared by the
examples of one run cancels.

The control value of a run is not the plain mean of the controls' margins but the least-squares line
through them (margin in the run against mean margin), evaluated at the example's own mean margin
(stats.line_weights: a fixed weighted mean per example, weights summing to 1, whose weighted mean margin
is the example's). Why: the shift the removal causes depends on margin, and an example at the top of its
class has its K nearest controls almost all below it (docs/controls.md gives the measured slope and gaps).
A plain mean then measures the shift at the controls' margin, not at the example's, and the adjusted
estimate leans by slope x gap.
Of the ways to remove that lean this is the simplest: the same K nearest controls, one line per example,
no bandwidth to choose, exact for any shift linear in margin over the controls' range, and still one
value per run, so the paired and Welch tests, the group means and every output work as before. Its
price is variance: sum of squared weights = 1/K + gap^2 / sum (x_c - mean x)^2, larger than 1/K where the
example sits beyond its controls; the tests see it, since they use the per-run differences. A planted
store (tests/test_controls.py, docs/controls.md) shows the plain mean's intervals missing and these covering.
"""
import numpy as np

import stats
from viz_io import LEVEL, group_title, listed, note, read_margins

CONTROLS = 50  # controls per held-out example (--controls)
COLUMNS = ['shift', 'control_shift', 'control_shift_ci_low', 'control_shift_ci_high', 'control_shift_p',
           'control_adjusted', 'control_adjusted_ci_low', 'control_adjusted_ci_high', 'control_adjusted_p',
           'control_adjusted_p_holm', 'control_adjusted_p_bh', 'control_count', 'control_gap',
           'control_margin_gap']


def match(store, mean_margin, idx, target, k, shift=None):
    """For each held-out example idx[j]: the k training examples that are never held out, have its label
    and the mean margin nearest to target[j] (stats.matched_controls; a note on stderr where fewer than k
    exist), and the weights that evaluate their line at target[j] (stats.line_weights).
    mean_margin (n_train,), target (m,) -> dict: controls, weights (lists of m (<= k,) arrays), control_gap
    (m,): largest |mean margin difference| to a control, control_margin_gap (m,): target - plain mean of
    the controls' mean margins (positive: they sit below the example); NaN for an example without controls;
    control_target (m,): the margin the controls were matched and read at.

    shift (n_train,), with/without only: every example's mean with - mean without, where mean_margin is the
    mean of both arms and target the example's mean in `with`. A control's mean over both arms sits half
    its shift below its margin in `with`, so the target is moved as far: target - control shift / 2, the
    control shift read at the moved target (two rounds; the shift changes little with margin)."""
    target = np.asarray(target, dtype=np.float64)
    at, rounds = target, 3 if shift is not None else 1
    for r in range(rounds):
        controls = stats.matched_controls(mean_margin, store.labels, idx, at, k)
        weights = [stats.line_weights(mean_margin[c], t) for c, t in zip(controls, at)]
        if r < rounds - 1:
            at = target - np.array([w @ shift[c] if len(c) else 0.0 for c, w in zip(controls, weights)]) / 2
    short = [(int(i), len(c)) for i, c in zip(idx, controls) if len(c) < k]
    if short:
        note(f'fewer than {k} controls (same label, never held out, finite margins) for '
             f'{len(short)} held-out example(s): {listed([f"{i} ({n})" for i, n in short])}; '
             'using those there are.')
    pairs = list(zip(controls, at))
    return dict(controls=controls, weights=weights, control_target=at,
                control_gap=np.array([np.abs(mean_margin[c] - t).max() if len(c) else np.nan for c, t in pairs]),
                control_margin_gap=np.array([t - mean_margin[c].mean() if len(c) else np.nan for c, t in pairs]))


def per_run_values(store, arm, matched, run_numbers):
    """Per run, each held-out example's control value: its controls' margins in that run, weighted by
    matched['weights'] (the line through them at the example's mean margin), reading only their columns.
    matched: match's result for m examples; run_numbers: the runs wanted (stored runs of `arm`), in any order.
    -> (len(run_numbers), m) float64 (NaN where an example has no controls or a control's margin is not finite)."""
    controls = matched['controls']
    columns = np.unique(np.concatenate([*controls, np.zeros(0, np.int64)]))
    margins, run_info = read_margins(store, arm, columns)
    margins = margins[np.searchsorted(run_info['run'], run_numbers)]  # (len(run_numbers), columns); stored runs are sorted
    out = np.full((len(run_numbers), len(controls)), np.nan)
    for j, (c, w) in enumerate(zip(controls, matched['weights'])):
        if len(c):
            out[:, j] = margins[:, np.searchsorted(columns, c)] @ w
    return out


def analyse(res, compare, a, b, ca, cb, matched):
    """The control statistics, added to res. a, b: (runs, m) margins of the held-out examples on the two
    sides compared (with / without; kept / removed), ca, cb: the same runs' control values (per_run_values);
    compare(x, y) -> a test dict (diff, se, df, p) of side x against side y, e.g. stats.paired_test.
    matched: match's result (controls, weights and margin gaps).

    Adds per example (m,): shift (a - b, by `compare`), control_shift, control_adjusted = shift -
    control_shift (tested on a - ca against b - cb), their CIs and p-values, Holm and BH of
    control_adjusted_p, control_count, control_gap, control_margin_gap, controls (list of index arrays); per
    group of res['group_summary']: shift, control_shift and control_adjusted from per-run group averages, with
    CIs, p and counts of significant positive and negative examples, and control_margin_gap (group mean)."""
    def tested(x, y, name):
        t = compare(x, y)
        low, high = stats.confidence_interval(t['diff'], t['se'], t['df'], LEVEL)
        return {name: t['diff'], f'{name}_ci_low': low, f'{name}_ci_high': high, f'{name}_p': t['p']}

    with np.errstate(invalid='ignore'):  # examples without controls: NaN throughout
        res.update(shift=compare(a, b)['diff'], **tested(ca, cb, 'control_shift'),
                   **tested(a - ca, b - cb, 'control_adjusted'))
    res['control_adjusted_p_holm'] = stats.holm(res['control_adjusted_p'])
    res['control_adjusted_p_bh'] = stats.benjamini_hochberg(res['control_adjusted_p'])
    controls = res['controls'] = matched['controls']
    res['control_count'] = np.array([len(c) for c in controls])
    for key in ('control_gap', 'control_margin_gap', 'control_target'):
        res[key] = matched[key]
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
        g['control_margin_gap'] = res['control_margin_gap'][pos].mean()


def section(res, explanation):
    """The report's control section: `explanation` (one line: viz_io.controls_intro), then per group (all its
    examples with controls) and per example (those with control-adjusted p < alpha)."""
    if not res['control_k']:
        return []
    if 'control_adjusted' not in res:
        return ['', f'Controls: none analysed; {res["control_skipped"]}']
    pct, alpha = f'{LEVEL:.0%}', res['alpha']
    lines = ['', explanation,
             f'{"group":<12}{"examples":>8}  {"shift":>7}  {"control shift":>13}  {pct + " CI":<18}  {"adjusted":>8}  '
             f'{pct + " CI":<18}  {"p":>6}  {"sig. +":>6}  {"sig. -":>6}  {"margin gap":>10}']
    for name, g in res['group_summary'].items():
        if 'control_adjusted' not in g:
            lines.append(f'{name.capitalize():<12}  (no example of the group has controls)')
            continue
        cs = f'[{g["control_shift_ci_low"]:+.3f}, {g["control_shift_ci_high"]:+.3f}]'
        ca = f'[{g["control_adjusted_ci_low"]:+.3f}, {g["control_adjusted_ci_high"]:+.3f}]'
        lines.append(f'{name.capitalize():<12}{g["examples"]:>8}  {g["shift"]:>+7.3f}  {g["control_shift"]:>+13.3f}  '
                     f'{cs:<18}  {g["control_adjusted"]:>+8.3f}  {ca:<18}  {g["control_adjusted_p"]:>6.4f}  '
                     f'{g["control_adjusted_positive"]:>6}  {g["control_adjusted_negative"]:>6}  '
                     f'{g["control_margin_gap"]:>+10.3f}')
    lines += ['', f'Control-adjusted self-influence different from zero (p < {alpha:g}):', head()]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        lines += [row(res, j) for j in pos if res['control_adjusted_p'][j] < alpha] or ['(none)']
    return lines


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


def all_rows(res):
    """--all: every held-out example's control-adjusted self-influence, with Holm and BH."""
    if 'control_adjusted' not in res:
        return []
    test = 'paired t-test' if res['control_test'] == 'paired' else "Welch's t-test"
    lines = ['', f'All held-out examples, control-adjusted. * marks p < {res["alpha"]:g} ({test}); Holm and BH: adjusted over '
                 f'all {len(res["index"])} examples; controls: how many; gap: largest |mean margin difference| '
                 'to one of them.', head(adjusted_p=True)]
    for name, pos in res['groups']:
        lines.append(group_title(name))
        lines += [row(res, j, adjusted_p=True) for j in pos]
    return lines

