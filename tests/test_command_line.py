"""Bad command lines are refused before anything is written: exit code 2, one line on stderr naming the
bad value and what is expected, and nothing created on disk (no store, no runs/ folder)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import command_line
import experiment
import trainer_airbench
import trainer_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """Files the command lines point to, in a folder of their own."""
    folder = tmp_path_factory.mktemp('inputs')
    files = {'duplicates': {'random': [1, 2, 2], 'easy': [5]}, 'across': {'random': [1, 2], 'easy': [2]},
             'booleans': {'random': [True, 1]}, 'empty group': {'random': [0], 'easy': []},
             'negative': {'random': [-3]}, 'outside': {'random': [0], 'easy': [45114]}, 'a list': [1, 2]}
    for name, content in files.items():
        (folder / f'{name}.json').write_text(json.dumps(content))
    (folder / 'not json.json').write_text('{"random": [0,')
    (folder / 'a file').write_text('not a folder')
    os.mkfifo(folder / 'fifo')  # no writer ever opens it: reading it would wait for ever
    return folder


BAD = [
    (['--runs', '0'], '--runs 0: expected a number of runs per arm from 1'),
    (['--runs', '-1'], '--runs -1: expected'),
    (['--runs', 'abc'], "invalid int value: 'abc'"),
    (['--runs', '1000001'], '--runs 1000001'),
    (['--hyp', 'norm=foo'], "norm='foo', expected 'batch'"),
    (['--hyp', 'lr=abc'], "--hyp lr=abc: 'abc' is not a finite number >= 0"),
    (['--hyp', 'lr=-0.1'], '--hyp lr=-0.1: expected a finite number >= 0'),
    (['--hyp', 'lr=NaN'], '--hyp lr=NaN: expected a finite number >= 0'),
    (['--hyp', 'batch_size=0'], '--hyp batch_size=0: expected an integer >= 1'),
    (['--hyp', 'batch_size=12.5'], '--hyp batch_size=12.5: expected an integer'),
    (['--hyp', 'batch_size=5000'], 'a run would take 0 optimizer steps'),
    (['--hyp', 'widths=7'], '--hyp widths=7: expected a non-empty JSON list'),
    (['--hyp', 'widths=[64, 0]'], '--hyp widths=[64, 0]: expected a JSON list of items, each an integer >= 1'),
    (['--hyp', 'epochs=-1'], '--hyp epochs=-1: expected an integer >= 0'),
    (['--hyp', 'epochs=0'], 'a run would take 0 optimizer steps'),
    (['--hyp', 'nesterov=1'], '--hyp nesterov=1: expected true or false'),
    (['--hyp', 'momentum=0.0'], '--hyp momentum=0.0: momentum=0.0: Nesterov momentum needs a number in (0, 1)'),
    (['--hyp', 'momentum=1.0'], 'momentum=1.0: expected a number in [0, 1)'),
    (['--hyp', 'label_smoothing=1.5'], 'label_smoothing=1.5: expected a number in [0, 1)'),
    (['--hyp', 'bn_momentum=2.0'], 'bn_momentum=2.0: expected a number in [0, 1]'),
    (['--hyp', 'schedule=[[0.0,0.1,0.2]]'], 'expected [[fraction, multiplier], ...] pairs'),
    (['--hyp', 'schedule=[[0.5,1.0],[0.2,0.0]]'], 'fractions rising within [0, 1]'),
    (['--hyp', 'schedule=[[0.0,-1.0]]'], 'each a finite number >= 0'),
    (['--hyp', 'learning_rate=3'], '--hyp learning_rate=3: expected KEY=VALUE with KEY one of'),
    (['--hyp', 'lr'], '--hyp lr: expected KEY=VALUE'),
    (['--hyp', 'lr=1', '--hyp', 'lr=2'], '--hyp lr= given twice'),
    (['--seed-base', '-5'], '--seed-base -5: expected an integer from 0'),
    (['--gpus', 'abc'], '--gpus abc: expected comma-separated GPU indices'),
    (['--gpus', '0,0'], '--gpus 0,0: expected distinct GPU indices'),
    (['--gpus', '0,1'], '--gpus 0,1: no CUDA device is visible here'),
    (['--device', 'foo'], '--device foo: expected cpu, cuda or cuda:N'),
    (['--device', 'cuda'], '--device cuda: no CUDA device is visible here'),
    (['--device', 'cpu', '--gpus', '0'], '--gpus 0 with --device cpu'),
    (['--out', '{inputs}/a file'], 'a file: that is a file; expected a store folder'),
    (['--held-out', '{inputs}/duplicates.json'], '[2] listed more than once'),
    (['--held-out', '{inputs}/across.json'], '[2] listed more than once'),
    (['--held-out', '{inputs}/booleans.json'], "group 'random' holds [true], expected example indices"),
    (['--held-out', '{inputs}/negative.json'], "group 'random' holds [-3], expected example indices"),
    (['--held-out', '{inputs}/empty group.json'], "group 'easy' is [], expected a non-empty list"),
    (['--held-out', '{inputs}/a list.json'], 'expected a JSON object of groups'),
    (['--held-out', '{inputs}/not json.json'], 'not valid JSON'),
    (['--held-out', '{inputs}/missing.json'], 'missing.json: No such file or directory'),
    (['--held-out', '{inputs}/outside.json'], 'indices [45114] are outside the 1437 training examples'),
    (['--held-out', '{inputs}/fifo'], 'fifo: that is a FIFO, not a regular file'),
    (['--held-out', '/dev/zero'], '/dev/zero: that is a device, not a regular file'),
    (['--held-out', '{inputs}'], 'that is a folder, not a regular file'),
    (['--scan', '--design', 'factorial'], '--scan and --design factorial are two designs'),
    (['--design', 'mixed'], "invalid choice: 'mixed'"),
]


@pytest.mark.parametrize('args, message', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_command_line_is_refused_in_one_line_and_writes_nothing(args, message, inputs, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    monkeypatch.chdir(tmp_path)
    args = [a.format(inputs=inputs) for a in args]
    before = sorted(os.listdir(inputs))
    code = experiment.main(trainer_digits, ['--smoke', '--runs', '2', *args] if '--runs' not in args else
                           ['--smoke', *args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], err
    assert out == '' and os.listdir(tmp_path) == [] and sorted(os.listdir(inputs)) == before


def test_hyp_values_keep_the_type_of_the_default():
    hyp = {'lr': 0.2, 'epochs': 15, 'widths': [256, 256], 'sizes': (1, 2, 3), 'norm': 'batch', 'flag': True,
           'schedule': [[0.0, 0.1], [1.0, 0.0]], 'shift': -1.0}
    got = command_line.parse_hyp(['lr=1', 'epochs=3', 'widths=[8]', 'sizes=[4, 5, 6]', 'norm=layer', 'flag=false',
                                'schedule=[[0, 1], [0.5, 0.2]]', 'shift=-3'], hyp)
    assert got == {'lr': 1, 'epochs': 3, 'widths': [8], 'sizes': (4, 5, 6), 'norm': 'layer', 'flag': False,
                   'schedule': [[0, 1], [0.5, 0.2]], 'shift': -3}
    assert command_line.parse_hyp(['epochs=0.5'], hyp, smoke={'epochs': 0.1}) == {'epochs': 0.5}  # fractional in --smoke
    for bad in ('sizes=[1, 2]', 'schedule=[1, 2]', 'flag=yes', 'epochs=true'):
        with pytest.raises(command_line.UsageError, match=bad.split('=')[0]):
            command_line.parse_hyp([bad], hyp)


TRAINERS = ['trainer_airbench', 'trainer_madry', 'trainer_digits', 'trainer_digits_conv']


@pytest.mark.parametrize('name', TRAINERS)
def test_each_trainers_help_says_what_that_trainer_does(name):
    """--smoke's help lists that trainer's SMOKE values, --hyp's example key is one of its hyperparameters,
    and --data-dir is offered only by the trainers that read CIFAR-10 from a folder."""
    module = __import__(name)
    result = subprocess.run([sys.executable, f'{name}.py', '--help'], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, 'COLUMNS': '1000'})  # one line per option
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip().startswith('--')}
    for key, value in module.SMOKE.items():
        assert f'{key}={json.dumps(value)} (default {json.dumps(module.hyp[key])})' in lines['--smoke']
    example = re.search(r'e\.g\. --hyp (\w+)=(\S+);', lines['--hyp'])
    assert example and example[1] in module.hyp
    command_line.parse_hyp([f'{example[1]}={example[2]}'], module.hyp)  # a value the trainer accepts
    assert ('--data-dir' in lines) == (name in ('trainer_airbench', 'trainer_madry'))


@pytest.mark.parametrize('name', TRAINERS)
def test_each_trainers_help_is_one_screen_of_options_and_two_examples(name):
    """At 80 columns: a one-line usage, two example commands, one line pointing to docs/trainers.md, and
    every option once, its help on its own line but for --smoke and --hyp, which list the trainer's values."""
    result = subprocess.run([sys.executable, f'{name}.py', '--help'], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, 'COLUMNS': '80'})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 32 and max(map(len, lines)) <= 120 and lines[0] == f'usage: python {name}.py [options]'
    assert sum(line.startswith(f'    python {name}.py ') for line in lines) == 2
    assert sum('docs/trainers.md' in line for line in lines) == 1
    cifar = name in ('trainer_airbench', 'trainer_madry')
    options = ['--runs', '--out', '--device', '--gpus', '--workers-per-gpu', '--smoke', '--scan', '--design',
               '--seed-base', '--held-out', '--hyp'] + (['--data-dir', '--block', '--precision'] if cifar else [])
    starts = [line.lstrip().split()[0] if line.startswith('  -') else None for line in lines] + [None]
    for option in options:
        assert starts.count(option) == 1, option
        after = lines[starts.index(option) + 1] if starts.index(option) + 1 < len(lines) else ''
        assert option in ('--smoke', '--hyp') or not after.startswith(' ' * 20), f'{option} wraps: {after}'


@pytest.mark.parametrize('name', ['trainer_digits', 'trainer_digits_conv', 'trainer_madry', 'airbench'])
def test_every_recipe_refuses_values_that_would_crash_its_run(name):
    module = __import__(name)
    for bad in [dict(momentum=1.0), dict(momentum=-0.1), dict(label_smoothing=1.0), dict(label_smoothing=-0.2)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            module.make_hyp(**bad)
    if 'bn_momentum' in module.hyp:  # the weight of the new batch in BatchNorm's running statistics
        for bad in (2.0, -0.1, float('nan')):
            with pytest.raises(ValueError, match=r'bn_momentum=.*expected a number in \[0, 1\]'):
                module.make_hyp(bn_momentum=bad)
        assert [module.make_hyp(bn_momentum=v)['bn_momentum'] for v in (0.0, 1.0)] == [0.0, 1.0]
    nesterov = name != 'trainer_madry'
    if nesterov:
        with pytest.raises(ValueError, match='Nesterov momentum needs'):
            module.make_hyp(momentum=0.0)
    else:
        assert module.make_hyp(momentum=0.0)['momentum'] == 0.0  # heavy ball without momentum: plain SGD


def test_a_held_out_file_over_the_size_bound_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    path = tmp_path / 'big.json'
    path.write_text(json.dumps({'random': list(range(1000))}))
    monkeypatch.setattr(command_line, 'MAX_HELD_OUT_BYTES', 100)
    with pytest.raises(command_line.UsageError, match='big.json: over 100 bytes'):
        command_line.read_held_out(str(path))


def test_plain_sgd_is_accepted_where_nesterov_is_a_choice():
    assert trainer_digits.make_hyp(momentum=0.0, nesterov=False)['momentum'] == 0.0


def test_madry_refuses_a_peak_after_the_last_epoch_before_writing(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'trainer_madry.py'), '--hyp', 'epochs=4',
                             '--device', 'cpu'], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and 'lr_peak_epoch=5 must lie in [0, epochs=4)' in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []


def test_a_trainer_module_missing_or_mistyping_a_name_is_refused_naming_it():
    import types
    with pytest.raises(TypeError, match='defines no infer: a trainer module defines NAME, hyp, train and infer'):
        experiment.main(types.SimpleNamespace(NAME='x', hyp={}, train=print), [])
    broken = types.SimpleNamespace(NAME='x', hyp={'lr': 1.0}, train=print, infer=print, SMOKE={'epochs': 1}, BLOCK=0)
    with pytest.raises(TypeError, match=r"SMOKE is \{'epochs': 1\}, expected a dict of keys of hyp; BLOCK is 0"):
        experiment.main(broken, [])


def test_the_trainers_first_line_names_the_held_out_set_it_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    path = tmp_path / 'mine.json'
    path.write_text(json.dumps({'rand': [0, 1, 2], 'easy': [5]}))  # 'rand': a mistyped 'random' stays visible
    code = experiment.main(trainer_digits, ['--smoke', '--runs', '2', '--device', 'cpu', '--held-out', str(path),
                                            '--out', str(tmp_path / 'store')])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.splitlines()[0] == f'held out: 4 examples from --held-out {path}: rand 3, easy 1'
    assert 'test_acc near chance' not in err


def test_a_held_out_set_that_does_not_fit_the_data_says_what_to_pass(inputs, cifar_dir, tmp_path, capsys):
    # the experiment's CIFAR-10 indices on a small CIFAR-format folder: a file of this data's indices is asked for
    out = tmp_path / 'small'
    assert experiment.main(trainer_airbench, ['--smoke', '--out', str(out), '--data-dir', cifar_dir,
                                              '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert 'are outside the 1000 training examples (0 to 999). Pass --held-out FILE.json' in err and not out.exists()
    # a store's own set is named when another file does not fit
    store = tmp_path / 'digits'
    assert experiment.main(trainer_digits, ['--smoke', '--runs', '1', '--out', str(store)]) == 0
    held = json.loads((store / 'settings.json').read_text())['held_out']
    capsys.readouterr()
    assert experiment.main(trainer_digits, ['--smoke', '--runs', '1', '--out', str(store), '--held-out',
                                            f'{inputs}/outside.json']) == 2
    groups = ', '.join(f'{len(v)} {k}' for k, v in held.items())
    assert f'The store {store} holds out {groups} examples: pass the --held-out file it was made with' in \
        capsys.readouterr().err


def test_runs_too_short_to_move_airbenchs_weights_are_named(cifar_dir, tmp_path, capsys):
    # 1,000 images at batch 512 for 0.2 epochs: 1 step. airbench's lookahead first pulls the weights at step 5
    # and its last update puts the EMA back, so such a run ends at its initial weights: nothing to report.
    held_out = tmp_path / 'held_out.json'
    held_out.write_text('{"random": [0, 1], "easy": [900, 901]}')
    argv = ['--smoke', '--runs', '1', '--data-dir', cifar_dir, '--device', 'cpu', '--held-out', str(held_out)]
    assert experiment.main(trainer_airbench, [*argv, '--out', str(tmp_path / 'short')]) == 0
    assert 'note: a run takes 1 optimizer steps here (1000 examples, batch_size 512, epochs 0.2); this ' \
           "trainer's weights first move at step 5" in capsys.readouterr().err
    assert experiment.main(trainer_airbench, [*argv, '--out', str(tmp_path / 'long'), '--hyp', 'batch_size=100',
                                              '--hyp', 'epochs=0.5']) == 0  # 5 steps
    assert 'weights first move' not in capsys.readouterr().err
