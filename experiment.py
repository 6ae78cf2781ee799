"""experiment.py: the with/without experiment harness shared by the trainer scripts.

What lives here: the held-out examples, the two arms and their seeds, the run store, the worker loop
that fills it (one process per GPU, any number of processes on any number of machines sharing one
folder), and the command line common to every trainer.

Store layout (one folder per trainer, e.g. runs/airbench/):

    settings.json            what made the runs: trainer, hyperparameters, held-out indices,
                             dataset fingerprint, seed base; a store refuses runs made otherwise
    labels.npy               (n_train,) int64 training labels, so the analysis needs no dataset
    with/000042.npz          one finished run: logits (n_train, 10) float16, seed, seconds, test_acc,
    without/000042.npz       device, versions; written to a temporary name, then renamed (atomic)
    failed/with-000042.json  a run that diverged (NaN): recorded, never stored as valid
    claims/with-000042       a run in progress: host, pid; refreshed every minute by its worker
    corrupt/                 run files that failed to load, moved aside (never deleted)
    packed/with.npy          (N, n_train, 10) float16, every stored run of the arm in run order,
    packed/with.json         rebuilt on demand when runs were added; read memory-mapped
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
import zipfile

import numpy as np

# Held-out examples, indices in torchvision's CIFAR-10 training order (data_batch_1 .. data_batch_5).
HELD_OUT = {
    'random': list(range(20)),  # the training set is already shuffled: the first 20 are a random sample
    'easy': [45114, 47798, 43746, 49106, 47082, 44095, 49524, 41014, 49159, 44279,
             45927, 40141, 47731, 46440, 49015, 49690, 46836, 43512, 43189, 49320],
}
ARMS = ('with', 'without')  # the experiment; a scan store has the single arm 'scan'
SCAN_SEED_BASE = 1_000_000  # scans use seeds from here on, experiments from 0: the ranges never meet

# Settings that must agree between a store and the command adding runs to it.
BINDING = ('trainer', 'hyp', 'held_out', 'n_train', 'data_fingerprint', 'seed_base', 'arms')

CLAIM_REFRESH = 60.0   # seconds between a worker's touches of its claim
CLAIM_TIMEOUT = 600.0  # seconds without a touch after which another host's claim counts as dead


class StoreError(Exception):
    """A store that cannot be used as asked; the message says why and what to do."""


def seed_for(run, seed_base=0):
    """Run k of both arms uses the same seed: init, data order and augmentation are paired."""
    return seed_base + run


def keep_for(arm, seed, n_train, held_out):
    """Indices of the training examples a run of `arm` may see (None: all of them).
    with: all; without: all but the held-out ones; scan: a random half drawn from the run's seed."""
    if arm == 'with':
        return None
    if arm == 'without':
        return np.setdiff1d(np.arange(n_train), [i for g in held_out.values() for i in g])
    if arm == 'scan':
        return np.sort(np.random.default_rng([7, seed]).permutation(n_train)[:n_train // 2])
    raise ValueError(f'arm {arm!r}, expected with, without or scan')


def kept_bits(arm, seed, n_train, held_out):
    """keep_for as packed bits, one per training example (None when a run sees all of them)."""
    keep = keep_for(arm, seed, n_train, held_out)
    return None if keep is None else np.packbits(np.isin(np.arange(n_train), keep))


class Store:
    def __init__(self, path):
        self.path = str(path)
        settings_file = os.path.join(self.path, 'settings.json')
        if not os.path.exists(settings_file):
            raise StoreError(f'no run store at {self.path} (no settings.json there). '
                             'Run a trainer script first, or pass the folder it wrote to.')
        try:
            with open(settings_file) as f:
                self.settings = json.load(f)
            self.labels = np.load(os.path.join(self.path, 'labels.npy'))
        except (OSError, ValueError) as e:
            raise StoreError(f'{self.path} is not a readable run store ({e}). '
                             'Point to a folder written by a trainer script.') from e
        self.settings.setdefault('arms', list(ARMS))
        missing = [k for k in BINDING if k not in self.settings]
        if missing:
            raise StoreError(f'{settings_file} lacks {missing}: not a store written by this project.')
        self.arms = tuple(self.settings['arms'])

    @classmethod
    def create(cls, path, settings, labels):
        """Open the store at `path`, making it if absent; refuse if it was made with other settings."""
        path = str(path)
        settings = json.loads(json.dumps({'arms': list(ARMS), **settings}))  # as read back: lists, not tuples
        if not os.path.exists(os.path.join(path, 'settings.json')):
            for sub in (*settings['arms'], 'failed', 'claims', 'corrupt', 'packed'):
                os.makedirs(os.path.join(path, sub), exist_ok=True)
            _atomic_write(os.path.join(path, 'labels.npy'), lambda f: np.save(f, np.asarray(labels, np.int64)))
            # Exclusive create: of two workers making the store at once, one writes and both agree after.
            try:
                _atomic_write(os.path.join(path, 'settings.json'),
                              lambda f: f.write(json.dumps(settings, indent=1).encode()), exclusive=True)
            except FileExistsError:
                pass
        store = cls(path)
        # A scan trains on random halves whatever the held-out set: that set only labels its report.
        binding = [k for k in BINDING if not (k == 'held_out' and settings['arms'] == ['scan'])]
        differ = [k for k in binding if store.settings.get(k) != settings.get(k)]
        if differ:
            lines = [f'  {k}: store has {_short(store.settings.get(k))}, this command has {_short(settings.get(k))}'
                     for k in differ]
            raise StoreError(f'{path} holds runs made with other settings:\n' + '\n'.join(lines) +
                             '\nUse another --out folder for these settings, or rerun with the store\'s settings.')
        return store

    # ---- finished, failed and claimed runs ----

    def run_file(self, arm, run):
        return os.path.join(self.path, arm, f'{run:06d}.npz')

    def stored(self, arm):
        """Run indices with a run file (not yet validated; see load)."""
        names = os.listdir(os.path.join(self.path, arm))
        return sorted(int(n[:-4]) for n in names if n.endswith('.npz') and n[:-4].isdigit())

    def counts(self, runs):
        """{arm: stored runs with index < runs}."""
        return {arm: sum(r < runs for r in self.stored(arm)) for arm in self.arms}

    def failed(self):
        """{(arm, run): record} for runs that diverged."""
        out = {}
        for name in os.listdir(os.path.join(self.path, 'failed')):
            if name.endswith('.json'):
                arm, run = name[:-5].rsplit('-', 1)
                with open(os.path.join(self.path, 'failed', name)) as f:
                    out[arm, int(run)] = json.load(f)
        return out

    def save_run(self, arm, run, seed, logits, seconds, test_acc, **extra):
        """Store one finished run; logits (n_train, 10). Atomic: the file is complete or absent.
        A run that saw only some examples also records which, as bits (checked on loading)."""
        logits = np.asarray(logits, dtype=np.float16)
        n_train = self.settings['n_train']
        if logits.shape != (n_train, 10):
            raise ValueError(f'logits of shape {logits.shape}, expected ({n_train}, 10)')
        record = dict(logits=logits, run=run, seed=seed, seconds=seconds, test_acc=test_acc,
                      store=self.settings['data_fingerprint'] + str(self.settings['seed_base']),
                      meta=json.dumps(extra))
        bits = kept_bits(arm, seed, n_train, self.settings['held_out'])
        if bits is not None:
            record['kept'] = bits
        _atomic_write(self.run_file(arm, run), lambda f: np.savez(f, **record))

    def save_failure(self, arm, run, seed, reason, **extra):
        record = dict(arm=arm, run=run, seed=seed, reason=reason, **extra)
        _atomic_write(os.path.join(self.path, 'failed', f'{arm}-{run:06d}.json'),
                      lambda f: f.write(json.dumps(record).encode()))

    def claim(self, arm, run):
        """Take (arm, run) for this process; False if another live worker has it."""
        path = os.path.join(self.path, 'claims', f'{arm}-{run:06d}')
        me = json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), time=time.time())).encode()
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._claim_is_dead(path):
                    return False
                _remove(path)  # a dead worker's claim: take the run over
                continue
            with os.fdopen(fd, 'wb') as f:
                f.write(me)
            return True
        return False

    def release(self, arm, run):
        _remove(os.path.join(self.path, 'claims', f'{arm}-{run:06d}'))

    def _claim_is_dead(self, path):
        try:
            with open(path) as f:
                owner = json.load(f)
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return True  # a claim cut short by a kill while being written
        if owner.get('host') == socket.gethostname():
            return not _pid_alive(owner.get('pid', -1))
        return age > CLAIM_TIMEOUT

    def clean_leftovers(self):
        """Remove temporary files left by killed processes of this host."""
        for sub in (*self.arms, 'failed', 'packed'):
            for name in os.listdir(os.path.join(self.path, sub)):
                parts = name.split('.tmp-')
                if len(parts) == 2 and parts[1].startswith(socket.gethostname() + '-'):
                    pid = parts[1][len(socket.gethostname()) + 1:].split('-')[0]
                    if pid.isdigit() and not _pid_alive(int(pid)):
                        _remove(os.path.join(self.path, sub, name))

    def in_progress(self):
        """Runs being trained now by live workers."""
        folder = os.path.join(self.path, 'claims')
        return sum(not self._claim_is_dead(os.path.join(folder, n)) for n in os.listdir(folder))

    def touch_claims(self, claims):
        for arm, run in list(claims):
            try:
                os.utime(os.path.join(self.path, 'claims', f'{arm}-{run:06d}'))
            except FileNotFoundError:
                pass

    # ---- reading runs back ----

    def read_run(self, arm, run):
        """One run file -> dict; raises StoreError if it is corrupt, truncated or foreign."""
        path = self.run_file(arm, run)
        try:
            with np.load(path) as z:
                rec = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise StoreError(f'{path}: corrupt or truncated ({type(e).__name__}: {e})') from e
        expected = dict(store=self.settings['data_fingerprint'] + str(self.settings['seed_base']),
                        run=run, seed=seed_for(run, self.settings['seed_base']))
        for k, v in expected.items():
            if k not in rec or rec[k].item() != v:
                raise StoreError(f'{path}: {k} is {rec[k].item() if k in rec else "missing"}, '
                                 f'expected {v} (a file from another store?)')
        n_train = self.settings['n_train']
        if 'logits' not in rec or rec['logits'].shape != (n_train, 10) or rec['logits'].dtype != np.float16:
            raise StoreError(f'{path}: logits missing or not ({n_train}, 10) float16')
        if arm == 'scan':  # the analysis redraws each run's half from its seed: it must be the one trained on
            bits = kept_bits(arm, seed_for(run, self.settings['seed_base']), n_train, self.settings['held_out'])
            if not np.array_equal(rec.get('kept'), bits):
                raise StoreError(f'{path}: trained on another half than the one its seed draws now '
                                 '(another numpy version?); keep it out of this scan')
        return rec

    def quarantine(self, arm, run, reason):
        """Move a bad run file aside so that the run is redone; nothing is deleted."""
        src = self.run_file(arm, run)
        dst = os.path.join(self.path, 'corrupt', f'{arm}-{run:06d}-{int(time.time())}.npz')
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            return
        print(f'warning: {reason}; moved to {dst}, the run will be redone by the next trainer command',
              flush=True)

    def load(self, arm):
        """(logits, runs): logits (N, n_train, 10) float16 memory-mapped, every valid run of `arm` in
        run order; runs: 'run', 'seed', 'seconds', 'test_acc' arrays of length N."""
        if arm not in self.arms:
            raise ValueError(f'arm {arm!r}, expected one of {self.arms}')
        packed, index_file = (os.path.join(self.path, 'packed', f'{arm}.{ext}') for ext in ('npy', 'json'))
        wanted = self.stored(arm)
        index = _read_json(index_file)
        if index is None or index['run'] != wanted or not self._pack_matches(packed, len(wanted)):
            self._pack(arm, wanted, index, packed, index_file)
            index = _read_json(index_file)
        logits = np.load(packed, mmap_mode='r') if index['run'] else \
            np.zeros((0, self.settings['n_train'], 10), np.float16)
        return logits, {k: np.asarray(index[k]) for k in ('run', 'seed', 'seconds', 'test_acc')}

    def _pack_matches(self, packed, n):
        if n == 0:
            return True
        try:
            return np.load(packed, mmap_mode='r').shape == (n, self.settings['n_train'], 10)
        except (OSError, ValueError):
            return False

    def _pack(self, arm, wanted, old_index, packed, index_file):
        """Write the packed array of all valid runs, streaming run by run and reusing the rows of the
        previous pack; a bad run file is quarantined and left out."""
        old = {}
        if old_index and old_index['run'] and self._pack_matches(packed, len(old_index['run'])):
            old_logits = np.load(packed, mmap_mode='r')
            old = {r: i for i, r in enumerate(old_index['run'])}
        index = {k: [] for k in ('run', 'seed', 'seconds', 'test_acc')}
        tmp = f'{packed}.tmp-{socket.gethostname()}-{os.getpid()}'
        try:
            if wanted:
                shape = (len(wanted), self.settings['n_train'], 10)
                out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float16, shape=shape)
            for run in wanted:
                if run in old:
                    i = old[run]
                    rec = {k: old_index[k][i] for k in index}
                    rec['logits'] = old_logits[i]
                else:
                    try:
                        rec = self.read_run(arm, run)
                    except StoreError as e:
                        self.quarantine(arm, run, str(e))
                        continue
                out[len(index['run'])] = rec['logits']
                for k in index:
                    index[k].append(rec[k].item() if hasattr(rec[k], 'item') else rec[k])
            if wanted:
                out.flush()
                if len(index['run']) < len(wanted):  # some runs were bad: keep the filled rows only
                    np.save(tmp + '.npy', out[:len(index['run'])])
                    os.replace(tmp + '.npy', tmp)
                del out
                os.replace(tmp, packed)
        except OSError as e:
            raise StoreError(f'could not write {packed} ({e}); stored runs are intact. '
                             'Free disk space and rerun.') from e
        finally:
            _remove(tmp)
            _remove(tmp + '.npy')
        _atomic_write(index_file, lambda f: f.write(json.dumps(index).encode()))


def _atomic_write(path, write, exclusive=False):
    """Write through a temporary file in the same folder, then rename: readers see all or nothing.
    exclusive: fail with FileExistsError if `path` exists (a hard link never overwrites)."""
    tmp = f'{path}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        raise StoreError(f'could not write {path} ({e}). Runs already stored are intact; '
                         'free disk space (or fix the folder) and rerun the same command to continue.') from e
    finally:
        _remove(tmp)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _short(value, width=120):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width] + '...'


############################################
#        Workers and the command line      #
############################################

def parse_args(trainer, doc, argv=None, runs=1000):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', type=int, default=runs, help=f'runs per arm (default {runs}); rerun with more to extend')
    p.add_argument('--out', help=f'store folder (default runs/{trainer}, runs/{trainer}-scan with --scan, '
                                 '-smoke appended with --smoke)')
    p.add_argument('--data-dir', default='data', help='folder with CIFAR-10 (downloaded there if absent)')
    p.add_argument('--device', help='cpu, cuda or cuda:N (default: cuda if present)')
    p.add_argument('--gpus', help='comma-separated GPU ids, one worker each (default: every visible GPU)')
    p.add_argument('--smoke', action='store_true', help='tiny net, a fraction of an epoch: seconds per run')
    p.add_argument('--scan', action='store_true',
                   help='instead of the with/without arms: runs on a random half of the training set each '
                        '(arm "scan"), to estimate the self-influence of every example (python viz.py --scan)')
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
    name = trainer + ('-scan' if args.scan else '') + ('-smoke' if args.smoke else '')
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
                        arms=['scan'] if args.scan else list(ARMS), versions=_versions())
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
            if not os.path.exists(store.run_file(arm, run)) and (arm, run) not in failed and store.claim(arm, run):
                if os.path.exists(store.run_file(arm, run)):  # finished by another worker since we looked
                    store.release(arm, run)
                    continue
                yield arm, run

    bar = tqdm(total=len(todo), initial=finished(), unit='run', disable=not progress, dynamic_ncols=True)
    log = bar.write if progress else lambda line: print(line, flush=True)
    seconds = []
    claims = unclaimed()
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
    bar.close()
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
