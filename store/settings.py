"""The settings that bind a store: their form, and checksums that name a value edited by hand."""
import hashlib
import json

import numpy as np

from design import DESIGNS
from store.files import StoreError, _is_int, _short

# Settings that must agree between a store and the command adding runs to it.
BINDING = ('trainer', 'hyp', 'held_out', 'n_train', 'data_fingerprint', 'seed_base', 'arms')
FORMAT = 2  # settings.json 'format': 2 = run files carry arm, run, seed and the binding hash


def digest(value):
    """A short hash of a JSON value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def group_order(held_out):
    """A hash of the order of the held-out groups (which digest ignores)."""
    return digest(list(held_out))


def checksums(settings):
    """The checksums of a new store's settings.json: one per binding key, and the held-out groups' order."""
    return {**{k: digest(settings[k]) for k in BINDING if k in settings}, 'groups': group_order(settings['held_out'])}


def differences(ours, theirs, keys):
    """Lines naming how settings `theirs` differ from `ours` in `keys`, down to the key inside hyp and the
    group inside held_out (and the order of the groups, which decides the factorial coins)."""
    lines = []
    for k in keys:
        a, b = ours.get(k), theirs.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k in ('hyp', 'held_out'):
            lines += [f'  {k}.{name}: store has {_short(a.get(name, "(none)"))}, this command has '
                      f'{_short(b.get(name, "(none)"))}' for name in sorted({*a, *b}, key=str)
                      if a.get(name) != b.get(name)]
            if a == b and k == 'held_out' and list(a) != list(b):
                lines.append(f'  held_out: groups in the order {list(a)} in the store, {list(b)} in this command')
        elif a != b:
            lines.append(f'  {k}: store has {_short(a)}, this command has {_short(b)}')
    return lines


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
    # The checksums ignore key order, but the order of the held-out groups decides which example each
    # seed's factorial coin removes: stores made by this version also record it (older ones: see pack.py).
    if 'groups' in s['checksums'] and s['checksums']['groups'] != group_order(s['held_out']):
        raise StoreError(f'{where}: the order of the held-out groups (now {_short(list(held))}) no longer '
                         'matches the order the store was created with; that order decides which examples each run '
                         f'was trained without. {fix}')
    edited = [k for k in BINDING if s['checksums'].get(k) != digest(s[k])]
    if edited:
        raise StoreError(f'{where}: {", ".join(f"{k!r} (now {_short(s[k])})" for k in edited)} no longer '
                         f'match{"es" if len(edited) == 1 else ""} the value the store was created with. {fix}')
    return s
