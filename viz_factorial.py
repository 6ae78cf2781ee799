"""viz_factorial.py: the report of a factorial store (arms `a` and `b`; a trainer's --design factorial),
the design that separates self-influence from cross-influence by construction.

    python viz.py runs/digits-factorial            # the report (viz.py picks it from the store's arms)
    python viz.py PATH --all --csv f.csv --json f.json --plot f.png --top 20

Design: run k of arms a and b share seed k (same initialisation, batches and augmentation); each held-out
example is removed from exactly one run of the pair, by a fair coin per example drawn from the seed
(store.factorial_split). For example i the pair difference

    d_k,i = margin in the run that kept i - margin in the run that removed i
          = self-influence of i + sum over the other held-out j of (+-1) x cross-influence of j on i + noise,

the signs independent of each other and of i's coin, so the cross-influences average out: the mean of
d over pairs estimates self-influence alone (paired t-test, df = pairs - 1; Holm and BH over the held-out
examples; group means from per-pair group averages). The cross-influences themselves come from one
least-squares fit per example i of its a - b margin difference on every held-out example's assignment
(+1 kept in a, -1 kept in b) and an intercept (stats.cross_influence; needs pairs > m + 1); the
coefficient of i's own assignment is a second self-influence estimate, free of the others' cross-influence
noise. Controls (viz_controls.py), examples never held out, have no self part in their a - b difference:
signed by i's coin, their mean is what adding i does to examples like it (i's cross-influence on its
look-alikes); the control-adjusted estimate is i's self-influence minus that.
"""
import textwrap

import numpy as np

import stats
import viz_controls
from design import FACTORIAL_ARMS, factorial_split
from store import StoreError
from viz_io import (LEVEL, controls_intro, example_head, example_line, group_summary, group_title, headline,
                    held_out_groups, listed, mean_margins, note, note_progress, positions_of, ptext, read_margins)

TOP = 10  # cross-influences printed (--top)


def is_factorial(store):
    return set(FACTORIAL_ARMS) <= set(store.arms)


def read_pairs(store, idx):
    """Margins of the held-out examples idx (m,) in both runs of every complete pair with finite margins,
    and which run of each pair kept each example. Pairs missing one half or with a non-finite margin at a
    held-out example are left out, with a note on stderr.
    -> ma, mb (pairs, m) float64; kept_in_a (pairs, m) bool; pair_info: dict of (pairs,) arrays seed, run_a, run_b."""
    ma, info_a = read_margins(store, 'a', idx)
    mb, info_b = read_margins(store, 'b', idx)
    seeds, ia, ib = np.intersect1d(info_a['seed'], info_b['seed'], return_indices=True)
    for arm, other, run_info in (('a', 'b', info_a), ('b', 'a', info_b)):
        lone = run_info['run'][~np.isin(run_info['seed'], seeds)]
        if len(lone):
            note(f'{len(lone)} run(s) of arm {arm} without the run of arm {other} that shares their seed, left out '
                 f'(a pair needs both): runs {listed(lone.tolist())}. Let the trainer finish them.')
    ma, mb = ma[ia], mb[ib]
    pair_info = dict(seed=seeds, run_a=info_a['run'][ia], run_b=info_b['run'][ib])
    bad = ~(np.isfinite(ma).all(1) & np.isfinite(mb).all(1))
    if bad.any():
        where = lambda k: ', '.join(str(idx[j]) for j in np.flatnonzero(~np.isfinite(ma[k]) | ~np.isfinite(mb[k])))
        note(f'{bad.sum()} pair(s) with non-finite logits at held-out examples, left out of every statistic: '
             + '; '.join(f'seed {pair_info["seed"][k]} at example(s) {where(k)}' for k in np.flatnonzero(bad)[:10])
             + (f' and {bad.sum() - 10} more' if bad.sum() > 10 else '') + '. Such runs diverged.')
    ok = ~bad
    pair_info = {k: v[ok] for k, v in pair_info.items()}
    kept_in_a = ~np.array([factorial_split(int(s), len(idx)) for s in pair_info['seed']], dtype=bool).reshape(-1, len(idx))
    return ma[ok], mb[ok], kept_in_a, pair_info


def estimate(ma, mb, kept_in_a, positions, alpha=0.01):
    """Every estimate of the factorial design from the held-out margins of complete pairs.
    ma, mb (pairs, m): margins in runs a and b; kept_in_a (pairs, m) bool; positions [(group, columns)].
    -> dict: per example (m,) mean_kept, mean_removed, self_influence, se, df, stat, p, ci_low, ci_high,
    p_holm, p_bh, significant, kept_in_a (pairs keeping it in a); group_summary; and, with pairs > m + 1,
    cross (stats.cross_influence), cross_p_bh (m, m) (BH over j != i, NaN on the diagonal) and the
    regression's self-influence (regression_self_influence, regression_se, regression_p) per example."""
    pairs, m = ma.shape
    kept, removed = np.where(kept_in_a, ma, mb), np.where(kept_in_a, mb, ma)
    res = stats.paired_test(kept, removed)
    res['self_influence'] = res.pop('diff')
    res['mean_kept'], res['mean_removed'] = kept.mean(0), removed.mean(0)
    res['ci_low'], res['ci_high'] = stats.confidence_interval(res['self_influence'], res['se'], res['df'], LEVEL)
    res['p_holm'], res['p_bh'] = stats.holm(res['p']), stats.benjamini_hochberg(res['p'])
    res['significant'] = res['p'] < alpha
    res['kept_in_a'] = kept_in_a.sum(0)
    res['group_summary'] = group_summary(positions, res, stats.paired_test, kept, removed)
    try:
        cross = stats.cross_influence(ma - mb, np.where(kept_in_a, 1.0, -1.0))
    except ValueError as e:
        res['cross_skipped'] = str(e)
        return res
    off = cross['p'].copy()
    np.fill_diagonal(off, np.nan)
    res['cross'], res['cross_p_bh'] = cross, stats.benjamini_hochberg(off.ravel()).reshape(m, m)
    res['regression_self_influence'] = np.diag(cross['beta']).copy()
    res['regression_se'], res['regression_p'] = np.diag(cross['se']).copy(), np.diag(cross['p']).copy()
    return res


def check(store):
    """Refuse a store of another design, naming the command that reports it."""
    if not is_factorial(store):
        raise StoreError(f'{store.path} is not a factorial store (arms: {", ".join(store.arms)}; a factorial store '
                         f'has {" and ".join(FACTORIAL_ARMS)}). Report it with python viz.py {store.path}.')


def analyse(store, alpha=0.01, controls=viz_controls.CONTROLS):
    """Every statistic of the factorial report (see estimate), plus the store's facts and, with
    controls > 0, the control statistics (viz_controls.analyse); notes on stderr about the store's progress."""
    check(store)
    groups = held_out_groups(store)
    note_progress(store)
    idx = np.concatenate([ix for _, ix in groups])
    ma, mb, kept_in_a, pair_info = read_pairs(store, idx)
    if len(ma) < 2:
        raise StoreError(f'{store.path} holds {len(ma)} complete pair(s) of runs (a and b of one seed, finite '
                         'margins); the paired test needs at least 2 (in practice hundreds). Let the trainer '
                         'finish more runs.')
    positions = positions_of(groups)
    res = estimate(ma, mb, kept_in_a, positions, alpha)
    res.update(path=store.path, trainer=store.settings.get('trainer', '?'), alpha=alpha, pairs=len(ma),
               index=idx, group=np.array([name for name, ix in groups for _ in ix]), groups=positions,
               control_k=controls)
    if controls:
        analyse_controls(store, res, ma, mb, kept_in_a, pair_info)
    return res


def analyse_controls(store, res, ma, mb, kept_in_a, pair_info):
    """Controls matched on their mean margin over both arms (the mean of the two arms' means), which shares
    no noise with their kept - removed differences (see viz_with_without.analyse_controls), against the held-out
    example's mean margin when kept: like the controls, it is trained on itself and on half the held-out set. A run's control value is the line through the controls'
    margins at the example's mean margin (viz_controls). Compared like the example: kept side against
    removed side of each pair, paired."""
    mean_both = (mean_margins(store, 'a', pair_info['run_a']) + mean_margins(store, 'b', pair_info['run_b'])) / 2
    matched = viz_controls.match(store, mean_both, res['index'], res['mean_kept'], res['control_k'])
    ca = viz_controls.per_run_values(store, 'a', matched, pair_info['run_a'])  # (pairs, m)
    cb = viz_controls.per_run_values(store, 'b', matched, pair_info['run_b'])
    has = np.array([len(c) > 0 for c in matched['controls']])
    ok = np.isfinite(ca[:, has]).all(1) & np.isfinite(cb[:, has]).all(1)
    if not ok.all():
        note(f'{(~ok).sum()} pair(s) with non-finite logits at a control example, left out of the control '
             f'analysis: seeds {listed(pair_info["seed"][~ok].tolist())}.')
    if ok.sum() < 2:
        res['control_skipped'] = f'{ok.sum()} pair(s) with finite control margins; at least 2 are needed.'
        return
    k_a, ma, mb, ca, cb = kept_in_a[ok], ma[ok], mb[ok], ca[ok], cb[ok]
    kept, removed = np.where(k_a, ma, mb), np.where(k_a, mb, ma)
    c_kept, c_removed = np.where(k_a, ca, cb), np.where(k_a, cb, ca)
    res['control_test'], res['control_runs'] = 'paired', int(ok.sum())
    viz_controls.analyse(res, stats.paired_test, kept, removed, c_kept, c_removed, matched)


############################################
#                 report                   #
############################################

def lines(res, top=TOP, every=False):
    """The printed report: design, group means, the held-out examples with p < alpha, controls, cross-influences;
    every=True (--all) lists every held-out example and its control row, and every cross-influence that passes BH."""
    pct, alpha, m = f'{LEVEL:.0%}', res['alpha'], len(res['index'])
    text = (f'Factorial design, store {res["path"]} (trainer {res["trainer"]}): {res["pairs"]} pairs of runs; each '
            'held-out example removed from one run of its pair by a coin (method: docs/analysis.md). Paired t-test '
            f'(df {res["pairs"] - 1}), {pct} CI; Holm and BH over all {m} held-out examples. Group means:')
    out = [*answer(res)[0], 'Details (every test but the answer above is secondary):', *textwrap.wrap(text, 110),
           f'{"group":<12}{"examples":>8}  {"mean":>7}  {pct + " CI":<18}  {"p":>6}  {"sig. +":>6}  {"sig. -":>6}']
    for name, g in res['group_summary'].items():
        ci = f'[{g["ci_low"]:+.3f}, {g["ci_high"]:+.3f}]'
        out.append(f'{name.capitalize():<12}{g["examples"]:>8}  {g["mean"]:>+7.3f}  {ci:<18}  {g["p"]:>6.4f}  '
                   f'{g["significant_positive"]:>6}  {g["significant_negative"]:>6}')
    regression = 'regression_self_influence' in res
    head = example_head('kept', 'removed') + (f'  {"regression":>10}  {"reg. p":>6}' if regression else '')

    def row(j):
        return example_line(res, j, 'mean_kept', 'mean_removed') + (
            f'  {res["regression_self_influence"][j]:>+10.3f}  {res["regression_p"][j]:>6.4f}' if regression else '')
    # By default only the examples with p < alpha, as the with/without report's table; --all lists every one.
    title = f'Every held-out example. * marks p < {alpha:g}' if every else \
        f'Held-out examples with p < {alpha:g} (every one: --all)'
    out += ['', f'{title}; kept / removed: its mean margin in the run that kept / removed it;',
            'regression: the coefficient of its own assignment (see cross-influences).'
            if regression else f'(no regression estimate: {res["cross_skipped"]})', head]
    for name, pos in res['groups']:
        out.append(group_title(name))
        out += [row(j) for j in pos if every or res['significant'][j]] or ['(none)']
    out += controls_section(res) + cross_section(res, top, every)
    if every:
        out += viz_controls.all_rows(res)
    return out


def answer(res):
    """The headline (viz_io.headline): the control-adjusted group means over the pairs."""
    return headline(res, f'paired t-test over {res["pairs"]} pairs')


def controls_section(res):
    if 'control_adjusted' not in res:
        return viz_controls.section(res, '')
    return viz_controls.section(res, controls_intro(res, f'paired t-test over {res["control_runs"]} pairs'))


def cross_rows(res):
    """Every pair j != i as (p, j, i), sorted by p (NaN last)."""
    m = len(res['index'])
    j, i = np.nonzero(~np.eye(m, dtype=bool))
    order = np.lexsort((i, j, np.nan_to_num(res['cross']['p'][j, i], nan=np.inf)))
    return j[order], i[order]


def cross_section(res, top, every):
    alpha, m = res['alpha'], len(res['index'])
    if 'cross' not in res:
        return ['', f'Cross-influences: not estimated; {res["cross_skipped"]}.']
    c, df = res['cross'], res['cross']['df']
    passing = np.nan_to_num(res['cross_p_bh'], nan=1.0) < alpha
    np.fill_diagonal(passing, False)
    beta = c['beta']
    q = stats.confidence_interval(0.0, 1.0, df, LEVEL)[1]  # the t quantile of the CIs
    text = ('Cross-influences j -> i: for each held-out example i, least squares of its margin difference (run a '
            '- run b) on every held-out example\'s assignment (+1 kept in a, -1 kept in b) and an intercept; df '
            f'{df}. The coefficient of j is the change of i\'s margin when j is added; BH over the {m * (m - 1)} '
            f'pairs j != i. {passing.sum()} pass BH p < {alpha:g} ({(passing & (beta > 0)).sum()} positive, '
            f'{(passing & (beta < 0)).sum()} negative).')
    lines = ['', *textwrap.wrap(text, 110)]
    diag = np.isfinite(res['regression_self_influence'])
    if diag.sum() >= 3:
        r = np.corrcoef(res['regression_self_influence'][diag], res['self_influence'][diag])[0, 1]
        lines.append(f'The coefficient of i\'s own assignment, a second self-influence estimate: correlation {r:.2f} '
                     f'with the pair means over {diag.sum()} examples.')
    js, is_ = cross_rows(res)
    shown = [(j, i) for j, i in zip(js, is_) if passing[j, i]] if every else list(zip(js, is_))[:top]
    lines += ['', (f'Every cross-influence that passes BH p < {alpha:g}:' if every else
                   f'The {len(shown)} with the smallest p:'),
              f'{"from j":>7}  {"to i":>6}  {"effect":>7}  {f"{LEVEL:.0%} CI":<18}  {"p":>9}  {"BH p":>9}']
    for j, i in shown:
        ci = f'[{beta[j, i] - q * c["se"][j, i]:+.3f}, {beta[j, i] + q * c["se"][j, i]:+.3f}]'
        lines.append(f'{res["index"][j]:>7}  {res["index"][i]:>6}  {beta[j, i]:>+7.3f}  {ci:<18}  '
                     f'{ptext(c["p"][j, i]):>9}  {ptext(res["cross_p_bh"][j, i]):>9}')
    if not shown:
        lines.append('(none)')
    return lines


############################################
#                 outputs                  #
############################################

COLUMNS = ['group', 'index', 'kept_in_a', 'mean_kept', 'mean_removed', 'self_influence', 'se', 'df', 'stat', 'p',
           'ci_low', 'ci_high', 'p_holm', 'p_bh', 'significant', 'regression_self_influence', 'regression_se',
           'regression_p', *viz_controls.COLUMNS]


def json_doc(res):
    """Settings, group summaries and every estimated cross-influence j -> i (j != i) with its CI, p and BH p
    (viz_io.write_json adds the per-example rows)."""
    doc = dict(store=res['path'], trainer=res['trainer'], design='factorial', pairs=res['pairs'], alpha=res['alpha'],
               level=LEVEL, controls_per_example=res['control_k'], headline=answer(res)[1],
               groups=res['group_summary'])
    if 'cross' in res:
        c = res['cross']
        q = stats.confidence_interval(0.0, 1.0, c['df'], LEVEL)[1]  # the t quantile of the CIs
        doc['cross_df'] = c['df']
        doc['cross_influences'] = [
            {'from': res['index'][j], 'to': res['index'][i], 'effect': c['beta'][j, i], 'se': c['se'][j, i],
             'ci_low': c['beta'][j, i] - q * c['se'][j, i], 'ci_high': c['beta'][j, i] + q * c['se'][j, i],
             'p': c['p'][j, i], 'p_bh': res['cross_p_bh'][j, i]} for j, i in zip(*cross_rows(res))]
    else:
        doc['cross_skipped'] = res['cross_skipped']
    return doc


def plot_labels(res):
    """x label and title of the forest plot (viz_io.write_plot; diamonds: the control-adjusted estimates)."""
    return ('self-influence = mean margin kept - removed; diamonds: control-adjusted',
            f'{res["trainer"]}: factorial design, {res["pairs"]} pairs')

