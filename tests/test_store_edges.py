"""The store's edges: nothing outside it touched, no silent change of what it means, every odd file one
clear line. Each test is an attack from outside that once went wrong (docs/store.md lists them)."""
import csv
import errno
import json
import os
import shutil
import zipfile

import numpy as np
import pytest

import experiment
import store_worker
import viz
from store import Store, StoreError
from test_store import ARMS, TOY_HELD, fake_store, moved, patch, refuse, toy_store

TOY_SETTINGS = dict(trainer='toy', hyp={'lr': 1.0}, held_out=TOY_HELD, n_train=40, data_fingerprint='toy', seed_base=0)

HELD = {'random': [0, 1, 2, 3], 'easy': [30, 31, 32, 33]}  # not in sorted order: 'easy' < 'random'


def factorial_store(path, runs, hyp=None):
    rng = np.random.default_rng(0)
    settings = dict(trainer='toy', hyp=hyp or {'lr': 1.0, 'epochs': 2}, held_out=HELD, n_train=40,
                    data_fingerprint='toy', seed_base=0, arms=['a', 'b'])
    s = Store.create(path, settings, np.arange(40) % 10)
    for run in range(runs):
        for arm in 'ab':
            s.save_run(arm, run, run, rng.normal(0, 1, (40, 10)).astype(np.float16), 1.0, 0.5)
    return s


def rewrite_settings(path, **dump):
    """settings.json as a person tidying files leaves it (json.tool --sort-keys, jq -S, another indent)."""
    with open(path / 'settings.json') as f:
        settings = json.load(f)
    with open(path / 'settings.json', 'w') as f:
        json.dump(settings, f, **dump)
    return settings


# ---------------------------------------------------------------------------------------------------
# Settings compared as the store reads them
# ---------------------------------------------------------------------------------------------------

def test_settings_rewritten_with_sorted_keys_reordering_the_held_out_groups_are_refused_by_name(tmp_path):
    factorial_store(tmp_path, 3).load('a')  # a pack is built
    rewrite_settings(tmp_path, sort_keys=True)
    with pytest.raises(StoreError, match=r'the order of the held-out groups \(now \["easy", "random"\]\) no longer '
                                         'matches'):
        Store(tmp_path)
    assert moved(tmp_path) == [] and len(os.listdir(tmp_path / 'a')) == 3


def test_an_older_factorial_store_with_reordered_groups_is_refused_at_loading_and_nothing_is_moved(tmp_path):
    factorial_store(tmp_path, 3).load('a')
    settings = rewrite_settings(tmp_path, sort_keys=True)
    del settings['checksums']['groups']  # as written before the groups' order was recorded
    (tmp_path / 'settings.json').write_text(json.dumps(settings, sort_keys=True))
    with pytest.raises(StoreError, match=r'every run file of .*a \(3\) .*trained on other examples.*reordered\? '
                                         'Nothing was moved'):
        Store(tmp_path).load('a')
    assert moved(tmp_path) == [] and len(os.listdir(tmp_path / 'a')) == 3


def test_key_order_and_whitespace_alone_change_nothing(tmp_path):
    s = factorial_store(tmp_path, 3, hyp={'lr': 1.0, 'epochs': 2})
    before = np.asarray(s.load('a')[0]).copy()
    settings = rewrite_settings(tmp_path, indent=7)
    settings['hyp'] = dict(reversed(settings['hyp'].items()))
    (tmp_path / 'settings.json').write_text(json.dumps(dict(reversed(settings.items())), indent=3))
    assert np.array_equal(Store(tmp_path).load('a')[0], before) and moved(tmp_path) == []
    again = dict(trainer='toy', hyp={'epochs': 2, 'lr': 1.0}, held_out=HELD, n_train=40, data_fingerprint='toy',
                 seed_base=0, arms=['a', 'b'])
    Store.create(tmp_path, again, np.arange(40) % 10)  # the same settings, keys in another order


def test_a_command_with_the_groups_in_another_order_is_refused_naming_the_order(tmp_path):
    factorial_store(tmp_path, 1)
    other = dict(trainer='toy', hyp={'lr': 1.0, 'epochs': 2}, held_out=dict(reversed(HELD.items())), n_train=40,
                 data_fingerprint='toy', seed_base=0, arms=['a', 'b'])
    with pytest.raises(StoreError, match=r"held_out: groups in the order \['random', 'easy'\] in the store, "
                                         r"\['easy', 'random'\] in this command"):
        Store.create(tmp_path, other, np.arange(40) % 10)


def test_the_other_settings_message_names_the_differing_hyperparameter_however_long_the_settings(tmp_path):
    hyp = {f'knob_{i:02d}': 0.123456789 for i in range(40)}
    toy_store(tmp_path, 1, hyp=hyp)
    settings = dict(trainer='toy', hyp={**hyp, 'knob_37': 0.5}, held_out={'random': [0, 1], 'easy': [30, 32]},
                    n_train=40, data_fingerprint='toy', seed_base=0, arms=list(ARMS))
    with pytest.raises(StoreError) as e:
        Store.create(tmp_path, settings, np.arange(40) % 10)
    lines = str(e.value).splitlines()
    assert '  hyp.knob_37: store has 0.123456789, this command has 0.5' in lines
    assert '  held_out.easy: store has [30, 31], this command has [30, 32]' in lines
    assert not any('knob_36' in line for line in lines)


# ---------------------------------------------------------------------------------------------------
# Nothing outside the store touched; only what the store wrote ever moved or removed
# ---------------------------------------------------------------------------------------------------

def a_victim(path):
    """A user's folder beside the store: a thesis, a results table and an old draft's temporary file."""
    path.mkdir()
    for name in ('thesis.tex', 'results.csv', 'draft.tmp-1'):
        (path / name).write_text(name)
        os.utime(path / name, (1e9, 1e9))  # old: no age rule may take it for a leftover
    return sorted(os.listdir(path))


@pytest.mark.parametrize('sub', ['with', 'packed', 'claims', 'failed', 'corrupt'])
def test_a_store_folder_linked_out_of_the_store_is_refused_and_nothing_there_is_touched(tmp_path, sub, capsys):
    store, victim = tmp_path / 'S', tmp_path / 'victim'
    toy_store(store, 2)
    there = a_victim(victim)
    shutil.rmtree(store / sub)
    os.symlink('../victim', store / sub)
    with pytest.raises(SystemExit, match=f'viz: {store / sub} is a symbolic link \\(to ../victim\\)'):
        viz.main([str(store)])
    with pytest.raises(StoreError, match='symbolic link'):
        Store.create(store, TOY_SETTINGS, np.arange(40) % 10)
    assert sorted(os.listdir(victim)) == there


@pytest.mark.parametrize('sub', ['claims', 'failed', 'packed', 'without'])
def test_a_plain_file_where_a_store_folder_belongs_is_one_line(tmp_path, sub, capsys):
    toy_store(tmp_path, 2)
    shutil.rmtree(tmp_path / sub)
    (tmp_path / sub).write_text('not a folder')
    with pytest.raises(SystemExit, match=f'viz: {tmp_path / sub} is a file where the store keeps a folder'):
        viz.main([str(tmp_path)])


def test_only_temporary_files_the_store_wrote_are_removed(tmp_path):
    s = toy_store(tmp_path, 2)
    for name in ('with/backup.tmp-2024', 'packed/x.tmp-keep', 'claims/notes', 'with/draft.reader-1'):
        (tmp_path / name).write_text('mine')
        os.utime(tmp_path / name, (1e9, 1e9))
    s.clean_leftovers()
    s.load('with')
    for name in ('with/backup.tmp-2024', 'packed/x.tmp-keep', 'claims/notes', 'with/draft.reader-1'):
        assert (tmp_path / name).read_text() == 'mine'


def test_a_stray_file_in_an_arm_is_named_and_left_where_it_is(tmp_path, capsys):
    s = toy_store(tmp_path, 2)
    (tmp_path / 'with' / 'notes.txt').write_text('mine')
    assert list(s.load('with')[1]['run']) == [0, 1]
    assert 'notes.txt: not a run file name' in capsys.readouterr().err
    assert (tmp_path / 'with' / 'notes.txt').read_text() == 'mine' and moved(tmp_path) == []


@pytest.mark.parametrize('inside', [['with/notes.txt'], ['packed/x.tmp-keep'], ['with/notes.txt', 'packed/x.tmp-keep'],
                                    ['thesis.tex']])
def test_a_folder_holding_anything_the_store_did_not_write_is_not_taken_for_a_new_store(tmp_path, inside):
    out = tmp_path / 'D'
    for name in inside:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text('mine')
    before = sorted(str(p.relative_to(out)) for p in out.rglob('*'))
    holds = ', '.join(sorted(inside))
    with pytest.raises(StoreError, match=f'{out} is not empty and not a run store .*it holds {holds}'
                                         r'\). Nothing was changed'):
        Store.create(out, TOY_SETTINGS, np.arange(40) % 10)
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*')) == before
    assert all((out / name).read_text() == 'mine' for name in inside)


# ---------------------------------------------------------------------------------------------------
# Odd files: one line, never a traceback or a hang
# ---------------------------------------------------------------------------------------------------

def rewrite_run(s, arm, run, /, **changes):
    path = s.run_file(arm, run)
    with np.load(path) as z:
        rec = {k: z[k] for k in z.files}
    rec.update(changes)
    with open(path, 'wb') as f:
        np.savez(f, **rec)


@pytest.mark.parametrize('key, value', [('seconds', np.complex128(1 + 2j)), ('test_acc', np.bytes_(b'0.5')),
                                        ('seconds', np.str_('fast'))])
def test_a_run_file_with_a_scalar_of_the_wrong_type_is_moved_aside_and_the_report_runs(tmp_path, key, value, capsys):
    s = toy_store(tmp_path, 3)
    rewrite_run(s, 'with', 1, **{key: value})
    viz.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert f'000001.npz: {key}' in err and 'Traceback' not in err and len(moved(tmp_path)) == 1
    assert list(Store(tmp_path).load('with')[1]['run']) == [0, 2]


def test_a_run_file_with_a_huge_extra_member_is_refused_before_it_is_read(tmp_path, capsys):
    s = toy_store(tmp_path, 2)
    path = s.run_file('with', 1)
    with zipfile.ZipFile(path, 'a', zipfile.ZIP_DEFLATED) as z:  # 60 MB unpacked; compresses to little
        z.writestr('extra.npy', b'\0' * 10_000_000)
        z.writestr('big.npy', b'\0' * 50_000_000)
    assert os.path.getsize(path) < 2_000_000
    assert list(s.load('with')[1]['run']) == [0]
    assert '000001.npz: holds extra.npy, big.npy, expected only the members' in capsys.readouterr().err


def test_a_member_larger_than_its_expected_size_is_refused_by_name(tmp_path, capsys):
    s = toy_store(tmp_path, 2)
    rewrite_run(s, 'with', 1, kept=np.zeros(1_000_000, np.uint8))
    assert list(s.load('with')[1]['run']) == [0]
    assert '000001.npz: member kept.npy holds 1,000,128 bytes, expected at most 4,101' in capsys.readouterr().err


@pytest.mark.parametrize('kind', ['fifo', 'folder', 'link'])
def test_a_fifo_folder_or_link_as_a_run_file_is_one_line_and_moved_aside(tmp_path, kind, capsys):
    s = toy_store(tmp_path, 2)
    path = s.run_file('with', 1)
    outside = tmp_path.parent / f'{tmp_path.name}-outside.npz'
    os.replace(path, outside)
    {'fifo': os.mkfifo, 'folder': os.mkdir, 'link': lambda p: os.symlink(outside, p)}[kind](path)
    assert list(s.load('with')[1]['run']) == [0]  # a FIFO would block an open() without O_NONBLOCK forever
    err = capsys.readouterr().err
    assert f'000001.npz is a {dict(fifo="FIFO", folder="folder", link="symbolic link")[kind]}' in err
    assert len(moved(tmp_path)) == 1 and outside.exists()


@pytest.mark.parametrize('kind', ['fifo', 'folder'])
def test_a_fifo_or_folder_as_a_claim_is_one_line_for_the_trainer_and_ignored_by_viz(tmp_path, kind, capsys):
    s = toy_store(tmp_path, 2)
    claim = tmp_path / 'claims' / 'with-000005'
    (os.mkfifo if kind == 'fifo' else os.mkdir)(claim)
    with pytest.raises(StoreError, match=f'{claim} is a {"FIFO" if kind == "fifo" else "folder"}, expected a file: '
                                         'not a claim. Remove it'):
        s.claim('with', 5)
    assert s.in_progress() == 0
    s.clean_leftovers()
    viz.main([str(tmp_path)])
    assert claim.exists()


DEEP = '[' * 100_000 + ']' * 100_000


@pytest.mark.parametrize('where', ['settings.json', 'packed/with.json', 'failed/with-000003.json',
                                   'claims/with-000003'])
def test_deeply_nested_json_anywhere_the_store_reads_is_one_line(tmp_path, where, capsys):
    s = toy_store(tmp_path, 2)
    s.load('with')
    (tmp_path / where).write_text(DEEP)
    if where == 'settings.json':
        with pytest.raises(StoreError, match='settings.json is not valid JSON \\(nested too deep\\)'):
            Store(tmp_path)
        return
    s = Store(tmp_path)
    assert list(s.load('with')[1]['run']) == [0, 1] and s.failed() == {}
    fresh = where == 'claims/with-000003'  # a fresh claim of unknown form: alive while its heartbeat is
    assert s.in_progress() == fresh and s.claim('with', 3) != fresh


# ---------------------------------------------------------------------------------------------------
# Out of space or inodes
# ---------------------------------------------------------------------------------------------------

def test_out_of_inodes_after_claiming_says_the_real_cause_and_leaves_no_claim(tmp_path, monkeypatch, capsys):
    """Once a run is claimed nothing can be created (no inode left): the run file cannot be written, and
    releasing the claim cannot create its marker. The one line says why; the claim is gone."""
    fake_store(tmp_path)
    real_claim = Store.claim

    def claim_then_fill_the_disk(self, arm, run):
        got = real_claim(self, arm, run)
        patch(monkeypatch, refuse(str(tmp_path), errno.ENOSPC))
        return got
    monkeypatch.setattr(Store, 'claim', claim_then_fill_the_disk)
    code = experiment.main(store_worker, ['--smoke', '--runs', '2', '--out', str(tmp_path), '--device', 'cpu'])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert code == 2 and len(errors) == 1, errors
    assert 'could not write' in errors[0] and '000000.npz' in errors[0] and 'No space left on device' in errors[0]
    assert 'could not claim' not in errors[0]
    monkeypatch.undo()
    assert os.listdir(tmp_path / 'claims') == []


# ---------------------------------------------------------------------------------------------------
# Command-line and input edges
# ---------------------------------------------------------------------------------------------------

HELD_OUT_FILES = {'dollar': '{"$\\\\foo$": [0, 1]}', 'space': '{"my group": [0]}', 'empty name': '{"": [0]}',
                  'deep': '{"random": ' + DEEP + '}'}
EDGES = [([''], "--out '': empty; expected a store folder"),
         (['   '], "--out '   ': empty"),
         (['x', 'dollar'], 'group name "$\\\\foo$": expected 1 to 40 letters, digits, _ or -'),
         (['x', 'space'], 'group name "my group": expected 1 to 40 letters'),
         (['x', 'empty name'], 'group name "": expected 1 to 40 letters'),
         (['x', 'deep'], 'not valid JSON (nested too deep)')]


@pytest.mark.parametrize('out_and_file, message', EDGES, ids=[' '.join(a) for a, _ in EDGES])
def test_an_edge_of_the_command_line_is_refused_in_one_line_and_writes_nothing(out_and_file, message, tmp_path,
                                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path.parent / f'{tmp_path.name}-inputs'
    inputs.mkdir()
    args = ['--out', out_and_file[0]]
    if len(out_and_file) > 1:
        (inputs / 'held.json').write_text(HELD_OUT_FILES[out_and_file[1]])
        args += ['--held-out', str(inputs / 'held.json')]
    code = experiment.main(store_worker, ['--smoke', '--runs', '1', '--device', 'cpu', *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_a_report_file_on_a_full_disk_is_never_left_partial(tmp_path, monkeypatch, capsys):
    toy_store(tmp_path / 'S', 4)
    out = tmp_path / 'report.csv'
    real = csv.DictWriter.writerows

    def full(self, rows):
        real(self, rows[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(csv.DictWriter, 'writerows', full)
    with pytest.raises(SystemExit, match=f'viz: could not write {out} .*No space left on device'):
        viz.main([str(tmp_path / 'S'), '--csv', str(out)])
    assert sorted(os.listdir(tmp_path)) == ['S']  # no partial report, no temporary file


def test_a_group_name_matplotlib_would_read_as_math_is_plotted_as_it_is(tmp_path):
    # a store made before group names were checked
    settings = dict(TOY_SETTINGS, held_out={'$\\foo$': [0, 1], 'easy': [30, 31]})
    s = Store.create(tmp_path / 'S', settings, np.arange(40) % 10)
    rng = np.random.default_rng(0)
    for run in range(4):
        for arm in ARMS:
            s.save_run(arm, run, run, rng.normal(0, 1, (40, 10)).astype(np.float16), 1.0, 0.5)
    viz.main([str(tmp_path / 'S'), '--plot', str(tmp_path / 'forest.png')])
    assert (tmp_path / 'forest.png').read_bytes()[:4] == b'\x89PNG'


def test_a_failed_download_removes_the_data_folder_it_created(tmp_path, monkeypatch):
    import airbench
    monkeypatch.setattr(airbench, 'CIFAR10_URL', 'http://127.0.0.1:9/cifar-10-python.tar.gz')  # nothing listens
    with pytest.raises(airbench.DataError, match='the download failed'):
        airbench.load_cifar10(str(tmp_path / 'data'))
    assert os.listdir(tmp_path) == []


def train_fake(path, runs=2):
    return experiment.main(store_worker, ['--smoke', '--runs', str(runs), '--out', str(path), '--device', 'cpu'])


def test_a_folder_with_a_run_files_name_is_moved_aside_and_the_run_redone_by_the_trainer(tmp_path, capsys):
    s = fake_store(tmp_path)
    os.mkdir(s.run_file('with', 1))
    assert train_fake(tmp_path) == 0
    assert 'with/000001.npz is a folder, expected a file; the run will be redone' in capsys.readouterr().err
    assert Store(tmp_path).read_run('with', 1)['run'] == 1 and len(moved(tmp_path)) == 1


def test_a_run_file_that_cannot_be_moved_aside_is_an_error_for_the_trainer_and_no_promise_in_viz(
        tmp_path, monkeypatch, capsys):
    s = fake_store(tmp_path, 2)
    os.remove(s.run_file('with', 1))
    os.mkdir(s.run_file('with', 1))
    patch(monkeypatch, refuse('000001.npz', errno.EPERM, ('rename',)))  # an immutable file, a foreign owner
    assert train_fake(tmp_path) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'with/000001.npz is a folder, expected a file, and it could not be moved' in errors[0]
    assert 'cannot be redone while it is there. Remove it and rerun.' in errors[0]
    os.rmdir(s.run_file('with', 1))
    with open(s.run_file('with', 1), 'wb') as f:
        f.write(b'garbage')
    assert list(Store(tmp_path).load('with')[1]['run']) == [0]
    err = capsys.readouterr().err
    assert 'no trainer can replace it while it is there. Move or remove it by hand' in err and 'redone' not in err


@pytest.mark.parametrize('kind', ['fifo', 'folder'])
def test_a_fifo_or_folder_as_the_pack_is_never_waited_on(tmp_path, kind):
    s = toy_store(tmp_path, 3)
    s.load('with')
    os.remove(tmp_path / 'packed' / 'with.npy')
    (os.mkfifo if kind == 'fifo' else os.mkdir)(tmp_path / 'packed' / 'with.npy')
    assert list(Store(tmp_path).load('with')[1]['run']) == [0, 1, 2]
    # a FIFO is replaced by a new pack; a folder cannot be, and the runs are read from their files
    assert os.path.isfile(tmp_path / 'packed' / 'with.npy') == (kind == 'fifo')


# Report files: written as a user expects for any name, nothing that is not a regular file renamed over.

import signal
import subprocess
import sys

import viz_io

ROW = {'index': np.arange(3), 'self_influence': np.array([0.5, -1.0, 2.0])}


def test_a_device_is_written_into_never_replaced():
    before = os.stat('/dev/null')
    viz_io.write_csv(ROW, '/dev/null', ['index', 'self_influence'])
    after = os.stat('/dev/null')
    assert (after.st_ino, after.st_rdev, after.st_mode) == (before.st_ino, before.st_rdev, before.st_mode)


def test_a_full_device_gives_the_write_error():
    with pytest.raises(OSError) as e:
        viz_io.write_json(ROW, '/dev/full', {}, ['index', 'self_influence'])
    assert e.value.errno == errno.ENOSPC
    assert os.stat('/dev/full').st_rdev != 0 and not os.path.isfile('/dev/full')


def test_a_fifo_is_written_into(tmp_path):
    fifo = tmp_path / 'pipe'
    os.mkfifo(fifo)
    reader = subprocess.Popen(['cat', str(fifo)], stdout=subprocess.PIPE, text=True)
    viz_io.write_csv(ROW, str(fifo), ['index', 'self_influence'])
    assert reader.communicate(timeout=20)[0].splitlines()[0] == 'index,self_influence'
    assert not os.path.isfile(fifo) and os.listdir(tmp_path) == ['pipe']


def test_dash_is_standard_output(capsys):
    viz_io.write_csv(ROW, '-', ['index', 'self_influence'])
    assert capsys.readouterr().out.splitlines() == ['index,self_influence', '0,0.5', '1,-1.0', '2,2.0']


def viz_to_stdout(store, stdout):
    """viz.py STORE --csv /dev/stdout as a user runs it, its stdout a pipe or a file -> the finished process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, 'viz.py'), str(store), '--controls', '0', '--csv',
                           '/dev/stdout'], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)


def report_then_csv(text):
    """The printed report and the CSV rows that follow it in one stream."""
    report, head, rows = text.partition('\ngroup,index,')
    return report, rows.splitlines()[1:] if head else []


def test_csv_to_dev_stdout_goes_down_a_pipe_after_the_report(tmp_path):
    fake_store(tmp_path / 'store', runs=3)
    done = viz_to_stdout(tmp_path / 'store', subprocess.PIPE)
    assert done.returncode == 0 and done.stderr == '', done.stderr
    report, rows = report_then_csv(done.stdout)
    assert report.startswith('Answer') and [r.split(',')[1] for r in rows] == ['0', '1', '5', '9']  # held out
    assert os.listdir(tmp_path) == ['store']


def test_csv_to_dev_stdout_redirected_to_a_file_follows_the_report_in_it(tmp_path):
    fake_store(tmp_path / 'store', runs=3)
    with open(tmp_path / 'out.txt', 'w') as out:  # viz.py STORE --csv /dev/stdout > out.txt
        done = viz_to_stdout(tmp_path / 'store', out)
    assert done.returncode == 0 and done.stderr == '', done.stderr
    report, rows = report_then_csv((tmp_path / 'out.txt').read_text())
    assert report.startswith('Answer') and 'Runs per arm needed' in report  # the whole report, then the CSV
    assert [r.split(',')[1] for r in rows] == ['0', '1', '5', '9']
    assert sorted(os.listdir(tmp_path)) == ['out.txt', 'store']


def test_a_link_keeps_being_a_link_and_its_target_gets_the_report(tmp_path):
    (tmp_path / 'real.csv').write_text('old')
    os.symlink('real.csv', tmp_path / 'link.csv')
    viz_io.write_csv(ROW, str(tmp_path / 'link.csv'), ['index'])
    assert os.path.islink(tmp_path / 'link.csv')
    assert (tmp_path / 'real.csv').read_text().splitlines() == ['index', '0', '1', '2']


def test_a_folder_is_refused_not_replaced(tmp_path):
    (tmp_path / 'out').mkdir()
    with pytest.raises(IsADirectoryError):
        viz_io.write_csv(ROW, str(tmp_path / 'out'), ['index'])
    assert os.path.isdir(tmp_path / 'out') and os.listdir(tmp_path) == ['out']


def test_a_legal_long_name_works(tmp_path):
    name = tmp_path / ('r' * 240 + '.csv')  # 244 bytes: legal; a longer temporary name beside it was not
    viz_io.write_csv(ROW, str(name), ['index'])
    assert name.read_text().splitlines()[0] == 'index' and os.listdir(tmp_path) == [name.name]


def test_stale_temporary_files_of_dead_processes_are_removed_by_the_next_viz(tmp_path):
    dead = subprocess.Popen(['true'])
    dead.wait()
    me = files_module.identity()
    stale = tmp_path / f'{viz_io.TMP_PREFIX}{me["boot"]}.{me["pidns"]}.{dead.pid}.12345.0123abcd'
    live = tmp_path / f'{viz_io.TMP_PREFIX}{files_module._tag()}'
    other = tmp_path / 'keep.csv'
    others = tmp_path / f'keep.csv.tmp-{dead.pid}-0123abcd'  # not a name of this report: left alone
    for p in (stale, live, other, others):
        p.write_text('x')
    viz_io.remove_stale_temps([str(tmp_path / 'report.csv')])
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, others.name])


def test_a_temporary_file_whose_owner_cannot_be_checked_here_is_kept_for_a_day(tmp_path):
    dead = subprocess.Popen(['true'])
    dead.wait()
    names = [f'{viz_io.TMP_PREFIX}abcdef01.4026531836.{dead.pid}.12345.0123abcd',  # another container's
             f'{viz_io.TMP_PREFIX}{dead.pid}-0123abcd',  # an earlier viz's: a pid, of no known namespace
             f'report.csv.tmp-{dead.pid}-0123abcd']  # the earliest form
    for name in names:
        (tmp_path / name).write_text('x')
    viz_io.remove_stale_temps([str(tmp_path / 'report.csv')])
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # its process may be running there
    day_ago = time.time() - 86401
    for name in names:
        os.utime(tmp_path / name, (day_ago, day_ago))
    viz_io.remove_stale_temps([str(tmp_path / 'report.csv')])
    assert os.listdir(tmp_path) == []


def test_ctrl_c_in_viz_is_one_line(tmp_path):
    code = ('import viz, viz_io\n'
            'def stop(*a): raise KeyboardInterrupt\n'
            'viz._main = stop\n'
            'viz.main([])\n')
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, '-c', code], cwd=here, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and 'interrupted' in done.stderr
    assert 'Traceback' not in done.stderr


@pytest.mark.parametrize('script', ['viz.py', 'trainer_digits.py'])
def test_ctrl_c_at_any_moment_of_the_start_is_one_line(tmp_path, script):
    if script == 'viz.py':
        fake_store(tmp_path / 'store', runs=3)
        args = [str(tmp_path / 'store'), '--controls', '0']
    else:
        args = ['--smoke', '--runs', '2', '--out', str(tmp_path / 'store'), '--device', 'cpu']
    for delay in (0.1, 0.3, 0.6, 0.9):  # the imports (scipy, torch) take most of a second or more
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        late = p.returncode in (0, -signal.SIGINT) and delay > 0.5  # its work done, it was exiting: no message due
        assert 'Traceback' not in err and (p.returncode == 130 or late), (delay, p.returncode, err)
        if p.returncode == 130:
            assert 'interrupted' in err.strip().splitlines()[-1] or 'stopped by SIGINT' in err, (delay, err)


def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path):
    def write(f):
        f.write('partial')
        os.kill(os.getpid(), signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, viz._stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            viz_io.write_whole(str(tmp_path / 'r.csv'), write)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.listdir(tmp_path) == []


# Liveness of claims: neither /proc, nor start times across time namespaces, nor clocks need agree.

import time

import store as store_module
import store.claims as claims_module
import store.files as files_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOREIGN = dict(host='elsewhere', boot='other', pidns='1', pid=1, start=5, token='x')  # another machine's


def foreign_claim(store, run, mtime):
    path = os.path.join(store.path, 'claims', f'with-{run:06d}')
    with open(path, 'w') as f:
        json.dump(FOREIGN, f)
    os.utime(path, (mtime, mtime))
    return path


def test_a_worker_in_another_time_namespace_leaves_a_live_claim(tmp_path):
    s = fake_store(tmp_path)
    assert s.claim('with', 2)
    code = f'from store import Store; print(Store({str(tmp_path)!r}).claim("with", 2))'
    done = subprocess.run(['unshare', '--time', '--boottime', '100000', sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, 'PYTHONPATH': ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['False']  # its start times differ by 100000 s: the heartbeat decides
    assert s.holds('with', 2)


def test_a_process_hidden_by_hidepid_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    fake_store(tmp_path)
    sleeper = subprocess.Popen(['sleep', '60'])
    try:
        me = store_module.identity()
        live = dict(me, pid=sleeper.pid, start=files_module._start_time(sleeper.pid), token='x')
        monkeypatch.setattr(files_module, '_start_time', lambda pid: None)  # /proc shows no other process
        assert files_module.owner_alive(live, time.time())
        assert not files_module.owner_alive(live, time.time() - store_module.CLAIM_TIMEOUT - 1)
        dead = subprocess.Popen(['true'])
        dead.wait()
        assert not files_module.owner_alive(dict(live, pid=dead.pid), time.time())  # no such pid at all
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize('ahead', [660, -660])
def test_a_host_whose_clock_differs_takes_no_live_claim(tmp_path, monkeypatch, ahead):
    s = fake_store(tmp_path)
    foreign_claim(s, 3, time.time())  # touched just now by the store's (the file server's) clock
    real = time.time
    monkeypatch.setattr(time, 'time', lambda: real() + ahead)  # this host's clock is 11 minutes off
    assert not Store(tmp_path).claim('with', 3)
    os.utime(os.path.join(s.path, 'claims', 'with-000003'), (real() - 601, real() - 601))
    assert Store(tmp_path).claim('with', 3)  # silent for 601 s of the store's clock: taken over


@pytest.mark.parametrize('ahead', [660, -660])
def test_a_host_whose_clock_differs_removes_no_live_temporary_file(tmp_path, monkeypatch, ahead):
    s = fake_store(tmp_path)
    tmp = os.path.join(s.path, 'with', '000003.npz.tmp-abcdef01.4026531836.1.5.0123abcd')  # another host's
    open(tmp, 'w').close()  # written just now by the store's (the file server's) clock
    real = time.time
    monkeypatch.setattr(time, 'time', lambda: real() + ahead)  # this host's clock is 11 minutes off
    Store(tmp_path).clean_leftovers(['with'])
    assert os.path.exists(tmp)
    os.utime(tmp, (real() - 601, real() - 601))
    Store(tmp_path).clean_leftovers(['with'])
    assert not os.path.exists(tmp)  # untouched for 601 s of the store's clock: left over


def test_a_heartbeat_a_day_in_the_future_that_does_not_advance_is_taken_over(tmp_path):
    s = fake_store(tmp_path)
    path = foreign_claim(s, 4, time.time() + 86400)
    assert not s.claim('with', 4)  # suspect, not yet known dead
    assert abs(os.stat(path).st_mtime - time.time()) < 5  # brought back to the store's now
    later = time.time() - store_module.CLAIM_TIMEOUT - 1  # as if CLAIM_TIMEOUT passed without a touch
    os.utime(path, (later, later))
    assert Store(tmp_path).claim('with', 4)


def test_a_heartbeat_that_cannot_be_corrected_is_trusted_only_while_it_changes(tmp_path, monkeypatch):
    s = fake_store(tmp_path)
    foreign_claim(s, 5, time.time() + 86400)
    now = [time.time()]
    monkeypatch.setattr(claims_module.Claims, '_store_now', lambda self: now[0])

    def refused(*a, **k):
        raise PermissionError(errno.EPERM, 'another user')
    monkeypatch.setattr(claims_module.os, 'utime', refused)  # another user's claim file
    assert not s.claim('with', 5)
    now[0] += store_module.CLAIM_TIMEOUT - 10
    assert not s.claim('with', 5)  # unchanged, but not yet for CLAIM_TIMEOUT
    now[0] += 20
    assert s.claim('with', 5)  # observed unchanged for CLAIM_TIMEOUT: its worker is gone


# Every claim checked right before storing: a stored run is never replaced, a lost claim discarded in one line.

def test_a_run_stored_meanwhile_by_another_worker_is_never_replaced(tmp_path, capsys):
    s = fake_store(tmp_path)
    late = Store(tmp_path)
    assert s.claim('with', 1)
    seed = store_module.seed_for(1, s.settings['seed_base'])
    logits = np.zeros((s.settings['n_train'], 10))
    assert s.save_run('with', 1, seed, logits, 1.0, 0.5)
    s.release('with', 1)
    stored = open(s.run_file('with', 1), 'rb').read()
    assert late.claim('with', 1)  # stalled past the check for a stored run, then claims it afresh
    assert not late.save_run('with', 1, seed, logits + 1, 2.0, 0.9)
    assert open(s.run_file('with', 1), 'rb').read() == stored
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('store: with run 1: stored by another worker') and 'discarded' in err[-1]


def test_a_worker_stalled_between_writing_and_linking_its_claim_discards_it_in_one_line(tmp_path, monkeypatch,
                                                                                         capsys):
    s = fake_store(tmp_path)
    capsys.readouterr()
    link = os.link

    def stalled(src, dst, **k):  # meanwhile another worker took this one for dead and cleaned up
        os.remove(src)
        return link(src, dst, **k)
    monkeypatch.setattr(files_module.os, 'link', stalled)
    assert not s.claim('with', 6)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'with run 6' in err[0] and 'left to the other workers' in err[0]
    assert os.listdir(os.path.join(s.path, 'claims')) == []
    assert Store(tmp_path).claim('with', 6)


# A run file that cannot be one: set aside and redone, or one line saying why it cannot be.

def train_capture(path, runs, capsys):
    capsys.readouterr()
    code = experiment.main(store_worker, ['--smoke', '--runs', str(runs), '--out', str(path), '--device', 'cpu'])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if not line.startswith(('--smoke', 'held out:'))]


def test_a_zero_byte_run_file_is_redone_by_the_trainer(tmp_path, capsys):
    s = fake_store(tmp_path, runs=3)
    open(s.run_file('with', 2), 'w').close()
    code, out, err = train_capture(tmp_path, 3, capsys)
    assert code == 0 and 'with    run     2' in out
    assert len(err) == 1 and 'holds 0 bytes' in err[0] and 'will be redone' in err[0]
    assert s.read_run('with', 2)['run'] == 2


@pytest.mark.parametrize('odd', ['zero bytes', 'folder'])
def test_a_run_file_that_cannot_be_moved_stops_the_trainer_in_one_line_naming_why(tmp_path, capsys, monkeypatch,
                                                                                   odd):
    s = fake_store(tmp_path, runs=3)
    path = s.run_file('with', 2)
    os.remove(path)
    os.mkdir(path) if odd == 'folder' else open(path, 'w').close()
    rename = os.rename

    def immutable(src, dst, **k):  # chattr +i: even root gets EPERM
        if src == path:
            raise PermissionError(errno.EPERM, 'Operation not permitted')
        return rename(src, dst, **k)
    monkeypatch.setattr(os, 'rename', immutable)
    code, out, err = train_capture(tmp_path, 3, capsys)
    assert code != 0 and 'runs with' not in out  # never counted as done
    assert len(err) == 1 and 'Operation not permitted' in err[0] and 'chattr -i' in err[0], err
    assert 'will be redone' not in err[0]


def test_a_folder_as_a_run_file_in_viz_is_redone_only_where_viz_says_so(tmp_path, capsys, monkeypatch):
    s = fake_store(tmp_path, runs=3)
    os.remove(s.run_file('with', 1))
    os.mkdir(s.run_file('with', 1))
    rename = os.rename
    monkeypatch.setattr(os, 'rename', lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EPERM, 'no')))
    capsys.readouterr()
    viz.main([str(tmp_path), '--controls', '0'])
    notes = [line for line in capsys.readouterr().err.splitlines() if '000001.npz' in line]
    assert len(notes) == 1 and 'will be redone' not in notes[0] and 'by hand' in notes[0]
    monkeypatch.setattr(os, 'rename', rename)
    viz.main([str(tmp_path), '--controls', '0'])
    notes = [line for line in capsys.readouterr().err.splitlines() if '000001.npz' in line]
    assert len(notes) == 1 and 'will be redone' in notes[0]
    code, out, _ = train_capture(tmp_path, 3, capsys)
    assert code == 0 and 'with    run     1' in out  # as said: redone


def test_a_store_out_of_inodes_says_so_in_one_line_not_that_the_disk_is_full(tmp_path, monkeypatch, capsys):
    fake_store(tmp_path)
    statvfs = os.statvfs
    no_inode = type('fs', (), dict(f_files=1000, f_favail=0, f_ffree=0))
    monkeypatch.setattr(files_module.os, 'statvfs', lambda p: no_inode if str(tmp_path) in str(p) else statvfs(p))
    patch(monkeypatch, refuse(str(tmp_path), errno.ENOSPC))
    code, _, err = train_capture(tmp_path, 2, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith('error:'), err
    assert 'No inode is left' in err[0] and 'df -i' in err[0] and 'disk is full' not in err[0]


def test_viz_writes_into_dev_null_and_says_in_one_line_that_dev_full_is_full(tmp_path, capsys):
    fake_store(tmp_path, runs=3)
    viz.main([str(tmp_path), '--controls', '0', '--csv', '/dev/null'])
    assert not os.path.isfile('/dev/null') and os.stat('/dev/null').st_rdev != 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        viz.main([str(tmp_path), '--controls', '0', '--json', '/dev/full'])
    assert 'could not write /dev/full' in str(e.value) and 'No space left on device' in str(e.value)
    assert '\n' not in str(e.value) and not os.path.isfile('/dev/full')
