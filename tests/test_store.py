"""The run store under attack (store.py): workers released at one instant, stale and foreign claims,
kills at every rename and link, crafted and foreign run files, stale packs, full and read-only disks,
hand-edited settings. Workers are real harness processes (experiment.main) with a trivial trainer
(tests/store_worker.py); each finished run prints one line, and the tests count trainings from them."""
import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

import design
import store as store_module
import viz
from store import Store, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'store_worker.py')
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import store_worker  # noqa: E402

ARMS = ('with', 'without')
N = 64  # training examples of the fake dataset (store_worker.N_TRAIN)


def start(*args, env=None):
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finish(procs, timeout=120):
    """[(returncode, stdout, stderr)] of every process; kills them all if one overruns."""
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def trainings(stdout):
    """(arm, run) of every 'arm run k seed ...' line: one per training a worker finished."""
    return [(w[0], int(w[2])) for w in (line.split() for line in stdout.splitlines())
            if len(w) > 3 and w[1] == 'run' and w[2].isdigit()]


def release_together(tmp_path, procs_args, env=None):
    """Start the processes, wait until all have imported everything, then release them at one instant."""
    go = tmp_path / 'go'
    procs = [start(*args, go, env=env) for args in procs_args]
    deadline = time.time() + 120
    while len(list(tmp_path.glob('go.ready-*'))) < len(procs):
        assert time.time() < deadline and all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.05)
    go.touch()
    return finish(procs)


def fake_store(path, runs=0):
    """A store of the fake trainer's settings, with `runs` finished runs per arm."""
    import experiment
    code = experiment.main(store_worker, ['--smoke', '--runs', str(max(runs, 1)), '--out', str(path), '--device', 'cpu'])
    assert code == 0
    s = Store(path)
    if runs == 0:
        for arm in ARMS:
            os.remove(s.run_file(arm, 0))
    return s


def leftovers(path):
    """Every temporary file, takeover marker, claim or private pack link left in the store."""
    return sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                  if '.tmp-' in n or '.takeover-' in n or '.reader-' in n or os.path.basename(d) == 'claims')


def assert_exactly(path, runs):
    s = Store(path)
    for arm in ARMS:
        assert s.stored(arm) == list(range(runs))
        for run in range(runs):
            s.read_run(arm, run)


# ---------------------------------------------------------------------------------------------------
# Claims: no run trained twice
# ---------------------------------------------------------------------------------------------------

def test_three_workers_released_at_one_instant_train_every_run_exactly_once(tmp_path):
    out, runs, met = tmp_path / 'store', 100, tmp_path / 'met'
    fake_store(out)
    met.mkdir()  # each worker's first training waits until all three have one: all three work, whatever the timing
    results = release_together(tmp_path, [('train', out, runs)] * 3, env={'RENDEZVOUS': f'{met}:3'})
    assert all(code == 0 for code, _, _ in results), [e[-2000:] for _, _, e in results]
    assert all(trainings(o) for _, o, _ in results)
    done = Counter(t for _, o, _ in results for t in trainings(o))
    assert [t for t, k in done.items() if k > 1] == []  # no run trained twice
    assert sorted(done) == sorted((a, r) for r in range(runs) for a in ARMS)
    assert_exactly(out, runs)
    assert leftovers(out) == []


def _dead_pid():
    p = subprocess.Popen(['true'])
    p.wait()
    return p.pid


def stale_claims(store, runs, kind):
    """Claims of every run of `store` by workers that are gone:
    'dead': a mix of a dead process of this machine (pid no longer running), a worker of another
    machine silent for longer than CLAIM_TIMEOUT, and a claim in an earlier version's format;
    'reused': a live process of this machine that is not a worker (its pid was reused: another
    start time), with a fresh heartbeat."""
    me = store_module.identity()
    sleeper = subprocess.Popen(['sleep', '120'])
    old = time.time() - store_module.CLAIM_TIMEOUT - 60
    for run in range(runs):
        for arm in ARMS:
            path = os.path.join(store.path, 'claims', f'{arm}-{run:06d}')
            if kind == 'reused':
                owner = dict(me, pid=sleeper.pid, start=store_module._start_time(sleeper.pid) + 1, token='x')
                mtime = time.time()
            elif run % 3 == 0:
                owner, mtime = dict(me, pid=_dead_pid() if run == 0 else 999_999_999, token='x'), time.time()
            elif run % 3 == 1:
                owner, mtime = dict(me, boot='another-machine', pid=1, token='x'), old
            else:
                owner, mtime = dict(host=me['host'], pid=1, time=0), old  # the earlier format
            with open(path, 'w') as f:
                json.dump(owner, f)
            os.utime(path, (mtime, mtime))
    return sleeper


@pytest.mark.parametrize('kind', ['dead', 'reused'])
def test_stale_claims_are_taken_over_by_exactly_one_of_three_workers(tmp_path, kind):
    out, runs = tmp_path / 'store', 100
    s = fake_store(out)
    sleeper = stale_claims(s, runs, kind)
    try:
        results = release_together(tmp_path, [('train', out, runs)] * 3)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert all(code == 0 for code, _, _ in results), [e[-2000:] for _, _, e in results]
    done = Counter(t for _, o, _ in results for t in trainings(o))
    assert [t for t, k in done.items() if k > 1] == []
    assert sorted(done) == sorted((a, r) for r in range(runs) for a in ARMS)  # none blocked forever
    assert_exactly(out, runs)
    assert leftovers(out) == []


def test_workers_in_separate_pid_namespaces_of_one_host_train_every_run_once(tmp_path):
    """Containers with host networking: one hostname, one kernel, pids from different namespaces.
    A pid from another namespace proves nothing here: such claims live by their heartbeat."""
    if subprocess.run(['unshare', '--pid', '--fork', '--mount-proc', 'true'], capture_output=True).returncode:
        pytest.skip('unshare --pid needs CAP_SYS_ADMIN; the namespace logic is covered by '
                    'test_claim_from_another_pid_namespace_lives_by_its_heartbeat')
    out, runs, go = tmp_path / 'store', 100, tmp_path / 'go'
    fake_store(out)
    cmd = [sys.executable, WORKER, 'train', str(out), str(runs), str(go)]
    procs = [subprocess.Popen(['unshare', '--pid', '--fork', '--mount-proc', '--kill-child', *cmd] if k < 2 else cmd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob('go.ready-*'))) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.05)
    go.touch()
    results = finish(procs)
    assert all(code == 0 for code, _, _ in results), [e[-2000:] for _, _, e in results]
    done = Counter(t for _, o, _ in results for t in trainings(o))
    assert [t for t, k in done.items() if k > 1] == []
    assert_exactly(out, runs)
    assert leftovers(out) == []


def test_claim_from_another_pid_namespace_lives_by_its_heartbeat(tmp_path):
    s = fake_store(tmp_path)
    me = store_module.identity()
    claim = tmp_path / 'claims' / 'with-000003'
    claim.write_text(json.dumps(dict(me, pidns='4026530000', pid=999_999_999, token='x')))  # no such pid here
    assert not s.claim('with', 3)  # its worker runs in another namespace: alive while its heartbeat is
    assert s.in_progress() == 1
    # its run file being written: kept by this machine's cleanup
    tmp = tmp_path / 'with' / f'000003.npz.tmp-{me["boot"]}.4026530000.999999999.12345.abcd0123'
    tmp.write_bytes(b'half a run')
    s.clean_leftovers()
    assert tmp.exists() and claim.exists()
    old = time.time() - store_module.CLAIM_TIMEOUT - 1
    for path in (claim, tmp):
        os.utime(path, (old, old))
    s.clean_leftovers()  # silent for too long: dead
    assert not tmp.exists() and not claim.exists()


def test_a_worker_releases_only_its_own_claim(tmp_path):
    s, other = fake_store(tmp_path), Store(tmp_path)
    assert s.claim('with', 4)
    claim = tmp_path / 'claims' / 'with-000004'
    theirs = json.dumps(dict(store_module.identity(), token='theirs')).encode()
    claim.write_bytes(theirs)  # taken over meanwhile (this process was thought dead)
    s.release('with', 4)
    assert claim.read_bytes() == theirs
    other.release('with', 4)  # never claimed it
    assert claim.read_bytes() == theirs


def test_another_hosts_claim_blocks_until_its_heartbeat_stops(tmp_path):
    s = fake_store(tmp_path)
    claim = tmp_path / 'claims' / 'with-000003'
    claim.write_text(json.dumps(dict(host='elsewhere', boot='other', pidns='1', pid=1, start=5, token='x')))
    assert not s.claim('with', 3)  # fresh: its worker is alive on another machine
    old = time.time() - store_module.CLAIM_TIMEOUT - 1
    os.utime(claim, (old, old))
    assert s.claim('with', 3)  # no heartbeat for too long: the run is taken over
    assert json.loads(claim.read_text())['pid'] == os.getpid()
    assert not Store(tmp_path).claim('with', 3)  # and now held by this (live) process
    assert [n for n in os.listdir(tmp_path / 'claims')] == ['with-000003']  # no marker left


# ---------------------------------------------------------------------------------------------------
# Kills at every rename, link and open: what is left is cleaned, the rerun ends at exactly N
# ---------------------------------------------------------------------------------------------------

KILLS = {
    'claim link': 'link:claims/with-000002',
    'claim temp open': 'open:claims/with-000002.tmp',
    'run file link': 'link:with/000002.npz',  # a run file is linked into place: never over another
    'run file temp open': 'open:with/000002.npz.tmp',
    'release of a finished run': 'remove:claims/with-000002',
    'release marker link': 'link:claims/with-000002.takeover',
    'labels link at creation': 'link:labels.npy',
    'settings link at creation': 'link:settings.json',
}


def test_workers_killed_at_each_rename_link_and_open_leave_nothing_behind_a_rerun(tmp_path):
    """One worker per kill point (all at once, each on its own store); then the same command again."""
    cases = {where: tmp_path / where.replace(' ', '-') for where in KILLS}
    results = finish([start('train', out, 4, env={'KILL_AT': KILLS[where]}) for where, out in cases.items()])
    for (where, out), (code, stdout, _) in zip(cases.items(), results):
        assert code == -9, (where, stdout)  # killed where asked, not finished
        if os.path.exists(out / 'settings.json'):
            s = Store(out)
            for arm in ARMS:
                for run in s.stored(arm):
                    s.read_run(arm, run)  # every run file there is complete
        fake_store(out, runs=4)
        assert_exactly(out, 4)
        assert leftovers(out) == [], where
        assert sorted(os.listdir(out)) == sorted(['settings.json', 'labels.npy', *ARMS, *store_module.SUBFOLDERS])


@pytest.mark.parametrize('where', ['link:claims/with-000000.takeover', 'replace:claims/with-000000.takeover'])
def test_worker_killed_while_taking_over_a_dead_claim_leaves_nothing_behind(tmp_path, where):
    s = fake_store(tmp_path)
    stale_claims(s, 1, 'dead').kill()
    code, _, _ = finish([start('claim', tmp_path, env={'KILL_AT': where})])[0]
    assert code == -9 and len(os.listdir(tmp_path / 'claims')) >= 2  # the dead claim and a marker or temp file
    assert s.claim('with', 0)  # the next worker takes the run over
    s.release('with', 0)
    s.clean_leftovers()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize('where', ['open:packed/with.npy.tmp', 'replace:packed/with.npy', 'replace:packed/with.json'])
def test_viz_killed_while_packing_leaves_nothing_behind_the_next_one(tmp_path, where):
    s = fake_store(tmp_path, runs=3)
    code, _, _ = finish([start('load', tmp_path, env={'KILL_AT': where})])[0]
    assert code == -9
    logits, run_info = Store(tmp_path).load('with')
    assert list(run_info['run']) == [0, 1, 2]
    assert all(np.array_equal(logits[i], s.read_run('with', i)['logits']) for i in range(3))
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Two viz at once, two creators at once
# ---------------------------------------------------------------------------------------------------

def test_two_viz_at_once_while_runs_are_added_see_consistent_packs(tmp_path):
    s = fake_store(tmp_path, runs=10)
    go = tmp_path / 'go'
    procs = [start('load', tmp_path, go, env={'LOAD_REPEAT': '25'}) for _ in range(2)]
    while len(list(tmp_path.glob('go.ready-*'))) < 2:
        assert all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.02)
    go.touch()
    rng = np.random.default_rng(0)
    for run in range(10, 40):
        s.save_run('with', run, run, rng.normal(0, 1, (N, 10)).astype(np.float16), 1.0, 0.5)
        time.sleep(0.01)
    results = finish(procs)
    assert [code for code, _, _ in results] == [0, 0], [e[-3000:] for _, _, e in results]


def test_two_processes_creating_one_store_with_different_data_leave_a_consistent_store(tmp_path):
    pairs = [(tmp_path / f's{i}', 2 * i, 2 * i + 1) for i in range(5)]
    results = release_together(tmp_path, [('create', path, k) for path, *ks in pairs for k in ks])
    for i, (path, *_) in enumerate(pairs):
        outcome = sorted(results[2 * i][1].split()[:1] + results[2 * i + 1][1].split()[:1])
        assert outcome == ['created', 'refused:'], results[2 * i: 2 * i + 2]
        s = Store(path)  # checks labels.npy against settings.json
        k = int(s.settings['data_fingerprint'][4:])
        assert (s.labels == k % 10).all()  # the labels of the data the settings name


# ---------------------------------------------------------------------------------------------------
# Foreign and stale data never reach the analysis
# ---------------------------------------------------------------------------------------------------

def test_kept_mask_marks_exactly_the_kept_examples_and_every_one_for_none():
    assert design.kept_mask(None, 5).tolist() == [True] * 5
    assert design.kept_mask([3, 0], 5).tolist() == [True, False, False, True, False]
    assert design.kept_mask(np.zeros(0, np.int64), 3).tolist() == [False] * 3
    held_out = {'random': [1, 4], 'easy': [7]}
    for arm, seed in (('without', 0), ('a', 3), ('b', 3), ('scan', 5)):
        keep = design.keep_for(arm, seed, 10, held_out)
        mask = design.kept_mask(keep, 10)
        assert np.array_equal(np.flatnonzero(mask), np.unique(keep))
        assert np.array_equal(design.kept_bits(arm, seed, 10, held_out), np.packbits(mask))


TOY_HELD = {'random': [0, 1], 'easy': [30, 31]}


def toy_store(path, runs, hyp=None, seed_base=0, rng_seed=0):
    """A store written through the real API: `runs` runs per arm of random logits."""
    rng = np.random.default_rng(rng_seed)
    settings = dict(trainer='toy', hyp=hyp or {'lr': 1.0}, held_out=TOY_HELD, n_train=40, data_fingerprint='toy',
                    seed_base=seed_base)
    s = Store.create(path, settings, np.arange(40) % 10)
    for run in range(runs):
        for arm in ARMS:
            s.save_run(arm, run, seed_base + run, rng.normal(0, 1, (40, 10)).astype(np.float16), 1.0, 0.5)
    return s


def loaded(s, arm='with'):
    """Run indices load() returns, after checking each row against its run file."""
    logits, run_info = s.load(arm)
    for i, run in enumerate(run_info['run']):
        assert np.array_equal(logits[i], s.read_run(arm, int(run))['logits'])
    return list(run_info['run'])


def moved(path):
    return sorted(os.listdir(os.path.join(path, 'corrupt')))


def test_run_file_from_a_store_with_other_hyperparameters_is_refused_and_moved_aside(tmp_path, capsys):
    s = toy_store(tmp_path / 'a', 3)
    other = toy_store(tmp_path / 'b', 4, hyp={'lr': 2.0})  # e.g. --hyp norm=layer: same data, seeds, arms
    shutil.copy(other.run_file('with', 3), s.run_file('with', 3))
    assert loaded(s) == [0, 1, 2]
    err = capsys.readouterr().err
    assert '000003.npz: binding is' in err and 'made with other settings' in err
    assert moved(s.path) == [m for m in moved(s.path) if m.startswith('with-000003.npz')] and len(moved(s.path)) == 1


def test_without_file_copied_into_with_is_refused_naming_the_arm(tmp_path, capsys):
    s = toy_store(tmp_path, 2)
    shutil.copy(s.run_file('without', 1), s.run_file('with', 1))
    assert loaded(s) == [0]
    assert "000001.npz: arm is 'without', expected 'with'" in capsys.readouterr().err


def test_factorial_run_file_put_into_the_other_arm_is_refused(tmp_path, capsys):
    settings = dict(trainer='toy', hyp={}, held_out=TOY_HELD, n_train=40, data_fingerprint='toy', seed_base=0,
                    arms=['a', 'b'])
    s = Store.create(tmp_path, settings, np.arange(40) % 10)
    for run in range(3):
        for arm in ('a', 'b'):
            s.save_run(arm, run, run, np.zeros((40, 10), np.float16), 1.0, 0.5)
    shutil.copy(s.run_file('a', 2), s.run_file('b', 2))
    assert loaded(s, 'a') == [0, 1, 2] and loaded(s, 'b') == [0, 1]
    assert "b/000002.npz: arm is 'a', expected 'b'" in capsys.readouterr().err


def test_run_file_renamed_to_another_run_is_refused(tmp_path, capsys):
    s = toy_store(tmp_path, 2)
    os.replace(s.run_file('with', 1), os.path.join(s.path, 'with', '000005.npz'))
    assert loaded(s) == [0]
    assert '000005.npz: run is 1, expected 5' in capsys.readouterr().err


def test_a_name_that_is_not_six_digits_is_not_a_second_copy_of_a_run(tmp_path, capsys):
    s = toy_store(tmp_path, 6)
    shutil.copy(s.run_file('with', 5), os.path.join(s.path, 'with', '0000005.npz'))
    assert loaded(s) == [0, 1, 2, 3, 4, 5]
    assert '0000005.npz: not a run file name' in capsys.readouterr().err
    assert s.counts(10)['with'] == 6


def test_a_store_of_another_trainer_is_refused_in_one_line_naming_both(tmp_path):
    toy_store(tmp_path, 1)
    settings = dict(trainer='other', hyp={'momentum': 0.9, 'width': 4}, held_out=TOY_HELD, n_train=40,
                    data_fingerprint='toy', seed_base=0)
    with pytest.raises(StoreError) as e:
        Store.create(tmp_path, settings, np.arange(40) % 10)
    message = str(e.value)
    assert "trainer 'toy', not 'other'" in message and '--out' in message
    assert 'momentum' not in message and '\n' not in message  # not every hyperparameter of the other trainer
    assert len(Store(tmp_path).stored('with')) == 1


def test_every_run_file_foreign_means_settings_changed_and_nothing_is_moved(tmp_path):
    toy_store(tmp_path / 'a', 3)
    toy_store(tmp_path / 'b', 1, hyp={'lr': 2.0})
    shutil.copy(tmp_path / 'b' / 'settings.json', tmp_path / 'a' / 'settings.json')  # whole, checksums and all
    with pytest.raises(StoreError, match=r'every run file of .*with \(3\) was made with other settings .*Nothing was'):
        Store(tmp_path / 'a').load('with')
    assert moved(tmp_path / 'a') == [] and len(os.listdir(tmp_path / 'a' / 'with')) == 3


def test_run_file_replaced_after_packing_is_read_again(tmp_path):
    s = toy_store(tmp_path, 3)
    loaded(s)
    new = np.full((40, 10), 3.0, np.float16)
    os.remove(s.run_file('with', 1))  # a redone run: its file moved away, then the same name, new content
    s.save_run('with', 1, 1, new, 1.0, 0.5)
    logits, _ = Store(tmp_path).load('with')
    assert np.array_equal(logits[1], new)


def test_run_file_rewritten_in_place_with_its_mtime_put_back_is_read_again(tmp_path):
    s = toy_store(tmp_path / 'a', 3)
    loaded(s)
    toy_store(tmp_path / 'b', 3, rng_seed=1)  # same settings, other logits: run files of the same size
    path = tmp_path / 'a' / 'with' / '000001.npz'
    st = os.stat(path)
    other = (tmp_path / 'b' / 'with' / '000001.npz').read_bytes()
    assert len(other) == st.st_size
    with open(path, 'r+b') as f:  # same inode, same size
        f.write(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    logits, _ = Store(tmp_path / 'a').load('with')
    assert np.array_equal(logits[1], Store(tmp_path / 'b').read_run('with', 1)['logits'])


@pytest.mark.parametrize('removed', [1, 2])  # a middle run (values would shift) and the last (an IndexError)
def test_a_run_file_removed_while_a_report_reads_changes_nothing_it_reads(tmp_path, removed):
    s = toy_store(tmp_path, 3)
    logits, run_info = s.load('with')
    before = np.array(logits)
    os.remove(tmp_path / 'with' / f'{removed:06d}.npz')
    again, info = s.load('with')  # the same Store: the same snapshot, for the margins read later
    assert list(info['run']) == [0, 1, 2] and list(info['seed']) == list(run_info['seed'])
    assert np.array_equal(again, before)
    assert loaded(Store(tmp_path)) == [r for r in (0, 1, 2) if r != removed]  # opened again: the change seen


def test_zeros_written_into_the_pack_are_noticed_and_the_pack_rebuilt(tmp_path):
    s = toy_store(tmp_path, 3)
    before = np.array(s.load('with')[0])
    with open(tmp_path / 'packed' / 'with.npy', 'r+b') as f:
        f.seek(store_module.HEADER_BYTES)
        f.write(bytes(3 * 40 * 20))
    logits, _ = Store(tmp_path).load('with')
    assert np.array_equal(logits, before) and np.abs(before).sum() > 0


def test_a_byte_of_the_pack_flipped_with_its_mtime_put_back_is_noticed_and_the_pack_rebuilt(tmp_path):
    s = toy_store(tmp_path, 3)
    before = np.array(s.load('with')[0])
    assert np.array_equal(Store(tmp_path).load('with')[0], before)  # a second reader maps the same pack
    path = tmp_path / 'packed' / 'with.npy'
    st = os.stat(path)
    with open(path, 'r+b') as f:  # the sign bit of the first logit: same inode, size and mtime
        f.seek(store_module.HEADER_BYTES + 1)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x80]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    logits, _ = Store(tmp_path).load('with')
    assert np.array_equal(logits, before)


@pytest.mark.parametrize('index', ['{}', '[]', 'garbage', '{"run": [0, 1, 2], "seed": [0], "binding": 1}'])
def test_a_damaged_pack_index_means_a_rebuild_not_a_traceback(tmp_path, index):
    s = toy_store(tmp_path, 3)
    loaded(s)
    (tmp_path / 'packed' / 'with.json').write_text(index)
    assert loaded(Store(tmp_path)) == [0, 1, 2]


def test_pack_of_other_rows_than_its_index_says_is_rebuilt(tmp_path):
    s = toy_store(tmp_path, 3)
    loaded(s, 'with'), loaded(s, 'without')
    shutil.copy(tmp_path / 'packed' / 'without.npy', tmp_path / 'packed' / 'with.npy')  # same shape, other data
    assert loaded(Store(tmp_path)) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------
# A store that explains itself
# ---------------------------------------------------------------------------------------------------

def edit_settings(path, **changes):
    settings_file = os.path.join(path, 'settings.json')
    with open(settings_file) as f:
        settings = json.load(f)
    settings.update(changes)
    with open(settings_file, 'w') as f:
        json.dump(settings, f)


@pytest.mark.parametrize('key, value', [('n_train', 41), ('seed_base', 5), ('hyp', {'lr': 9.0}),
                                        ('held_out', {'random': [0, 1], 'easy': [30, 32]})])
def test_hand_edited_setting_is_refused_by_name_and_nothing_is_moved(tmp_path, key, value):
    toy_store(tmp_path, 3)
    edit_settings(tmp_path, **{key: value})
    with pytest.raises(StoreError, match=f"'{key}' \\(now .*no longer matches the value the store was created with"):
        Store(tmp_path)
    assert moved(tmp_path) == [] and len(os.listdir(tmp_path / 'with')) == 3


@pytest.mark.parametrize('key, value, message', [
    ('arms', ['with', 'maybe'], "'arms' is"),
    ('held_out', {'random': [0, 400]}, "'held_out' is"),
    ('held_out', {'random': [0, 0]}, 'each example once'),
    ('n_train', 'many', "'n_train' is"),
    ('seed_base', -1, "'seed_base' is"),
    ('format', 1, "'format' is 1"),
])
def test_malformed_settings_are_refused_naming_the_key(tmp_path, key, value, message):
    toy_store(tmp_path, 1)
    edit_settings(tmp_path, **{key: value})
    with pytest.raises(StoreError, match=message):
        Store(tmp_path)


@pytest.mark.parametrize('text', ['[1, 2]', '{"trainer": "toy"', '"a string"'])
def test_settings_that_are_not_an_object_are_refused(tmp_path, text):
    toy_store(tmp_path, 1)
    (tmp_path / 'settings.json').write_text(text)
    with pytest.raises(StoreError, match='settings.json'):
        Store(tmp_path)


def test_truncated_or_shuffled_labels_are_refused(tmp_path):
    toy_store(tmp_path, 1)
    labels_file = tmp_path / 'labels.npy'
    good = labels_file.read_bytes()
    labels_file.write_bytes(good[:len(good) // 2])
    with pytest.raises(StoreError, match='labels.npy is truncated or corrupt'):
        Store(tmp_path)
    np.save(labels_file, np.random.default_rng(0).permutation(np.arange(40) % 10))
    with pytest.raises(StoreError, match='does not hold the labels the store was created with'):
        Store(tmp_path)


def test_garbage_records_in_failed_are_moved_aside_and_a_stray_file_is_named_and_left_alone(tmp_path, capsys):
    s = toy_store(tmp_path, 2)
    s.save_failure('with', 7, 7, 'diverged')
    (tmp_path / 'failed' / 'with-000008.json').write_text('{not json')
    (tmp_path / 'failed' / 'notes.txt').write_text('hello')
    shutil.copy(tmp_path / 'failed' / 'with-000007.json', tmp_path / 'failed' / 'with-000009.json')
    assert list(s.failed()) == [('with', 7)]
    err = capsys.readouterr().err
    assert 'with-000008.json: not a JSON object' in err and 'notes.txt: not a failure record' in err
    assert 'with-000009.json: run is 7, expected 9' in err
    assert sorted(os.listdir(tmp_path / 'failed')) == ['notes.txt', 'with-000007.json'] and len(moved(tmp_path)) == 2


def test_missing_subfolders_are_recreated_and_a_bad_run_is_still_moved_aside(tmp_path, capsys):
    s = toy_store(tmp_path, 3)
    for sub in store_module.SUBFOLDERS:
        shutil.rmtree(tmp_path / sub)
    with open(s.run_file('with', 2), 'r+b') as f:
        f.truncate(100)
    s = Store(tmp_path)
    assert loaded(s) == [0, 1] and s.failed() == {} and s.in_progress() == 0
    assert len(moved(tmp_path)) == 1 and 'corrupt or truncated' in capsys.readouterr().err
    assert s.claim('with', 2)


def refuse(path_part, err, funcs=('open',), read=False):
    """Patch the given file functions to fail with `err` (an errno) on paths containing path_part:
    for open, reads fail if read=True, else writes."""
    real = {f: getattr(builtins if f == 'open' else os, f) for f in funcs}

    def wrap(name):
        def wrapper(*args, **kwargs):
            paths = [a for a in args[:2] if isinstance(a, (str, os.PathLike))]
            hit = any(path_part in str(p) for p in paths)
            if name == 'open' and hit:
                mode = args[1] if len(args) > 1 else kwargs.get('mode', 'r')
                hit = ('r' in mode and '+' not in mode) == read
            if hit:
                raise OSError(err, os.strerror(err), str(paths[0]))
            return real[name](*args, **kwargs)
        return wrapper
    return {f: wrap(f) for f in funcs}


def patch(monkeypatch, wrappers):
    for name, fn in wrappers.items():
        monkeypatch.setattr(builtins if name == 'open' else os, name, fn)


@pytest.mark.parametrize('err', [errno.EACCES, errno.EIO])
def test_a_run_file_that_cannot_be_read_is_an_error_not_corrupt(tmp_path, monkeypatch, err):
    s = toy_store(tmp_path, 3)
    patch(monkeypatch, refuse('with/000001.npz', err, read=True))
    with pytest.raises(store_module.Unreadable, match=f'cannot read .*000001.npz .*{os.strerror(err)}.*not moved'):
        s.load('with')
    monkeypatch.undo()
    assert moved(tmp_path) == [] and loaded(s) == [0, 1, 2]


def test_packing_on_a_full_disk_stops_cleanly_and_analyses_from_the_run_files(tmp_path, monkeypatch, capsys):
    s = toy_store(tmp_path, 3)
    real_open = builtins.open

    class Full:
        """A file on a disk that fills up after the header."""
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > store_module.HEADER_BYTES:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if 'packed' in str(path) and 'x' in mode else f
    monkeypatch.setattr(builtins, 'open', full_open)
    monkeypatch.setattr(np, 'memmap', _no_writable_map(np.memmap))
    assert loaded(s) == [0, 1, 2]
    assert 'No space left on device' in capsys.readouterr().err
    assert os.listdir(tmp_path / 'packed') == []  # no temporary file left


def _no_writable_map(memmap):
    """np.memmap (or open_memmap) that refuses to map for writing: a page written through a mapping on a
    full disk is a SIGBUS."""
    names_of_args = ('dtype', 'mode') if memmap is np.memmap else ('mode',)

    def only_read(filename, *args, **kwargs):
        names = names_of_args
        mode = dict(zip(names, args)).get('mode', kwargs.get('mode', 'r+'))
        assert mode == 'r', f'a writable mapping ({mode})'
        return memmap(filename, *args, **kwargs)
    return only_read


def test_the_pack_is_never_written_through_a_mapping(tmp_path, monkeypatch):
    s = toy_store(tmp_path, 3)
    monkeypatch.setattr(np, 'memmap', _no_writable_map(np.memmap))
    monkeypatch.setattr(np.lib.format, 'open_memmap', _no_writable_map(np.lib.format.open_memmap))
    assert loaded(s) == [0, 1, 2]
    s.save_run('with', 3, 3, np.zeros((40, 10), np.float16), 1.0, 0.5)
    assert loaded(s) == [0, 1, 2, 3]


def test_a_store_viz_cannot_write_to_is_analysed_from_its_run_files_with_a_note(tmp_path, monkeypatch, capsys):
    s = toy_store(tmp_path, 3)
    loaded(s)
    s.save_run('with', 3, 3, np.zeros((40, 10), np.float16), 1.0, 0.5)  # the pack is stale now
    patch(monkeypatch, refuse(str(tmp_path), errno.EROFS, ('open', 'link', 'replace', 'rename', 'remove', 'mkdir')))
    logits, run_info = Store(tmp_path).load('with')
    assert list(run_info['run']) == [0, 1, 2, 3] and not np.asarray(logits[3]).any()
    err = capsys.readouterr().err
    assert 'Read-only file system' in err and 'directly' in err and 'Free disk space' not in err


def test_a_trainer_on_a_store_it_cannot_write_to_says_so(tmp_path, monkeypatch, capsys):
    fake_store(tmp_path)
    patch(monkeypatch, refuse(str(tmp_path), errno.EROFS, ('open', 'link', 'replace', 'rename', 'remove', 'mkdir')))
    import experiment
    code = experiment.main(store_worker, ['--smoke', '--runs', '2', '--out', str(tmp_path), '--device', 'cpu'])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 2 and len(errors) == 1 and 'could not claim a run' in errors[0] and 'not writable' in errors[0]


def test_a_full_disk_when_a_claim_is_written_stops_the_trainer_with_a_message(tmp_path, monkeypatch, capsys):
    fake_store(tmp_path)
    patch(monkeypatch, refuse(os.path.join(str(tmp_path), 'claims'), errno.ENOSPC))
    import experiment
    code = experiment.main(store_worker, ['--smoke', '--runs', '2', '--out', str(tmp_path), '--device', 'cpu'])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert code == 2 and len(errors) == 1 and 'No space left on device' in errors[0] and 'disk is full' in errors[0]


def test_notes_about_the_store_go_to_stderr_and_stdout_is_the_report(tmp_path, capsys):
    s = toy_store(tmp_path, 4)
    with open(s.run_file('without', 3), 'r+b') as f:
        f.truncate(50)
    viz.main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert 'corrupt or truncated' in err and 'corrupt' not in out and 'store:' not in out
    assert out.startswith('Answer') and '\n\nShowing examples' in out  # the answer, then the seed's table


def test_the_store_module_imports_without_torch_and_viz_does_not_import_it():
    without = "import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import store"
    subprocess.run([sys.executable, '-c', without, ROOT], check=True)
    viz_only = "import sys; sys.path.insert(0, sys.argv[1]); import viz; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, '-c', viz_only, ROOT], check=True)


def _child_of(pid):
    """The pid (in this namespace) of the only child of process `pid`."""
    deadline = time.time() + 60
    while time.time() < deadline:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            children = f.read().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError(f'process {pid} started no child')


def test_a_worker_stopped_past_the_claim_timeout_discards_its_result_and_the_run_is_stored_once(tmp_path):
    """A worker in another pid namespace stopped (SIGSTOP: a suspended job, a paused machine) in its
    first training, longer than the claim timeout; its claim goes silent, a second worker takes the run
    over and stores it. On SIGCONT the first finds its claim gone, discards its result with one line,
    and stores nothing."""
    if subprocess.run(['unshare', '--pid', '--fork', '--mount-proc', 'true'], capture_output=True).returncode:
        pytest.skip('unshare --pid needs CAP_SYS_ADMIN')
    out, paused = tmp_path / 'store', tmp_path / 'paused'
    fake_store(out)
    cmd = [sys.executable, WORKER, 'train', str(out), '1']
    first = subprocess.Popen(['unshare', '--pid', '--fork', '--mount-proc', '--kill-child', *cmd],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, 'PAUSE_IN_TRAIN': str(paused)})
    try:
        deadline = time.time() + 120
        while not paused.exists():
            assert time.time() < deadline and first.poll() is None, finish([first])
            time.sleep(0.05)
        worker = _child_of(first.pid)
        os.kill(worker, signal.SIGSTOP)  # from this (the parent) namespace even its pid 1 stops
        (tmp_path / 'paused.go').touch()  # seen once it runs again
        old = time.time() - store_module.CLAIM_TIMEOUT - 1
        os.utime(out / 'claims' / 'with-000000', (old, old))  # stopped for longer than the timeout
        [(code, stdout, err)] = finish([start('train', out, 1)])
        assert code == 0 and sorted(trainings(stdout)) == [('with', 0), ('without', 0)], err[-2000:]
        stored = os.stat(Store(out).run_file('with', 0)).st_ino
        os.kill(worker, signal.SIGCONT)
        [(code, stdout, err)] = finish([first])
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 0 and trainings(stdout) == [], err[-2000:]
    said = "store: with run 0: this worker's claim was taken over while it was stopped or slow; its result is discarded"
    assert [said in line for line in err.splitlines() if 'taken over' in line] == [True]
    assert os.stat(Store(out).run_file('with', 0)).st_ino == stored  # stored once, by the second worker
    assert_exactly(out, 1)
    assert leftovers(out) == []
