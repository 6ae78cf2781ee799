"""viz_scan.py: the scan report (python viz.py --scan): every training example's self-influence from a
scan store, whose runs each trained on a random half of the training set (a trainer's --scan).

    python viz.py --scan                          # runs/airbench-scan
    python viz.py --scan --trainer digits --top 30 --csv scan.csv --json scan.json

Self-influence of example i = its mean margin over the runs that included it - its mean over the runs
that excluded it, Welch's t-test per example, Benjamini-Hochberg over all. The report lists the most
negative and most positive examples, the easy-set candidates (easy_candidates: the most negative among
the high-margin examples), where the store's held-out examples rank, and whether any of it is more than
noise: the split-half reliability of the estimates (even against odd runs, in the same pass) and the most
extreme estimates next to what estimates with no effect anywhere would give (simulated).

A scan estimates the effect of adding an example to models trained on half the data, not leave-one-out
on the full set: confirm its picks on other seeds with a with/without or factorial store.

How: one streamed pass over the runs' kept margins (store/margins.py), a chunk of runs at a time, all runs
and both halves together, so memory does not grow with the number of runs; the no-effect simulation draws
NULL_DRAWS scans whatever the number of runs (bench/bench_viz_reports.py measures both).
"""
import textwrap

import numpy as np

import stats
from design import keep_for, kept_mask
from store import Store, StoreError
from viz_io import LEVEL, listed, note, note_progress, ptext, wrap_items

HIGH_MARGIN_QUANTILE = 0.75  # high margin: mean margin when included at or above this quantile of the tested
NULL_DRAWS = 200             # simulated scans with no effect, for the extremes (stats.null_extremes)
TOP = 20                     # the noise check's k: easy candidates compared across halves, extremes (--top)
LISTED = 10                  # examples per printed list; --top N sets both to N


def check(store):
    """Refuse a store without a scan arm, saying how to make a scan."""
    if 'scan' not in store.arms:
        trainer = store.settings.get('trainer', 'X')
        raise StoreError(f'{store.path} is not a scan store: it has no \'scan\' arm (arms: {", ".join(store.arms)}). '
                         f'Make one with python trainer_{trainer}.py --scan (it writes runs/{trainer}-scan), '
                         f'then run python viz.py --scan.')


def open_scan(path):
    """The scan store at `path`, checked (see check), for analyse."""
    store = Store(path)
    check(store)
    return store


def scan_masks(store, seeds):
    """(k, n_train) bool: the examples each run trained on, recomputed from its seed as the trainer drew them."""
    n_train, held_out = store.settings['n_train'], store.settings['held_out']
    included = np.zeros((len(seeds), n_train), dtype=bool)
    for row, seed in zip(included, seeds):
        row[:] = kept_mask(keep_for('scan', int(seed), n_train, held_out), n_train)
    return included


def scan_chunks(store, run_info, left_out):
    """Yield (margins (k, n_train) float64, included (k, n_train) bool, odd (k,) bool: odd run number),
    a chunk of the scan's runs at a time (Store.margin_chunks). Runs with a non-finite margin are skipped;
    their run numbers are appended to left_out."""
    kept = store.kept_chunks('scan')  # kept beside the pack, or None: drawn again from the seeds
    for lo, m in store.margin_chunks('scan'):
        seeds, numbers = run_info['seed'][lo:lo + len(m)], run_info['run'][lo:lo + len(m)]
        ok = np.isfinite(m).all(1)
        left_out += [int(r) for r in numbers[~ok]]
        included = scan_masks(store, seeds[ok]) if kept is None else next(kept)[1]
        if kept is not None and not ok.all():
            included = included[ok]
        yield (m if ok.all() else m[ok]), included, numbers[ok] % 2 == 1  # no copy of the usual whole chunk


def analyse(store, alpha=0.01, top=TOP):
    """Every statistic of the scan report, with notes on stderr about the store's progress. -> dict:
    per-example (n_train,) arrays (index, label, n_in, mean_in, ..., rank, high_margin, tested,
    self_influence_even / _odd: the estimates from the even and the odd run numbers alone), the scan's
    summary (runs, counts, threshold) and 'reliability' (see reliability; `top`: the length of the lists
    it compares)."""
    check(store)
    note_progress(store)
    logits, run_info = store.load('scan')  # (N, n_train, 10) float16, memory-mapped
    if len(logits) < 2:
        raise StoreError(f'{store.path} holds {len(logits)} finished scan run(s); comparing runs that '
                         'included an example with runs that excluded it needs at least 2 (in practice '
                         'hundreds). Let the trainer finish more runs.')
    left_out = []
    try:
        res, even, odd = stats.scan_test_halves(scan_chunks(store, run_info, left_out))
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
    threshold = np.quantile(res['mean_in'][tested], HIGH_MARGIN_QUANTILE)
    res['high_margin'] = tested & (res['mean_in'] >= threshold)
    res['tested'] = tested
    res['self_influence_even'] = np.where(tested, even['diff'], np.nan)
    res['self_influence_odd'] = np.where(tested, odd['diff'], np.nan)
    res['index'] = np.arange(n)
    res['label'] = np.asarray(store.labels)
    res.update(path=store.path, trainer=store.settings.get('trainer', '?'), runs=usable, left_out_runs=left_out,
               alpha=alpha, order=order, high_margin_threshold=threshold,
               groups=[(name, np.asarray(ix, dtype=np.int64)) for name, ix in store.settings['held_out'].items()])
    res['reliability'] = reliability(res, top)
    return res


def easy_candidates(res, k=20, per_class=None):
    """The rule that picks an "easy" held-out set from a scan: among the tested examples whose mean
    margin when included is in the top quartile (res['high_margin']), the k with the most negative
    self-influence estimates; with per_class, at most that many of one label. res: analyse's result.
    -> (<= k,) int64 indices, most negative first."""
    order = res['order'][res['high_margin'][res['order']]]
    if per_class is not None:
        taken = {}
        keep = []
        for j in order:
            label = int(res['label'][j])
            if taken.get(label, 0) < per_class:
                taken[label] = taken.get(label, 0) + 1
                keep.append(j)
        order = np.asarray(keep, dtype=np.int64)
    return order[:k]


def reliability(res, top):
    """Is the scan more than noise? -> dict:
    split_half: (r, Spearman-Brown, examples) of the even- against the odd-run estimates, over all tested
      examples; split_half_high: the same over the high-margin ones;
    overlap: how many of the `top` easy candidates of the even runs are among those of the odd runs, and
      overlap_chance, the number expected if the two lists were drawn at random (top^2 / high-margin);
    extremes: for the lists the report prints, the observed k-th most extreme estimate against the same
      order statistic of estimates with no effect (stats.null_extremes with the observed standard errors):
      {name: dict(examples, observed, null_median, null_far, null_near, beyond)}, (k,) arrays each, most
      extreme first; null_far / null_near: the 2.5% / 97.5% quantiles of the draws on the list's side
      (for a negative list: 2.5% and 97.5%; positive: 97.5% and 2.5%); beyond: observed past null_far.
    The simulation takes the estimates as independent; in a scan they share runs, so read it as a guide."""
    tested, high = res['tested'], res['high_margin']
    even, odd = res['self_influence_even'], res['self_influence_odd']
    out = dict(split_half=stats.split_half(even[tested], odd[tested]),
               split_half_high=stats.split_half(even[high], odd[high]))
    both = high & np.isfinite(even) & np.isfinite(odd)
    k = min(top, both.sum())
    pick = lambda est: set(np.flatnonzero(both)[np.argsort(est[both], kind='stable')[:k]])
    out['overlap'], out['overlap_k'] = len(pick(even) & pick(odd)), int(k)
    out['overlap_chance'] = k * k / both.sum() if both.sum() else np.nan
    si, se = res['self_influence'], res['se']
    out['extremes'] = {}
    draws = {}  # one simulation per subset serves both tails: the null is symmetric
    for name, subset, sign in (('most negative', tested, 1), ('most positive', tested, -1),
                               ('most negative high-margin', high, 1)):
        if subset.sum() < 2:
            continue
        key = 'high' if subset is high else 'tested'
        if key not in draws:
            draws[key] = stats.null_extremes(se[subset], top, NULL_DRAWS, seed=len(draws))
        null = sign * draws[key]
        observed = sign * np.sort(sign * si[subset])[:null.shape[1]]
        low, mid, high_q = np.quantile(null, [0.025, 0.5, 0.975], axis=0)
        # far: the 2.5% of no-effect draws most extreme on this list's side; beyond it, p < 0.025 one-sided
        far, near = (low, high_q) if sign > 0 else (high_q, low)
        out['extremes'][name] = dict(examples=int(subset.sum()), observed=observed, null_median=mid, null_far=far,
                                     null_near=near, beyond=sign * observed < sign * far)
    return out


COLUMNS = ['index', 'label', 'n_in', 'n_out', 'mean_in', 'mean_out', 'self_influence', 'se', 'df', 'stat', 'p',
           'ci_low', 'ci_high', 'p_bh', 'rank', 'high_margin', 'tested', 'self_influence_even',
           'self_influence_odd']  # per training example, in CSV and JSON


def scan_head():
    """mean margin in / out: over the runs that included / excluded the example."""
    return (f'{"rank":>6}  {"index":>6}  {"label":>5}  {"mean margin in":>14}  {"mean margin out":>15}  {"self-infl":>9}  '
            f'{f"{LEVEL:.0%} CI":<18}  {"p":>9}  {"BH p":>9}')


def scan_row(res, j):
    if not res['tested'][j]:
        return (f'{"-":>6}  {j:>6}  {res["label"][j]:>5}  left out: included in {res["n_in"][j]} run(s), '
                f'excluded from {res["n_out"][j]}')
    ci = f'[{res["ci_low"][j]:+.3f}, {res["ci_high"][j]:+.3f}]'
    return (f'{res["rank"][j]:>6.0f}  {j:>6}  {res["label"][j]:>5}  {res["mean_in"][j]:>14.3f}  '
            f'{res["mean_out"][j]:>15.3f}  {res["self_influence"][j]:>+9.3f}  {ci:<18}  '
            f'{ptext(res["p"][j]):>9}  {ptext(res["p_bh"][j]):>9}')


def answer(res):
    """The scan's headline: how many examples pass BH, and whether the estimates are more than noise.
    -> (lines ending with a blank one, the JSON's 'headline')."""
    tested, si, alpha = res['tested'], res['self_influence'], res['alpha']
    significant = tested & (res['p_bh'] < alpha)
    r, sb, _ = res['reliability']['split_half']
    beyond = [name for name, e in res['reliability']['extremes'].items() if e['beyond'][0]]
    text = (f'Answer: {significant.sum()} of {tested.sum()} tested examples have BH p < {alpha:g} '
            f'({(significant & (si < 0)).sum()} negative, {(significant & (si > 0)).sum()} positive); split halves '
            f'correlate at r = {r:.2f}' + (f' (reliability {sb:.2f})' if r > 0 else '') + '; the most extreme estimate '
            + (f'of {", ".join(beyond)} is beyond what no effect gives' if beyond else 'of every list is within what no '
               'effect gives: no candidate stands out from noise') + ' (method: docs/analysis.md).')
    doc = dict(tested=int(tested.sum()), significant=int(significant.sum()),
               negative=int((significant & (si < 0)).sum()), positive=int((significant & (si > 0)).sum()),
               split_half_r=r, spearman_brown=sb, beyond_no_effect=beyond)
    return [*textwrap.wrap(text, 110), ''], doc


def lines(res, top=LISTED):
    """The scan's printed report: the answer, header, the top-k lists, where the store's held-out examples
    rank, and whether it is more than noise."""
    tested, order = res['tested'], res['order']
    counts = res['n_in']
    significant = tested & (res['p_bh'] < res['alpha'])
    si = res['self_influence']
    out = answer(res)[0] + [f'Scan {res["path"]} (trainer {res["trainer"]}): {res["runs"]} runs, {len(si)} examples, '
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
    out += [scan_row(res, j) for j in order[:top]]
    out += ['', f'{min(top, len(order))} most positive self-influence:', scan_head()]
    out += [scan_row(res, j) for j in order[::-1][:top]]
    out += ['', f'Most negative among high-margin examples (mean margin when included >= '
                f'{res["high_margin_threshold"]:.3f}, the top quartile; {res["high_margin"].sum()} examples), '
                f'the candidates for an "easy" held-out set:', scan_head()]
    out += [scan_row(res, j) for j in easy_candidates(res, top)]
    return out + held_out_section(res) + noise_section(res)


def held_out_section(res):
    """Where the store's held-out examples rank, a few per line: index: rank (self-influence, * where BH
    p < alpha); their other columns are in --csv and --json."""
    out = ['', f'Held-out examples of the store, index: rank among the {res["tested"].sum()} tested (self-influence, '
               f'* BH p < {res["alpha"]:g}; every column: --csv):']
    if not res['groups']:
        out.append('(the store lists none)')
    for name, ix in res['groups']:
        items = [f'{j}: {res["rank"][j]:.0f} ({res["self_influence"][j]:+.3f}'
                 f'{"*" if res["p_bh"][j] < res["alpha"] else ""})' if res['tested'][j] else f'{j}: - (left out)'
                 for j in ix]
        out += wrap_items(items, first=f'{name.capitalize() + ":":<8}', width=110)
    return out


def noise_section(res):
    """Is the scan more than noise: split-half reliability and the extremes against no effect."""
    rel = res['reliability']
    r, sb, n = rel['split_half']
    r_high, _, n_high = rel['split_half_high']
    text = (f'Is it more than noise (method: docs/analysis.md)? Split halves: r = {r:.2f} over {n} '
            'tested' + (f' (reliability {sb:.2f})' if r > 0 else '') + f', {r_high:.2f} over {n_high} high-margin')
    if rel['overlap_k']:
        text += (f'; easy candidates in both: {rel["overlap"]} of {rel["overlap_k"]} '
                 f'({rel["overlap_chance"]:.1f} by chance)')
    text += f'; against {NULL_DRAWS} scans of no effect:'
    lines = ['', *textwrap.wrap(text, 110),
             f'{"list":<27}{"examples":>8}  {"k":>4}  {"observed":>8}  {"no effect":>9}  {"95% of draws":<18}  verdict']
    for name, e in rel['extremes'].items():
        for k in sorted({0, len(e['observed']) - 1}):
            span = sorted((e['null_far'][k], e['null_near'][k]))
            verdict = 'beyond: more extreme than no effect gives' if e['beyond'][k] else 'within what no effect gives'
            lines.append(f'{name:<27}{e["examples"]:>8}  {k + 1:>4}  {e["observed"][k]:>+8.3f}  '
                         f'{e["null_median"][k]:>+9.3f}  {f"[{span[0]:+.3f}, {span[1]:+.3f}]":<18}  {verdict}')
    return lines


def json_doc(res):
    """The scan's summary and its reliability (see reliability); viz_io.write_json adds one row per training
    example."""
    doc = dict(store=res['path'], trainer=res['trainer'], runs=res['runs'], left_out_runs=res['left_out_runs'],
               level=LEVEL, alpha=res['alpha'], high_margin_threshold=float(res['high_margin_threshold']),
               high_margin_rule='mean margin when included in the top quartile of the tested examples',
               held_out={name: ix.tolist() for name, ix in res['groups']}, null_draws=NULL_DRAWS,
               headline=answer(res)[1])
    rel = res['reliability']
    doc['reliability'] = dict(
        split_half_r=rel['split_half'][0], spearman_brown=rel['split_half'][1], split_half_examples=rel['split_half'][2],
        split_half_r_high_margin=rel['split_half_high'][0], split_half_examples_high_margin=rel['split_half_high'][2],
        easy_candidates_overlap=rel['overlap'], easy_candidates_compared=rel['overlap_k'],
        easy_candidates_overlap_chance=rel['overlap_chance'], extremes=rel['extremes'])
    return doc


