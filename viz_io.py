"""viz_io.py: what the three reports share: reading margins out of a run store (streamed, a chunk of runs
at a time, from the margins kept beside the pack, only the columns asked for), the notes on stderr, the
group means and per-example table rows of the with/without and factorial reports, and the CSV / JSON /
forest-plot writers, which take a report's result.

Reports: viz_with_without.py, viz_factorial.py, viz_scan.py; each offers analyse(store, ...) -> result dict,
lines(result, ...) -> the printed report, COLUMNS (its per-example CSV / JSON columns), json_doc(result) and,
but for the scan, plot_labels(result); viz.py is the command line that picks one from the store's arms.
"""
import csv
import errno
import json
import os
import re
import stat
import sys
import textwrap
import time

import numpy as np

import stats
from store import StoreError
from store.files import TAG, _tag, _tag_owner, identity, owner_alive

LEVEL = 0.95  # confidence level of every interval


def note(message):
    print(f'viz: {message}', file=sys.stderr, flush=True)


def listed(indices, limit=10):
    """'3, 17, 40 and 5 more': the first `limit` of a list of runs or examples."""
    shown = ', '.join(str(i) for i in indices[:limit])
    return shown + (f' and {len(indices) - limit} more' if len(indices) > limit else '')


def ptext(p):
    """p-values that reach 1e-30 and below: three significant digits, not four decimals."""
    return f'{p:.3g}'


def group_title(name):
    return f'{name.capitalize()} examples:'


############################################
#            reading the store             #
############################################

def note_progress(store):
    """Say on stderr if the store is still being written or holds runs that diverged."""
    path = store.path
    busy = store.in_progress()
    if busy:
        note(f'{path} is still being written ({busy} run(s) in progress); analysing the runs finished so far.')
    failed = store.failed()
    if failed:
        note(f'{len(failed)} run(s) diverged during training and were recorded in {path}/failed/, not stored.')


def held_out_groups(store):
    """[(name, indices (k,) int64)] of the store's held-out examples, in the store's order."""
    groups = [(name, np.asarray(ix, dtype=np.int64)) for name, ix in store.settings['held_out'].items()]
    if not groups or not all(len(ix) for _, ix in groups):
        raise StoreError(f'{store.path}/settings.json lists no held-out examples '
                         f'(held_out = {store.settings["held_out"]}); nothing to analyse.')
    return groups


def positions_of(groups):
    """[(name, indices)] -> [(name, its positions in the concatenated held-out order)]."""
    out, start = [], 0
    for name, ix in groups:
        out.append((name, np.arange(start, start + len(ix))))
        start += len(ix)
    return out


def read_margins(store, arm, idx):
    """Margins of the examples idx (m,) in every finished run of `arm` (Store.margin_chunks: from the margins
    kept beside the pack). -> margins (N, m) float64, run_info (dict of (N,) arrays: run, seed, seconds,
    test_acc)."""
    _, run_info = store.load(arm)
    out = np.empty((len(run_info['run']), len(idx)))
    for lo, chunk in store.margin_chunks(arm, idx):
        out[lo:lo + len(chunk)] = chunk
    return out, run_info


def drop_nonfinite(arm, margins, run_info, idx, what='held-out examples'):
    """Leave out runs with a NaN/inf margin at any column; say which runs and examples."""
    bad = ~np.isfinite(margins)  # (N, m)
    rows = np.flatnonzero(bad.any(1))
    if len(rows):
        where = lambda r: ', '.join(str(idx[j]) for j in np.flatnonzero(bad[r]))
        shown = '; '.join(f'run {run_info["run"][r]} at example(s) {where(r)}' for r in rows[:10])
        more = f' and {len(rows) - 10} more' if len(rows) > 10 else ''
        note(f'{arm} arm: {len(rows)} run(s) with non-finite logits at {what}, left out of '
             f'every statistic: {shown}{more}. Such runs diverged; retrain them if they are many.')
    keep = np.setdiff1d(np.arange(len(margins)), rows)
    return margins[keep], {k: np.asarray(v)[keep] for k, v in run_info.items()}


def mean_margins(store, arm, run_numbers=None):
    """Every training example's mean margin over the runs of `arm` (those numbered in `run_numbers`, default
    all): from the sums kept with the margins where every run is used, else one streamed pass over its
    margins, a chunk of runs at a time. A non-finite margin counts for nothing.
    -> (n_train,) float64, NaN for an example with no finite margin."""
    _, run_info = store.load(arm)
    use = np.ones(len(run_info['run']), bool) if run_numbers is None else np.isin(run_info['run'], run_numbers)
    kept = store.margin_sums(arm) if use.all() else None  # summed in this order when the margins were kept
    if kept is not None:
        total, count = kept
        with np.errstate(invalid='ignore', divide='ignore'):
            return np.where(count > 0, total / count, np.nan)
    n_train = store.settings['n_train']
    total, count = np.zeros(n_train), np.zeros(n_train, np.int64)
    for lo, chunk in store.margin_chunks(arm):
        m = chunk[use[lo:lo + len(chunk)]]  # (k, n_train)
        ok = np.isfinite(m)
        total += np.where(ok, m, 0.0).sum(0)
        count += ok.sum(0)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(count > 0, total / count, np.nan)


############################################
#          tables of two reports           #
############################################

def group_summary(positions, res, compare, a, b):
    """Each group's mean self-influence over all its examples, tested on the per-run (per-pair) group
    average of sides a and b (runs, m), so that the correlation between examples of one run is accounted
    for; the CI is for these k examples. positions: [(group, columns)]; res: the per-example significant
    and self_influence; compare(x, y) -> a test dict (diff, se, df, p).
    -> {group: dict(examples, mean, ci_low, ci_high, p, significant_positive, significant_negative)}."""
    out = {}
    for name, pos in positions:
        g = compare(a[:, pos].mean(1, keepdims=True), b[:, pos].mean(1, keepdims=True))
        low, high = stats.confidence_interval(g['diff'], g['se'], g['df'], LEVEL)
        sig, si = res['significant'][pos], res['self_influence'][pos]
        out[name] = dict(examples=len(pos), mean=g['diff'][0], ci_low=low[0], ci_high=high[0], p=g['p'][0],
                         significant_positive=int((sig & (si > 0)).sum()),
                         significant_negative=int((sig & (si < 0)).sum()))
    return out


def example_head(first, second):
    """Head of the per-example table: first / second name the two sides' mean margin columns."""
    return (f'{"index":>6}  {first:>7}  {second:>7}  {"self-infl":>9}  {f"{LEVEL:.0%} CI":<18}  {"p":>6}    '
            f'{"Holm":>6}  {"BH":>6}')


def example_line(res, j, first, second):
    """Example j's row under example_head: res[first][j], res[second][j] (mean margins), self-influence, CI,
    p with * where p < alpha, Holm and BH p."""
    ci = f'[{res["ci_low"][j]:+.3f}, {res["ci_high"][j]:+.3f}]'
    mark = '*' if res['significant'][j] else ' '
    return (f'{res["index"][j]:>6}  {res[first][j]:>7.3f}  {res[second][j]:>7.3f}  '
            f'{res["self_influence"][j]:>+9.3f}  {ci:<18}  {res["p"][j]:>6.4f} {mark}  '
            f'{res["p_holm"][j]:>6.4f}  {res["p_bh"][j]:>6.4f}')


def per_group(res, row):
    """Each group's title, then row(j) for each of its examples (positions j)."""
    lines = []
    for name, pos in res['groups']:
        lines.append(group_title(name))
        lines += [row(j) for j in pos]
    return lines


############################################
#                 writers                  #
############################################

def _finite_or_none(v):
    return v if not isinstance(v, float) or np.isfinite(v) else None


def plain(v):
    """A numpy scalar or array as plain Python (floats, ints, bools, lists); NaN/inf stay floats."""
    return v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v


def wrap_items(items, first, width):
    """Join items with two spaces into lines of at most `width` characters, never splitting an item."""
    lines, line = [], first
    for item in items:
        if len(line) + len(item) > width and line.strip():
            lines.append(line.rstrip())
            line = ' ' * len(first)
        line += item + '  '
    return lines + [line.rstrip()]


def rows_of(res, columns):
    """One dict per example (row of res['index']) with the columns of `columns` that res holds, plain
    Python values (NaN/inf kept as floats)."""
    columns = [c for c in columns if c in res]
    return [{c: res[c][j].item() for c in columns} for j in range(len(res['index']))]


TMP_PREFIX = '.viz-tmp-'  # + the store's tag (boot id, pid and time namespace, pid, start time, 8 hex digits):
                          # its owner can be checked as a store file's is; short, so any legal name works beside it
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + f'({TAG})')
_UNKNOWN_OWNER = re.compile(re.escape(TMP_PREFIX) + r'\d+-[0-9a-f]{8}')  # the form before the tag: a pid alone
STALE_S = 86400.0  # a temporary file whose owner cannot be checked from here is left over after a day


def remove_stale_temps(paths):
    """Remove the temporary files a killed viz left beside `paths`: TMP_PREFIX names of a process of this
    kernel and pid namespace that no longer runs; any other (another PID namespace's or machine's, or an
    earlier viz's name that holds a pid alone, and NAME.tmp-PID-HEX, the earliest form, for these report
    names only) once it is older than a day."""
    for path in {os.path.realpath(p) for p in paths if p and p != '-' and _descriptor_name(p) is None}:
        folder, base = os.path.split(path)
        earliest = re.compile(re.escape(base) + r'\.tmp-\d+-[0-9a-f]{8}')
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        me = identity()
        for name in names:
            tagged = _TMP_NAME.fullmatch(name)
            if not (tagged or _UNKNOWN_OWNER.fullmatch(name) or earliest.fullmatch(name)):
                continue
            full = os.path.join(folder, name)
            try:
                mtime = os.lstat(full).st_mtime
                owner = _tag_owner(tagged[1]) if tagged else {}
                checkable = me['boot'] and (owner.get('boot'), owner.get('pidns')) == (me['boot'], me['pidns'])
                if mtime < time.time() - STALE_S or (checkable and not owner_alive(owner, mtime)):
                    os.remove(full)
            except OSError:
                pass


# Names of an open descriptor rather than of a file: writing through them must not reopen (and truncate) or
# rename over what they point to (stdout redirected to a file, a pipe).
_DESCRIPTOR = re.compile(r'/dev/std(?:in|out|err)|/dev/fd/\d+|/proc/[^/]+/fd/\d+')
_STD_FD = {'/dev/stdin': 0, '/dev/stdout': 1, '/dev/stderr': 2}


def _absolute(path):
    return os.path.normpath(os.path.join(os.getcwd(), path))


def _descriptor_name(path):
    """The first name along `path`'s chain of symbolic links that names an open descriptor (/dev/stdout,
    /dev/fd/N, /proc/PID/fd/N), else None."""
    for _ in range(40):  # the kernel's limit on links followed
        path = _absolute(path)
        if _DESCRIPTOR.fullmatch(path):
            return path
        try:
            target = os.readlink(path)
        except OSError:
            return None
        path = os.path.join(os.path.dirname(path), target)
    return None


def _write_through(name, write, mode, text):
    """Write into the descriptor `name` names: this process's own (/dev/stdout, /dev/fd/1, /proc/self/fd/1)
    through a duplicate of it, so that the text goes on at its offset after what was printed before, as
    `cmd > out.txt` expects; another process's opened for appending, never truncated."""
    proc = re.fullmatch(r'/proc/([^/]+)/fd/(\d+)', name)
    fd = _STD_FD.get(name) if name.startswith('/dev/std') else int(name.rpartition('/')[2])
    if proc and proc[1] not in ('self', 'thread-self', str(os.getpid())):
        fd = None  # another process's descriptor
    sys.stdout.flush()  # the printed report comes first
    sys.stderr.flush()
    if fd is None:
        f = open(name, mode.replace('w', 'a'), **text)
    else:
        f = os.fdopen(os.dup(fd), mode, **text)
    with f:
        write(f)
        f.flush()


def write_whole(path, write, mode='w'):
    """Write a report file. A regular file (or a new name) is written through a short temporary name in
    the same folder and renamed into place: a full disk or a kill leaves the previous file or none, never
    a partial one. '-' is standard output; a name of an open descriptor (/dev/stdout, /dev/fd/N,
    /proc/PID/fd/N, or a link to one) is written through it, and anything else that exists and is not a
    regular file (a device, a FIFO) is written into: neither is ever renamed over. A symbolic link's
    target is replaced, not the link. write(f) fills the open file."""
    text = {'newline': ''} if 'b' not in mode else {}
    if path == '-':
        out = sys.stdout.buffer if 'b' in mode else sys.stdout
        write(out)
        out.flush()
        return
    descriptor = _descriptor_name(path)
    if descriptor is not None:
        return _write_through(descriptor, write, mode, text)
    try:
        st = os.stat(path)  # follows links: what a write would reach
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, 'a folder, not a file', path)
        with open(path, mode, **text) as f:
            write(f)
            f.flush()
        return
    target = os.path.realpath(path)
    tmp = os.path.join(os.path.dirname(target), TMP_PREFIX + _tag())
    try:
        with open(tmp, mode, **text) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_csv(res, path, columns):
    """One row per example (res['index']): the columns of `columns` that res holds."""
    columns = [c for c in columns if c in res]
    rows = rows_of(res, columns)

    def write(f):
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    write_whole(path, write)


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return _finite_or_none(plain(v))


def write_json(res, path, doc, columns):
    """doc (a report's json_doc) plus one entry per example under 'examples': its `columns` and, where res
    has them, its controls (index list); NaN/inf written as null."""
    rows = rows_of(res, columns)
    for r, c in zip(rows, res.get('controls', ())):
        r['controls'] = c.tolist()
    doc = _json_safe({**doc, 'examples': rows})
    write_whole(path, lambda f: json.dump(doc, f, indent=1))


def write_plot(res, path, xlabel, title):
    """Forest plot: res['self_influence'] with its CI per held-out example, one colour per group, filled
    markers for p < alpha; where res has 'control_adjusted', a second marker (a diamond just below) with
    its CI: the control-adjusted estimate."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt

    m = len(res['index'])
    adjusted = 'control_adjusted' in res
    fig, ax = plt.subplots(figsize=(7, 1.5 + (0.3 if adjusted else 0.2) * (m + 2 * len(res['groups']))))
    y, ticks, labels = 0.0, [], []
    for k, (name, pos) in enumerate(res['groups']):
        colour = f'C{k}'
        for i, j in enumerate(pos):
            si, lo, hi = res['self_influence'][j], res['ci_low'][j], res['ci_high'][j]
            ax.errorbar(si, y, xerr=[[si - lo], [hi - si]], fmt='o', color=colour, capsize=2, markersize=4,
                        markerfacecolor=colour if res['significant'][j] else 'white',
                        label=f'{_literal(name)} examples' if i == 0 else None)
            if adjusted and np.isfinite(res['control_adjusted'][j]):
                ca, lo, hi = (res[c][j] for c in ('control_adjusted', 'control_adjusted_ci_low',
                                                  'control_adjusted_ci_high'))
                filled = res['control_adjusted_p'][j] < res['alpha']
                ax.errorbar(ca, y - 0.35, xerr=[[ca - lo], [hi - ca]], fmt='D', color=colour, capsize=2,
                            markersize=3.5, alpha=0.7, markerfacecolor=colour if filled else 'white',
                            label=f'{_literal(name)}, control-adjusted' if i == 0 else None)
            ticks.append(y)
            labels.append(str(res['index'][j]))
            y -= 1
        y -= 1.5  # gap between groups
    ax.axvline(0, color='grey', linewidth=0.8)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel(textwrap.fill(xlabel + f' ({LEVEL:.0%} CI; filled: p < {res["alpha"]:g})', 70,
                                break_on_hyphens=False))  # fits 7 inches
    ax.set_title(_literal(title), fontsize=10)
    ax.legend(loc='best', fontsize=8)
    fig.tight_layout()
    kind = os.path.splitext(path)[1][1:].lower() or 'png'
    write_whole(path, lambda f: fig.savefig(f, dpi=120, format=kind), mode='wb')
    plt.close(fig)


def _literal(text):
    """Text shown as it is in a plot: a '$' would start matplotlib's math mode (and fail on '$\\foo$')."""
    return str(text).replace('$', r'\$')


def verdict(estimate, p, alpha):
    """The headline's words for a group estimate and its p."""
    if not np.isfinite(p):
        return 'not tested'
    if p >= alpha:
        return 'not significant: no evidence of self-influence'
    return f'significant: {"negative" if estimate < 0 else "positive"} self-influence'


def headline(res, sample):
    """The report's first lines: per group, the estimate the project stands behind, said in words: the
    control-adjusted group effect where the group's examples have controls, else the raw shift (said so).
    sample: the runs or pairs it rests on, in words. -> (lines ending with a blank one, the JSON's 'headline')."""
    alpha, pct = res['alpha'], f'{LEVEL:.0%}'
    rows, out = [], [f'Answer ({pct} CI, p; significant if p < {alpha:g}; {sample}; method: docs/analysis.md):']
    for name, g in res['group_summary'].items():
        adjusted = 'control_adjusted' in g
        key = 'control_adjusted' if adjusted else 'mean'
        p = g[f'{key}_p' if adjusted else 'p']
        est, low, high = g[key], g[f'{key}_ci_low' if adjusted else 'ci_low'], g[f'{key}_ci_high' if adjusted else 'ci_high']
        basis = 'control-adjusted' if adjusted else 'raw shift, NOT control-adjusted'
        words = verdict(est, p, alpha)
        out.append(f'  {name} examples: {est:+.3f} [{low:+.3f}, {high:+.3f}], p {p:.4f}, {basis}; {words}')
        rows.append(dict(group=name, estimate=est, ci_low=low, ci_high=high, p=p, significant=bool(p < alpha),
                         control_adjusted=adjusted, verdict=words))
    if not all(r['control_adjusted'] for r in rows):
        why = ('--controls 0' if not res['control_k'] else res.get('control_skipped', 'no controls for the group'))
        out.append(f'  (raw shift: {why}; it includes cross-influence from the other held-out examples: docs/controls.md)')
    return out + [''], dict(sample=sample, level=LEVEL, alpha=alpha, groups=rows)


def controls_intro(res, test):
    """The one line above the control tables: how many controls, how close, which test; the method is
    docs/analysis.md's."""
    count, gap = res['control_count'], res['control_gap']
    per = f'{count.min()}' if count.min() == count.max() else f'{count.min()} to {count.max()}'
    up_to = '' if per == str(res['control_k']) else f' (of up to {res["control_k"]})'
    return (f'Controls (method: docs/analysis.md): {per} per example{up_to}, farthest margin gap median '
            f'{np.nanmedian(gap):.3f}, max {np.nanmax(gap):.3f}; {test}:')
