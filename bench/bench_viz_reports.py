"""bench/bench_viz_reports.py: what the controls, the factorial report and the scan's split halves cost,
next to the with/without analysis without controls (which reads only the held-out columns).

    python bench/bench_viz_reports.py               # 100 runs per arm x 50000 examples x 10 float16
    python bench/bench_viz_reports.py --runs 20     # a quick check of the bench itself

Stores (random logits, CIFAR-10's size and held-out set): with/without, factorial
(arms a and b) and scan, each written through Store.save_run and packed once before timing. Each analysis
runs in its own process, page cache warm (a first untimed pass), so that peak memories (ru_maxrss,
including ~70 MB of numpy and scipy) are separate. Printed: seconds and peak MB per analysis, seconds per
run, and the ratios. Stores go to DIR (--dir, default /tmp/bench_viz_reports), deleted unless --keep.
"""
import argparse
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


def make_arms(path, arms, runs, seed_base):
    """A store of random logits with the given arms, run k of every arm with seed seed_base + k."""
    from experiment import HELD_OUT
    from store import Store
    rng = np.random.default_rng(1)
    settings = dict(trainer='bench', hyp={}, held_out=HELD_OUT, n_train=N_TRAIN, data_fingerprint='bench',
                    seed_base=seed_base, arms=list(arms))
    store = Store.create(path, settings, rng.integers(0, 10, N_TRAIN))
    for run in range(runs):
        for arm in arms:
            logits = rng.standard_normal((N_TRAIN, 10), dtype=np.float32) * 2
            store.save_run(arm, run, seed_base + run, logits.astype(np.float16), seconds=0.0, test_acc=0.0)
    for arm in arms:
        store.load(arm)  # the one-time packing, not part of the timings


def child(kind, path):
    """One analysis; its text is a summary line to check that it did the work."""
    import viz_factorial
    import viz_scan
    import viz_with_without
    from store import Store
    if kind.startswith('with'):
        res = viz_with_without.analyse(Store(path), controls=int(kind.split('-')[1]))
        return f'{res["n_with"]} runs with, controls {res["control_k"]}'
    if kind == 'factorial':
        res = viz_factorial.analyse(Store(path))
        return f'{res["pairs"]} pairs, controls {res["control_k"]}'
    res = viz_scan.analyse(Store(path))
    return f'{res["runs"]} scan runs, split-half r {res["reliability"]["split_half"][0]:.2f}'


def measure(kind, path):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', kind, '--dir', path],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f'bench step {kind} failed:\n{out.stderr}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=int, default=100, help='runs per arm (default 100)')
    parser.add_argument('--dir', default='/tmp/bench_viz_reports', help='where the generated stores go')
    parser.add_argument('--keep', action='store_true', help='keep the stores (reused when present)')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for name in ('scipy.stats', 'viz'):  # imports are not part of the timed step
            importlib.import_module(name)
        t0 = time.perf_counter()
        text = child(args.child, args.dir)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_mb=peak, text=text)))
        return

    from store import SCAN_SEED_BASE
    stores = {'with': ('with', 'without'), 'factorial': ('a', 'b'), 'scan': ('scan',)}
    gb = 5 * args.runs * N_TRAIN * 10 * 2 / 1e9
    print(f'stores: 5 arms x {args.runs} runs x {N_TRAIN} x 10 float16 = {gb:.1f} GB of logits in {args.dir} '
          f'(about twice that on disk, run files and packed arrays)')
    try:
        for name, arms in stores.items():
            path = os.path.join(args.dir, name)
            if not (args.keep and os.path.exists(os.path.join(path, 'packed'))):
                shutil.rmtree(path, ignore_errors=True)
                t0 = time.perf_counter()
                make_arms(path, arms, args.runs, SCAN_SEED_BASE if name == 'scan' else 0)
                print(f'{name} store written and packed in {time.perf_counter() - t0:.0f} s')
        steps = [('with-0', 'with'), ('with-50', 'with'), ('factorial', 'factorial'), ('scan', 'scan')]
        results = {}
        for kind, name in steps:
            path = os.path.join(args.dir, name)
            measure(kind, path)  # warm the page cache
            results[kind] = r = measure(kind, path)
            print(f'{kind:<10} {r["seconds"]:7.2f} s  {1000 * r["seconds"] / args.runs:7.1f} ms per run  '
                  f'peak {r["peak_mb"]:5.0f} MB   ({r["text"]})')
        print(f'controls 50 / none, with/without: {results["with-50"]["seconds"] / results["with-0"]["seconds"]:.1f} x '
              'time')
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
    main()
