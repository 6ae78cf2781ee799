"""Packing the runs of an arm into one memory-mapped array for the analysis, rebuilt whenever a run file
or the data file differs from its index."""
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from design import kept_bits, seed_for

from store.files import (OWN_TEMP, StoreError, SyncBehind, Unreadable, _Vanished, _read_json, _remove, _tag, _why, fsync_dir,
                         open_file, publish)
from store.runs import RUN_NAME, largest_run_file

HEADER_BYTES = 128  # of a pack's .npy header: fixed, so the shape can be rewritten in place


class Pack:
    """The packing part of Store: packed/<arm>.npy and its index packed/<arm>.json."""

    def load(self, arm):
        """(logits, run_info): logits (N, n_train, 10) float16, every valid run of `arm` in run order
        (memory-mapped from the pack; in memory when the store cannot be written); run_info: 'run', 'seed',
        'seconds', 'test_acc' arrays of length N.
        One snapshot per Store object: a later call returns the runs the first one read (one report reads
        its runs, their seeds and every margin from the same files, whatever is added or removed meanwhile;
        open the store again to see the changes; a run saved through this Store is seen)."""
        if arm not in self.arms:
            raise ValueError(f'arm {arm!r}, expected one of {self.arms}')
        snapshots = self.__dict__.setdefault('_snapshots', {})
        if arm not in snapshots:
            snapshots[arm] = self._load(arm)
        logits, run_info = snapshots[arm]
        return logits, dict(run_info)

    def _load(self, arm):
        for name in self._names(arm):  # anything but a six-digit run file, a write in progress or a hidden file
            if not RUN_NAME.fullmatch(name) and not OWN_TEMP.fullmatch(name) and not name.startswith('.'):
                self._note_once(('name', arm, name), f'{os.path.join(self.path, arm, name)}: not a run file name '
                                '(expected six digits, e.g. 000042.npz); left out and left alone')
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
        """{run: [size, mtime_ns, inode, ctime_ns]} of the run files of `arm` (the change time: a file
        rewritten with its mtime put back is read again)."""
        out = {}
        for run in self.stored(arm):
            try:
                st = os.stat(self.run_file(arm, run))
            except FileNotFoundError:
                continue
            out[run] = _data_stat(st)
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
        # the groups' order too: the binding hash ignores it, and it decides a factorial run's examples
        if not isinstance(index, dict) or index.get('binding') != self.binding or \
                index.get('groups') != list(self.settings['held_out']) or \
                not all(isinstance(index.get(k), list) for k in keys) or \
                len({len(index[k]) for k in keys}) != 1 or not isinstance(index.get('data'), list):
            return None
        return index

    def _map_pack(self, arm, index):
        """Map the data file if it is the one the index was built with and holds its rows; else None.
        Mapped through the file checked here, whatever its name holds by now: a rebuild by another
        process renames a new file over the name and never writes into this one."""
        data = self._pack_paths(arm)[0]
        try:
            f = open_file(data)
        except (OSError, StoreError):  # absent, unreadable, or no file (a FIFO, a link): rebuilt
            return None
        with f:
            st = os.fstat(f.fileno())
            # the change time too: bytes written in place with the mtime put back change it
            if _data_stat(st) != index['data']:
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
            return np.memmap(f, np.float16, 'r', offset=offset, shape=shape)

    def _open_pack(self, arm, files):
        index = self._read_index(arm)
        if index is None or dict(zip(index['run'], index['files'])) != files or len(index['run']) != len(files):
            return None
        logits = self._map_pack(arm, index)
        if logits is None:
            return None
        self.__dict__.setdefault('_pack_index', {})[arm] = index  # the margins' key (store/margins.py)
        return logits, {k: np.asarray(index[k]) for k in ('run', 'seed', 'seconds', 'test_acc')}

    def _pack(self, arm, files):
        """Write the pack of every valid run and its margins file (store/margins.py) in one sequential
        pass, reusing the rows (logits and margins) of the previous pack for run files that did not
        change; a run file's own margins are copied (checked at a few examples), computed only for a file
        without them; bad run files are moved aside. Returns (logits, run_info), mapped from the file
        written here; analyses from the run files if the pack cannot be written."""
        n_train = self.settings['n_train']
        data, index_file = self._pack_paths(arm)
        old_index = self._read_index(arm)
        old = self._map_pack(arm, old_index) if old_index else None
        reuse = {} if old is None else {r: (i, f) for i, (r, f) in enumerate(zip(old_index['run'], old_index['files']))}
        old_margins = None if old is None else self._open_margins(arm, old_index)  # rows of the old pack's runs
        tmp = f'{data}.tmp-{_tag()}'
        keys = ('run', 'seed', 'seconds', 'test_acc', 'files')
        index = {k: [] for k in keys}
        bad = []
        rows = self._margin_rows(arm, old_margins, None if old is None else len(old))
        to_read = [run for run in sorted(files) if run not in reuse or reuse[run][1] != files[run]]
        ahead = _draw_ahead(self, arm, to_read)  # a scan's halves, drawn in another thread meanwhile
        read = _ReadAhead(self, arm, to_read, files, bad, ahead)  # run files read by another thread meanwhile
        try:
            with open(tmp, 'xb') as f, SyncBehind(f) as out:
                out.write(_npy_header((len(files), n_train, 10)))
                for run in sorted(files):
                    if run in reuse and reuse[run][1] == files[run]:
                        i = reuse[run][0]
                        logits, rec = old[i], {k: old_index[k][i] for k in keys}
                        rows.reused(i, logits, rec['seed'])
                    else:
                        got = read.next(run)
                        if got is None:
                            continue
                        found, stat = got
                        logits = found['logits']
                        rec = dict(run=run, seed=found['seed'].item(), seconds=found['seconds'].item(),
                                   test_acc=found['test_acc'].item(), files=stat)
                        rows.read(found)
                    # written in order, never through a mapping: a full disk is an OSError, not a SIGBUS
                    out.write(memoryview(np.ascontiguousarray(logits, dtype='<f2')).cast('B'))  # no copy
                    for k in keys:
                        index[k].append(rec[k])
                if len(index['run']) < len(files):  # some runs were bad: the header says how many are here
                    f.seek(0)
                    f.write(_npy_header((len(index['run']), n_train, 10)))
                    f.truncate(HEADER_BYTES + len(index['run']) * n_train * 20)
                out.finish()
            del old
            self._set_aside_runs(arm, bad, good=len(index['run']))
            if not index['run']:
                return self._empty()
            shape = (len(index['run']), n_train, 10)
            # this reader maps the file it wrote, whatever happens to its name from here on
            with open(tmp, 'rb') as f:
                mine = os.fstat(f.fileno()).st_ino
                logits = np.memmap(f, np.float16, 'r', offset=HEADER_BYTES, shape=shape)
            try:  # publish for the next reader, keyed on the file as renamed (a rename changes its ctime)
                os.replace(tmp, data)
                fsync_dir(os.path.dirname(data))
                st = os.stat(data)
                if st.st_ino == mine:
                    index.update(binding=self.binding, groups=list(self.settings['held_out']), data=_data_stat(st))
                    publish(index_file, json.dumps(index).encode())
            except (OSError, StoreError):
                pass
        except OSError as e:  # disk full, read-only store, no packed/ folder
            return self._from_files(arm, self._stats(arm), f'could not write {data} ({_why(e)})')
        finally:
            _remove(tmp)
            rows.close(keep='data' in index)
            read.close()
            if ahead is not None:
                ahead.close()
        if 'data' in index:  # published: the margins' key (store/margins.py), and the margins beside it
            self.__dict__.setdefault('_pack_index', {})[arm] = index
            written = rows.publish(index)
            if written is not None:  # this snapshot reads the file written here
                self.__dict__.setdefault('_margin_sources', {})[arm] = (logits, written)
        return logits, {k: np.asarray(index[k]) for k in ('run', 'seed', 'seconds', 'test_acc')}

    def _read_valid(self, arm, run, files, bad, drop=False, expected_bits=None, buf=None):
        """(record, stat) of one run file for packing, or None if it vanished or failed its checks (then
        appended to `bad` with the reason, to be moved aside). An unreadable file stops the reading.
        drop, expected_bits, buf: as Runs._read_run takes them."""
        try:
            return self._read_run(arm, run, drop=drop, expected_bits=expected_bits, buf=buf)
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
        # In a factorial store the held-out groups' order decides each run's examples: a reordered
        # settings.json (a tidy-up with sorted keys) makes every run look trained on other examples.
        reordered = ': trained on other examples' if self.settings['arms'] == ['a', 'b'] else ': binding is'
        foreign = [b for b in bad if ': binding is' in b[1] or reordered in b[1]]
        if len(bad) >= 2 and good == 0 and len(foreign) == len(bad):
            raise StoreError(f'every run file of {os.path.join(self.path, arm)} ({len(bad)}) was made with other '
                             f'settings than settings.json records (e.g. {bad[0][1]}). Was settings.json replaced, '
                             'or its held-out groups reordered? Nothing was moved: restore it, or use another --out.')
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


class _ReadAhead:
    """The run files to be packed, each read and checked (Pack._read_valid) by one other thread while this
    one writes the previous run: reading, its CRC and writing release the GIL, so a second core reads while
    the first writes. Each file is read into one of three buffers in turn: a record stays valid until the
    caller has asked for the next two runs."""

    def __init__(self, store, arm, runs, files, bad, ahead):
        self.read = lambda run, buf: store._read_valid(arm, run, files, bad, drop=True, buf=buf,
                                                      expected_bits=None if ahead is None else ahead.get(run))
        self.runs, self.i = runs, 0
        self.pool = ThreadPoolExecutor(1)
        self.buffers = [bytearray(largest_run_file(store.settings['n_train'])) for _ in range(3)]
        self.pending = {}
        self._submit(0)

    def _submit(self, i):
        if i < len(self.runs):
            buf = self.buffers[i % 3]
            self.pending[self.runs[i]] = self.pool.submit(self.read, self.runs[i], buf)

    def next(self, run):
        """(record, stat) of `run`, the next run of the list, or None (as Pack._read_valid)."""
        assert run == self.runs[self.i]
        self.i += 1
        self._submit(self.i)  # into the buffer of two runs ago, no longer used
        return self.pending.pop(run).result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)  # no read outlives the pack


class _DrawAhead:
    """The kept examples (design.kept_bits) of a scan's runs to be read, drawn in order by one other
    thread while this one reads and checks run files (numpy's permutation and sort release the GIL)."""

    def __init__(self, store, runs):
        n_train, held_out, base = store.settings['n_train'], store.settings['held_out'], store.settings['seed_base']
        self.pool = ThreadPoolExecutor(1)
        self.drawn = {run: self.pool.submit(kept_bits, 'scan', seed_for(run, base), n_train, held_out)
                      for run in runs}

    def get(self, run):
        """A function returning the bits of `run` (waiting for them if need be)."""
        return self.drawn[run].result

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)  # no draw outlives the pack


def _draw_ahead(store, arm, runs):
    return _DrawAhead(store, runs) if arm == 'scan' and runs else None


def _npy_header(shape, descr='<f2'):
    """A .npy (version 1.0) header of exactly HEADER_BYTES for a C-ordered array of `shape` (float16 by
    default), so that the shape can be rewritten in place."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, tuple(shape))
    body = text.ljust(HEADER_BYTES - 11) + '\n'
    return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(body)) + body.encode('latin1')


def _data_stat(st):
    """What an index records of a file: [size, mtime_ns, inode, ctime_ns] (the change time: bytes written in
    place with the mtime put back change it)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
