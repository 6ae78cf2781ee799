"""Blocks of runs trained at once (--block, trainers with BLOCKS), the precision a store binds (--precision)
and several workers per GPU (--workers-per-gpu): the harness's side, with a trainer that does not learn
(tests/block_trainer.py), on the CPU."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

import block_trainer
import design
import experiment
import workers
from store import Store, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tests', 'block_trainer.py')


def run_main(out, runs, *more):
    return experiment.main(block_trainer, ['--smoke', '--runs', str(runs), '--out', str(out), '--device', 'cpu', *more])


def calls(log):
    """The train calls block_trainer logged, in order."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def expected_logits(store, arm, run):
    seed = design.seed_for(run, store.settings['seed_base'])
    keep = design.keep_for(arm, seed, block_trainer.N_TRAIN, store.settings['held_out'])
    return block_trainer.logits(seed, block_trainer.N_TRAIN if keep is None else len(keep), block_trainer.N_TRAIN)


@pytest.mark.parametrize('design_args', [[], ['--design', 'factorial'], ['--scan']], ids=['with-without', 'factorial',
                                                                                        'scan'])
def test_each_run_of_a_block_is_stored_with_its_own_seed_and_keep(design_args, tmp_path, monkeypatch):
    log = tmp_path / 'log'
    monkeypatch.setenv('BLOCK_LOG', str(log))
    assert run_main(tmp_path / 'store', 5, '--block', '4', *design_args) == 0
    store = Store(tmp_path / 'store')
    for arm in store.arms:
        assert store.stored(arm) == list(range(5))
        for run in range(5):
            record = store.read_run(arm, run)
            assert torch.equal(torch.from_numpy(record['logits']), expected_logits(store, arm, run).half())
            assert json.loads(str(record['meta']))['block'] in (1, 2, 4)  # a short last block
    blocks = calls(log)
    assert all(c['listed'] for c in blocks) and max(len(c['seeds']) for c in blocks) == 4
    trained = Counter(s for c in blocks for s in c['seeds'])
    assert sum(trained.values()) == 5 * len(store.arms)  # every run once
    if store.arms != ('scan',):
        first = blocks[0]['seeds']
        assert first == [0, 0, 1, 1]  # both arms in one block: equal steps under batching 'paired'


def test_under_rebatch_a_block_holds_only_runs_of_equal_steps(tmp_path, monkeypatch):
    log = tmp_path / 'log'
    monkeypatch.setenv('BLOCK_LOG', str(log))
    assert run_main(tmp_path / 'store', 3, '--block', '4', '--hyp', 'batching=rebatch') == 0
    blocks = calls(log)
    # 64 examples in batches of 8: with trains 8 steps, without (60 kept) 7; three runs each
    assert [(c['kept'], c['steps']) for c in blocks] == [([64] * 3, [8] * 3), ([60] * 3, [7] * 3)]
    assert experiment.run_steps(block_trainer, {**block_trainer.hyp, 'batching': 'rebatch'}, 64, 60) == 7
    assert experiment.run_steps(block_trainer, block_trainer.hyp, 64, 60) == 8  # paired: as many as with


def test_block_one_passes_scalars_and_is_the_default_on_a_cpu(tmp_path, monkeypatch):
    log = tmp_path / 'log'
    monkeypatch.setenv('BLOCK_LOG', str(log))
    assert run_main(tmp_path / 'default', 2) == 0
    assert run_main(tmp_path / 'one', 2, '--block', '1') == 0
    assert [c['listed'] for c in calls(log)] == [False] * 8
    a, b = Store(tmp_path / 'default'), Store(tmp_path / 'one')
    for arm in a.arms:
        for run in range(2):
            assert (a.read_run(arm, run)['logits'] == b.read_run(arm, run)['logits']).all()
            assert json.loads(str(a.read_run(arm, run)['meta']))['block'] == 1


def test_one_diverged_model_of_a_block_fails_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('DIVERGE_SEED', '1')
    assert run_main(tmp_path, 2, '--block', '4') == 0
    store = Store(tmp_path)
    assert set(store.failed()) == {('with', 1), ('without', 1)}
    assert store.stored('with') == store.stored('without') == [0]
    assert capsys.readouterr().out.count('FAILED: non-finite logits') == 2


def test_a_block_whose_trainer_raises_diverged_fails_every_run_of_it(tmp_path, monkeypatch):
    monkeypatch.setenv('DIVERGE_ALL', '1')
    assert run_main(tmp_path, 2, '--block', '3') == 0
    store = Store(tmp_path)
    assert set(store.failed()) == {(a, r) for a in store.arms for r in range(2)}
    assert store.stored('with') == store.stored('without') == []
    assert {rec['block'] for rec in store.failed().values()} == {3, 1}  # a block of 3, then the last run alone


def test_a_block_stopped_by_sigterm_gives_back_every_claim_and_the_rerun_completes(tmp_path):
    out, paused, log = tmp_path / 'store', tmp_path / 'paused', tmp_path / 'log'
    command = [sys.executable, SCRIPT, '--smoke', '--runs', '4', '--block', '4', '--out', str(out), '--device', 'cpu']
    env = {**os.environ, 'BLOCK_LOG': str(log), 'PAUSE_AT': f'{paused}:2'}  # in the second block
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not paused.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert paused.exists(), proc.communicate()[0]
    assert len(os.listdir(out / 'claims')) == 4  # the block's four runs are claimed while it trains
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert 'gave back 4 run(s) in progress' in output and '(with runs 2-3; without runs 2-3)' in output, output
    store = Store(out)
    assert os.listdir(out / 'claims') == [] and store.stored('with') == store.stored('without') == [0, 1]

    again = subprocess.run(command, env={**os.environ, 'BLOCK_LOG': str(log)}, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert store.stored('with') == store.stored('without') == [0, 1, 2, 3] and os.listdir(out / 'claims') == []
    assert [c['seeds'] for c in calls(log)] == [[0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_three_workers_of_a_launch_on_one_store_train_every_run_once(tmp_path):
    out, met = tmp_path / 'store', tmp_path / 'met'
    met.mkdir()
    argv = [SCRIPT, '--smoke', '--runs', '12', '--block', '2', '--out', str(out)]
    env = {**os.environ, 'RENDEZVOUS': f'{met}:3', 'TRAIN_S': '0.05', 'BLOCK_LOG': str(tmp_path / 'log')}
    done = subprocess.run([sys.executable, '-c', 'import sys, workers; sys.argv = sys.argv[1:]; '
                           f'sys.exit(workers.launch(["cpu"] * 3, {str(out)!r}, 12))', *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    lines = re.findall(r'^(with|without) +run +(\d+) +seed', done.stdout, re.M)
    assert sorted(Counter(lines).values()) == [1] * 24, done.stdout  # each of 2 x 12 runs once
    assert len({c['pid'] for c in calls(tmp_path / 'log')}) == 3  # all three worked
    store = Store(out)
    assert store.stored('with') == store.stored('without') == list(range(12)) and os.listdir(out / 'claims') == []


def test_workers_per_gpu_starts_that_many_workers_on_each_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    started = []

    class Worker:  # stands for a worker process that ends at once
        def __init__(self, command):
            started.append(command)

        def poll(self):
            return 0

        def wait(self):
            return 0
    monkeypatch.setattr(workers.subprocess, 'Popen', Worker)
    monkeypatch.setattr(sys, 'argv', [SCRIPT, '--workers-per-gpu', '3'])
    assert experiment.main(block_trainer, ['--workers-per-gpu', '3', '--out', str(tmp_path / 's')]) == 0
    assert [c[-3:] for c in started] == [['--worker', '--device', f'cuda:{g}'] for g in (0, 0, 0, 1, 1, 1)]
    assert all(c[:2] == [sys.executable, SCRIPT] for c in started)
    started.clear()
    assert experiment.main(block_trainer, ['--workers-per-gpu', '2', '--device', 'cuda:1']) == 0
    assert [c[-1] for c in started] == ['cuda:1', 'cuda:1']  # one GPU, shared by two workers
    started.clear()
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert experiment.main(block_trainer, ['--workers-per-gpu', '2']) == 0
    assert [c[-1] for c in started] == ['cuda:0', 'cuda:0']


def test_one_gpu_named_by_gpus_is_the_one_its_worker_trains_on(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    got = []
    monkeypatch.setattr(experiment, 'work', lambda store, runs, train, infer, hyp, data, test, device, **kw:
                        got.append((device, hyp['precision'], kw['block'])))
    assert experiment.main(block_trainer, ['--gpus', '1', '--out', str(tmp_path)]) == 0
    assert got == [(torch.device('cuda', 1), 'float16', 'auto')]  # CUDA: float16 and --block auto by default
    assert Store(tmp_path).settings['hyp']['precision'] == 'float16'


def test_auto_precision_is_resolved_for_the_device_and_binds_the_store(tmp_path, monkeypatch, capsys):
    cpu, cuda = torch.device('cpu'), torch.device('cuda', 0)
    assert [experiment.resolve_precision(p, cpu) for p in ('auto', 'float32', 'float16')] == \
        ['float32', 'float32', 'float16']
    assert [experiment.resolve_precision(p, cuda) for p in ('auto', 'float32', 'float16')] == \
        ['float16', 'float32', 'float16']
    log = tmp_path / 'log'
    monkeypatch.setenv('BLOCK_LOG', str(log))
    assert run_main(tmp_path / 'cpu', 1) == 0  # auto on the CPU
    assert Store(tmp_path / 'cpu').settings['hyp']['precision'] == 'float32'
    assert {c['precision'] for c in calls(log)} == {'float32'}
    assert run_main(tmp_path / 'cpu', 2, '--precision', 'float16') == 2
    err = capsys.readouterr().err
    assert 'hyp.precision: store has "float32", this command has "float16"' in err, err
    assert Store(tmp_path / 'cpu').stored('with') == [0]  # nothing added

    monkeypatch.chdir(tmp_path)  # float16 made here, as a CUDA worker would: a default worker on the CPU is refused
    assert experiment.main(block_trainer, ['--smoke', '--runs', '1', '--device', 'cpu', '--precision',
                                           'float16']) == 0
    made = Store(tmp_path / 'runs' / 'blocks-smoke-precision=float16')  # an explicit precision names the default --out
    assert made.settings['hyp']['precision'] == 'float16' and calls(log)[-1]['precision'] == 'float16'
    capsys.readouterr()
    assert run_main(made.path, 1) == 2
    assert 'hyp.precision: store has "float16", this command has "float32"' in capsys.readouterr().err


BAD = [
    (['--block', '0'], '--block 0: expected auto or a number of models to train at once (an integer >= 1)'),
    (['--block', '2.5'], '--block 2.5: expected auto or a number'),
    (['--block', 'fast'], '--block fast: expected auto or a number'),
    (['--precision', 'float64'], "argument --precision: invalid choice: 'float64'"),
    (['--precision', 'float16', '--hyp', 'precision=float32'],
     '--precision float16 and --hyp precision=float32: the same setting twice'),
    (['--hyp', 'precision=half'], '--hyp precision=half: expected one of auto, float32, float16'),
    (['--workers-per-gpu', '0'], '--workers-per-gpu 0: expected an integer >= 1'),
    (['--workers-per-gpu', 'two'], "argument --workers-per-gpu: invalid int value: 'two'"),
    (['--workers-per-gpu', '2'], '--workers-per-gpu 2: no CUDA device is visible here'),
    (['--workers-per-gpu', '2', '--device', 'cpu'], '--workers-per-gpu 2: with --device cpu there is no GPU'),
]


@pytest.mark.parametrize('args, message', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_block_precision_or_workers_is_refused_in_one_line_and_writes_nothing(args, message, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    monkeypatch.chdir(tmp_path)
    assert experiment.main(block_trainer, ['--runs', '1', *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_block_and_precision_are_offered_only_by_trainers_that_have_them(capsys):
    import trainer_digits
    assert experiment.main(trainer_digits, ['--block', '4']) == 2
    assert ('--block 4: this trainer trains a fixed block of 100 models at once (its BLOCK); --block is for '
            'trainers that set BLOCKS = True') in capsys.readouterr().err
    assert experiment.main(trainer_digits, ['--precision', 'float16']) == 2
    assert "--precision float16: this trainer has no 'precision' hyperparameter" in capsys.readouterr().err
    for module, offered in ((trainer_digits, False), (block_trainer, True)):
        with pytest.raises(SystemExit):
            experiment.main(module, ['--help'])
        shown = capsys.readouterr().out
        assert ('--block K|auto' in shown) == offered and ('--precision' in shown) == offered


def fake_timed_train(per_step):
    """A trainer whose step at block size k takes per_step[k] seconds ('oom': out of memory there)."""
    def train(images, labels, *, keep, seed, device, **hyp):
        k = len(seed) if isinstance(seed, list) else 1
        if per_step[k] == 'oom':
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        p = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([p], lr=0.1)
        for _ in range(20):
            time.sleep(per_step[k])
            p.grad = torch.zeros(1)
            optimizer.step()
    return train


def test_auto_block_keeps_the_fastest_per_model_until_memory_runs_out_or_time_stops_improving(capsys):
    images, labels, cpu = torch.zeros(8, 1), torch.zeros(8, dtype=torch.int64), torch.device('cpu')
    # per model-step: 20, 12, 8 ms, then out of memory at 8 models
    train = fake_timed_train({1: 0.020, 2: 0.024, 4: 0.032, 8: 'oom'})
    assert workers.choose_block(train, images, labels, {}, cpu) == 4
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(r'block auto: 4 models at once \(ms per model-step over 5 steps: K=1 [\d.]+, K=2 [\d.]+, '
                        r'K=4 [\d.]+; stopped: K=8 ran out of memory\)', line), line
    # per model-step: 20, 12, then 20 ms: 4 is no faster than 2
    assert workers.choose_block(fake_timed_train({1: 0.020, 2: 0.024, 4: 0.080}), images, labels, {}, cpu) == 2
    assert 'stopped: K=4 no faster per model' in capsys.readouterr().err
    assert workers.choose_block(train, images, labels, {}, cpu, largest=2) == 2  # no more runs to do than 2


def test_auto_block_on_a_cpu_store_says_its_choice_and_fills_the_store(tmp_path, capsys):
    assert run_main(tmp_path, 3, '--block', 'auto') == 0
    assert re.search(r'^block auto: \d+ models at once', capsys.readouterr().err, re.M)
    assert Store(tmp_path).stored('with') == Store(tmp_path).stored('without') == [0, 1, 2]


def test_a_full_disk_at_a_blocks_second_claim_gives_the_first_back_and_removes_the_new_store(tmp_path, monkeypatch,
                                                                                            capsys):
    claim, calls = Store.claim, []

    def full_at_the_second(self, arm, run):
        calls.append((arm, run))
        if len(calls) == 2:
            raise StoreError(f'could not claim a run: could not write {self.path}/claims/{arm}-{run:06d} '
                             '(No space left on device). The disk is full: free space and rerun the same command.')
        return claim(self, arm, run)
    monkeypatch.setattr(Store, 'claim', full_at_the_second)
    assert run_main(tmp_path / 'new', 2, '--block', '2') == 2
    assert not os.path.exists(tmp_path / 'new')  # the first claim was given back, so the new store was unused
    assert 'No space left on device' in capsys.readouterr().err
    run_main(tmp_path / 'old', 1)  # a store that exists: it stays, with no claim left in it
    calls.clear()
    assert run_main(tmp_path / 'old', 2, '--block', '2') == 2
    assert os.listdir(tmp_path / 'old' / 'claims') == [] and Store(tmp_path / 'old').stored('with') == [0]
