"""experiment.py: the harness every trainer script runs: `raise SystemExit(experiment.main(module))`.

What lives here: the trainer protocol (below), CIFAR-10's held-out examples, and main, which reads a
trainer module and the command line and hands the runs to the workers. The command line itself:
command_line.py; the worker loop that fills a run store (and what a run will cost): workers.py.

A trainer is a module that defines these names (docs/trainers.md has a worked example):

    NAME       str: the store folder runs/NAME (with -scan, -factorial, -smoke, overrides) and the
               trainer's name in the store's settings
    hyp        dict: the hyperparameters, JSON values; --hyp KEY=VALUE overrides any of them, keeping
               the type of the default
    train(images, labels, *, keep, seed, device, **hyp) -> net
               one run: keep None (every example) or the indices of the examples the run may see, seed an
               int that fixes init, data order and augmentation; raises airbench.Diverged if it diverges
               (recorded in failed/, not retried). With BLOCK > 1 (or BLOCKS and --block above 1), keep
               and seed are lists of k entries, one per model trained at once
    infer(net, images) -> logits, (N, 10) float, no augmentation; (k, N, 10) for a net of k models
  and may define (default in brackets):
    SMOKE      dict: the values of hyp that --smoke replaces, keys of hyp [{}]
    make_hyp(**hyp) -> dict: the trainer's own check of a full set of hyperparameters (a choice among
               names, a range), raising TypeError or ValueError; called on the command line's values
               before anything is written [no check beyond --hyp's types]
    load(data_dir) -> (train images, train labels, test images, test labels): tensors, labels int64
               [load_cifar10: CIFAR-10 from --data-dir]
    DATA_DIR   bool: whether load reads --data-dir; False: the option is not offered, load gets None [True]
    HELD_OUT   {group: [training indices]}, each index once [HELD_OUT below: CIFAR-10's]
    BLOCK      int >= 1: models that train trains at once [1]
    BLOCKS     bool: train accepts lists of any length k >= 1 (k models at once, each the run it would be
               alone); the command line then offers --block K|auto [False]. Runs of one block take equal
               steps (run_steps)
    RUNS       int >= 1: the default of --runs [1000]
    MIN_STEPS  int >= 1: a run of fewer optimizer steps ends at its initial weights (a note then says so) [1]
    steps(hyp, n_train) -> int: optimizer steps of one run, for the cost note and the progress bar
               [default_steps: ceil(epochs x (n_train // batch_size))]
    __doc__    the top of --help: what the trainer does and how to run it
  A hyp key 'precision' ('auto', 'float32' or 'float16') brings --precision; the store records the
  precision resolved for the worker's device (resolve_precision), and train receives it.
"""
import math
import os
import platform
import re
import sys
from types import SimpleNamespace

import numpy as np

from command_line import UsageError, check_command, check_held_out, is_number, parse_args
from design import (ARMS, FACTORIAL_ARMS, SCAN_SEED_BASE, check_values, keep_for, nesterov_momentum,  # noqa: F401
                    override, seed_for)  # check_values, nesterov_momentum, override: the trainers call experiment.*
from store import Store, StoreError
from workers import Stopped, catch_signals, holding, launch, memory_line, out_of_memory, restore_signals, work

# Held-out examples, indices in torchvision's CIFAR-10 training order (data_batch_1 .. data_batch_5).
HELD_OUT = {
    'random': list(range(20)),  # the training set is already shuffled: the first 20 are a random sample
    'easy': [45114, 47798, 43746, 49106, 47082, 44095, 49524, 41014, 49159, 44279,
             45927, 40141, 47731, 46440, 49015, 49690, 46836, 43512, 43189, 49320],
}


def default_steps(hyp, n_train):
    """Optimizer steps of one run: ceil(epochs x full batches per epoch), the rule of every trainer here."""
    if 'epochs' not in hyp or 'batch_size' not in hyp:
        return None
    return math.ceil(hyp['epochs'] * (n_train // hyp['batch_size']))


def run_steps(trainer, hyp, n_train, n_kept):
    """Optimizer steps of one run that may see n_kept of the n_train examples: the trainer's steps(hyp, n)
    counted over the kept examples under batching 'rebatch' (full batches of kept examples), over every
    example otherwise (removed examples leave their batches). Runs of one block must agree on it."""
    steps = getattr(trainer, 'steps', default_steps)
    return steps(hyp, n_kept if hyp.get('batching') == 'rebatch' else n_train)


def resolve_precision(precision, device):
    """'auto' -> 'float16' on CUDA, 'float32' elsewhere: airbench's rule, which the trainers' arithmetic follows."""
    import airbench
    return airbench.resolve_precision(precision, device)


############################################
#      The trainer protocol, and main      #
############################################

def load_cifar10(data_dir):
    """(train images, train labels, test images, test labels): the trainers' default dataset."""
    import airbench
    return (*airbench.load_cifar10(data_dir), *airbench.load_cifar10(data_dir, train=False))


# The optional names of a trainer module, at the value the harness takes when the module leaves one out.
OPTIONAL = dict(SMOKE={}, make_hyp=None, load=load_cifar10, DATA_DIR=True, HELD_OUT=HELD_OUT, BLOCK=1, BLOCKS=False,
                RUNS=1000, MIN_STEPS=1, steps=default_steps)


def read_trainer(module):
    """The trainer protocol's names from `module` (a trainer script's module, or any object with those
    attributes), the optional ones at their defaults -> SimpleNamespace. A missing or mistyped name is a
    TypeError naming it: a mistake in the trainer's code, not in the command line."""
    where = getattr(module, '__name__', type(module).__name__)
    missing = [name for name in ('NAME', 'hyp', 'train', 'infer') if not hasattr(module, name)]
    if missing:
        raise TypeError(f'{where} defines no {", ".join(missing)}: a trainer module defines NAME, hyp, train '
                        'and infer (docs/trainers.md)')
    t = SimpleNamespace(NAME=module.NAME, hyp=module.hyp, train=module.train, infer=module.infer,
                        doc=module.__doc__ or '', **{k: getattr(module, k, v) for k, v in OPTIONAL.items()})
    wrong = [f'{name} is {value!r}, expected {kind}' for name, value, ok, kind in [
        ('NAME', t.NAME, isinstance(t.NAME, str) and re.fullmatch(r'[\w.=-]+', t.NAME), 'a folder name'),
        ('hyp', t.hyp, isinstance(t.hyp, dict), 'a dict'),
        ('SMOKE', t.SMOKE, isinstance(t.SMOKE, dict) and set(t.SMOKE) <= set(t.hyp), 'a dict of keys of hyp'),
        ('BLOCK', t.BLOCK, is_number(t.BLOCK) and t.BLOCK == int(t.BLOCK) >= 1, 'an integer >= 1'),
        ('RUNS', t.RUNS, is_number(t.RUNS) and t.RUNS == int(t.RUNS) >= 1, 'an integer >= 1'),
        ('MIN_STEPS', t.MIN_STEPS, is_number(t.MIN_STEPS) and t.MIN_STEPS == int(t.MIN_STEPS) >= 1,
         'an integer >= 1'),
        ('DATA_DIR', t.DATA_DIR, isinstance(t.DATA_DIR, bool), 'True or False'),
        ('BLOCKS', t.BLOCKS, isinstance(t.BLOCKS, bool) and not (t.BLOCKS and t.BLOCK != 1),
         'True or False, and True only with BLOCK 1 (a fixed block, or blocks of any size)')] if not ok]
    wrong += [f'{name} is not a function' for name in ('train', 'infer', 'load', 'steps')
              if not callable(getattr(t, name))]
    if t.make_hyp is not None and not callable(t.make_hyp):
        wrong.append('make_hyp is not a function')
    if wrong:
        raise TypeError(f'{where}: {"; ".join(wrong)} (docs/trainers.md)')
    return t


def main(trainer, argv=None):
    """Run the with/without experiment (or a scan, or the factorial design) for one trainer module (the
    names it defines: the top of this file); returns the process exit code. Every argument is checked
    before anything is written."""
    t = read_trainer(trainer)
    try:
        args = parse_args(t.NAME, t.doc, argv, t.RUNS, t.hyp, t.SMOKE, t.DATA_DIR, t.BLOCKS)
        plan = check_command(args, t.hyp, t.SMOKE, t.make_hyp, blocks=t.BLOCKS, block=t.BLOCK)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    hyp = {**t.hyp, **(t.SMOKE if args.smoke else {}), **plan['overrides']}
    design = 'scan' if args.scan else args.design
    arms = {'scan': ['scan'], 'factorial': list(FACTORIAL_ARMS), 'with-without': list(ARMS)}[design]
    name = t.NAME + ('' if design == 'with-without' else f'-{design}') + ('-smoke' if args.smoke else '')
    out = args.out or os.path.join('runs', '-'.join([name, *plan['named']]))
    seed_base = args.seed_base if args.seed_base is not None else SCAN_SEED_BASE if args.scan else 0
    devices = [f'cuda:{g}' for g in plan['gpus'] for _ in range(args.workers_per_gpu)]  # one process each
    if len(devices) > 1:
        return launch(devices, out, args.runs)
    import airbench
    try:
        catch_signals()  # a signal stops the setup at once: nothing is held yet
        import torch
        device = torch.device(args.device or (devices[0] if devices else airbench.default_device()))  # --gpus 1: cuda:1
        if 'precision' in hyp:  # the store records what the runs were made in, not 'auto'
            hyp['precision'] = resolve_precision(hyp['precision'], device)
        if t.DATA_DIR and args.data_dir is None:  # a rerun reads the folder its store was made from, if there
            made = _store_data_dir(out)
            args.data_dir = made if made and os.path.isdir(made) else 'data'
        try:
            images, labels, test_images, test_labels = t.load(args.data_dir)
        except airbench.DataError as e:
            raise airbench.DataError(f'{e}{_made_from(out, args.data_dir)}') from e
        where = f'--held-out {args.held_out}' if args.held_out else 'the held-out set'
        held_out = plan['held_out'] or check_held_out(t.HELD_OUT, where)
        bad = [i for g in held_out.values() for i in g if i >= len(labels)]
        if bad:
            raise UsageError(f'{where}: indices {bad} are outside the {len(labels)} training examples (0 to '
                             f'{len(labels) - 1}).{_held_out_hint(out, args.held_out)}')
        n_steps = t.steps(hyp, len(labels))
        if n_steps is not None and n_steps < 1:
            raise UsageError(f'--hyp {" ".join(args.hyp) or "(defaults)"}: a run would take {n_steps} optimizer '
                             f'steps ({len(labels)} examples, batch_size {hyp["batch_size"]}, epochs {hyp["epochs"]}); '
                             'expected at least 1: raise epochs or lower batch_size')
        settings = dict(trainer=t.NAME, hyp=hyp, held_out=held_out, n_train=len(labels),
                        data_fingerprint=airbench.fingerprint(images, labels), seed_base=seed_base,
                        arms=arms, versions=_versions())
        if t.DATA_DIR:  # not binding: the same data may move; named when a rerun cannot find it
            settings['data_dir'] = os.path.abspath(args.data_dir)
        print(held_out_line(held_out, args.held_out), file=sys.stderr, flush=True)
        holding()  # from here files are written and runs claimed: a signal waits for a check
        existed = os.path.lexists(out)
        store = Store.create(out, settings, labels.numpy())
        if args.runs < 2:
            print(f'note: --runs {args.runs}: viz needs at least 2 runs per arm to report this store; the same '
                  'command with --runs 2 or more adds to it.', file=sys.stderr)
        if n_steps is not None and n_steps < t.MIN_STEPS:
            print(f'note: a run takes {n_steps} optimizer steps here ({len(labels)} examples, batch_size '
                  f'{hyp["batch_size"]}, epochs {hyp["epochs"]}); this trainer\'s weights first move at step '
                  f'{t.MIN_STEPS}, so every run ends at its initial weights and the report will show no effect: '
                  'raise --hyp epochs or lower batch_size.', file=sys.stderr)
        if args.smoke:
            print('--smoke: a short run of a small net, to check that everything runs; its test_acc is below a '
                  'full run\'s and says nothing about the experiment.', file=sys.stderr)
        block = t.BLOCK if not t.BLOCKS else plan['block'] or ('auto' if device.type == 'cuda' else 1)
        try:
            work(store, args.runs, t.train, t.infer, hyp, (images, labels), (test_images, test_labels), device,
                 block=block, progress=not args.worker, steps=n_steps, say_cost=not args.smoke,
                 steps_of=lambda arm, run: _steps_of(t, hyp, arm, seed_for(run, seed_base), len(labels), held_out))
        except Exception as e:  # a failure, not a signal: a folder this command made for nothing is not left behind
            if not existed and store.remove_if_unused():
                print(f'note: removed {out}, which this command made: no run was stored', file=sys.stderr)
            if out_of_memory(e):  # too large a net for the settings, not a fault of the trainer's code
                print(f'error: {memory_line(e, device, args.hyp, t.BLOCKS)}', file=sys.stderr)
                return 2
            raise
    except (airbench.DataError, StoreError, UsageError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except Stopped as stop:
        print(stop.line(), file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        restore_signals()
    return 0


def held_out_line(held_out, path):
    """The first line of a trainer: which held-out set it uses, from where, its groups and their sizes (a
    mistyped group name in a --held-out file shows here, not only in the report)."""
    source = f'--held-out {path}' if path else "the trainer's default"
    groups = ', '.join(f'{name} {len(g)}' for name, g in held_out.items())
    total = sum(len(g) for g in held_out.values())
    return f'held out: {total} examples from {source}: {groups}'


def _store_data_dir(out):
    """The data folder the store at `out` was made from (its settings' data_dir), or None."""
    try:
        made = Store(out).settings.get('data_dir')
    except StoreError:
        return None
    return made if isinstance(made, str) and made else None


def _made_from(out, data_dir):
    """' The store OUT was made from the data in DIR: ...' when `out` is a store made from another data folder."""
    made = _store_data_dir(out)
    if made is None or os.path.abspath(data_dir) == made:
        return ''
    return f' The store {out} was made from the data in {made}: pass --data-dir {made}.'


def _held_out_hint(out, given):
    """What to pass instead of a held-out set that does not fit the data: the store's own set, when OUT is a
    store, else (no --held-out given) a file of this data's indices."""
    try:
        held = Store(out).settings.get('held_out') or {}
    except StoreError:
        held = {}
    if held:
        groups = ', '.join(f'{len(v)} {k}' for k, v in held.items())
        return f' The store {out} holds out {groups} examples: pass the --held-out file it was made with.'
    return '' if given else ' Pass --held-out FILE.json, {"random": [...], "easy": [...]}, with indices of this data.'


def _steps_of(t, hyp, arm, seed, n_train, held_out):
    keep = keep_for(arm, seed, n_train, held_out)
    return run_steps(t, hyp, n_train, n_train if keep is None else len(keep))


def _versions():
    import torch
    return dict(python=platform.python_version(), numpy=np.__version__, torch=torch.__version__)
