"""Run stores in the real format (Store.create + save_run) whose margins are planted, for the analysis
tests (test_viz.py, test_controls.py, test_factorial.py, test_scan.py)."""
import numpy as np

import stats
from store import Store
from viz_io import read_margins


def logits_with_margins(margins, labels):
    """(..., n, 10) logits whose margins are `margins` (..., n): label logit = margin, one other class at 0,
    the other eight at -30 (they move the margin by 1e-12). Float16 storage: margins to about 0.004."""
    labels = np.asarray(labels)
    logits = np.full((*np.shape(margins), 10), -30.0)
    np.put_along_axis(logits, np.broadcast_to(((labels + 1) % 10)[:, None], logits.shape[:-1] + (1,)), 0.0, -1)
    np.put_along_axis(logits, np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)),
                      np.asarray(margins, dtype=np.float64)[..., None], -1)
    return logits.astype(np.float16)


def write_arms(path, held_out, labels, margins, seed_base=0):
    """A store whose every example has the planted margins: margins {arm: (runs, n_train)}, run k of every
    arm with seed seed_base + k; rows of NaN are not written (a missing run)."""
    settings = dict(trainer='toy', hyp={}, held_out=held_out, n_train=len(labels), data_fingerprint='toy',
                    seed_base=seed_base, arms=list(margins))
    store = Store.create(path, settings, labels)
    for arm, m in margins.items():
        for run, row in enumerate(m):
            if not np.isnan(row).all():
                store.save_run(arm, run, seed=seed_base + run, logits=logits_with_margins(row, labels),
                               seconds=1.0, test_acc=0.9)
    return store


TOP_N, TOP_RUNS, TOP_K = 5000, 40, 20
TOP_SLOPE = -0.15  # planted control shift per margin unit: with - without = 0.3 + TOP_SLOPE x margin


def top_of_class_store(path, seed):
    """5000 examples, 500 per label, mean margins ~ N(4, 1.5); held out: the 10 highest of each label ('easy',
    100) and 5 drawn at random from the rest ('random', 50). Removing them shifts every example by
    0.3 - 0.15 x its margin (a cross-influence that depends on margin); the held-out ones also by their own
    self-influence, uniform in -0.3..+0.3. Noise: per seed and example (both arms) sd 0.3, per run sd 0.3,
    independent sd 0.15; 40 seed-matched runs per arm. -> (index, self-influence) of the held-out examples."""
    rng = np.random.default_rng(seed)
    labels = np.arange(TOP_N) % 10
    base = rng.normal(4, 1.5, TOP_N)
    easy = np.concatenate([np.flatnonzero(labels == c)[np.argsort(-base[labels == c])[:10]] for c in range(10)])
    rest = np.setdiff1d(np.arange(TOP_N), easy)
    random = np.sort(np.concatenate([rng.choice(rest[labels[rest] == c], 5, replace=False) for c in range(10)]))
    held = np.concatenate([random, easy])
    self_effect = np.zeros(TOP_N)
    self_effect[held] = rng.uniform(-0.3, 0.3, len(held))
    removal = 0.3 + TOP_SLOPE * base + self_effect  # with - without
    seed_noise = rng.normal(0, 0.3, (TOP_RUNS, TOP_N))
    arm = lambda shift: (base - shift + seed_noise + rng.normal(0, 0.3, (TOP_RUNS, 1))
                         + rng.normal(0, 0.15, (TOP_RUNS, TOP_N)))
    write_arms(path, {'random': random.tolist(), 'easy': easy.tolist()}, labels,
               {'with': arm(0.0), 'without': arm(removal)})
    return held, self_effect[held]


def plain_mean_controls(path, res):
    """The estimate before the line: control value = plain mean of the same controls' margins in each run.
    -> control-adjusted (m,), its 95% CI low (m,), high (m,)."""
    store = Store(path)
    runs = {arm: read_margins(store, arm, np.arange(TOP_N))[0] for arm in ('with', 'without')}
    a, b = (runs[arm][:, res['index']] for arm in ('with', 'without'))
    ca, cb = (np.stack([runs[arm][:, c].mean(1) for c in res['controls']], 1) for arm in ('with', 'without'))
    t = stats.paired_test(a - ca, b - cb)
    return (t['diff'], *stats.confidence_interval(t['diff'], t['se'], t['df']))


def coverage(stores=20, controls=TOP_K):
    """Coverage of the planted self-influence by the 95% CIs of the line (the report) and of the plain mean,
    over `stores` top-of-class stores (seeds 0 ..), per group: examples and group means. Printed by
    PYTHONPATH=. python tests/planted_stores.py [stores] (about 3 s per store)."""
    import contextlib
    import io
    import tempfile

    import viz
    hits = {}
    for seed in range(stores):
        with tempfile.TemporaryDirectory() as folder:
            held, truth = top_of_class_store(f'{folder}/store', seed)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                res = viz.main([f'{folder}/store', '--controls', str(controls)])
            old = plain_mean_controls(f'{folder}/store', res)
        new = (res['control_adjusted'], res['control_adjusted_ci_low'], res['control_adjusted_ci_high'])
        for name, pos in res['groups']:
            for method, (estimate, low, high) in (('line', new), ('plain mean', old)):
                h = hits.setdefault((name, method), {'examples': [], 'error': [], 'groups': []})
                h['examples'] += list((low[pos] <= truth[pos]) & (truth[pos] <= high[pos]))
                h['error'].append(np.mean(estimate[pos] - truth[pos]))
            g = res['group_summary'][name]
            hits[name, 'line']['groups'].append(g['control_adjusted_ci_low'] <= truth[pos].mean()
                                                <= g['control_adjusted_ci_high'])
    for (name, method), h in hits.items():
        groups = f', group means {np.mean(h["groups"]):.0%} of {stores}' if h['groups'] else ''
        print(f'{name:<7} {method:<11} examples covered {np.mean(h["examples"]):.1%} of {len(h["examples"])}, '
              f'mean error {np.mean(h["error"]):+.4f}{groups}')


if __name__ == '__main__':
    import sys
    coverage(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
