"""The experiment harness: arms, pairing, the store, killed and parallel workers (CPU, --smoke scale)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import airbench
import design
import experiment
import trainer_airbench
import trainer_digits
import workers
from store import Store, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD = {'random': list(range(20)), 'easy': list(range(900, 920))}


@pytest.fixture(scope='module')
def held_out_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('held') / 'held_out.json'
    path.write_text(json.dumps(HELD))
    return str(path)


def argv(cifar_dir, held_out_file, out, runs, *more):
    return ['--smoke', '--runs', str(runs), '--out', str(out), '--data-dir', cifar_dir,
            '--held-out', held_out_file, '--device', 'cpu', *more]


def airbench_with(**changes):
    """trainer_airbench as a trainer module, with some of its names changed."""
    return types.SimpleNamespace(**{**vars(trainer_airbench), **changes})


def run_main(cifar_dir, held_out_file, out, runs, *more, hyp=None, smoke=None):
    trainer = airbench_with(hyp=hyp or trainer_airbench.hyp, SMOKE=smoke or trainer_airbench.SMOKE)
    return experiment.main(trainer, argv(cifar_dir, held_out_file, out, runs, *more))


def test_without_arm_never_sees_a_held_out_example_and_takes_as_many_steps(cifar_dir, held_out_file, tmp_path,
                                                                          monkeypatch):
    seen = []  # every Loader made, with the batch and whitening indices it gave out
    real_batches, real_first = airbench.Loader.batches, airbench.Loader.first_kept

    def batches(self):
        for b in real_batches(self):
            self.seen_idx.append(b[0])
            yield b

    def first_kept(self, n):
        self.seen_idx, self.whiten_idx = [], self.kept.nonzero()[:n, 0]
        seen.append(self)
        return real_first(self, n)
    monkeypatch.setattr(airbench.Loader, 'batches', batches)
    monkeypatch.setattr(airbench.Loader, 'first_kept', first_kept)
    assert run_main(cifar_dir, held_out_file, tmp_path, 2) == 0

    held = np.array(HELD['random'] + HELD['easy'])
    withs = [ld for ld in seen if ld.kept.all()]
    withouts = [ld for ld in seen if not ld.kept.all()]
    assert len(withs) == len(withouts) == 2
    for ld in withouts:
        assert not np.isin(torch.cat(ld.seen_idx).numpy(), held).any()
        assert not np.isin(ld.whiten_idx.numpy(), held).any()
        assert (~ld.kept).sum() == len(held)
    for a, b in zip(withs, withouts):
        assert len(a.seen_idx) == len(b.seen_idx) > 0  # same number of optimizer steps
        assert np.isin(torch.cat(a.seen_idx).numpy(), held).any()  # the with arm does see them


def test_paired_runs_share_their_seed_and_a_run_is_reproducible(cifar_dir, held_out_file, tmp_path):
    assert run_main(cifar_dir, held_out_file, tmp_path / 'a', 2) == 0
    assert run_main(cifar_dir, held_out_file, tmp_path / 'b', 2, '--seed-base', '0') == 0
    a, b = Store(tmp_path / 'a'), Store(tmp_path / 'b')
    for run in range(2):
        ra, rb = a.read_run('with', run), a.read_run('without', run)
        assert ra['seed'] == rb['seed'] == design.seed_for(run)
        assert np.array_equal(ra['logits'], b.read_run('with', run)['logits'])  # bit-identical rerun
    la, run_info = a.load('with')
    assert list(run_info['seed']) == [0, 1] and not np.array_equal(la[0], la[1])


def spawn_digits(out, runs):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'trainer_digits.py'), '--smoke', '--runs', str(runs),
                             '--out', str(out), '--device', 'cpu'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_killed_worker_loses_no_run_and_rerun_ends_with_exactly_n(tmp_path):
    out = tmp_path / 'store'
    proc = spawn_digits(out, 60)  # 120 runs: a block of 100, then one of 20
    deadline, in_progress = time.time() + 300, False
    while not in_progress and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # kill while a block is in progress, after a block finished
        in_progress = (out / 'with').is_dir() and len(os.listdir(out / 'with')) >= 1 and \
            (out / 'claims').is_dir() and len(os.listdir(out / 'claims')) >= 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert in_progress, 'the worker never reached a run in progress after a finished one: nothing was tested'
    store = Store(out)
    for arm in experiment.ARMS:
        for run in store.stored(arm):
            store.read_run(arm, run)  # every file that exists is a complete run
    assert sum(len(store.stored(a)) for a in experiment.ARMS) < 120

    again = spawn_digits(out, 60)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert store.stored('with') == store.stored('without') == list(range(60))
    assert os.listdir(out / 'claims') == []
    assert not [n for a in experiment.ARMS for n in os.listdir(out / a) if not n.endswith('.npz')]  # no leftovers


def test_folder_made_with_other_settings_is_refused(cifar_dir, held_out_file, tmp_path, capsys):
    assert run_main(cifar_dir, held_out_file, tmp_path, 1) == 0
    before = sorted(os.listdir(tmp_path / 'with'))
    assert run_main(cifar_dir, held_out_file, tmp_path, 2, '--seed-base', '7') == 2
    err = capsys.readouterr().err
    assert 'holds runs made with other settings' in err and 'seed_base: store has 0, this command has 7' in err
    other = {**trainer_airbench.hyp, 'lr': 6.0}
    assert run_main(cifar_dir, held_out_file, tmp_path, 2, hyp=other) == 2
    assert 'hyp' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / 'with')) == before  # nothing lost, nothing added


def test_corrupt_or_foreign_run_file_is_reported_left_out_and_redone(cifar_dir, held_out_file, tmp_path, capsys):
    assert run_main(cifar_dir, held_out_file, tmp_path / 'a', 3) == 0
    assert run_main(cifar_dir, held_out_file, tmp_path / 'b', 1, '--seed-base', '5') == 0
    store = Store(tmp_path / 'a')
    path = store.run_file('with', 1)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    os.replace(Store(tmp_path / 'b').run_file('with', 0), store.run_file('with', 2))  # a foreign file
    capsys.readouterr()
    logits, run_info = store.load('with')
    out, err = capsys.readouterr()
    assert '000002.npz' not in out  # stdout is for the runs and the report
    assert '000001.npz: corrupt or truncated' in err and '000002.npz: binding is' in err and 'another store' in err
    assert list(run_info['run']) == [0] and logits.shape[0] == 1
    assert len(os.listdir(tmp_path / 'a' / 'corrupt')) == 2  # moved aside, not deleted
    assert run_main(cifar_dir, held_out_file, tmp_path / 'a', 3) == 0
    assert list(Store(tmp_path / 'a').load('with')[1]['run']) == [0, 1, 2]  # a Store object is one snapshot


def test_diverged_run_is_recorded_as_failed_not_stored(cifar_dir, held_out_file, tmp_path, capsys):
    # 6 steps: enough for the lookahead to pull the diverged weights in
    assert run_main(cifar_dir, held_out_file, tmp_path, 1, hyp={**trainer_airbench.hyp, 'lr': 1e30},
                    smoke={**trainer_airbench.SMOKE, 'epochs': 6}) == 0
    store = Store(tmp_path)
    assert store.stored('with') == store.stored('without') == []
    failed = store.failed()
    assert set(failed) == {('with', 0), ('without', 0)} and failed['with', 0]['seed'] == 0
    assert 'FAILED' in capsys.readouterr().out
    assert store.load('with')[0].shape == (0, store.settings['n_train'], 10)


def test_packed_arrays_hold_exactly_the_stored_runs(cifar_dir, held_out_file, tmp_path):
    assert run_main(cifar_dir, held_out_file, tmp_path, 2) == 0
    store = Store(tmp_path)
    logits, run_info = store.load('without')
    assert isinstance(logits, np.memmap) and logits.dtype == np.float16
    assert logits.shape == (2, 1000, 10)
    for i, run in enumerate(run_info['run']):
        assert np.array_equal(logits[i], store.read_run('without', run)['logits'])
    assert run_main(cifar_dir, held_out_file, tmp_path, 3) == 0  # extending: the pack follows
    store = Store(tmp_path)  # a Store object is one snapshot: a new one sees the runs added
    logits, run_info = store.load('without')
    assert logits.shape == (3, 1000, 10) and np.array_equal(logits[2], store.read_run('without', 2)['logits'])
    assert all(0 <= a <= 1 for a in run_info['test_acc']) and all(s > 0 for s in run_info['seconds'])


def test_store_rejects_missing_folder_with_a_clear_message(tmp_path):
    with pytest.raises(StoreError, match='no run store at'):
        Store(tmp_path / 'nothing')


def test_held_out_indices_outside_the_data_are_refused(cifar_dir, tmp_path, capsys):
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'random': [0], 'easy': [45114]}))
    assert run_main(cifar_dir, str(bad), tmp_path / 'out', 1) == 2
    assert '45114' in capsys.readouterr().err


def test_full_disk_reports_and_keeps_stored_runs(cifar_dir, held_out_file, tmp_path, monkeypatch, capsys):
    assert run_main(cifar_dir, held_out_file, tmp_path, 1) == 0
    real_savez = np.savez

    def full(f, **kw):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(np, 'savez', full)
    assert run_main(cifar_dir, held_out_file, tmp_path, 2) == 2
    assert 'No space left on device' in capsys.readouterr().err
    monkeypatch.setattr(np, 'savez', real_savez)
    store = Store(tmp_path)
    assert store.stored('with') == [0] and os.listdir(tmp_path / 'claims') == []
    assert not [n for n in os.listdir(tmp_path / 'with') if '.tmp-' in n]


def test_scan_masks_are_reproducible_halves_and_disjoint_from_the_experiment_seeds():
    n, runs = 500, 200
    seeds = [design.seed_for(r, experiment.SCAN_SEED_BASE) for r in range(runs)]
    masks = np.zeros((runs, n), bool)
    for k, seed in enumerate(seeds):
        keep = design.keep_for('scan', seed, n, HELD)
        assert len(keep) == n // 2 and np.array_equal(keep, design.keep_for('scan', seed, n, HELD))
        masks[k, keep] = True
    counts = masks.sum(0)  # Binomial(200, 1/2) per example: sd about 7
    assert abs(counts.mean() - runs / 2) < 1 and counts.min() > 60 and counts.max() < 140
    assert not set(seeds) & {design.seed_for(r) for r in range(100_000)}


def test_blocks_of_runs_store_the_same_runs_as_one_at_a_time(cifar_dir, held_out_file, tmp_path):
    def train_block(images, labels, *, keep, seed, device, **hyp):
        return [trainer_airbench.train(images, labels, keep=k, seed=s, device=device, **hyp)
                for k, s in zip(keep, seed)]

    def infer_block(nets, images):
        return torch.stack([trainer_airbench.infer(net, images) for net in nets])

    assert run_main(cifar_dir, held_out_file, tmp_path / 'one', 2) == 0
    assert experiment.main(airbench_with(train=train_block, infer=infer_block, BLOCK=3, BLOCKS=False),
                           argv(cifar_dir, held_out_file, tmp_path / 'block', 2)) == 0
    one, block = Store(tmp_path / 'one'), Store(tmp_path / 'block')
    for arm in experiment.ARMS:
        assert block.stored(arm) == [0, 1]
        for run in (0, 1):
            assert np.array_equal(one.read_run(arm, run)['logits'], block.read_run(arm, run)['logits'])


def test_the_real_airbench_trainer_in_blocks_of_four_stores_the_runs_it_stores_one_at_a_time(
        cifar_dir, held_out_file, tmp_path):
    """--block 4 through the command line: a block mixes both arms (runs 0 and 1 of `with` and `without`),
    and each stored run is the run --block 1 stores with the same seed. The fused net's grouped
    convolutions and masked BatchNorm round differently from the single net's, and the difference grows
    over the smoke run's steps; stored as float16, logits agree to a few thousandths of their scale."""
    assert run_main(cifar_dir, held_out_file, tmp_path / 'one', 2) == 0
    assert run_main(cifar_dir, held_out_file, tmp_path / 'block', 2, '--block', '4') == 0
    one, block = Store(tmp_path / 'one'), Store(tmp_path / 'block')
    for arm in experiment.ARMS:
        assert block.stored(arm) == [0, 1]
        for run in (0, 1):
            a, b = one.read_run(arm, run), block.read_run(arm, run)
            assert a['seed'] == b['seed']
            scale = np.abs(a['logits'].astype(np.float32)).max()
            assert np.abs(a['logits'].astype(np.float32) - b['logits'].astype(np.float32)).max() < 5e-3 * scale
    assert not np.allclose(one.read_run('with', 0)['logits'], one.read_run('with', 1)['logits'])


def test_scan_store_trains_each_run_on_its_own_half(cifar_dir, held_out_file, tmp_path, monkeypatch):
    kept = []
    real_first = airbench.Loader.first_kept

    def first_kept(self, n):
        kept.append(self.kept.nonzero()[:, 0].numpy())
        return real_first(self, n)
    monkeypatch.setattr(airbench.Loader, 'first_kept', first_kept)
    assert run_main(cifar_dir, held_out_file, tmp_path, 2, '--scan') == 0
    store = Store(tmp_path)
    assert store.arms == ('scan',) and store.settings['seed_base'] == experiment.SCAN_SEED_BASE
    logits, run_info = store.load('scan')
    assert logits.shape == (2, 1000, 10)
    for k, seed in enumerate(run_info['seed']):
        assert np.array_equal(kept[k], design.keep_for('scan', int(seed), 1000, HELD))


def test_hyp_override_reaches_training_and_names_the_default_store(cifar_dir, held_out_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ['--smoke', '--runs', '1', '--data-dir', cifar_dir, '--held-out', held_out_file, '--device', 'cpu',
            '--hyp', 'lr=6.5', '--hyp', 'flip=none']
    assert experiment.main(trainer_airbench, args) == 0
    store = Store(tmp_path / 'runs' / 'airbench-smoke-lr=6.5-flip=none')
    assert store.settings['hyp']['lr'] == 6.5 and store.settings['hyp']['flip'] == 'none'
    assert experiment.main(trainer_airbench, ['--hyp', 'learning_rate=3']) == 2


def test_scan_run_trained_on_another_half_than_its_seed_draws_is_left_out(tmp_path, monkeypatch, capsys):
    settings = dict(trainer='t', hyp={}, held_out=HELD, n_train=1000, data_fingerprint='f',
                    seed_base=experiment.SCAN_SEED_BASE, arms=['scan'])
    store = Store.create(tmp_path, settings, np.zeros(1000, np.int64))
    for run in range(2):
        store.save_run('scan', run, design.seed_for(run, experiment.SCAN_SEED_BASE),
                       np.zeros((1000, 10), np.float16), 1.0, 0.5)
    assert list(store.load('scan')[1]['run']) == [0, 1]
    real_keep_for = design.keep_for
    monkeypatch.setattr(design, 'keep_for', lambda arm, seed, n, held: real_keep_for(arm, seed + 1, n, held))
    (tmp_path / 'packed' / 'scan.json').unlink()  # force a repack that reads the run files again
    logits, run_info = Store(tmp_path).load('scan')  # a new snapshot
    assert len(run_info['run']) == 0 and 'trained on other examples' in capsys.readouterr().err


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signalled_worker_gives_its_runs_back_at_once_and_names_them(tmp_path, signum):
    out = tmp_path / 'store'
    proc = spawn_digits(out, 60)  # 120 runs: a block of 100, then one of 20
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (out / 'settings.json').exists() and Store(out).in_progress() > 0):
        time.sleep(0.05)
    proc.send_signal(signum)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signum, output
    said = [line for line in output.splitlines() if line.startswith('stopped by')]
    assert said and 'Traceback' not in output, output
    store = Store(out)
    assert store.in_progress() == 0 and os.listdir(out / 'claims') == []  # nothing waits for a timeout
    named = {arm: parts for arm, parts in re.findall(r'(with|without) runs? ([\d, -]+)', said[0])}
    for arm in experiment.ARMS:  # the line names exactly the runs of its block that are not stored
        runs = [r for part in named[arm].split(', ') for r in _span(part)]
        assert runs and sorted(runs + store.stored(arm)) in (list(range(50)), list(range(60)))


def _span(text):
    first, _, last = text.partition('-')
    return list(range(int(first), int(last or first) + 1))


def test_a_second_signal_ends_the_worker_at_once_and_a_repeat_of_the_first_is_one(monkeypatch):
    exits, now = [], [100.0]
    monkeypatch.setattr(workers.os, '_exit', exits.append)
    monkeypatch.setattr(workers.time, 'monotonic', lambda: now[0])
    signals = workers._Signals()
    signals.handle(signal.SIGTERM, None)  # while storing: noted, acted on at the next check
    now[0] += workers.SAME_SIGNAL_S / 2
    signals.handle(signal.SIGTERM, None)  # the same request again (Slurm signals every process of the job)
    assert exits == []
    with pytest.raises(workers.Stopped):
        signals.check()
    now[0] += workers.SAME_SIGNAL_S
    signals.handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]

    signals = workers._Signals()
    signals.abandonable = True  # while training: stopped at once
    with pytest.raises(workers.Stopped):
        signals.handle(signal.SIGTERM, None)


def test_a_log_has_a_line_per_run_and_progress_lines_but_no_bar_frames(tmp_path):
    env = {**os.environ, 'EXPERIMENT_PROGRESS_S': '0'}  # a progress line after every block
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'trainer_digits.py'), '--smoke', '--runs', '60',
                           '--out', str(tmp_path), '--device', 'cpu'], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '\r' not in done.stdout + done.stderr
    assert len(re.findall(r'^(?:with|without) +run +\d+ +seed', done.stdout, re.M)) == 120
    progress = re.findall(r'^\d\d:\d\d:\d\d  (\d+)/120 runs \(\d+%\), [\d,]+ runs/h', done.stderr, re.M)
    assert progress == ['100', '120']  # blocks of 100 and 20


def test_a_progress_line_comes_at_most_once_per_interval(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(workers.time, 'monotonic', lambda: now[0])
    monkeypatch.setattr(workers, 'on_terminal', lambda: False)
    shown = workers.Progress(total=400, done=100, every=60)
    for done in (150, 200, 250):
        now[0] += 25
        shown.update(done)
    lines = capsys.readouterr().err.splitlines()  # one line, at 50 s then 75 s: the one at 75 s
    assert len(lines) == 1 and lines[0].endswith('250/400 runs (62%), 7,200 runs/h, ETA 1 min')


def test_a_multi_gpu_parent_passes_a_signal_on_to_its_workers(tmp_path):
    worker = tmp_path / 'worker.py'  # stands for a trainer's --worker: says it is up, then what it got
    worker.write_text('import os, signal, sys, time\n'
                      'def stop(signum, frame):\n'
                      '    open(os.path.join(sys.argv[1], f"got-{os.getpid()}"), "w").write(str(signum))\n'
                      '    sys.exit(128 + signum)\n'
                      'signal.signal(signal.SIGTERM, stop)\n'
                      'open(os.path.join(sys.argv[1], f"up-{os.getpid()}"), "w").close()\n'
                      'time.sleep(60)\n')
    parent = subprocess.Popen([sys.executable, '-c', 'import sys, workers; sys.argv = sys.argv[1:]; '
                               'sys.exit(workers.launch(["cuda:0", "cuda:1"], sys.argv[1] + "/store", 5))', str(worker),
                               str(tmp_path)], cwd=ROOT)
    deadline = time.time() + 60
    while len([n for n in os.listdir(tmp_path) if n.startswith('up-')]) < 2 and time.time() < deadline:
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    got = [(tmp_path / n).read_text() for n in os.listdir(tmp_path) if n.startswith('got-')]
    assert got == [str(int(signal.SIGTERM))] * 2


def test_a_run_given_back_by_another_worker_is_redone_by_a_worker_already_past_it(tmp_path):
    labels = torch.arange(40) % 10
    settings = dict(trainer='toy', hyp={}, held_out={'random': [0, 1]}, n_train=40, data_fingerprint='toy',
                    seed_base=0, arms=list(experiment.ARMS))
    store = Store.create(tmp_path, settings, labels.numpy())
    other = Store(tmp_path)
    assert other.claim('with', 0)  # another worker's run in progress: this worker's first pass skips it

    def train(images, labels, keep, seed, device):
        other.release('with', 0)  # ... and the other worker, stopped, gives it back meanwhile
        return None

    def infer(net, images):
        return torch.zeros(len(images), 10)
    images = torch.zeros(40, 1)
    workers.work(store, 2, train, infer, {}, (images, labels), (images[:10], labels[:10]), torch.device('cpu'))
    assert store.stored('with') == store.stored('without') == [0, 1]


def test_a_smaller_runs_says_what_else_the_store_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    common = ['--smoke', '--device', 'cpu', '--out', str(tmp_path / 'store')]
    assert experiment.main(trainer_digits, [*common, '--runs', '3']) == 0
    capsys.readouterr()
    assert experiment.main(trainer_digits, [*common, '--runs', '2']) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert '2/2 runs with' in last and 'holds 2 run(s) beyond --runs 2' in last, last


def test_the_summary_says_how_many_runs_other_workers_still_hold():
    class Held:  # 16 of 80 stored, the other 64 claimed by live workers elsewhere
        path, arms = 'S', ['with', 'without']
        def counts(self, runs): return {'with': 8, 'without': 8}
        def failed(self): return []
        def in_progress(self): return 64
        def stored(self, arm): return list(range(8))
    line = workers.summary(Held(), 40, [])
    assert '8/40 runs with' in line and '64 more held by other live workers' in line, line


def test_one_run_per_arm_says_that_viz_will_need_two(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    args = ['--smoke', '--device', 'cpu', '--out', str(tmp_path / 'store'), '--runs', '1']
    assert experiment.main(trainer_digits, args) == 0
    assert 'viz needs at least 2 runs per arm' in capsys.readouterr().err


def test_a_full_disk_at_store_creation_says_the_disk_is_full(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)

    def short_write(f, array):  # numpy's message on a full disk: an OSError without errno
        raise OSError(f'{array.nbytes} requested and 1008 written')
    monkeypatch.setattr(np, 'save', short_write)
    monkeypatch.setattr(os, 'statvfs', lambda path: types.SimpleNamespace(f_bavail=0))
    code = experiment.main(trainer_digits, ['--smoke', '--runs', '2', '--device', 'cpu', '--out',
                                            str(tmp_path / 'store')])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith('error: ') and 'The disk is full' in err[-1], err
    assert 'stored runs' not in err[-1].lower()  # the store being made holds none
    assert os.listdir(tmp_path) == []  # none of the folders this command made is left behind


def test_a_net_too_large_for_the_memory_is_one_line_naming_the_cause(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    code = experiment.main(trainer_digits, ['--smoke', '--runs', '2', '--device', 'cpu', '--out', str(tmp_path / 'store'),
                                            '--hyp', 'widths=[10000000000000]'])  # 10 PB of weights: refused at once
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert code == 2 and len(err) == 1, err
    assert 'not enough memory on cpu' in err[0] and 'widths=[10000000000000]' in err[0] and 'batch_size' in err[0]
    assert os.listdir(tmp_path) == []


def test_a_rerun_that_cannot_find_the_data_names_the_folder_the_store_was_made_from(
        cifar_dir, held_out_file, tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils

    def offline(url, root, filename):
        raise OSError('Network is unreachable')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', offline)
    made_from = str(tmp_path / 'cifar')
    shutil.copytree(cifar_dir, made_from)
    assert run_main(made_from, held_out_file, tmp_path / 'store', 2) == 0
    assert Store(tmp_path / 'store').settings['data_dir'] == made_from
    os.rename(made_from, tmp_path / 'moved')  # the data moved since
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # a rerun from elsewhere, without --data-dir: ./data does not exist
    args = [a for a in argv(made_from, held_out_file, tmp_path / 'store', 4) if a not in ('--data-dir', made_from)]
    assert experiment.main(airbench_with(), args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert len(err) == 1 and f'was made from the data in {made_from}: pass --data-dir' in err[0]


def test_a_rerun_without_data_dir_reads_the_folder_the_store_was_made_from(cifar_dir, held_out_file, tmp_path,
                                                                         monkeypatch):
    import torchvision.datasets.utils

    def offline(url, root, filename):
        raise AssertionError('a download was tried')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', offline)
    assert run_main(cifar_dir, held_out_file, tmp_path / 'store', 2) == 0
    monkeypatch.chdir(tmp_path)  # elsewhere, and without --data-dir
    args = [a for a in argv(cifar_dir, held_out_file, tmp_path / 'store', 3) if a not in ('--data-dir', cifar_dir)]
    assert experiment.main(airbench_with(), args) == 0
    assert Store(tmp_path / 'store').stored('with') == [0, 1, 2] and sorted(os.listdir(tmp_path)) == ['store']


def test_a_run_that_fails_before_any_result_leaves_no_store_folder_a_store_with_runs_stays(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    args = ['--smoke', '--device', 'cpu', '--runs', '2']
    new = tmp_path / 'new'

    def broken(*a, **k):  # a fault of the trainer, e.g. an op torch refuses: not a diverged run
        raise RuntimeError('planted fault')
    digits = types.SimpleNamespace(**{**vars(trainer_digits), 'train': broken})
    with pytest.raises(RuntimeError, match='planted fault'):
        experiment.main(digits, [*args, '--out', str(new)])
    assert not new.exists() and f'removed {new}' in capsys.readouterr().err

    kept = tmp_path / 'kept'
    assert experiment.main(trainer_digits, [*args, '--out', str(kept)]) == 0
    with pytest.raises(RuntimeError, match='planted fault'):
        experiment.main(digits, ['--smoke', '--device', 'cpu', '--runs', '4', '--out', str(kept)])
    assert Store(kept).stored('with') == [0, 1] and 'removed' not in capsys.readouterr().err
