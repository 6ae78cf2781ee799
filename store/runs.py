"""Finished and failed runs: writing them, and checking that a run file belongs where it lies."""
import errno
import json
import os
import re
import io
import stat
import struct
import time
import zipfile
import zlib

import numpy as np

from design import MAX_RUNS, kept_bits, seed_for
from store.files import (OWN_TEMP, NotRegular, StoreError, TempRemoved, Unreadable, _Vanished, _kind, _short, _tag, _why, fsync_dir,
                         note, open_file, publish)
from store.kernel import Kernel, margins_agree

RUN_NAME = re.compile(r'(\d{6})\.npz')

FAILED_NAME = re.compile(r'([a-z]+)-(\d{6})\.json')


class Runs:
    """The run files part of Store: <arm>/NNNNNN.npz, failed/ and corrupt/."""

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
        A run that saw only some examples also records which, as bits (checked on loading). The run's
        margins (stats.margins of its logits, float64) are kept in the file too, so that packing copies
        them instead of computing them.
        -> False if this process had claimed the run and lost the claim: nothing was stored."""
        self._check_run_index(arm, run, seed)
        logits = np.asarray(logits, dtype=np.float16)
        n_train = self.settings['n_train']
        if logits.shape != (n_train, 10):
            raise ValueError(f'logits of shape {logits.shape}, expected ({n_train}, 10)')
        kernel = self.__dict__.get('_kernel')
        if kernel is None:
            kernel = self.__dict__['_kernel'] = Kernel(self.labels)
        record = dict(logits=logits, margins=kernel(logits), arm=arm, run=run, seed=seed, binding=self.binding,
                      seconds=seconds, test_acc=test_acc, meta=json.dumps(extra))
        bits = kept_bits(arm, seed, n_train, self.settings['held_out'])
        if bits is not None:
            record['kept'] = bits
        self.__dict__.get('_snapshots', {}).pop(arm, None)  # this Store's next load sees its own run
        return self._publish_if_held(arm, run, self.run_file(arm, run), lambda f: np.savez(f, **record))

    def _publish_if_held(self, arm, run, path, data):
        """Publish a result of (arm, run), unless this process claimed the run and has lost the claim
        (taken over while it was stopped: the run is another worker's now). -> whether it was stored."""
        claimed = self._claim_path(arm, run) in self._mine
        try:  # a run file is never replaced: one stored meanwhile by another worker stays
            if publish(path, data, exclusive=path == self.run_file(arm, run),
                       check=lambda: not claimed or self.holds(arm, run)):
                return True
        except FileExistsError:
            note(f'{arm} run {run}: stored by another worker while this one was stopped or slow; this '
                 'worker\'s result is discarded')
            return False
        except TempRemoved:
            pass
        note(f'{arm} run {run}: this worker\'s claim was taken over while it was stopped or slow; its result '
             'is discarded (the run is the other worker\'s)')
        return False

    def failure_file(self, arm, run):
        return os.path.join(self.path, 'failed', f'{arm}-{run:06d}.json')

    def save_failure(self, arm, run, seed, reason, **extra):
        self._check_run_index(arm, run, seed)
        record = dict(arm=arm, run=run, seed=seed, binding=self.binding, reason=reason, **extra)
        return self._publish_if_held(arm, run, self.failure_file(arm, run), json.dumps(record).encode())

    def failed(self):
        """{(arm, run): record} for runs that diverged; an entry that is not a failure record of this
        store is named and moved aside."""
        out = {}
        for name in self._names('failed'):
            if OWN_TEMP.fullmatch(name) or name.startswith('.'):
                continue
            path = os.path.join(self._folder('failed'), name)
            m = FAILED_NAME.fullmatch(name)
            if not m or m[1] not in self.arms:
                self._note_once(path, f'{path}: not a failure record (expected a name like '
                                      f'{self.arms[0]}-000042.json); left alone')
                continue
            arm, run = m[1], int(m[2])
            try:
                with open_file(path) as f:
                    rec = json.loads(f.read(1 << 20))  # a record is a few hundred bytes
            except FileNotFoundError:
                continue
            except NotRegular as e:
                self._set_aside('failed', name, f'{e} (a failure record)')
                continue
            except OSError as e:
                raise Unreadable(f'cannot read {path} ({_why(e)}); it was not moved. Fix its permissions '
                                 'or the disk and rerun.') from e
            except (ValueError, RecursionError):
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

    def _read_run(self, arm, run, drop=False, expected_bits=None, buf=None):
        """(record, (size, mtime_ns, inode, ctime_ns) of the file read). A 'margins' member that is not
        (n_train,) float64 or disagrees with the logits is left out of the record (the margins are then
        computed from the logits). drop: the file's pages are dropped from the page cache once read (it is
        being packed: the pack is what the next reads need cached). expected_bits: a function returning
        kept_bits of this run, where the caller draws them (a scan's, drawn ahead in another thread). buf: a
        bytearray the file is read into where it fits (a packer's, reused: the arrays returned are views of it
        until the next file is read into it)."""
        path = self.run_file(arm, run)
        try:
            with open_file(path) as f:
                st = os.fstat(f.fileno())
                rec = _load_members(path, f, self.settings['n_train'], st.st_size, buf)
                if drop and hasattr(os, 'posix_fadvise'):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except FileNotFoundError:
            raise _Vanished(path) from None
        except StoreError:
            raise
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
            found = rec[key].item() if key in rec and rec[key].ndim == 0 and rec[key].dtype.kind in 'iuU' else None
            if found != value:
                raise StoreError(f'{path}: {key} is {"missing" if found is None else repr(found)}, expected '
                                 f'{value!r} ({why})')
        n_train = self.settings['n_train']
        if 'logits' not in rec or rec['logits'].shape != (n_train, 10) or rec['logits'].dtype != np.float16:
            raise StoreError(f'{path}: logits missing or not ({n_train}, 10) float16')
        # The analysis redraws each run's kept examples from its arm and seed: they must be the ones trained on.
        drawn = self.__dict__.setdefault('_kept_bits', {})  # with, without: the same examples whatever the seed
        bits = drawn[arm] if arm in drawn else kept_bits(arm, seed, n_train, self.settings['held_out']) \
            if expected_bits is None else expected_bits()
        if arm in ('with', 'without'):
            drawn[arm] = bits
        if bits is not None and not np.array_equal(rec.get('kept'), bits):
            raise StoreError(f'{path}: trained on other examples than its arm and seed draw now '
                             '(another numpy version?); keep it out of this store')
        for key in ('seconds', 'test_acc'):
            if key not in rec or rec[key].ndim != 0 or rec[key].dtype.kind not in 'fiu':
                raise StoreError(f'{path}: {key} missing or not a number'
                                 f'{"" if key not in rec else f" ({rec[key].dtype} {rec[key].shape})"}')
        if 'margins' in rec:  # a file from before margins were kept has none: computed from the logits
            m = rec['margins']
            if m.shape != (n_train,) or m.dtype != np.float64 or not margins_agree(m, rec['logits'], self.labels, run):
                del rec['margins']
                self._note_once(('margins', path), f'{path}: its kept margins are not those of its logits; '
                                'computed from the logits instead')
        return rec, [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

    def quarantine(self, arm, run, reason, identity_read=None):
        """Move a bad run file aside so that the run is redone; nothing is deleted. identity_read: the
        (size, mtime_ns, inode, ctime_ns) of the file found bad; a newer file at that name is put back."""
        self._set_aside(arm, f'{run:06d}.npz', reason, identity_read,
                        then='; the run will be redone by the next trainer command')

    def set_aside_odd_runs(self):
        """For a trainer: move aside what holds a run file's name but cannot be one (a folder, a FIFO, a
        link, a file shorter than the smallest zip), so that the run is redone; raise StoreError naming
        why if one cannot be moved (the run could never be redone, and would be counted as done)."""
        for arm in self.arms:
            for run in self.stored(arm):
                path = self.run_file(arm, run)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue  # vanished meanwhile
                if stat.S_ISREG(st.st_mode) and st.st_size >= SMALLEST_ZIP:
                    continue
                odd = f'{path} is {_kind(st.st_mode)}, expected a file' if not stat.S_ISREG(st.st_mode) else \
                    f'{path} holds {st.st_size} bytes, expected a run file (a zip of at least {SMALLEST_ZIP})'
                try:
                    self._set_aside(arm, f'{run:06d}.npz', odd, then='; the run will be redone', quiet=True)
                except OSError as e:
                    raise StoreError(f'{odd}, and it could not be moved to corrupt/ ({_why(e)}{_move_hint(e)}): '
                                     f'run {run} of {arm} cannot be redone while it is there. Remove it and '
                                     'rerun.') from e

    def _set_aside(self, sub, name, reason, identity_read=None, then='', quiet=False):
        """Move a bad file of the store to corrupt/ and say so (reason + then); -> False if it could not be
        moved (then said without the promise `then`: no trainer can replace it; quiet: the OSError raised
        instead, for the caller's one line)."""
        src = os.path.join(self.path, sub, name)
        dst = os.path.join(self.path, 'corrupt', f'{sub}-{name}.{time.strftime("%Y%m%d-%H%M%S")}-{_tag()}')
        try:
            os.makedirs(self._folder('corrupt'), exist_ok=True)
            os.rename(src, dst)
        except FileNotFoundError:
            return True  # already moved by another process
        except OSError as e:
            if quiet:
                raise
            self._note_once(src, f'{reason}; left out, and it could not be moved to corrupt/ ({_why(e)}'
                                 f'{_move_hint(e)}): no trainer can replace it while it is there. Move or remove '
                                 'it by hand.')
            return False
        fsync_dir(os.path.dirname(src))
        if identity_read is not None:
            st = os.stat(dst)
            if st.st_ino != identity_read[2]:  # a worker redid the run since it was read: put it back
                try:
                    os.link(dst, src)
                    os.remove(dst)
                except OSError:
                    pass
                return True
        note(f'{reason}{then}; moved to {dst}')
        return True


SMALLEST_ZIP = 22  # bytes: an empty zip (its end record alone); a shorter run file is no run


def _move_hint(e):
    """Why a file of a writable store could not be moved: root gets EPERM only from an immutable file."""
    if e.errno == errno.EPERM:
        return '; an immutable or append-only file or folder? `lsattr` shows an i or a; `chattr -i` it'
    return ''


# The members a run file may hold, and the most bytes each may take: the expected logits bound what is read.
NPY_HEADER = 4096  # bytes, at most, of a member's .npy header


def _member_limits(n_train):
    return dict(logits=n_train * 10 * 2, margins=n_train * 8, kept=(n_train + 7) // 8, meta=1 << 20, arm=256, run=8, seed=8,
                binding=256, seconds=16, test_acc=16)


def _load_members(path, f, n_train, size, buf=None):
    """{member: array} of the run file open as `f` (of `size` bytes), each member checked by name and size
    before anything is read (a small file can hold a huge compressed member), then read once and checked
    against its CRC. Object arrays are refused (numpy's allow_pickle=False): a run file from a shared store
    loads data, never code. The file is read whole with one pread, into `buf` where it fits."""
    limits = _member_limits(n_train)
    with zipfile.ZipFile(f) as z:  # the zip's central directory, parsed once
        infos = z.infolist()
        names = [i.filename.removesuffix('.npy') for i in infos]
        odd = [i.filename for i, n in zip(infos, names) if n not in limits or not i.filename.endswith('.npy')]
        if odd or len(set(names)) < len(names):
            raise StoreError(f'{path}: holds {", ".join(odd[:3]) or "a member twice"}, expected only the members of a '
                             f'run file ({", ".join(limits)})')
        big = [(i.filename, i.file_size) for i, n in zip(infos, names) if i.file_size > limits[n] + NPY_HEADER]
        if big:
            raise StoreError(f'{path}: member {big[0][0]} holds {big[0][1]:,} bytes, expected at most '
                             f'{limits[big[0][0][:-4]] + NPY_HEADER:,} for {n_train} training examples')
        if size > largest_run_file(n_train):
            raise StoreError(f'{path}: holds {size:,} bytes, expected at most {largest_run_file(n_train):,} for a '
                             f'run file of {n_train} training examples')
        # writable, as np.load's arrays are; a view of `buf` where it fits (a packer's, reused)
        whole = memoryview(buf)[:size] if buf is not None and len(buf) >= size else memoryview(bytearray(size))
        if os.preadv(f.fileno(), [whole], 0) != size:
            raise zipfile.BadZipFile('truncated while it was read')
        return {n: _npy(_member_bytes(z, f, i, whole), i.filename) for i, n in zip(infos, names)}


LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)  # a zip member's local header: 30 bytes
ZIP_ENTRY = 512  # bytes, at most, a member adds to a run file besides its data (headers, name, zip64 fields)


def largest_run_file(n_train):
    """The most bytes a run file of every member at its largest takes (the largest read whole)."""
    return sum(_member_limits(n_train).values()) + len(_member_limits(n_train)) * (NPY_HEADER + ZIP_ENTRY)


def _member_bytes(z, f, info, whole):
    """The bytes of one member of the zip `z` open on `f`, checked against the CRC of its directory entry.
    A stored member (np.savez writes no other) is sliced from `whole`, the file's bytes; anything else is
    read through zipfile."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 or info.compress_size != info.file_size:
        with z.open(info) as member:  # zipfile checks the CRC at the member's end
            return member.read()
    head = bytes(whole[info.header_offset:info.header_offset + LOCAL_HEADER.size])
    if len(head) < LOCAL_HEADER.size or head[:4] != zipfile.stringFileHeader:
        raise zipfile.BadZipFile(f'Bad magic number for file header of {info.filename!r}')
    fields = LOCAL_HEADER.unpack(head)
    name = info.header_offset + LOCAL_HEADER.size  # then the extra field, then the data
    start = name + fields[zipfile._FH_FILENAME_LENGTH] + fields[zipfile._FH_EXTRA_FIELD_LENGTH]
    data = whole[start:start + info.file_size]
    if len(data) != info.file_size:
        raise zipfile.BadZipFile(f'{info.filename!r} is truncated')
    if whole[name:name + fields[zipfile._FH_FILENAME_LENGTH]] != info.orig_filename.encode('utf-8'):
        raise zipfile.BadZipFile(f'File name in directory {info.filename!r} and header differ')
    if zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f'Bad CRC-32 for file {info.filename!r}')
    return data


_HEADERS = {}  # a .npy header's bytes -> (shape, fortran_order, dtype): run files repeat the same few headers


def _npy(raw, name):
    """The array of a .npy file's bytes `raw` (version 1.0 or 2.0 of the format); object arrays refused."""
    raw = memoryview(raw)
    version = bytes(raw[6:8])
    if bytes(raw[:6]) != b'\x93NUMPY' or version not in (b'\x01\x00', b'\x02\x00'):
        raise ValueError(f'{name}: not a .npy array of format version 1.0 or 2.0')
    start = 10 if version == b'\x01\x00' else 12
    if len(raw) < start:
        raise ValueError(f'{name}: truncated header')
    length = start + struct.unpack('<H' if start == 10 else '<I', raw[8:start])[0]
    header = bytes(raw[:length])
    got = _HEADERS.get(header)
    if got is None:
        fp = io.BytesIO(header)
        read = np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(fp) == (1, 0) else \
            np.lib.format.read_array_header_2_0
        got = read(fp)
        if got[2].hasobject:
            raise ValueError(f'{name}: object arrays cannot be loaded when allow_pickle=False')
        if len(_HEADERS) < 256:
            _HEADERS[header] = got
    shape, fortran, dtype = got
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - length != count * dtype.itemsize:
        raise ValueError(f'{name}: holds {len(raw) - length} bytes of data, expected {count * dtype.itemsize} '
                         f'for {dtype} {shape}')
    return np.frombuffer(raw[length:], dtype, count).reshape(shape, order='F' if fortran else 'C')
