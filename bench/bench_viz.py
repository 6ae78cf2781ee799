"""bench/bench_viz.py: time and peak memory of viz's analysis on a full-size store, next to a
straightforward baseline that loads every run into RAM.

    python bench/bench_viz.py                 # 2 arms x 1000 runs x 50000 x 10 float16: 2 GB of logits
    python bench/bench_viz.py --runs 20       # a quick check of the bench itself

Steps, each timed: (1) write the store run by run through Store.save_run (random logits, a few planted
effects), (2) the store packs each arm into one (N, 50000, 10) array on its first load (one-time cost),
(3) the floor (every packed logit read once with numpy), viz's analysis with --controls 0 (memory-mapped,
held-out columns only) and the default report (controls included), each with its ratio to the floor, and
(4) the baseline (np.load of every run
file, stacked, margins of all 50000 examples in float32, Welch t-tests of all columns). Each of these runs
in their own process so that the peak memories (ru_maxrss, which includes the ~70 MB of numpy and scipy)
are separate. Needs about twice the logits on disk (run files + packed arrays), in DIR/store (--dir,
default /tmp/bench_viz), deleted at the end unless --keep.
"""
import argparse
import glob
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
N_TRAIN = 50000
BASELINE_RAM_PER_GB = 7.5  # GB of RAM the baseline is given per GB of logits (measured: 14.1 GB peak for 2 GB)


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def available_gb():
    """Memory a new process can get: MemAvailable counts the page cache (the store just written fills
    it) as reclaimable, where free memory (MemFree) does not."""
    try:
        with open('/proc/meminfo') as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith('MemAvailable:'))
        return kb * 1024 / 1e9
    except (OSError, StopIteration):  # not Linux: free memory, a lower bound
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1e9


def make_store(path, runs):
    """2 x runs x (50000, 10) float16 logits, written the way trainers write them (one atomic file per run)."""
    from experiment import HELD_OUT
    from store import Store, seed_for
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N_TRAIN)
    settings = dict(trainer='bench', hyp={}, held_out=HELD_OUT, n_train=N_TRAIN, data_fingerprint='bench',
                    seed_base=0)
    store = Store.create(path, settings, labels)
    planted = np.array(HELD_OUT['random'][:5] + HELD_OUT['easy'][:5])
    shift = np.array([0.3] * 5 + [-0.3] * 5, dtype=np.float32)  # margin units, in the `with` arm only
    for run in range(runs):
        for arm in ('with', 'without'):
            logits = rng.standard_normal((N_TRAIN, 10), dtype=np.float32) * 2
            if arm == 'with':
                logits[planted, labels[planted]] += shift
            store.save_run(arm, run, seed_for(run), logits.astype(np.float16), seconds=0.0, test_acc=0.0)


def child_pack(path):
    from store import Store
    store = Store(path)
    for arm in ('with', 'without'):
        store.load(arm)


def child_viz(path):
    import viz_with_without
    from store import Store
    res = viz_with_without.analyse(Store(path), controls=0)  # held-out columns only; bench_viz_reports.py times controls
    return '\n'.join(viz_with_without.faithful_table(res) + viz_with_without.summary(res))


def child_floor(path):
    """The floor: every logit of both packed arms read once with numpy (sequential chunks of 50 runs)."""
    total = 0.0
    for arm in ('with', 'without'):
        logits = np.load(os.path.join(path, 'packed', f'{arm}.npy'), mmap_mode='r')  # (N, 50000, 10) float16
        for lo in range(0, len(logits), 50):
            total += float(np.asarray(logits[lo:lo + 50]).sum(dtype=np.float32))
    return f'sum of every logit {total:.3g}'


def child_report(path):
    import viz_with_without
    from store import Store
    res = viz_with_without.analyse(Store(path))  # the default report: CONTROLS controls per held-out example
    return '\n'.join(viz_with_without.faithful_table(res))


def child_baseline(path):
    """What the original analysis did: glob the run files, stack them all, margins of everything."""
    from store import Store
    from scipy import special
    from scipy import stats as sps
    store = Store(path)
    labels = store.labels
    margins = {}
    for arm in ('with', 'without'):
        logits = np.stack([np.load(f)['logits'] for f in sorted(glob.glob(os.path.join(path, arm, '*.npz')))])
        x = logits.astype(np.float32)                              # (N, 50000, 10)
        is_label = np.arange(10) == labels[:, None]
        correct = x[:, is_label]                                  # (N, 50000)
        x[:, is_label] = -np.inf
        margins[arm] = correct - special.logsumexp(x, axis=-1)    # (N, 50000) float32
        del logits, x
    t = sps.ttest_ind(margins['with'], margins['without'], equal_var=False)
    idx = np.concatenate([ix for ix in store.settings['held_out'].values()])
    return f'{int((t.pvalue[idx] < 0.01).sum())} held-out examples with p < 0.01'


def measure(step, bench_dir):
    """Run one step in a fresh interpreter -> dict: seconds of the step, peak MB of that process, its text."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', step, '--dir', bench_dir],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'bench step {step} failed:\n{out.stderr}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=1000, help='runs per arm')
    parser.add_argument('--dir', default='/tmp/bench_viz', help='where the generated store goes')
    parser.add_argument('--keep', action='store_true', help='keep the generated store (reused if the size matches)')
    parser.add_argument('--skip-baseline', action='store_true',
                        help=f'the baseline needs about {BASELINE_RAM_PER_GB * 2:.0f} GB of RAM at 1000 runs')
    parser.add_argument('--child', choices=('pack', 'floor', 'viz', 'report', 'baseline'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    store_path = os.path.join(args.dir, 'store')

    if args.child:
        for name in ('scipy.special', 'scipy.stats', 'viz'):  # imports (~1 s, ~50 MB) are not part of the timed step
            importlib.import_module(name)
        t0 = time.perf_counter()
        text = {'pack': child_pack, 'floor': child_floor, 'viz': child_viz, 'report': child_report,
                'baseline': child_baseline}[args.child](store_path)
        print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_mb=peak_mb(), text=text or '')))
        return

    gb = 2 * args.runs * N_TRAIN * 10 * 2 / 1e9
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir)) or '/').free / 1e9
    if free < 2.2 * gb:
        sys.exit(f'{args.dir}: {free:.1f} GB free, the bench needs about {2.2 * gb:.1f} GB '
                 f'(run files + packed arrays of {gb:.1f} GB). Pass a smaller --runs or another --dir.')
    run_file = lambda run: os.path.join(store_path, 'with', f'{run:06d}.npz')
    reuse = args.keep and os.path.exists(run_file(args.runs - 1)) and not os.path.exists(run_file(args.runs))
    print(f'store: 2 arms x {args.runs} runs x {N_TRAIN} x 10 float16 = {gb:.2f} GB of logits in {store_path}')
    if not reuse:
        shutil.rmtree(store_path, ignore_errors=True)  # only the bench's own folder, never --dir itself
        t0 = time.perf_counter()
        make_store(store_path, args.runs)
        print(f'write run files:      {time.perf_counter() - t0:7.1f} s  (Store.save_run, one fsync-ed file per run)')
    try:
        pack = measure('pack', args.dir)
        print(f'pack (one-time):      {pack["seconds"]:7.1f} s  peak {pack["peak_mb"]:7.0f} MB')
        floor = measure('floor', args.dir)
        print(f'floor (numpy read):   {floor["seconds"]:7.2f} s  peak {floor["peak_mb"]:7.0f} MB  (both packed arms once)')
        fast = measure('viz', args.dir)
        print(f'viz analysis:         {fast["seconds"]:7.2f} s  peak {fast["peak_mb"]:7.0f} MB  (--controls 0)  '
              f'{fast["seconds"] / floor["seconds"]:5.1f} x floor')
        report = measure('report', args.dir)
        print(f'viz default report:   {report["seconds"]:7.2f} s  peak {report["peak_mb"]:7.0f} MB  (default controls)  '
              f'{report["seconds"] / floor["seconds"]:5.1f} x floor')
        print(f'first call:           {pack["seconds"] + report["seconds"]:7.2f} s  (pack + default report)  '
              f'{(pack["seconds"] + report["seconds"]) / floor["seconds"]:5.1f} x floor')
        available, needed = available_gb(), BASELINE_RAM_PER_GB * gb
        if not args.skip_baseline and available < needed:
            print(f'baseline skipped: it needs about {needed:.1f} GB of RAM, {available:.1f} GB available')
        elif not args.skip_baseline:
            base = measure('baseline', args.dir)
            print(f'baseline (all in RAM):{base["seconds"]:7.2f} s  peak {base["peak_mb"]:7.0f} MB')
            print(f'ratio baseline / viz: {base["seconds"] / fast["seconds"]:7.1f} x time, '
                  f'{base["peak_mb"] / fast["peak_mb"]:.1f} x peak memory')
            print(f'baseline check: {base["text"]}')
        print('\n' + fast['text'])
    finally:
        if not args.keep:
            shutil.rmtree(store_path, ignore_errors=True)
            try:
                os.rmdir(args.dir)  # only if the bench left it empty
            except OSError:
                pass


if __name__ == '__main__':
    main()
