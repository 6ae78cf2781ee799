"""First contact: a full-size run on a CPU says what it will cost before it starts, long runs move the
progress bar within the run, and slurm.sbatch starts on a fresh clone."""
import io
import os
import re
import shutil
import stat
import subprocess

import pytest
import torch
from tqdm import tqdm

import experiment
import trainer_airbench
import trainer_digits
import workers
from store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_full_size_run_on_a_cpu_says_its_cost_and_the_two_pointers_then_goes_on(cifar_dir, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(workers, 'COST_STEPS', 2)  # a tiny step budget: two full-width steps timed
    monkeypatch.setattr(Store, 'claim', lambda self, arm, run: False)  # then "go on" without training 2000 runs
    monkeypatch.setattr(trainer_airbench, 'HELD_OUT', {'random': list(range(20)), 'easy': list(range(900, 920))},
                        raising=False)  # the generated data hold 1000 images
    code = experiment.main(trainer_airbench, ['--runs', '1000', '--out', str(tmp_path), '--data-dir', cifar_dir,
                                              '--device', 'cpu'])
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith('note: on this CPU')]
    assert code == 0 and len(notes) == 1, err
    minutes = re.search(r'a full-size run takes about (\d+(?:\.\d+)?) min \((\d+) steps at ', notes[0])
    assert minutes and float(minutes[1]) > 0 and int(minutes[2]) == 10  # ceil(9.9 x 1000 // 512) steps
    assert re.search(r'the 2000 runs to do take about [\d,]+ (min|h)', notes[0])
    assert '--smoke' in notes[0] and 'python trainer_digits.py' in notes[0] and 'Going on' in notes[0]
    assert f'{tmp_path}: 0/1000 runs with' in out  # it went on (and found nothing it could claim)


def test_cheap_runs_on_a_cpu_start_without_a_cost_note(tmp_path, capsys):
    code = experiment.main(trainer_digits, ['--runs', '1', '--out', str(tmp_path), '--device', 'cpu'])
    assert code == 0 and 'note: on this CPU' not in capsys.readouterr().err  # full size, but seconds per run


def test_the_cost_of_a_run_is_extrapolated_from_the_timed_steps(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(workers.time, 'perf_counter', lambda: clock[0])

    def train(images, labels, *, keep, seed, device, **hyp):  # 5 s of set-up, then 2 s per step
        clock[0] += 5
        w = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([w], lr=0.1)
        for _ in range(100):
            clock[0] += 2
            w.sum().backward()
            optimizer.step()
    images = torch.zeros(10, 1)
    per_block = workers.cost_of_runs(train, images, images, {'batch_size': 30}, 'cpu', 1, steps=50,
                                        n_infer=90, left=20)
    assert per_block == pytest.approx(5 + 50 * 2 + 2 / 3 * 90 / 30)  # set-up, steps, inference as forwards
    assert 'about 1.8 min (50 steps at 2.00 s' in capsys.readouterr().err  # 107 s


def test_the_bar_moves_within_a_long_run_step_by_step(capsys):
    bar = tqdm(total=4, file=io.StringIO())
    w = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    handle = workers._move_bar_per_step(bar, share=2, steps=4)  # a block of 2 runs, 4 steps each
    seen = []
    for _ in range(5):
        w.sum().backward()
        optimizer.step()
        seen.append(round(bar.n, 3))
    handle.remove()
    optimizer.step()
    assert seen == [0.5, 1.0, 1.5, 1.98, 1.98] and bar.n == pytest.approx(1.98)  # never past the block


def test_a_long_run_moves_the_bar_within_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, 'LONG_RUN_S', 0.0)  # every block counts as long, once one has been timed
    monkeypatch.setattr(workers, 'on_terminal', lambda: True)  # the bar is shown on a terminal only
    seen, real = [], workers._move_bar_per_step

    def watched(bar, share, steps):  # record the bar after every step of the blocks that move it
        handles = [real(bar, share, steps), workers._on_every_step(lambda: seen.append(bar.n))]
        return type('Handles', (), {'remove': lambda self: [h.remove() for h in handles]})()
    monkeypatch.setattr(workers, '_move_bar_per_step', watched)
    monkeypatch.setattr(trainer_digits, 'BLOCK', 2)
    code = experiment.main(trainer_digits, ['--smoke', '--runs', '2', '--out', str(tmp_path), '--device', 'cpu'])
    assert code == 0
    steps = trainer_digits.SMOKE['epochs'] * (1437 // trainer_digits.hyp['batch_size'])
    # the second block, step by step (the first had no time to go by)
    assert len(seen) == steps and all(2 < n < 4 for n in seen) and seen == sorted(seen)


def test_slurm_script_starts_on_a_fresh_clone(tmp_path):
    clone, stub = tmp_path / 'clone', tmp_path / 'bin'
    clone.mkdir()
    stub.mkdir()
    shutil.copy(os.path.join(ROOT, 'slurm.sbatch'), clone)
    (stub / 'python').write_text('#!/bin/sh\necho "$PWD" "$@" > "$STUB_LOG"\n')  # the trainer, replaced
    (stub / 'python').chmod(stat.S_IRWXU)
    env = {**os.environ, 'PATH': f'{stub}:{os.environ["PATH"]}', 'STUB_LOG': str(tmp_path / 'called'),
           'SLURM_SUBMIT_DIR': str(clone), 'SLURM_JOB_NAME': 'self-influence', 'SLURM_ARRAY_JOB_ID': '812',
           'SLURM_ARRAY_TASK_ID': '3', 'SLURM_JOB_ID': '815'}
    subprocess.run(['bash', str(clone / 'slurm.sbatch')], cwd=tmp_path, env=env, check=True)
    called = (tmp_path / 'called').read_text().split()
    assert called[0] == str(clone) and called[1] == 'trainer_airbench.py' and '--runs' in called

    script = (clone / 'slurm.sbatch').read_text()
    options = dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', script, re.M))
    log = options['output'].replace('%x', env['SLURM_JOB_NAME']).replace('%A', '812').replace('%a', '3')
    assert os.path.isdir(os.path.dirname(os.path.join(clone, log)))  # where Slurm opens the log, before the script runs
    h, m, s = map(int, options['time'].split(':'))
    first, last = map(int, options['array'].split('-'))
    runs = 2 * int(re.search(r'--runs (\d+)', script)[1])
    assert h * 3600 + m * 60 + s >= runs * 4.2 / (last - first + 1)  # the measured 4.2 s per run on one H200


def test_every_trainer_command_in_the_readme_and_docs_parses(tmp_path, monkeypatch):
    """A newcomer copies commands from the README and docs/: each `python trainer_X.py ...` names a trainer
    that exists and options it accepts, with values that pass the checks made before anything is written."""
    import shlex
    import types
    import command_line
    monkeypatch.chdir(tmp_path)
    command = re.compile(r'(?:^|`)(?:OMP_NUM_THREADS=1 )?python (trainer_\w+\.py(?: [^`|&#\n\\]*)?)', re.M)
    commands = []
    for page in ['README.md', *(os.path.join('docs', n) for n in sorted(os.listdir(os.path.join(ROOT, 'docs'))))]:
        with open(os.path.join(ROOT, page)) as f:
            commands += [(page, m[1]) for m in command.finditer(f.read())]
    assert len(commands) > 10
    for page, text in commands:
        script, *args = shlex.split(text.strip())
        if script == 'trainer_resnet18.py':  # the worked example, run by tests/test_trainer_example.py
            continue
        module = __import__(script[:-3])
        t = experiment.read_trainer(module)
        try:
            parsed = command_line.parse_args(t.NAME, t.doc, args, t.RUNS, t.hyp, t.SMOKE, t.DATA_DIR, t.BLOCKS)
            parsed = types.SimpleNamespace(**{**vars(parsed), 'gpus': None, 'device': None})  # this machine's aside
            command_line.check_command(parsed, t.hyp, t.SMOKE, t.make_hyp, blocks=t.BLOCKS, block=t.BLOCK)
        except command_line.UsageError as e:
            pytest.fail(f'{page}: python {text}: {e}')
    assert os.listdir(tmp_path) == []
