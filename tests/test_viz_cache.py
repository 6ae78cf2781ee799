"""The margins kept beside the pack (store/margins.py): the margins of the logits to the last bit, rebuilt
whenever the pack or a run file changes or the file is damaged, never required (a store that cannot be
written is analysed without), and the reports the same with and without them."""
import builtins
import errno
import json
import os
import shutil

import numpy as np
import pytest

import stats
import viz
from store import Store
from store.margins import Margins

HELD = {'random': [0, 1, 2, 3], 'easy': [20, 21, 22, 23]}
N_TRAIN = 60


def make(path, runs, rng_seed=0):
    """A with/without store of random logits, some far apart (a margin a float32 would round)."""
    rng = np.random.default_rng(rng_seed)
    settings = dict(trainer='toy', hyp={}, held_out=HELD, n_train=N_TRAIN, data_fingerprint='toy', seed_base=0)
    s = Store.create(path, settings, np.arange(N_TRAIN) % 10)
    for run in range(runs):
        for arm in ('with', 'without'):
            s.save_run(arm, run, run, logits(rng), 1.0, 0.5)
    return s


def logits(rng):
    x = rng.normal(0, 3, (N_TRAIN, 10))
    x[::7] *= 3000  # up to about +-30,000: exponents far apart
    return x.astype(np.float16)


def kept(s, arm='with'):
    """The margins a Store reads, checked against the margins of the logits it loads."""
    rows = np.concatenate([c for _, c in s.margin_chunks(arm)])
    assert np.array_equal(rows, stats.margins(np.asarray(s.load(arm)[0]), s.labels), equal_nan=True)
    return rows


def files(path, arm='with'):
    return [os.path.join(path, 'packed', f'{arm}.margins.{ext}') for ext in ('npy', 'json')]


def test_margins_are_kept_beside_the_pack_and_equal_the_logits_margins_to_the_last_bit(tmp_path):
    s = make(tmp_path, 20)
    rows = kept(s)
    assert all(os.path.isfile(f) for f in files(tmp_path))
    assert rows.dtype == np.float64 and rows.shape == (20, N_TRAIN)
    assert not np.array_equal(rows, rows.astype(np.float32).astype(np.float64))  # float32 would round these
    cols = np.array([3, 21, 59, 0])
    again = Store(tmp_path)  # read back from the file
    assert np.array_equal(np.concatenate([c for _, c in again.margin_chunks('with', cols)]), rows[:, cols])


def test_a_valid_margins_file_is_read_not_rebuilt(tmp_path):
    make(tmp_path, 3)
    kept(Store(tmp_path))
    before = [os.stat(f).st_ino for f in files(tmp_path)]
    kept(Store(tmp_path))
    assert [os.stat(f).st_ino for f in files(tmp_path)] == before


def add(path, s):
    s.save_run('with', 5, 5, logits(np.random.default_rng(9)), 1.0, 0.5)


def remove(path, s):
    os.remove(s.run_file('with', 1))


def replace(path, s):
    os.remove(s.run_file('with', 1))
    s.save_run('with', 1, 1, np.full((N_TRAIN, 10), 3.0, np.float16), 1.0, 0.5)


def rewrite_with_mtime_put_back(path, s):
    other = make(path.parent / 'other', 5, rng_seed=1)
    run = s.run_file('with', 1)
    st = os.stat(run)
    data = open(other.run_file('with', 1), 'rb').read()
    assert len(data) == st.st_size
    with open(run, 'r+b') as f:  # same inode, same size, same mtime: only the change time tells
        f.write(data)
    os.utime(run, ns=(st.st_atime_ns, st.st_mtime_ns))


def repack(path, s):  # the pack rebuilt from the same runs: another data file
    for name in ('with.npy', 'with.json'):
        os.remove(path / 'packed' / name)


@pytest.mark.parametrize('change', [add, remove, replace, rewrite_with_mtime_put_back, repack])
def test_margins_are_rebuilt_whenever_a_run_file_or_the_pack_changes(tmp_path, change):
    path = tmp_path / 'store'
    s = make(path, 5)
    before = kept(s)
    change(path, s)
    after = kept(Store(path))  # equal to the margins of the logits loaded now
    if change is not repack:
        assert not np.array_equal(before, after)
    key = json.load(open(files(path)[1]))['pack']
    assert key['data'] == json.load(open(path / 'packed' / 'with.json'))['data']


def truncate(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 8)


def zeros_with_mtime_put_back(path):
    st = os.stat(path)
    with open(path, 'r+b') as f:
        f.seek(200)
        f.write(bytes(64))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def garbage(path):
    with open(path, 'wb') as f:
        f.write(b'\x93NUMPY garbage')


def emptied(path):
    open(path, 'wb').close()


@pytest.mark.parametrize('damage', [truncate, zeros_with_mtime_put_back, garbage, emptied])
@pytest.mark.parametrize('which', [0, 1])  # the margins file, its index
def test_a_damaged_margins_file_or_index_is_rebuilt_never_a_traceback(tmp_path, damage, which):
    make(tmp_path, 4)
    before = kept(Store(tmp_path))
    damage(files(tmp_path)[which])
    assert np.array_equal(kept(Store(tmp_path)), before)
    assert os.path.getsize(files(tmp_path)[0]) == 128 + before.nbytes + 2 * N_TRAIN * 8  # the runs, then sums and counts


def test_margins_copied_from_another_store_of_the_same_shape_are_rebuilt(tmp_path):
    make(tmp_path / 'a', 4)
    kept(Store(tmp_path / 'a'))
    kept(make(tmp_path / 'b', 4, rng_seed=1))
    for f, g in zip(files(tmp_path / 'b'), files(tmp_path / 'a')):
        shutil.copy(f, g)
    kept(Store(tmp_path / 'a'))


def test_a_store_where_the_margins_cannot_be_written_is_analysed_without_them(tmp_path, monkeypatch):
    make(tmp_path, 4)
    real = builtins.open

    def refuse(file, mode='r', *args, **kwargs):
        if 'margins' in str(file) and 'x' in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', refuse)
    Store(tmp_path).load('with')  # packed in one pass with its margins, which cannot be written
    kept(Store(tmp_path))  # nor when first read
    assert not any(os.path.exists(f) for f in files(tmp_path))
    assert not [n for n in os.listdir(tmp_path / 'packed') if '.tmp-' in n]


def reports(path, capsys, *args):
    """(stdout, the JSON file) of viz on the store at path."""
    out = path.parent / f'{path.name}.json'
    viz.main([str(path), '--json', str(out), *args])
    return capsys.readouterr().out, out.read_text()


@pytest.mark.parametrize('kind', ['with/without', 'scan'])
def test_reports_are_the_same_from_the_margins_file_from_a_rebuilt_one_and_from_the_logits(
        tmp_path, monkeypatch, capsys, kind):
    if kind == 'scan':
        from test_scan import make_scan_store
        path = tmp_path / 'scan'
        make_scan_store(path, 200, 30, effect=np.where(np.arange(200) == 5, -1.0, 0.0))
        args = ['--scan']
    else:
        path = tmp_path / 'store'
        make(path, 12)
        args = ['--controls', '5']
    first = reports(path, capsys, *args)  # builds the margins file
    assert os.path.exists(files(path, 'scan' if kind == 'scan' else 'with')[0])
    assert reports(path, capsys, *args) == first  # reads it
    for f in os.listdir(path / 'packed'):
        if '.margins.' in f:
            os.remove(path / 'packed' / f)
    assert reports(path, capsys, *args) == first  # rebuilt
    monkeypatch.setattr(Margins, '_margin_source', lambda self, arm: None)  # margins from the logits, as before
    assert reports(path, capsys, *args) == first


def test_the_kernel_that_fills_the_margins_file_gives_stats_margins_bit_for_bit():
    from store.kernel import Kernel
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    kernel = Kernel(labels)
    for scale in (0.01, 1, 10, 300, 30000):
        x = rng.standard_normal((5000, 10)) * scale
        x[rng.random(x.shape) < 0.01] *= 1000  # some logits far from the rest
        x = np.clip(x, -65000, 65000).astype(np.float16)
        x[5, 3], x[7], x[9], x[11, labels[11]] = np.nan, np.inf, -np.inf, np.inf
        with np.errstate(invalid='ignore'):
            assert np.array_equal(kernel(x), stats.margins(x, labels), equal_nan=True)


def test_a_scans_kept_examples_are_the_ones_its_seeds_draw(tmp_path):
    import viz_scan
    from test_scan import make_scan_store
    make_scan_store(tmp_path, 203, 35)  # not a multiple of 8: the last byte of bits padded
    s = Store(tmp_path)
    seeds = s.load('scan')[1]['seed']
    chunks = list(s.kept_chunks('scan'))
    assert [lo for lo, _ in chunks] == [lo for lo, _ in s.margin_chunks('scan')]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), viz_scan.scan_masks(s, seeds))


def test_a_report_reads_its_own_snapshots_margins_while_another_rebuilds_them(tmp_path):
    writer = make(tmp_path, 4)
    report = Store(tmp_path)
    before = kept(report)
    add(tmp_path, writer)
    os.remove(writer.run_file('with', 0))
    assert len(kept(Store(tmp_path))) == 4  # runs 1, 2, 3, 5: the pack and its margins rebuilt meanwhile
    assert np.array_equal(kept(report), before)  # the report's runs, from the file it opened


def test_a_run_saved_through_a_store_is_in_its_next_margins(tmp_path):
    s = make(tmp_path, 4)
    kept(s)
    add(tmp_path, s)
    assert len(kept(s)) == 5


def rewrite(path, **changes):
    """A run file rewritten with some members changed (None: left out), as another version wrote it."""
    with np.load(path) as z:
        rec = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    with open(path, 'wb') as f:
        np.savez(f, **rec)


def test_a_run_file_keeps_its_margins_and_packing_copies_them(tmp_path, monkeypatch):
    s = make(tmp_path, 20)
    rec = s.read_run('with', 3)
    assert rec['margins'].dtype == np.float64
    assert np.array_equal(rec['margins'], stats.margins(rec['logits'], s.labels), equal_nan=True)

    class Refused:
        def __init__(self, labels):
            raise AssertionError('margins computed while packing run files that keep them')
    monkeypatch.setattr('store.margins.Kernel', Refused)
    kept(Store(tmp_path))  # packed with its margins file, every margin copied


def test_run_files_written_before_margins_were_kept_are_packed_with_computed_margins(tmp_path, capsys):
    s = make(tmp_path, 5)
    for run in (0, 3):
        rewrite(s.run_file('with', run), margins=None)
    assert len(kept(Store(tmp_path))) == 5
    assert 'kept margins' not in capsys.readouterr().err


@pytest.mark.parametrize('wrong', ['another run', 'float32', 'one example off'])
def test_a_margins_member_that_disagrees_with_its_logits_is_not_trusted(tmp_path, capsys, wrong):
    s = make(tmp_path, 5)
    path = s.run_file('with', 2)
    m = s.read_run('with', 1)['margins'] if wrong == 'another run' else s.read_run('with', 2)['margins'].copy()
    if wrong == 'float32':
        m = m.astype(np.float32)
    if wrong == 'one example off':
        from store.kernel import spot_positions
        m[spot_positions(N_TRAIN, 2)[3]] += 1e-12
    rewrite(path, margins=m)
    kept(Store(tmp_path))  # the margins of the logits, not of the member
    assert f'{path}: its kept margins are not those of its logits' in capsys.readouterr().err
    assert os.path.exists(path)  # the logits are good: the file stays


def test_a_pack_rebuilt_after_new_runs_reads_only_the_new_run_files(tmp_path, monkeypatch):
    s = make(tmp_path, 6)
    kept(Store(tmp_path))
    s.save_run('with', 6, 6, logits(np.random.default_rng(9)), 1.0, 0.5)
    read = []
    real = Store._read_run
    monkeypatch.setattr(Store, '_read_run', lambda self, arm, run, **kw: read.append(run) or real(self, arm, run, **kw))
    assert len(kept(Store(tmp_path))) == 7  # the six earlier rows (logits and margins) reused
    assert read == [6]
    os.remove(files(tmp_path)[0])  # the previous margins gone: the reused rows' margins computed from the pack
    add_other = Store(tmp_path)
    add_other.save_run('with', 7, 7, logits(np.random.default_rng(3)), 1.0, 0.5)
    assert len(kept(Store(tmp_path))) == 8


def test_a_damaged_member_fails_its_crc_and_an_object_member_is_refused_both_named_and_moved_aside(tmp_path, capsys):
    s = make(tmp_path, 4)
    path = s.run_file('with', 1)
    data = bytearray(open(path, 'rb').read())
    at = data.index(b'logits.npy') + 400  # inside the logits' data
    data[at] ^= 0xFF
    open(path, 'wb').write(bytes(data))
    with np.load(s.run_file('with', 2)) as z:
        rec = {k: z[k] for k in z.files}
    rec['meta'] = np.array([{'code': 'run me'}], dtype=object)
    with open(s.run_file('with', 2), 'wb') as f:
        np.savez(f, **rec)
    assert list(Store(tmp_path).load('with')[1]['run']) == [0, 3]
    err = capsys.readouterr().err
    assert "000001.npz: corrupt or truncated (BadZipFile: Bad CRC-32 for file 'logits.npy')" in err
    assert '000002.npz: corrupt or truncated (ValueError: meta.npy: object arrays cannot be loaded' in err
    assert len(os.listdir(tmp_path / 'corrupt')) == 2


def test_a_pack_read_ahead_holds_each_run_files_own_rows_around_a_bad_file(tmp_path):
    """Packing reads the next run file in another thread, into one of a few reused buffers: every row of
    the pack and of its margins file must still be that run file's own, and a bad file among them left out."""
    s = make(tmp_path, 12)
    path = s.run_file('with', 5)
    data = bytearray(open(path, 'rb').read())
    data[data.index(b'logits.npy') + 400] ^= 0xFF  # fails its CRC: moved aside, its neighbours packed
    open(path, 'wb').write(bytes(data))
    fresh = Store(tmp_path)
    packed, info = fresh.load('with')
    assert list(info['run']) == [r for r in range(12) if r != 5]
    for row, run in zip(packed, info['run']):
        assert np.array_equal(row, Store(tmp_path).read_run('with', int(run))['logits'])
    kept(fresh)  # each margins row that of its run's logits



def test_a_run_file_larger_than_any_run_file_is_named_and_moved_aside_unread(tmp_path, capsys, monkeypatch):
    s = make(tmp_path, 3)
    path = s.run_file('with', 1)
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:  # a zip still (zipfile skips what comes before its first member), but
        f.write(bytes(4 << 20) + data)  # larger than any run file of 60 examples can be
    preads = []
    real = os.preadv
    monkeypatch.setattr(os, 'preadv', lambda fd, bufs, at: preads.append(sum(len(b) for b in bufs)) or real(fd, bufs, at))
    assert list(Store(tmp_path).load('with')[1]['run']) == [0, 2]
    assert max(preads) < 1 << 20  # the large file was never read
    assert '000001.npz: holds 4,' in capsys.readouterr().err
