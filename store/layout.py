"""Opening and creating a store: its folders, settings.json and labels.npy, and clearing what killed
processes left behind."""
import hashlib
import json
import os
import time

import numpy as np

from design import ARMS
from store.claims import CLAIM_NAME, TAKEOVER, Claims
from store.files import (OWN_TEMP, READER_TIMEOUT, StoreError, Unreadable, _mtime, _read_bytes, _remove, _tag_owner,
                         _why, _write_advice, check_folder, identity, note, open_file, owner_alive, parse_json, publish)
from store.margins import Margins
from store.pack import Pack
from store.runs import Runs
from store.settings import BINDING, FORMAT, check_settings, checksums, differences, digest, labels_digest

SUBFOLDERS = ('failed', 'claims', 'corrupt', 'packed')


class Store(Claims, Runs, Pack, Margins):
    def __init__(self, path):
        self.path = str(path)
        settings_file = os.path.join(self.path, 'settings.json')
        if not os.path.isfile(settings_file):
            raise StoreError(f'no run store at {self.path} (no settings.json there). '
                             'Run a trainer script first, or pass the folder it wrote to.')
        try:
            with open_file(settings_file) as f:
                text = f.read(1 << 24)  # settings of a few KB; a huge file is cut and fails as JSON
        except OSError as e:
            raise Unreadable(f'cannot read {settings_file} ({_why(e)}). Fix its permissions or the disk.') from e
        settings, why = parse_json(text)
        if why:
            raise StoreError(f'{settings_file} is not valid JSON ({why}): edited by hand or cut short? '
                             'Restore it, or start a new store with another --out.')
        self.settings = check_settings(settings, settings_file)
        self.arms = tuple(self.settings['arms'])
        for sub in (*self.arms, *SUBFOLDERS):
            check_folder(os.path.join(self.path, sub))
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
            with open_file(path) as f:
                labels = np.load(f)
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
        settings['checksums'] = checksums(settings) if isinstance(settings.get('held_out'), dict) else {}
        check_settings(settings, 'the settings of this command')
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f'{path} is a file, expected a store folder. Pass another --out.')
        if not os.path.exists(os.path.join(path, 'settings.json')):
            cls._make(path, settings, labels)
        store = cls(path)
        # A scan trains on random halves whatever the held-out set: that set only labels its report.
        binding = [k for k in (*BINDING, 'labels_sha256')
                   if not (k == 'held_out' and settings['arms'] == ['scan'])]
        lines = differences(store.settings, settings, binding)
        if store.settings.get('trainer') != settings.get('trainer'):  # its other settings are that trainer's
            raise StoreError(f'{path} holds runs of the trainer {store.settings.get("trainer")!r}, not '
                             f'{settings.get("trainer")!r} (so its hyperparameters differ too). Use another '
                             '--out folder for this trainer.')
        if lines:
            raise StoreError(f'{path} holds runs made with other settings:\n' + '\n'.join(lines) +
                             '\nUse another --out folder for these settings, or rerun with the store\'s settings.')
        return store

    def remove_if_unused(self):
        """Remove a store this process just made and nothing has used: no run file, failure record, claim,
        pack or anything else. settings.json goes first (a folder without it is no store), then labels.npy,
        then each folder by rmdir, which leaves any folder something was written into meanwhile.
        -> whether the folder is gone."""
        arms = self.settings['arms']
        if any(self._names(sub) for sub in (*arms, *SUBFOLDERS)):
            return False
        for name in ('settings.json', 'labels.npy'):
            _remove(os.path.join(self.path, name))
        try:
            for sub in (*arms, *SUBFOLDERS):
                os.rmdir(os.path.join(self.path, sub))
            os.rmdir(self.path)
        except OSError:
            return False
        return True

    @staticmethod
    def _make(path, settings, labels):
        other = _not_ours(path, settings['arms'])
        if other:
            if os.path.exists(os.path.join(path, 'settings.json')):
                return  # made meanwhile by another process: the settings comparison speaks
            raise StoreError(f'{path} is not empty and not a run store (no settings.json; it holds '
                             f'{", ".join(other[:5])}{", ..." if len(other) > 5 else ""}). Nothing was changed '
                             'there: pass a new or empty folder as --out.')
        existed = os.path.lexists(path)
        subs = [sub for sub in (*settings['arms'], *SUBFOLDERS) if not os.path.isdir(os.path.join(path, sub))]
        try:
            for sub in subs:
                os.makedirs(os.path.join(path, sub), exist_ok=True)
        except OSError as e:
            _unmake(path, subs, existed)
            raise StoreError(f'could not create the store {path} ({_why(e)}). {_write_advice(e, new_store=True)}') from e
        labels_file = os.path.join(path, 'labels.npy')
        try:  # exclusive: of two processes making the store at once, the labels of one stay
            publish(labels_file, lambda f: np.save(f, labels), exclusive=True, new_store=True)
            mine = labels_file
        except FileExistsError:
            mine = None
        except StoreError:  # a full disk: the folders this call made are not left behind
            _unmake(path, subs, existed)
            raise
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
            publish(os.path.join(path, 'settings.json'), json.dumps(settings, indent=1).encode(), exclusive=True,
                    new_store=True)
        except FileExistsError:
            pass
        except StoreError:
            _unmake(path, subs, existed, mine)
            raise

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
        takeover markers that no longer apply. Never fails: a read-only store is left as it is, except
        when all is cleaned (a trainer starting): something that holds a run file's name but is no file is
        moved aside, and if it cannot be, StoreError says so (that run could never be redone)."""
        if subs is None:
            self.set_aside_odd_runs()
        for sub in (('', *self.arms, *SUBFOLDERS) if subs is None else subs):
            for name in self._names(sub):
                path = os.path.join(self.path, sub, name)
                try:
                    if not OWN_TEMP.fullmatch(name) and not TAKEOVER.fullmatch(name) and \
                            not (sub == 'claims' and CLAIM_NAME.fullmatch(name)):
                        continue  # not a name the store writes: never removed
                    if '.tmp-' in name:  # another host's is judged by its age on the store's own clock
                        if not owner_alive(_tag_owner(name.rpartition('.tmp-')[2]), _mtime(path), self._store_now()):
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
                    elif sub == 'claims' and CLAIM_NAME.fullmatch(name):
                        held = _read_bytes(path)
                        if held is not None and not self._claim_alive(held, path):
                            self._swap(path, held, None)
                except (OSError, StoreError):
                    pass


def _unmake(path, subs, existed, labels_file=None):
    """Undo a store creation that failed before settings.json appeared: the labels this process wrote
    (labels_file), then the subfolders `subs` it made and the folder itself unless it `existed`, each by
    rmdir, so that anything another process wrote there meanwhile stays."""
    if labels_file is not None:
        _remove(labels_file)
    for folder in [os.path.join(path, sub) for sub in subs] + ([] if existed else [path]):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _not_ours(path, arms):
    """What a folder without settings.json holds that a store being created there could not have made:
    anything but its subfolders (real folders), labels.npy, settings.json (written meanwhile by another
    process) and the store's own temporary files."""
    if not os.path.isdir(path):
        return []
    other = []
    for name in sorted(os.listdir(path)):
        inside = os.path.join(path, name)
        if name in (*arms, *SUBFOLDERS) and os.path.isdir(inside) and not os.path.islink(inside):
            other += [f'{name}/{n}' for n in sorted(os.listdir(inside)) if not OWN_TEMP.fullmatch(n)]
        elif OWN_TEMP.fullmatch(name):
            continue
        elif name not in ('labels.npy', 'settings.json') or not os.path.isfile(inside) or os.path.islink(inside):
            other.append(name + ('/' if os.path.isdir(inside) else ''))
    return other
