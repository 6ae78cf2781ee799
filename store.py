"""store.py: the run store, a folder that any number of workers on any number of machines fill at once.

What lives here: the arms and their seeds (which examples a run of each arm may see), the settings that
bind a store, the files of a store and who owns them, claims of runs in progress, finished and failed
runs, and packing them for the analysis. numpy only: viz.py reads a store without torch.

Layout (one folder per trainer and design, e.g. runs/airbench/):

    settings.json            what made the runs: trainer, hyperparameters, held-out indices, dataset
                             fingerprint, seed base, arms, labels checksum; written last, when the store
                             is complete; a store refuses runs made otherwise
    labels.npy               (n_train,) int64 training labels, so the analysis needs no dataset
    with/000042.npz          one finished run: logits (n_train, 10) float16, arm, run, seed, the hash of
    without/000042.npz       the binding settings, seconds, test_acc, device; six-digit names only
    failed/with-000042.json  a run that diverged (NaN): recorded, never stored as valid, not retried
    claims/with-000042       a run in progress: its worker's host, boot id, pid namespace, pid and
                             process start time; touched every minute by its worker
    corrupt/                 run files (and failure records) that failed their checks, moved aside, never deleted
    packed/with.npy          (N, n_train, 10) float16, every valid run of the arm in run order, and its
    packed/with.json         index: each run's file size, mtime and inode, and the data file's; rebuilt
                             whenever anything differs, read memory-mapped

Guarantees, and how each is kept:
- A file appears complete or not at all: it is written to a temporary name beside it, synced, then
  renamed into place (or hard-linked, where it must not replace anything), and the folder is synced
  (claims are not synced: after a crash of their machine they are stale anyway).
- A run is trained once: a claim appears with its content (a hard link cannot overwrite), a dead
  worker's claim is taken over through a marker that only one worker can create, and a worker
  releases only its own claim. Liveness: on the same machine and pid namespace, the pid must still
  run the process that made the claim (same start time: pid reuse cannot fool it); elsewhere, the
  claim's heartbeat must be younger than CLAIM_TIMEOUT.
- A run file proves where it belongs: the hash of the store's binding settings, its arm, run and
  seed (and, for runs that saw only some examples, which). Anything else is refused, named and
  moved to corrupt/, never analysed.
- The pack never goes stale: any change of a run file or of the data file means a rebuild. It is
  written sequentially (a full disk is an error, never a SIGBUS); a store that cannot be written is
  analysed straight from its run files.

Designs (the arms of a store): the with/without experiment (arms `with`, `without`), the factorial
design (arms `a`, `b`: run k of both shares seed k, and each held-out example is removed from exactly
one of the two, by a fair coin drawn from the seed), and the scan (arm `scan`: each run on a random half).
"""
import atexit
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import struct
import sys
import time

import numpy as np

ARMS = ('with', 'without')  # the experiment; a scan store has the single arm 'scan'
FACTORIAL_ARMS = ('a', 'b')  # the factorial design: each held-out example is removed from one run of the pair
DESIGNS = (list(ARMS), list(FACTORIAL_ARMS), ['scan'])  # the arms a store may have
SCAN_SEED_BASE = 1_000_000  # scans use seeds from here on, experiments from 0: the ranges never meet
MAX_RUNS = 1_000_000        # run files are named by six digits: runs 0 .. 999,999

# Settings that must agree between a store and the command adding runs to it.
BINDING = ('trainer', 'hyp', 'held_out', 'n_train', 'data_fingerprint', 'seed_base', 'arms')
FORMAT = 2  # settings.json 'format': 2 = run files carry arm, run, seed and the binding hash

CLAIM_REFRESH = 60.0   # seconds between a worker's touches of its claim
CLAIM_TIMEOUT = 600.0  # seconds without a touch after which a claim (or temporary file) of a process
                       # this machine cannot check counts as dead
READER_TIMEOUT = 86400.0  # seconds after which another machine's private link to a pack counts as left over

SUBFOLDERS = ('failed', 'claims', 'corrupt', 'packed')
RUN_NAME = re.compile(r'(\d{6})\.npz')
CLAIM_NAME = re.compile(r'(.+)-(\d{6})')
FAILED_NAME = re.compile(r'(.+)-(\d{6})\.json')
HEADER_BYTES = 128  # of a pack's .npy header: fixed, so the shape can be rewritten in place


class StoreError(Exception):
    """A store that cannot be used as asked; the message says why and what to do."""


class Unreadable(StoreError):
    """A file that exists but cannot be read (permissions, I/O error): not corrupt, never moved."""


class _Vanished(Exception):
    """A run file removed while it was being read (moved aside by another process)."""


def note(message):
    """Notes about the store go to stderr: stdout is the report."""
    print(f'store: {message}', file=sys.stderr, flush=True)


############################################
#           Arms, seeds and examples       #
############################################

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


def kept_mask(keep, n_train):
    """keep (None: every example, or the indices of the examples a run may see) -> (n_train,) bool,
    True where the run may see the example. numpy; torch users take torch.from_numpy of it."""
    if keep is None:
        return np.ones(n_train, dtype=bool)
    mask = np.zeros(n_train, dtype=bool)
    mask[np.asarray(keep, dtype=np.int64)] = True
    return mask


def kept_bits(arm, seed, n_train, held_out):
    """keep_for as packed bits, one per training example (None when a run sees all of them)."""
    keep = keep_for(arm, seed, n_train, held_out)
    return None if keep is None else np.packbits(kept_mask(keep, n_train))


############################################
#        Settings that bind a store        #
############################################

def digest(value):
    """A short hash of a JSON value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def labels_digest(labels):
    return hashlib.sha256(np.ascontiguousarray(labels, dtype='<i8').tobytes()).hexdigest()


def check_settings(s, where):
    """Return `s` if it is a well-formed settings object of this format; else raise StoreError naming
    the first key that is wrong. Each binding key carries a checksum: a value edited by hand is named
    here, not discovered later as a store full of foreign run files."""
    fix = ('settings.json was edited or damaged: restore it (a store\'s settings cannot change once runs '
           'are stored), or start a new store with another --out.')
    if not isinstance(s, dict):
        raise StoreError(f'{where} holds a JSON {type(s).__name__}, expected an object of settings. {fix}')
    if 'format' not in s:
        raise StoreError(f'{where} has no \'format\': the store was written by an earlier version of this '
                         'project, whose run files do not record their settings and arm. Analyse it with that '
                         'version, or train again into a new --out.')
    if s['format'] != FORMAT:
        raise StoreError(f'{where}: \'format\' is {_short(s["format"])}, this version reads format {FORMAT}. '
                         'Use the version of this project that wrote the store.')
    missing = [k for k in (*BINDING, 'labels_sha256', 'checksums') if k not in s]
    if missing:
        raise StoreError(f'{where} lacks {", ".join(map(repr, missing))}. {fix}')

    def bad(key, expected):
        raise StoreError(f'{where}: {key!r} is {_short(s[key])}, expected {expected}. {fix}')
    if not isinstance(s['trainer'], str) or not s['trainer']:
        bad('trainer', 'a trainer name')
    if not isinstance(s['hyp'], dict):
        bad('hyp', 'an object of hyperparameters')
    if not _is_int(s['n_train']) or s['n_train'] < 1:
        bad('n_train', 'the number of training examples (an integer >= 1)')
    if not isinstance(s['data_fingerprint'], str):
        bad('data_fingerprint', 'a string')
    if not _is_int(s['seed_base']) or s['seed_base'] < 0:
        bad('seed_base', 'an integer >= 0')
    if s['arms'] not in DESIGNS:
        bad('arms', ' or '.join(json.dumps(d) for d in DESIGNS))
    held = s['held_out']
    if not isinstance(held, dict) or not all(isinstance(g, list) and all(_is_int(i) for i in g)
                                             for g in held.values()):
        bad('held_out', 'an object of groups of example indices, e.g. {"random": [0, 1], "easy": [7]}')
    every = [i for g in held.values() for i in g]
    if any(not 0 <= i < s['n_train'] for i in every):
        bad('held_out', f'indices of training examples, 0 to {s["n_train"] - 1}')
    if len(set(every)) < len(every):
        bad('held_out', 'each example once')
    if not isinstance(s['labels_sha256'], str) or not isinstance(s['checksums'], dict):
        bad('labels_sha256' if not isinstance(s['labels_sha256'], str) else 'checksums',
            'what the store was created with')
    edited = [k for k in BINDING if s['checksums'].get(k) != digest(s[k])]
    if edited:
        raise StoreError(f'{where}: {", ".join(f"{k!r} (now {_short(s[k])})" for k in edited)} no longer '
                         f'match{"es" if len(edited) == 1 else ""} the value the store was created with. {fix}')
    return s


############################################
#       Files, owners and publication      #
############################################

_ME = {}


def identity():
    """Who this process is, in terms another process can check: host (for people), boot id (this
    kernel), pid namespace, pid, and the process start time in clock ticks since boot."""
    pid = os.getpid()
    if _ME.get('pid') != pid:  # after a fork, the child is another process
        _ME.clear()
        _ME.update(host=socket.gethostname(), boot=_boot_id(), pidns=_pid_namespace(), pid=pid,
                   start=_start_time(pid))
    return dict(_ME)


def _boot_id():
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip().replace('-', '')
    except OSError:
        return ''  # not Linux: liveness falls back to the heartbeat


def _pid_namespace():
    try:
        return re.sub(r'\D', '', os.readlink('/proc/self/ns/pid'))
    except OSError:
        return ''


def _start_time(pid):
    """Start time of process `pid` (clock ticks since boot), None if there is no such process here."""
    try:
        with open(f'/proc/{int(pid)}/stat') as f:
            fields = f.read().rpartition(')')[2].split()  # the name in (...) may hold spaces
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (OSError, ValueError, IndexError):
        return None


def owner_alive(owner, mtime):
    """Whether the process described by `owner` (a dict from identity()) still runs. It can be checked
    exactly only from the same kernel and pid namespace; otherwise the file's heartbeat (mtime) decides."""
    me = identity()
    if me['boot'] and me['pidns'] and owner.get('boot') == me['boot'] and owner.get('pidns') == me['pidns'] \
            and _is_int(owner.get('pid')) and _is_int(owner.get('start')):
        return _start_time(owner['pid']) == owner['start']
    return time.time() - mtime < CLAIM_TIMEOUT


def _tag():
    """A name part unique to this process and call, from which owner_alive can be checked."""
    me = identity()
    return f'{me["boot"] or "x"}.{me["pidns"] or "x"}.{me["pid"]}.{me["start"] or "x"}.{secrets.token_hex(4)}'


def _tag_owner(tag):
    parts = tag.split('.')
    if len(parts) != 5 or not parts[2].isdigit():
        return {}  # another format (an earlier version's): judged by age
    return dict(boot=parts[0], pidns=parts[1], pid=int(parts[2]), start=int(parts[3]) if parts[3].isdigit() else None)


def fsync_dir(folder):
    """Make a rename or link in `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder (EINVAL); the rename itself stands
    finally:
        os.close(fd)


def publish(path, data, exclusive=False, durable=True):
    """Write `data` (bytes, or a function writing to a binary file) through a temporary file in the same
    folder, then rename it into place: readers see all or nothing. exclusive: hard-link instead, which
    fails with FileExistsError if `path` exists. durable: sync the file and the folder, so that the
    file survives a crash of the machine (claims need not: after a crash they are stale anyway)."""
    tmp = f'{path}.tmp-{_tag()}'
    try:
        with open(tmp, 'xb') as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
        if durable:
            fsync_dir(os.path.dirname(path) or '.')
    except FileExistsError:
        raise  # exclusive, and `path` exists
    except OSError as e:
        raise StoreError(f'could not write {path} ({_why(e)}). {_write_advice(e)}') from e
    finally:
        _remove(tmp)


def _why(e):
    return e.strerror or str(e)


def _write_advice(e):
    if e.errno == errno.ENOSPC:
        return 'The disk is full: free space and rerun the same command; stored runs are intact.'
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return 'The store is not writable here: a trainer needs write access to its folder (viz.py does not).'
    return 'Stored runs are intact; fix the folder and rerun the same command to continue.'


def _read_bytes(path):
    """The bytes of a small file, None if it does not exist."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        return None


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


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
    except OSError:
        pass  # a read-only folder: nothing can be cleaned, and nothing needs to be for reading


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value, width=120):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width] + '...'


############################################
#               The store                  #
############################################

class Store:
    def __init__(self, path):
        self.path = str(path)
        settings_file = os.path.join(self.path, 'settings.json')
        if not os.path.isfile(settings_file):
            raise StoreError(f'no run store at {self.path} (no settings.json there). '
                             'Run a trainer script first, or pass the folder it wrote to.')
        try:
            with open(settings_file, 'rb') as f:
                text = f.read()
        except OSError as e:
            raise Unreadable(f'cannot read {settings_file} ({_why(e)}). Fix its permissions or the disk.') from e
        try:
            settings = json.loads(text)
        except ValueError as e:
            raise StoreError(f'{settings_file} is not valid JSON ({e}): edited by hand or cut short? '
                             'Restore it, or start a new store with another --out.') from e
        self.settings = check_settings(settings, settings_file)
        self.arms = tuple(self.settings['arms'])
        self.binding = digest({k: self.settings[k] for k in BINDING})  # recorded in every run file
        self.labels = self._read_labels()
        self._mine = {}  # claim path -> the bytes this process wrote there
        self._noted = set()
        for sub in (*self.arms, *SUBFOLDERS):  # a store synced through object storage may lack empty folders
            try:
                os.makedirs(os.path.join(self.path, sub), exist_ok=True)
            except OSError:
                pass  # read-only: a missing folder reads as empty

    def _read_labels(self):
        path = os.path.join(self.path, 'labels.npy')
        try:
            labels = np.load(path)
        except FileNotFoundError:
            raise StoreError(f'{path} is missing: the store lost its labels. Restore the file, or train '
                             'again into a new --out.') from None
        except OSError as e:
            if e.errno is not None:
                raise Unreadable(f'cannot read {path} ({_why(e)}). Fix its permissions or the disk.') from e
            raise StoreError(f'{path} is truncated or corrupt ({e}). Restore it from a copy.') from e
        except Exception as e:  # a truncated or garbage .npy fails in several ways
            raise StoreError(f'{path} is truncated or corrupt ({type(e).__name__}: {e}). '
                             'Restore it from a copy.') from e
        n = self.settings['n_train']
        if labels.shape != (n,) or labels.dtype.kind not in 'iu' or \
                labels_digest(labels) != self.settings['labels_sha256']:
            raise StoreError(f'{path} does not hold the labels the store was created with ({labels.dtype} '
                             f'{labels.shape}, checksum differs from settings.json; expected ({n},) integers): '
                             'replaced or edited? Restore it from a copy.')
        return labels.astype(np.int64)

    @classmethod
    def create(cls, path, settings, labels):
        """Open the store at `path`, making it if absent; refuse if it was made with other settings.
        labels.npy is in place before settings.json appears: a store with settings is complete."""
        path = str(path)
        labels = np.asarray(labels, dtype=np.int64)
        settings = json.loads(json.dumps({'format': FORMAT, 'arms': list(ARMS), **settings}))  # lists, not tuples
        settings['labels_sha256'] = labels_digest(labels)
        settings['checksums'] = {k: digest(settings[k]) for k in BINDING if k in settings}
        check_settings(settings, 'the settings of this command')
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f'{path} is a file, expected a store folder. Pass another --out.')
        if not os.path.exists(os.path.join(path, 'settings.json')):
            cls._make(path, settings, labels)
        store = cls(path)
        # A scan trains on random halves whatever the held-out set: that set only labels its report.
        binding = [k for k in (*BINDING, 'labels_sha256')
                   if not (k == 'held_out' and settings['arms'] == ['scan'])]
        differ = [k for k in binding if store.settings.get(k) != settings.get(k)]
        if differ:
            lines = [f'  {k}: store has {_short(store.settings.get(k))}, this command has {_short(settings.get(k))}'
                     for k in differ]
            raise StoreError(f'{path} holds runs made with other settings:\n' + '\n'.join(lines) +
                             '\nUse another --out folder for these settings, or rerun with the store\'s settings.')
        return store

    @staticmethod
    def _make(path, settings, labels):
        layout = {*settings['arms'], *SUBFOLDERS, 'labels.npy'}
        if os.path.isdir(path):
            other = [n for n in os.listdir(path) if n not in layout and '.tmp-' not in n]
            if other:
                raise StoreError(f'{path} is not empty and not a run store (no settings.json; it holds '
                                 f'{", ".join(sorted(other)[:5])}). Pass a new or empty folder as --out.')
        try:
            for sub in (*settings['arms'], *SUBFOLDERS):
                os.makedirs(os.path.join(path, sub), exist_ok=True)
        except OSError as e:
            raise StoreError(f'could not create the store {path} ({_why(e)}). {_write_advice(e)}') from e
        labels_file = os.path.join(path, 'labels.npy')
        try:  # exclusive: of two processes making the store at once, the labels of one stay
            publish(labels_file, lambda f: np.save(f, labels), exclusive=True)
        except FileExistsError:
            pass
        try:
            there = np.load(labels_file)
        except Exception:
            there = None
        if there is None or labels_digest(there) != settings['labels_sha256']:
            if os.path.exists(os.path.join(path, 'settings.json')):
                return  # made meanwhile by another process: the settings comparison speaks
            raise StoreError(f'{labels_file} holds other labels than this command\'s data, and there is no '
                             'settings.json: another process is creating this store with other data, or an '
                             f'interrupted creation left it. If no other process is running, remove {labels_file} '
                             'and rerun; otherwise use another --out.')
        try:  # settings.json last: it makes the store; exclusive, so the first one stays
            publish(os.path.join(path, 'settings.json'), json.dumps(settings, indent=1).encode(), exclusive=True)
        except FileExistsError:
            pass

    def _folder(self, sub):
        return os.path.join(self.path, sub)

    def _names(self, sub):
        try:
            return os.listdir(self._folder(sub))
        except FileNotFoundError:
            return []

    def _note_once(self, key, message):
        if key not in self._noted:
            self._noted.add(key)
            note(message)

    def clean_leftovers(self, subs=None):
        """Remove what killed processes left in `subs` (default: everywhere): temporary files, private
        links to old packs, and in claims/ the claims of dead workers (of finished runs too) and
        takeover markers that no longer apply. Never fails: a read-only store is left as it is."""
        for sub in (('', *self.arms, *SUBFOLDERS) if subs is None else subs):
            for name in self._names(sub):
                path = os.path.join(self.path, sub, name)
                try:
                    if '.tmp-' in name:
                        if not owner_alive(_tag_owner(name.rpartition('.tmp-')[2]), _mtime(path)):
                            _remove(path)
                    elif '.reader-' in name:
                        owner, me = _tag_owner(name.rpartition('.reader-')[2]), identity()
                        if owner.get('boot') == me['boot'] and owner.get('pidns') == me['pidns']:
                            if not owner_alive(owner, 0):
                                _remove(path)
                        elif time.time() - os.lstat(path).st_ctime > READER_TIMEOUT:
                            _remove(path)  # another machine's: its link count changed a day ago
                    elif sub == 'claims' and '.takeover-' in name:
                        target, _, rest = name.partition('.takeover-')
                        held = _read_bytes(os.path.join(self.path, sub, target))
                        if held is None or hashlib.sha256(held).hexdigest()[:16] != rest.split('-')[0]:
                            _remove(path)  # its claim has moved on: the marker can never be used again
                    elif sub == 'claims' and CLAIM_NAME.fullmatch(name) and '.' not in name:
                        held = _read_bytes(path)
                        if held is not None and not self._claim_alive(held, path):
                            self._swap(path, held, None)
                except (OSError, StoreError):
                    pass

    # ---- claims of runs in progress ----

    def _claim_path(self, arm, run):
        return os.path.join(self.path, 'claims', f'{arm}-{run:06d}')

    def claim(self, arm, run):
        """Take (arm, run) for this process; False if a live worker has it."""
        path = self._claim_path(arm, run)
        mine = json.dumps(dict(identity(), token=secrets.token_hex(8), time=time.time())).encode()
        for _ in range(3):
            try:
                self._link_new(path, mine)
                self._mine[path] = mine
                return True
            except FileExistsError:
                pass
            held = _read_bytes(path)
            if held is None:
                continue  # released meanwhile: try again
            if self._claim_alive(held, path):
                return False
            if self._swap(path, held, mine):  # a dead worker's claim: take the run over
                self._mine[path] = mine
                return True
            return False
        return False

    def release(self, arm, run):
        """Give up this process's claim of (arm, run); another's claim is left alone."""
        path = self._claim_path(arm, run)
        mine = self._mine.pop(path, None)
        if mine is not None and _read_bytes(path) == mine:
            self._swap(path, mine, None)

    def touch_claims(self, claims):
        """The heartbeat: refresh the mtime of this process's claims."""
        for arm, run in list(claims):
            path = self._claim_path(arm, run)
            mine = self._mine.get(path)
            if mine is not None and _read_bytes(path) == mine:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def in_progress(self):
        """Runs being trained now by live workers."""
        count = 0
        for name in self._names('claims'):
            path = os.path.join(self._folder('claims'), name)
            if CLAIM_NAME.fullmatch(name) and '.' not in name:
                held = _read_bytes(path)
                count += held is not None and self._claim_alive(held, path)
        return count

    def _claim_alive(self, held, path):
        try:
            owner = json.loads(held)
        except ValueError:
            owner = None
        return owner_alive(owner if isinstance(owner, dict) else {}, _mtime(path))

    def _link_new(self, path, data):
        """Make `path` hold `data`, atomically and only if it does not exist (FileExistsError)."""
        try:
            publish(path, data, exclusive=True, durable=False)
        except StoreError as e:
            raise StoreError(f'could not claim a run: {e}') from e.__cause__

    def _swap(self, path, held, replacement):
        """Replace the claim at `path` by `replacement` (None: remove it), provided it still holds `held`.
        Only the process that creates the marker `path.takeover-HASH-G` may move the claim off `held`;
        generation G+1 is tried only when the marker of generation G belongs to a dead process. The
        winner checks that the claim still holds `held`, then renames its marker over the claim (or
        removes the claim): there is no moment without a claim, and no two winners."""
        key = hashlib.sha256(held).hexdigest()[:16]
        me = json.dumps(dict(identity(), token=secrets.token_hex(8), time=time.time())).encode()
        marker_content = replacement if replacement is not None else me
        for gen in range(8):
            marker = f'{path}.takeover-{key}-{gen}'
            try:
                self._link_new(marker, marker_content)
            except FileExistsError:
                other = _read_bytes(marker)
                if other is None or self._claim_alive(other, marker):
                    return False  # a live process is moving this claim, or has moved it
                continue  # that process died: the next generation
            try:
                if _read_bytes(path) != held:
                    _remove(marker)
                    return False  # the claim moved on meanwhile
                if replacement is None:
                    os.remove(path)
                    _remove(marker)
                else:
                    os.replace(marker, path)
            except OSError as e:
                _remove(marker)
                raise StoreError(f'could not update the claim {path} ({_why(e)}). {_write_advice(e)}') from e
            for lower in range(gen):
                _remove(f'{path}.takeover-{key}-{lower}')
            return True
        return False

    # ---- finished and failed runs ----

    def run_file(self, arm, run):
        return os.path.join(self.path, arm, f'{run:06d}.npz')

    def stored(self, arm):
        """Run indices with a run file (six-digit names only; not yet validated, see load)."""
        return sorted(int(m[1]) for m in map(RUN_NAME.fullmatch, self._names(arm)) if m)

    def counts(self, runs):
        """{arm: stored runs with index < runs}."""
        return {arm: sum(r < runs for r in self.stored(arm)) for arm in self.arms}

    def _check_run_index(self, arm, run, seed):
        if arm not in self.arms:
            raise ValueError(f'arm {arm!r}, expected one of {self.arms}')
        if not 0 <= run < MAX_RUNS:
            raise ValueError(f'run {run}, expected 0 to {MAX_RUNS - 1}')
        if seed != seed_for(run, self.settings['seed_base']):
            raise ValueError(f'seed {seed} for run {run}, expected {seed_for(run, self.settings["seed_base"])}')

    def save_run(self, arm, run, seed, logits, seconds, test_acc, **extra):
        """Store one finished run; logits (n_train, 10). Atomic: the file is complete or absent.
        A run that saw only some examples also records which, as bits (checked on loading)."""
        self._check_run_index(arm, run, seed)
        logits = np.asarray(logits, dtype=np.float16)
        n_train = self.settings['n_train']
        if logits.shape != (n_train, 10):
            raise ValueError(f'logits of shape {logits.shape}, expected ({n_train}, 10)')
        record = dict(logits=logits, arm=arm, run=run, seed=seed, binding=self.binding, seconds=seconds,
                      test_acc=test_acc, meta=json.dumps(extra))
        bits = kept_bits(arm, seed, n_train, self.settings['held_out'])
        if bits is not None:
            record['kept'] = bits
        publish(self.run_file(arm, run), lambda f: np.savez(f, **record))

    def failure_file(self, arm, run):
        return os.path.join(self.path, 'failed', f'{arm}-{run:06d}.json')

    def save_failure(self, arm, run, seed, reason, **extra):
        self._check_run_index(arm, run, seed)
        record = dict(arm=arm, run=run, seed=seed, binding=self.binding, reason=reason, **extra)
        publish(self.failure_file(arm, run), json.dumps(record).encode())

    def failed(self):
        """{(arm, run): record} for runs that diverged; an entry that is not a failure record of this
        store is named and moved aside."""
        out = {}
        for name in self._names('failed'):
            if '.tmp-' in name or name.startswith('.'):
                continue
            path = os.path.join(self._folder('failed'), name)
            m = FAILED_NAME.fullmatch(name)
            if not m or m[1] not in self.arms:
                self._set_aside('failed', name, f'{path}: not a failure record (expected a name like '
                                                f'{self.arms[0]}-000042.json)')
                continue
            arm, run = m[1], int(m[2])
            try:
                with open(path, 'rb') as f:
                    rec = json.loads(f.read())
            except FileNotFoundError:
                continue
            except OSError as e:
                raise Unreadable(f'cannot read {path} ({_why(e)}); it was not moved. Fix its permissions '
                                 'or the disk and rerun.') from e
            except ValueError:
                rec = None
            expected = dict(arm=arm, run=run, seed=seed_for(run, self.settings['seed_base']), binding=self.binding)
            wrong = ['not a JSON object'] if not isinstance(rec, dict) else \
                [f'{k} is {_short(rec.get(k))}, expected {_short(v)}' for k, v in expected.items() if rec.get(k) != v]
            if wrong:
                self._set_aside('failed', name, f'{path}: {wrong[0]} (a record from another store, or damaged)')
                continue
            out[arm, run] = rec
        return out

    def read_run(self, arm, run):
        """One run file -> dict; raises StoreError if it is corrupt, truncated or belongs elsewhere,
        Unreadable if it cannot be read."""
        return self._read_run(arm, run)[0]

    def _read_run(self, arm, run):
        """(record, (size, mtime_ns, inode) of the file read)."""
        path = self.run_file(arm, run)
        try:
            with open(path, 'rb') as f:
                st = os.fstat(f.fileno())
                # allow_pickle stays False (numpy's default): a run file from a shared store loads data, never code
                with np.load(f) as z:
                    rec = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise _Vanished(path) from None
        except OSError as e:
            if e.errno is not None:
                raise Unreadable(f'cannot read {path} ({_why(e)}); it was not moved. Fix its permissions '
                                 'or the disk and rerun.') from e
            raise StoreError(f'{path}: corrupt or truncated ({type(e).__name__}: {e})') from e
        except Exception as e:  # a truncated or garbage file fails in many ways (zip, pickle, format)
            raise StoreError(f'{path}: corrupt or truncated ({type(e).__name__}: {e})') from e
        seed = seed_for(run, self.settings['seed_base'])
        expected = [('binding', self.binding, 'made with other settings (trainer, hyperparameters, held-out '
                                              'set, dataset or seed base): a file from another store'),
                    ('arm', arm, f'a file of another arm, put into {arm}/'),
                    ('run', run, 'a file renamed or copied to another run\'s name'),
                    ('seed', seed, 'a file from another seed range')]
        for key, value, why in expected:
            found = rec[key].item() if key in rec and rec[key].ndim == 0 else None
            if found != value:
                raise StoreError(f'{path}: {key} is {"missing" if found is None else repr(found)}, expected '
                                 f'{value!r} ({why})')
        n_train = self.settings['n_train']
        if 'logits' not in rec or rec['logits'].shape != (n_train, 10) or rec['logits'].dtype != np.float16:
            raise StoreError(f'{path}: logits missing or not ({n_train}, 10) float16')
        # The analysis redraws each run's kept examples from its arm and seed: they must be the ones trained on.
        bits = kept_bits(arm, seed, n_train, self.settings['held_out'])
        if bits is not None and not np.array_equal(rec.get('kept'), bits):
            raise StoreError(f'{path}: trained on other examples than its arm and seed draw now '
                             '(another numpy version?); keep it out of this store')
        for key in ('seconds', 'test_acc'):
            if key not in rec or rec[key].ndim != 0:
                raise StoreError(f'{path}: {key} missing')
        return rec, [st.st_size, st.st_mtime_ns, st.st_ino]

    def quarantine(self, arm, run, reason, identity_read=None):
        """Move a bad run file aside so that the run is redone; nothing is deleted. identity_read: the
        (size, mtime_ns, inode) of the file found bad; a newer file at that name is put back."""
        self._set_aside(arm, f'{run:06d}.npz', reason + '; the run will be redone by the next trainer command',
                        identity_read)

    def _set_aside(self, sub, name, reason, identity_read=None):
        src = os.path.join(self.path, sub, name)
        dst = os.path.join(self.path, 'corrupt', f'{sub}-{name}.{time.strftime("%Y%m%d-%H%M%S")}-{_tag()}')
        try:
            os.makedirs(self._folder('corrupt'), exist_ok=True)
            os.rename(src, dst)
        except FileNotFoundError:
            return  # already moved by another process
        except OSError as e:
            self._note_once(src, f'{reason}; left out (could not move it to corrupt/: {_why(e)})')
            return
        fsync_dir(os.path.dirname(src))
        if identity_read is not None:
            st = os.stat(dst)
            if st.st_ino != identity_read[2]:  # a worker redid the run since it was read: put it back
                try:
                    os.link(dst, src)
                    os.remove(dst)
                except OSError:
                    pass
                return
        note(f'{reason}; moved to {dst}')

    # ---- reading runs back: the pack ----

    def load(self, arm):
        """(logits, run_info): logits (N, n_train, 10) float16, every valid run of `arm` in run order
        (memory-mapped from the pack; in memory when the store cannot be written); run_info: 'run', 'seed',
        'seconds', 'test_acc' arrays of length N."""
        if arm not in self.arms:
            raise ValueError(f'arm {arm!r}, expected one of {self.arms}')
        for name in self._names(arm):  # anything but a six-digit run file, a write in progress or a hidden file
            if not RUN_NAME.fullmatch(name) and '.tmp-' not in name and not name.startswith('.'):
                self._set_aside(arm, name, f'{os.path.join(self.path, arm, name)}: not a run file name '
                                           '(expected six digits, e.g. 000042.npz)')
        self.clean_leftovers(['packed'])
        for attempt in range(3):
            files = self._stats(arm)
            if not files:
                return self._empty()
            got = self._open_pack(arm, files)
            if got is not None:
                return got
            if attempt < 2:
                got = self._pack(arm, files)
                if got is not None:
                    return got
        return self._from_files(arm, self._stats(arm), 'the pack kept changing while it was read')

    def _stats(self, arm):
        """{run: [size, mtime_ns, inode]} of the run files of `arm`."""
        out = {}
        for run in self.stored(arm):
            try:
                st = os.stat(self.run_file(arm, run))
            except FileNotFoundError:
                continue
            out[run] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return out

    def _empty(self):
        return (np.zeros((0, self.settings['n_train'], 10), np.float16),
                {'run': np.zeros(0, int), 'seed': np.zeros(0, int), 'seconds': np.zeros(0), 'test_acc': np.zeros(0)})

    def _pack_paths(self, arm):
        return (os.path.join(self.path, 'packed', f'{arm}.npy'), os.path.join(self.path, 'packed', f'{arm}.json'))

    def _read_index(self, arm):
        """The pack's index if well-formed and of this store, else None."""
        index = _read_json(self._pack_paths(arm)[1])
        keys = ('run', 'seed', 'seconds', 'test_acc', 'files')
        if not isinstance(index, dict) or index.get('binding') != self.binding or \
                not all(isinstance(index.get(k), list) for k in keys) or \
                len({len(index[k]) for k in keys}) != 1 or not isinstance(index.get('data'), list):
            return None
        return index

    def _map_pack(self, arm, index, private):
        """Map the data file if it is the one the index was built with and holds its rows; else None.
        private: map a link only this process uses, so that a rebuild by another process cannot
        change the file under the mapping."""
        data = self._pack_paths(arm)[0]
        try:
            f = open(data, 'rb')
        except OSError:
            return None
        with f:
            st = os.fstat(f.fileno())
            if [st.st_size, st.st_mtime_ns, st.st_ino] != index['data']:
                return None
            try:
                np.lib.format.read_magic(f)
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            except (ValueError, OSError):
                return None
            offset = f.tell()
            n = len(index['run'])
            if shape != (n, self.settings['n_train'], 10) or fortran or dtype != np.float16 or \
                    offset + n * self.settings['n_train'] * 20 != st.st_size or n == 0:
                return None
            if not private:  # mapped through the file checked above, whatever its name holds by now
                return np.memmap(f, np.float16, 'r', offset=offset, shape=shape)
            path = _reader_link(data, st)
            return None if path is None else np.memmap(path, np.float16, 'r', offset=offset, shape=shape)

    def _open_pack(self, arm, files):
        index = self._read_index(arm)
        if index is None or dict(zip(index['run'], index['files'])) != files or len(index['run']) != len(files):
            return None
        logits = self._map_pack(arm, index, private=True)
        if logits is None:
            return None
        return logits, {k: np.asarray(index[k]) for k in ('run', 'seed', 'seconds', 'test_acc')}

    def _pack(self, arm, files):
        """Write the pack of every valid run, sequentially, reusing the rows of the previous pack for
        run files that did not change; bad run files are moved aside. Returns (logits, run_info) or None
        if the store changed meanwhile; analyses from the run files if the pack cannot be written."""
        n_train = self.settings['n_train']
        data, index_file = self._pack_paths(arm)
        old_index = self._read_index(arm)
        old = self._map_pack(arm, old_index, private=False) if old_index else None
        reuse = {} if old is None else {r: (i, f) for i, (r, f) in enumerate(zip(old_index['run'], old_index['files']))}
        tmp = f'{data}.tmp-{_tag()}'
        keys = ('run', 'seed', 'seconds', 'test_acc', 'files')
        index = {k: [] for k in keys}
        bad = []
        try:
            with open(tmp, 'xb') as out:
                out.write(_npy_header((len(files), n_train, 10)))
                for run in sorted(files):
                    if run in reuse and reuse[run][1] == files[run]:
                        i = reuse[run][0]
                        logits, rec = old[i], {k: old_index[k][i] for k in keys}
                    else:
                        got = self._read_valid(arm, run, files, bad)
                        if got is None:
                            continue
                        found, stat = got
                        logits = found['logits']
                        rec = dict(run=run, seed=found['seed'].item(), seconds=found['seconds'].item(),
                                   test_acc=found['test_acc'].item(), files=stat)
                    # written in order, never through a mapping: a full disk is an OSError, not a SIGBUS
                    out.write(np.ascontiguousarray(logits, dtype='<f2').tobytes())
                    for k in keys:
                        index[k].append(rec[k])
                if len(index['run']) < len(files):  # some runs were bad: the header says how many are here
                    out.seek(0)
                    out.write(_npy_header((len(index['run']), n_train, 10)))
                    out.truncate(HEADER_BYTES + len(index['run']) * n_train * 20)
                out.flush()
                os.fsync(out.fileno())
                st = os.fstat(out.fileno())
            del old
            self._set_aside_runs(arm, bad, good=len(index['run']))
            if not index['run']:
                return self._empty()
            private = _reader_link(tmp, st)
            index.update(binding=self.binding, data=[st.st_size, st.st_mtime_ns, st.st_ino])
            try:  # publish for the next reader; this one maps its own link whatever happens here
                os.replace(tmp, data)
                fsync_dir(os.path.dirname(data))
                publish(index_file, json.dumps(index).encode())
            except (OSError, StoreError):
                pass
        except OSError as e:  # disk full, read-only store, no packed/ folder
            return self._from_files(arm, self._stats(arm), f'could not write {data} ({_why(e)})')
        finally:
            _remove(tmp)
        if private in (None, tmp):  # the file changed, or no hard links here: map what was published
            return None
        shape = (len(index['run']), n_train, 10)
        return (np.memmap(private, np.float16, 'r', offset=HEADER_BYTES, shape=shape),
                {k: np.asarray(index[k]) for k in ('run', 'seed', 'seconds', 'test_acc')})

    def _read_valid(self, arm, run, files, bad):
        """(record, stat) of one run file for packing, or None if it vanished or failed its checks (then
        appended to `bad` with the reason, to be moved aside). An unreadable file stops the reading."""
        try:
            return self._read_run(arm, run)
        except _Vanished:
            return None
        except Unreadable:
            raise
        except StoreError as e:
            bad.append((run, str(e), files[run]))
            return None

    def _set_aside_runs(self, arm, bad, good):
        """Move bad run files aside, unless every file of the arm is foreign: then settings.json is
        what changed, and nothing is moved."""
        foreign = [b for b in bad if ': binding is' in b[1] or ': binding is missing' in b[1]]
        if len(bad) >= 2 and good == 0 and len(foreign) == len(bad):
            raise StoreError(f'every run file of {os.path.join(self.path, arm)} ({len(bad)}) was made with other '
                             f'settings than settings.json records (e.g. {bad[0][1]}). Was settings.json replaced? '
                             'Nothing was moved: restore it, or use another --out.')
        for run, reason, stat in bad:
            self.quarantine(arm, run, reason, stat)

    def _from_files(self, arm, files, reason):
        """Every valid run read straight from its file, in memory (no pack is written)."""
        self._note_once(('from files', arm), f'{reason}; analysing the {len(files)} run files of '
                                             f'{os.path.join(self.path, arm)} directly, in memory')
        n_train = self.settings['n_train']
        logits = np.empty((len(files), n_train, 10), np.float16)
        run_info = {k: [] for k in ('run', 'seed', 'seconds', 'test_acc')}
        bad = []
        for run in sorted(files):
            got = self._read_valid(arm, run, files, bad)
            if got is None:
                continue
            rec, stat = got
            logits[len(run_info['run'])] = rec['logits']
            for k in run_info:
                run_info[k].append(rec[k].item())
        self._set_aside_runs(arm, bad, good=len(run_info['run']))
        return logits[:len(run_info['run'])], {k: np.asarray(v) for k, v in run_info.items()}


def _npy_header(shape):
    """A .npy (version 1.0) header of exactly HEADER_BYTES for a C-ordered float16 array of `shape`."""
    text = "{'descr': '<f2', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    body = text.ljust(HEADER_BYTES - 11) + '\n'
    return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(body)) + body.encode('latin1')


_READERS = {}  # inode -> this process's private link to a pack


def _reader_link(path, st):
    """A hard link to the pack data `path` (whose stat is `st`) that only this process uses and removes
    at exit: a rebuild by another process replaces the pack's name, never the file this process maps.
    Falls back to `path` itself on a file system without hard links; None if `path` changed."""
    if st.st_ino in _READERS and os.path.exists(_READERS[st.st_ino]):
        return _READERS[st.st_ino]
    base = path.split('.tmp-')[0]
    link = f'{base}.reader-{_tag()}'
    try:
        os.link(path, link)
    except FileNotFoundError:
        return None
    except OSError:
        return path
    if os.stat(link).st_ino != st.st_ino:
        _remove(link)
        return None
    if not _READERS:
        atexit.register(lambda: [_remove(p) for p in _READERS.values()])
    _READERS[st.st_ino] = link
    return link
