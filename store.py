"""store.py: the run store, a folder that any number of workers on any number of machines fill at once.

What lives here: the arms and their seeds (which examples a run of each arm may see), the store's
layout, the settings that bind a store, claims of runs in progress, reading run files back and packing
them for the analysis. numpy only: viz.py reads a store without torch.

Layout (one folder per trainer and design, e.g. runs/airbench/):

    settings.json            what made the runs: trainer, hyperparameters, held-out indices,
                             dataset fingerprint, seed base, arms; a store refuses runs made otherwise
    labels.npy               (n_train,) int64 training labels, so the analysis needs no dataset
    with/000042.npz          one finished run: logits (n_train, 10) float16, seed, seconds, test_acc,
    without/000042.npz       device, versions; written to a temporary name, then renamed (atomic)
    failed/with-000042.json  a run that diverged (NaN): recorded, never stored as valid
    claims/with-000042       a run in progress: host, pid; refreshed every minute by its worker
    corrupt/                 run files that failed to load, moved aside (never deleted)
    packed/with.npy          (N, n_train, 10) float16, every stored run of the arm in run order,
    packed/with.json         rebuilt on demand when runs were added; read memory-mapped

Designs (the arms of a store): the with/without experiment (arms `with`, `without`), the factorial
design (arms `a`, `b`: run k of both shares seed k, and each held-out example is removed from exactly
one of the two, by a fair coin drawn from the seed), and the scan (arm `scan`: each run on a random half).
"""
import json
import os
import socket
import threading
import time
import zipfile

import numpy as np

ARMS = ('with', 'without')  # the experiment; a scan store has the single arm 'scan'
FACTORIAL_ARMS = ('a', 'b')  # the factorial design: each held-out example is removed from one run of the pair
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


def held_out_indices(held_out):
    """{group: [indices]} -> (m,) int64, every held-out example in group order."""
    return np.asarray([i for g in held_out.values() for i in g], dtype=np.int64)


def factorial_split(seed, m):
    """(m,) bool, True where held-out example j is removed from run `a` of the pair with this seed (and
    kept in run `b`), False where it is removed from `b`. A fair coin per example, not an exact half:
    exact halves would make the signs of two examples anti-correlated (-1/(m-1)), which leaves a share
    of the cross-influences in each self-influence estimate and makes them unidentifiable by regression."""
    return np.random.default_rng([11, seed]).integers(0, 2, m).astype(bool)


def keep_for(arm, seed, n_train, held_out):
    """Indices of the training examples a run of `arm` may see (None: all of them).
    with: all; without: all but the held-out ones; a / b: all but the held-out ones the seed's
    factorial_split removes from that run; scan: a random half drawn from the run's seed."""
    if arm == 'with':
        return None
    if arm == 'without':
        return np.setdiff1d(np.arange(n_train), held_out_indices(held_out))
    if arm in FACTORIAL_ARMS:
        held = held_out_indices(held_out)
        removed_from_a = factorial_split(seed, len(held))
        return np.setdiff1d(np.arange(n_train), held[removed_from_a if arm == 'a' else ~removed_from_a])
    if arm == 'scan':
        return np.sort(np.random.default_rng([7, seed]).permutation(n_train)[:n_train // 2])
    raise ValueError(f'arm {arm!r}, expected with, without, a, b or scan')


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
            # allow_pickle stays False (numpy's default): a run file from a shared store loads data, never code
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
        # The analysis redraws each run's kept examples from its arm and seed: they must be the ones trained on.
        bits = kept_bits(arm, seed_for(run, self.settings['seed_base']), n_train, self.settings['held_out'])
        if bits is not None and not np.array_equal(rec.get('kept'), bits):
            raise StoreError(f'{path}: trained on other examples than its arm and seed draw now '
                             '(another numpy version?); keep it out of this store')
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
