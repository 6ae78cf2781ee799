"""experiment.py: the with/without experiment harness shared by the trainer scripts.

What lives here: the held-out examples, the worker loop that fills a run store (store.py; one process
per GPU, any number of processes on any number of machines sharing one folder), and the command line
common to every trainer.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from store import ARMS, CLAIM_REFRESH, FACTORIAL_ARMS, SCAN_SEED_BASE, Store, StoreError, keep_for, seed_for

# Held-out examples, indices in torchvision's CIFAR-10 training order (data_batch_1 .. data_batch_5).
HELD_OUT = {
    'random': list(range(20)),  # the training set is already shuffled: the first 20 are a random sample
    'easy': [45114, 47798, 43746, 49106, 47082, 44095, 49524, 41014, 49159, 44279,
             45927, 40141, 47731, 46440, 49015, 49690, 46836, 43512, 43189, 49320],
}

############################################
#        Workers and the command line      #
############################################

def parse_args(trainer, doc, argv=None, runs=1000):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', type=int, default=runs, help=f'runs per arm (default {runs}); rerun with more to extend')
    p.add_argument('--out', help=f'store folder (default runs/{trainer}, runs/{trainer}-scan with --scan, runs/{trainer}-factorial '
                                 'with --design factorial, '
                                 '-smoke appended with --smoke)')
    p.add_argument('--data-dir', default='data', help='folder with CIFAR-10 (downloaded there if absent)')
    p.add_argument('--device', help='cpu, cuda or cuda:N (default: cuda if present)')
    p.add_argument('--gpus', help='comma-separated GPU ids, one worker each (default: every visible GPU)')
    p.add_argument('--smoke', action='store_true', help='tiny net, a fraction of an epoch: seconds per run')
    p.add_argument('--scan', action='store_true',
                   help='instead of the with/without arms: runs on a random half of the training set each '
                        '(arm "scan"), to estimate the self-influence of every example (python viz.py --scan)')
    p.add_argument('--design', choices=('with-without', 'factorial'), default='with-without',
                   help='with-without: arms with (all examples) and without (all but the held-out ones); '
                        'factorial: arms a and b, run k of both with seed k, each held-out example removed from '
                        'one of the two by a coin drawn from the seed (separates self- from cross-influence)')
    p.add_argument('--seed-base', type=int, help=f'run k uses seed seed_base + k (default 0; '
                                                 f'{SCAN_SEED_BASE} with --scan, so the ranges are disjoint)')
    p.add_argument('--held-out', help='JSON file {"random": [...], "easy": [...]} replacing the default indices')
    p.add_argument('--hyp', action='append', default=[], metavar='KEY=VALUE',
                   help='override a hyperparameter, e.g. --hyp norm=layer (repeatable; VALUE read as JSON '
                        'if it parses, else as a string); the default --out then names the overrides')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)  # a child of a multi-GPU launch
    return p.parse_args(argv)


def load_cifar10(data_dir):
    """(train images, train labels, test images, test labels): the trainers' default dataset."""
    import airbench
    return (*airbench.load_cifar10(data_dir), *airbench.load_cifar10(data_dir, train=False))


def main(trainer, hyp, smoke, train, infer, doc, argv=None, load=load_cifar10, held_out=HELD_OUT, block=1,
         runs=1000):
    """Run the with/without experiment (or a scan) for one trainer; returns the process exit code.

    train(images, labels, keep=, seed=, device=, **hyp) -> net and infer(net, images) -> (N, 10) logits;
    with block > 1, train takes lists of `block` keeps and seeds and infer returns (block, N, 10):
    the trainer trains that many models at once. runs: the default of --runs.
    """
    args = parse_args(trainer, doc, argv, runs)
    overrides = dict(_parse_override(o, hyp) for o in args.hyp)
    hyp = {**hyp, **(smoke if args.smoke else {}), **overrides}
    if args.scan and args.design != 'with-without':
        raise SystemExit('error: --scan and --design factorial are two designs; choose one')
    design = 'scan' if args.scan else args.design
    arms = {'scan': ['scan'], 'factorial': list(FACTORIAL_ARMS), 'with-without': list(ARMS)}[design]
    name = trainer + ('' if design == 'with-without' else f'-{design}') + ('-smoke' if args.smoke else '')
    out = args.out or os.path.join('runs', '-'.join([name, *args.hyp]))
    seed_base = args.seed_base if args.seed_base is not None else SCAN_SEED_BASE if args.scan else 0
    gpus = _gpus(args)
    if len(gpus) > 1 and not args.worker:
        return launch(gpus, out, args.runs)
    import airbench
    try:
        import torch
        device = torch.device(args.device or airbench.default_device())
        images, labels, test_images, test_labels = load(args.data_dir)
        held_out = held_out if args.held_out is None else _read_held_out(args.held_out)
        bad = [i for g in held_out.values() for i in g if not 0 <= i < len(labels)]
        if bad:
            raise StoreError(f'held-out indices {bad} are outside the {len(labels)} training examples.')
        settings = dict(trainer=trainer, hyp=hyp, held_out=held_out, n_train=len(labels),
                        data_fingerprint=airbench.fingerprint(images, labels), seed_base=seed_base,
                        arms=arms, versions=_versions())
        store = Store.create(out, settings, labels.numpy())
        work(store, args.runs, train, infer, hyp, (images, labels), (test_images, test_labels), device,
             block=block, progress=not args.worker)
    except (airbench.DataError, StoreError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def work(store, runs, train, infer, hyp, data, test, device, block=1, progress=True):
    """Train every (arm, run) with run < `runs` that no one has stored, failed or claimed, `block` at a time."""
    import torch
    from tqdm import tqdm
    images, labels = (t.to(device) for t in data)  # on the device once, not copied again every run
    n_train, held_out, seed_base = len(labels), store.settings['held_out'], store.settings['seed_base']
    todo = [(arm, run) for run in range(runs) for arm in store.arms]  # arms interleaved: both grow together
    store.clean_leftovers()
    mine = set()
    threading.Thread(target=_heartbeat, args=(store, mine), daemon=True).start()

    def finished():
        return sum(store.counts(runs).values()) + sum(r < runs for _, r in store.failed())

    def unclaimed():
        failed = store.failed()
        for arm, run in todo:
            if os.path.exists(store.run_file(arm, run)) or (arm, run) in failed or not store.claim(arm, run):
                continue
            # finished by another worker between the look and the claim: nothing to do
            if os.path.exists(store.run_file(arm, run)) or os.path.exists(store.failure_file(arm, run)):
                store.release(arm, run)
                continue
            yield arm, run

    bar = tqdm(total=len(todo), initial=finished(), unit='run', disable=not progress, dynamic_ncols=True)
    log = bar.write if progress else lambda line: print(line, flush=True)
    seconds = []
    claims = unclaimed()
    try:  # the bar ends its line before any error message
        while True:
            jobs = [job for _, job in zip(range(block), claims)]
            if not jobs:
                break
            mine.update(jobs)
            try:
                seeds = [seed_for(run, seed_base) for _, run in jobs]
                keeps = [keep_for(arm, seed, n_train, held_out) for (arm, _), seed in zip(jobs, seeds)]
                start = time.perf_counter()
                try:
                    if block == 1:
                        net = train(images, labels, keep=keeps[0], seed=seeds[0], device=device, **hyp)
                        logits, test_logits = infer(net, images)[None], infer(net, test[0])[None]
                    else:
                        net = train(images, labels, keep=keeps, seed=seeds, device=device, **hyp)
                        logits, test_logits = infer(net, images), infer(net, test[0])
                except _diverged() as e:
                    for (arm, run), seed in zip(jobs, seeds):
                        store.save_failure(arm, run, seed, str(e), device=str(device), host=socket.gethostname())
                        log(f'{arm:<7} run {run:>5}  seed {seed:>6}  FAILED: {e} (recorded in failed/)')
                    continue
                logits = logits.half()  # (K, n_train, 10): stored as float16
                finite = torch.isfinite(logits).flatten(1).all(1).tolist()
                test_acc = (test_logits.argmax(-1).cpu() == test[1].cpu()).float().mean(-1).tolist()
                logits = logits.cpu().numpy()
                took = (time.perf_counter() - start) / len(jobs)
                for k, ((arm, run), seed) in enumerate(zip(jobs, seeds)):
                    if not finite[k]:
                        store.save_failure(arm, run, seed, 'non-finite logits on the training set',
                                           device=str(device), host=socket.gethostname())
                        log(f'{arm:<7} run {run:>5}  seed {seed:>6}  FAILED: non-finite logits (recorded in failed/)')
                        continue
                    store.save_run(arm, run, seed, logits[k], took, test_acc[k], device=_device_name(device),
                                   host=socket.gethostname(), torch=torch.__version__)
                    seconds.append(took)
                    log(f'{arm:<7} run {run:>5}  seed {seed:>6}  {took:7.2f} s  test_acc {test_acc[k]:.4f}')
            finally:
                for arm, run in jobs:
                    store.release(arm, run)
                    mine.discard((arm, run))
            bar.update(finished() - bar.n)
    finally:
        bar.close()
    store.clean_leftovers()  # claims of workers that died after finishing their runs
    counts = store.counts(runs)
    failed = sum(r < runs for _, r in store.failed())
    summary = f'{store.path}: ' + ', '.join(f'{counts[a]}/{runs} runs {a}' for a in store.arms)
    if failed:
        summary += f', {failed} failed (see failed/)'
    if seconds:
        summary += f'; this worker: {len(seconds)} runs, {np.mean(seconds):.2f} s/run'
    print(summary, flush=True)


def launch(gpus, out, runs):
    """One worker process per GPU on the same store; the parent shows the overall progress."""
    from tqdm import tqdm
    procs = [subprocess.Popen([sys.executable, sys.argv[0], *sys.argv[1:], '--worker', '--device', f'cuda:{g}'])
             for g in gpus]
    bar = tqdm(unit='run', dynamic_ncols=True)
    while any(p.poll() is None for p in procs):
        time.sleep(5)
        if os.path.exists(os.path.join(out, 'settings.json')):
            store = Store(out)
            bar.total = runs * len(store.arms)
            bar.update(sum(store.counts(runs).values()) - bar.n)
    bar.close()
    codes = [p.wait() for p in procs]
    return max(codes)


def _gpus(args):
    if args.gpus:
        return [int(g) for g in args.gpus.split(',')]
    if args.device and args.device != 'cuda':
        return []
    import torch
    return list(range(torch.cuda.device_count()))


def _heartbeat(store, mine):
    while True:
        time.sleep(CLAIM_REFRESH)
        store.touch_claims(mine)


def _diverged():
    import airbench
    return airbench.Diverged


def _parse_override(text, hyp):
    key, sep, value = text.partition('=')
    if not sep or key not in hyp:
        raise SystemExit(f'error: --hyp {text!r}: expected KEY=VALUE with KEY one of {sorted(hyp)}')
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _read_held_out(path):
    try:
        with open(path) as f:
            groups = json.load(f)
        assert isinstance(groups, dict) and all(isinstance(i, int) for g in groups.values() for i in g)
    except (OSError, ValueError, AssertionError, TypeError) as e:
        raise StoreError(f'--held-out {path}: expected a JSON object of groups of indices, '
                         'e.g. {"random": [0, 1], "easy": [45114]}') from e
    return groups


def _versions():
    import torch
    return dict(python=platform.python_version(), numpy=np.__version__, torch=torch.__version__)


def _device_name(device):
    import torch
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
