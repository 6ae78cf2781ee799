"""bench/bench_viz.py: time and peak memory of viz's reports on full-size stores, side by side with the floor
(every packed logit read once with numpy), at each size of --runs.

    python bench/bench_viz.py --runs 250,1000,4000   # 2 arms x R runs x 50000 x 10 float16, and a scan of R runs
    python bench/bench_viz.py --runs 10000 --scan-only   # a scan of 10,000 runs alone
    python bench/bench_viz.py --runs 20              # a quick check of the bench itself

For each R: (1) a with/without store of 2 x R runs and a scan store of R runs are written run by run through
Store.save_run (random logits, a few planted effects; not timed against the floor); (2) the first call
(python viz.py STORE on a store never read: packing and the kept margins included), then, page cache warm,
the floor (both packed arms read once), the default report (50 controls), --controls 0, and the same for the
scan (its first call, its floor: the scan arm read once, the warm scan report), each with its ratio to its
floor. Each step runs viz.main in a fresh interpreter, imports not timed (about 1 s), so that the peak
memories (ru_maxrss, which includes the ~70 MB of numpy and scipy) are separate. --baseline adds what the
original analysis did (np.load of every run file, all in RAM). Needs about 1 MB per run for the run files
and as much again for the pack, in DIR (--dir, default /tmp/bench_viz); each size's stores are deleted after
it is measured unless --keep.
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


def make_scan_store(path, runs):
    """runs x (50000, 10) float16 logits of a scan (each run on a random half), as a scan trainer writes them."""
    from experiment import HELD_OUT
    from store import SCAN_SEED_BASE, Store, seed_for
    rng = np.random.default_rng(1)
    settings = dict(trainer='bench', hyp={}, held_out=HELD_OUT, n_train=N_TRAIN, data_fingerprint='bench',
                    seed_base=SCAN_SEED_BASE, arms=['scan'])
    store = Store.create(path, settings, rng.integers(0, 10, N_TRAIN))
    for run in range(runs):
        logits = rng.standard_normal((N_TRAIN, 10), dtype=np.float32) * 2
        store.save_run('scan', run, seed_for(run, SCAN_SEED_BASE), logits.astype(np.float16), seconds=0.0,
                       test_acc=0.0)


def child_viz(path, *args):
    """python viz.py PATH ARGS, its report sent to /dev/null."""
    import contextlib
    import viz
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null):
        viz.main([path, *args])
    return ''


def child_floor(path, arms=('with', 'without')):
    """The floor: every logit of the packed arms read once with numpy (sequential chunks of 50 runs)."""
    total = 0.0
    for arm in arms:
        logits = np.load(os.path.join(path, 'packed', f'{arm}.npy'), mmap_mode='r')  # (N, 50000, 10) float16
        for lo in range(0, len(logits), 50):
            total += float(np.asarray(logits[lo:lo + 50]).sum(dtype=np.float32))
    return f'sum of every logit {total:.3g}'


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


STEPS = {'first': lambda d: child_viz(os.path.join(d, 'store')),
         'floor': lambda d: child_floor(os.path.join(d, 'store')),
         'report': lambda d: child_viz(os.path.join(d, 'store')),
         'controls0': lambda d: child_viz(os.path.join(d, 'store'), '--controls', '0'),
         'scan_first': lambda d: child_viz(os.path.join(d, 'scan'), '--scan'),
         'scan_floor': lambda d: child_floor(os.path.join(d, 'scan'), ('scan',)),
         'scan': lambda d: child_viz(os.path.join(d, 'scan'), '--scan'),
         'baseline': lambda d: child_baseline(os.path.join(d, 'store'))}


def measure(step, bench_dir):
    """Run one step in a fresh interpreter -> dict: seconds of the step, peak MB of that process, its text."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', step, '--dir', bench_dir],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'bench step {step} failed:\n{out.stderr}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def runs_list(text):
    try:
        sizes = [int(x) for x in text.split(',')]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f'{text!r}: expected runs per arm, 2 or more, comma-separated (e.g. 250,1000)')
    return sizes


def bench_size(runs, bench_dir, baseline, scan_only=False):
    """Write both stores of `runs` runs (the scan's alone with scan_only), measure every step on them,
    print one line each."""
    gb = (1 if scan_only else 3) * runs * N_TRAIN * 10 * 2 / 1e9  # 2 arms + a scan of logits
    free = shutil.disk_usage(bench_dir).free / 1e9
    if free < 2.4 * gb:
        print(f'{runs} runs: skipped, {free:.1f} GB free in {bench_dir}, about {2.4 * gb:.1f} GB needed')
        return
    stores = '' if scan_only else f'2 arms x {runs} runs, and '
    print(f'\n{runs} runs: {stores}a scan of {runs} runs, x {N_TRAIN} x 10 float16 '
          f'({gb:.2f} GB of logits) in {bench_dir}')
    t0 = time.perf_counter()
    if not scan_only:
        make_store(os.path.join(bench_dir, 'store'), runs)
    make_scan_store(os.path.join(bench_dir, 'scan'), runs)
    print(f'  write run files      {time.perf_counter() - t0:7.1f} s  (Store.save_run, one fsync-ed file per run)')
    steps = ('first', 'floor', 'report', 'controls0')[4 * scan_only:] + ('scan_first', 'scan_floor', 'scan')
    got = {step: measure(step, bench_dir) for step in steps}
    floors = {'first': 'floor', 'floor': 'floor', 'report': 'floor', 'controls0': 'floor',
              'scan_first': 'scan_floor', 'scan_floor': 'scan_floor', 'scan': 'scan_floor'}
    names = {'first': 'first call (packs)', 'floor': 'floor (numpy read)', 'report': 'default report',
             'controls0': '--controls 0', 'scan_first': 'scan, first call', 'scan_floor': 'scan floor',
             'scan': 'scan report'}
    for step, m in got.items():
        print(f'  {names[step]:<20} {m["seconds"]:7.2f} s  peak {m["peak_mb"]:6.0f} MB  '
              f'{m["seconds"] / got[floors[step]]["seconds"]:5.1f} x floor')
    if baseline and not scan_only:
        available, needed = available_gb(), BASELINE_RAM_PER_GB * gb * 2 / 3
        if available < needed:
            print(f'  baseline skipped: it needs about {needed:.1f} GB of RAM, {available:.1f} GB available')
        else:
            base = measure('baseline', bench_dir)
            print(f'  baseline (all in RAM){base["seconds"]:7.2f} s  peak {base["peak_mb"]:6.0f} MB  '
                  f'{base["seconds"] / got["floor"]["seconds"]:5.1f} x floor  ({base["text"]})')
    print(f'  load average: {" ".join(f"{x:.1f}" for x in os.getloadavg())}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=runs_list, default=[250, 1000, 4000],
                        help='runs per arm and of the scan, comma-separated sizes (default 250,1000,4000)')
    parser.add_argument('--dir', default='/tmp/bench_viz', help='where the generated stores go')
    parser.add_argument('--keep', action='store_true', help='keep the stores of the last size')
    parser.add_argument('--baseline', action='store_true',
                        help=f'also the original analysis, all in RAM '
                             f'(about {BASELINE_RAM_PER_GB * 2:.0f} GB at 1000 runs)')
    parser.add_argument('--scan-only', action='store_true', help='the scan alone (a third of the disk)')
    parser.add_argument('--child', choices=list(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        for name in ('scipy.special', 'scipy.stats', 'viz'):  # imports (~1 s, ~50 MB) are not part of the timed step
            importlib.import_module(name)
        t0 = time.perf_counter()
        text = STEPS[args.child](args.dir)
        print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_mb=peak_mb(), text=text or '')))
        return

    os.makedirs(args.dir, exist_ok=True)
    for i, runs in enumerate(args.runs):
        try:
            bench_size(runs, args.dir, args.baseline, args.scan_only)
        finally:
            if not (args.keep and i == len(args.runs) - 1):
                for name in ('store', 'scan'):  # only the bench's own folders, never --dir itself
                    shutil.rmtree(os.path.join(args.dir, name), ignore_errors=True)
    try:
        os.rmdir(args.dir)  # only if the bench left it empty
    except OSError:
        pass


if __name__ == '__main__':
    main()
