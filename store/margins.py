"""Each run's margins, computed once from the pack and kept beside it: packed/<arm>.margins.npy, (N + 2,
n_train) float64: the N runs' margins in the pack's run order, then each example's sum of finite margins
over all runs and their count (summed as viz_io.mean_margins sums, so its means are the same to the last
bit); for a scan, then each run's examples (design.keep_for) as packed bits, (N, ceil(n_train / 8))
uint8, so that no report draws them again; and its index packed/<arm>.margins.json. The reports read
margins, never logits: 40% of the logits' bytes, no logsumexp per report, and each example's mean margin
over all runs without reading any run.

float64, not float32: the margin is a logsumexp (stats.margins), and the reports' numbers must be the ones
computed from the logits, to the last bit. The index names the pack the margins were computed from (its
binding, data file stat, runs and run files' stats) and the margins file's own stat: a cache of another pack,
or one changed, truncated or damaged, is rebuilt, never read.
"""
import json
import mmap
import os

import numpy as np

from design import keep_for, kept_bits, kept_mask
from store.files import StoreError, SyncBehind, _read_json, _remove, _tag, fsync_dir, open_file, publish
from store.kernel import Kernel
from store.pack import HEADER_BYTES, _data_stat, _npy_header

CHUNK = 16  # runs per chunk; the reports' sums go chunk by chunk, so their last bits depend on it


class Margins:
    """The margins part of Store; uses Pack's load and the index it recorded for each arm (_pack_index)."""

    def margin_chunks(self, arm, columns=None):
        """Yield (first run, (k, len(columns)) float64): the margins (stats.margins) of the examples
        `columns` (default all) in the runs of load(arm), CHUNK runs at a time, in run order. Read from the
        margins file, built on the first call for a pack without a valid one; computed from the logits where
        the store cannot be written or the arm was read from its run files."""
        logits, _ = self.load(arm)
        source = self._margin_source(arm)
        n, n_train = len(logits), self.settings['n_train']
        pick = slice(None) if columns is None else np.asarray(columns)
        if source is None:
            from stats import margins  # scipy: the store itself needs numpy only
            for lo, part in _pack_chunks(logits):
                yield lo, margins(part[:, pick, :], self.labels[pick])
            return
        buf = np.empty((CHUNK, n_train))  # 6.4 MB at 50,000 examples
        for lo in range(0, n, CHUNK):
            k = min(CHUNK, n - lo)
            _read_into(source, buf[:k], HEADER_BYTES + lo * n_train * 8)
            yield lo, buf[:k, pick].copy()

    def kept_chunks(self, arm):
        """Yield (first run, (k, n_train) bool): the examples each run of load(arm) trained on, the chunks of
        margin_chunks; kept in the margins file of a scan. None where they are not kept (draw them from the
        seeds: design.keep_for)."""
        source = self._margin_source(arm)
        if source is None or arm != 'scan':
            return None
        n, n_train = len(self.load(arm)[0]), self.settings['n_train']
        width = -(-n_train // 8)
        start = HEADER_BYTES + (n + 2) * n_train * 8

        def chunks():
            buf = np.empty((CHUNK, width), np.uint8)
            for lo in range(0, n, CHUNK):
                k = min(CHUNK, n - lo)
                _read_into(source, buf[:k], start + lo * width)
                yield lo, np.unpackbits(buf[:k], axis=1, count=n_train).astype(bool)
        return chunks()

    def _margins_bytes(self, arm, n):
        """Size of the margins file of `arm` with n runs."""
        n_train = self.settings['n_train']
        return HEADER_BYTES + (n + 2) * n_train * 8 + (n * -(-n_train // 8) if arm == 'scan' else 0)

    def margin_sums(self, arm):
        """(total, count): each example's sum of finite margins over every run of load(arm), (n_train,)
        float64, and their number, (n_train,) int64; summed chunk by chunk as viz_io.mean_margins sums.
        None where the margins are not kept (then mean_margins streams them)."""
        source = self._margin_source(arm)
        if source is None:
            return None
        n, n_train = len(self.load(arm)[0]), self.settings['n_train']
        sums = np.empty((2, n_train))
        _read_into(source, sums, HEADER_BYTES + n * n_train * 8)
        return sums[0], sums[1].astype(np.int64)

    def _margin_source(self, arm):
        """The open margins file of this Store's snapshot of `arm`, or None (compute from the logits)."""
        logits = self.load(arm)[0]
        sources = self.__dict__.setdefault('_margin_sources', {})
        if arm not in sources or sources[arm][0] is not logits:  # a new snapshot: a run saved through this Store
            index = self.__dict__.get('_pack_index', {}).get(arm)
            sources[arm] = (logits, None if index is None else (self._open_margins(arm, index) or
                                                                self._write_margins(arm, index)))
        return sources[arm][1]

    def _margin_paths(self, arm):
        return (os.path.join(self.path, 'packed', f'{arm}.margins.npy'),
                os.path.join(self.path, 'packed', f'{arm}.margins.json'))

    @staticmethod
    def _margin_key(index):
        """What names a pack, as its JSON index holds it (lists, not tuples)."""
        return json.loads(json.dumps({k: index[k] for k in ('binding', 'groups', 'data', 'run', 'files')}))

    def _open_margins(self, arm, index):
        """The margins file, open, if its index names this pack and its stat and header are as written."""
        data, index_file = self._margin_paths(arm)
        own = _read_json(index_file)
        if not isinstance(own, dict) or own.get('pack') != self._margin_key(index):
            return None
        try:
            f = open_file(data)
        except (OSError, StoreError):
            return None
        st = os.fstat(f.fileno())
        n, n_train = len(index['run']), self.settings['n_train']
        if _data_stat(st) != own.get('file') or st.st_size != self._margins_bytes(arm, n) or \
                f.read(HEADER_BYTES) != _npy_header((n + 2, n_train), '<f8'):
            f.close()
            return None
        return f

    def _write_margins(self, arm, index):
        """Compute every run's margins from the pack (the pack is there, its margins file is not valid),
        write them sequentially to a temporary name, rename it into place and publish its index. -> the
        written file, open for reading, or None if it cannot be written (the margins are then computed
        from the logits at each read)."""
        logits, run_info = self.load(arm)
        writer = self._margins_writer(arm)
        if writer is None:
            return None
        kernel = Kernel(self.labels)
        n_train, held_out = self.settings['n_train'], self.settings['held_out']
        try:
            for lo, part in _pack_chunks(logits):
                for run, seed in zip(part, run_info['seed'][lo:lo + len(part)]):
                    kernel(run, out=writer.row())
                    writer.add(np.packbits(kept_mask(keep_for('scan', int(seed), n_train, held_out), n_train))
                               if arm == 'scan' else None)
        except OSError:
            writer.abandon()
            return None
        return self._publish_margins(arm, index, writer)

    def _margin_rows(self, arm, old, old_runs):
        """The margins rows of a pack being written (_Rows); old: the previous pack's margins file, open,
        or None; old_runs: its runs."""
        return _Rows(self, arm, old, old_runs)

    def _margins_writer(self, arm):
        """A _Writer of the margins file of `arm` at a temporary name, None if it cannot be made."""
        try:
            return _Writer(self._margin_paths(arm)[0], self.settings['n_train'], arm == 'scan')
        except OSError:
            return None

    def _publish_margins(self, arm, index, writer):
        """Finish `writer`, rename its file into place and publish its index, naming the pack `index`.
        -> the file, open for reading (whatever the names hold later), or None if it could not be finished."""
        try:
            f = writer.finish()
        except OSError:
            writer.abandon()
            return None
        data, index_file = self._margin_paths(arm)
        try:
            os.replace(writer.tmp, data)
            fsync_dir(os.path.dirname(data))
            st = os.fstat(f.fileno())  # after the rename, which changes the change time
            publish(index_file, json.dumps({'pack': self._margin_key(index), 'file': _data_stat(st)}).encode())
        except (OSError, StoreError):
            _remove(writer.tmp)
        return f


class _Rows:
    """The margins file written beside a pack in the same pass (Pack._pack): each run's row copied from
    the previous margins file (a row of the previous pack reused), from the run file (its own margins,
    checked when it was read), or computed from its logits where neither has them; a write that fails
    leaves the pack without a margins file (built when first read, as for an older pack)."""

    def __init__(self, store, arm, old, old_runs):
        self.labels, self.n_train, self.scan = store.labels, store.settings['n_train'], arm == 'scan'
        self.held_out = store.settings['held_out']
        self.store, self.arm, self.old, self.old_runs = store, arm, old, old_runs
        self.writer = store._margins_writer(arm)
        self.kernel = None

    def _margins_of(self, logits, row):
        if self.kernel is None:
            self.kernel = Kernel(self.labels)
        self.kernel(logits, out=row)

    def reused(self, i, logits, seed):
        """Row i of the previous pack, (n_train, 10) logits, its run's seed."""
        if self.writer is None:
            return
        width = -(-self.n_train // 8)
        bits = np.empty(width, np.uint8) if self.scan else None
        try:
            row = self.writer.row()
            if self.old is None:
                self._margins_of(logits, row)
                if self.scan:
                    bits = kept_bits('scan', int(seed), self.n_train, self.held_out)
            else:
                _read_into(self.old, row, HEADER_BYTES + i * self.n_train * 8)
                if self.scan:
                    _read_into(self.old, bits, HEADER_BYTES + (self.old_runs + 2) * self.n_train * 8 + i * width)
            self.writer.add(bits)
        except (OSError, StoreError):
            self._drop()

    def read(self, found):
        """A run file's record, as Runs._read_run returns it."""
        if self.writer is None:
            return
        try:
            row = self.writer.row()
            if 'margins' in found:
                row[:] = found['margins']
            else:
                self._margins_of(found['logits'], row)
            self.writer.add(found['kept'] if self.scan else None)
        except OSError:
            self._drop()

    def _drop(self):
        self.writer.abandon()
        self.writer = None

    def close(self, keep):
        """The previous margins file closed; keep: the pack was published (else nothing is)."""
        if self.old is not None:
            self.old.close()
            self.old = None
        if not keep and self.writer is not None:
            self._drop()

    def publish(self, index):
        """-> the margins file, open for reading, or None if there is none."""
        return None if self.writer is None else self.store._publish_margins(self.arm, index, self.writer)


class _Writer:
    """A margins file written sequentially at a temporary name beside `path`: each run's margins in run
    order (filled in place: row(), then add()), CHUNK runs at a time, each example's sum and count of
    finite margins summed chunk by chunk as viz_io.mean_margins sums them, then (a scan) each run's
    examples as bits; the header, which holds the number of runs, written last."""

    def __init__(self, path, n_train, scan):
        self.tmp = f'{path}.tmp-{_tag()}'
        self.file = open(self.tmp, 'xb')
        self.file.seek(HEADER_BYTES)
        self.out = SyncBehind(self.file)
        self.chunk = np.empty((CHUNK, n_train), '<f8')  # 6.4 MB at 50,000 examples
        self.k = self.runs = 0
        self.total, self.count = np.zeros(n_train), np.zeros(n_train, np.int64)
        self.bits = [] if scan else None  # (ceil(n_train / 8),) uint8 per run

    def row(self):
        """The next run's row, (n_train,) float64, to be filled before add()."""
        return self.chunk[self.k]

    def add(self, bits=None):
        """The row filled; bits: a scan run's examples, packed (design.kept_bits)."""
        if self.bits is not None:
            self.bits.append(np.array(bits))  # a copy: a run file's record may be a view of a reused buffer
        self.k += 1
        if self.k == CHUNK:
            self._flush()

    def _flush(self):
        m = self.chunk[:self.k]  # (k, n_train)
        self.out.write(memoryview(m).cast('B'))
        ok = np.isfinite(m)  # as viz_io.mean_margins sums: chunk by chunk
        if ok.all():  # the same sums, without the copy
            self.total += m.sum(0)
            self.count += self.k
        else:
            self.total += np.where(ok, m, 0.0).sum(0)
            self.count += ok.sum(0)
        self.runs += self.k
        self.k = 0

    def finish(self):
        """Write what is left, the sums, the bits and the header; sync. -> the file, open for reading."""
        if self.k:
            self._flush()
        out = self.out
        out.write(self.total.astype('<f8').tobytes() + self.count.astype('<f8').tobytes())  # counts < 2^53: exact
        for bits in self.bits or ():
            out.write(bits.tobytes())
        self.file.seek(0)
        self.file.write(_npy_header((self.runs + 2, len(self.total)), '<f8'))
        out.finish()
        self.file.close()
        return open(self.tmp, 'rb')

    def abandon(self):
        self.out.close()
        self.file.close()
        _remove(self.tmp)


def _read_into(source, buf, offset):
    """Fill the array `buf` from the open margins file at byte `offset`; a short read is an error."""
    view = memoryview(buf).cast('B')
    if os.preadv(source.fileno(), [view], offset) != view.nbytes:
        raise StoreError(f'{source.name} was truncated while it was read; run the command again')


def _pack_chunks(logits):
    """Yield (first run, up to CHUNK runs of logits (N, n_train, 10)), each chunk's pages released from this
    process once it has been used (they stay in the page cache), whatever file or descriptor it maps: the
    kernel maps file pages in around every page it faults in (fault-around, large folios; measured up to the
    whole 1 MB of a 50000-example run), so one mapping of the whole pack read through would end up resident."""
    mm = getattr(logits, '_mmap', None)
    release = isinstance(logits, np.memmap) and mm is not None and hasattr(mm, 'madvise')
    for lo in range(0, len(logits), CHUNK):
        part = logits[lo:lo + CHUNK]
        yield lo, part
        if release:
            start = logits.offset % mmap.ALLOCATIONGRANULARITY + lo * logits.strides[0]  # in the mapping
            end = min(start + len(part) * logits.strides[0], len(mm))
            start -= start % mmap.PAGESIZE
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass  # only memory: the pages stay mapped
