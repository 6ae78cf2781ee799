"""command_line.py: the command line every trainer shares (experiment.main), checked in full before
anything is written: runs, designs, seeds, the held-out file, devices and GPUs, and --hyp overrides,
each read with the type and range of the trainer's default. A bad value is a UsageError whose message
names it and what is expected.
"""
import argparse
import json
import math
import os
import re
import stat

from design import MAX_RUNS, SCAN_SEED_BASE
from store import parse_json

MAX_SEED = 2 ** 62     # seeds go to numpy and torch generators: keep seed_base + run well inside 64 bits
PRECISIONS = ('auto', 'float32', 'float16')  # airbench.PRECISIONS, here without importing torch: auto is float16 on CUDA


class UsageError(Exception):
    """A command line that cannot be run; the message names the bad value and what is expected."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(trainer, doc, argv=None, runs=1000, hyp=None, smoke=None, data_dir=True, blocks=False):
    """The trainer's command line; the help of --smoke and --hyp is taken from its `smoke` and `hyp`
    dicts, --data-dir is offered only when the trainer reads a data folder (`data_dir`), --precision
    when its hyp has 'precision' and --block when it trains blocks of any size (`blocks`). An option not
    offered is still read, hidden, so that check_command can say why it does not apply."""
    hyp, smoke = hyp or {}, smoke or {}
    # One line per option at 80 columns: the help column sits just past the longest option, --workers-per-gpu N;
    # what each option does in full is in docs/trainers.md, which the trainer's docstring points to.
    p = _Parser(usage='python %(prog)s [options]', description=doc,
                formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=23))
    p.add_argument('--runs', type=int, default=runs, metavar='N',
                   help=f'runs per arm (default {runs}); rerun with more to extend')
    p.add_argument('--out', metavar='DIR', help=f'store folder (default runs/{trainer}, then -smoke...)')
    if data_dir:
        p.add_argument('--data-dir', metavar='DIR',
                       help='CIFAR-10 folder (default: the store\'s own, else data/)')
    else:
        p.set_defaults(data_dir=None)  # the data ship with a package
    p.add_argument('--device', metavar='DEV', help='cpu, cuda or cuda:N (default: cuda if present)')
    p.add_argument('--gpus', metavar='IDS', help='comma-separated GPU ids, one worker each (default all)')
    p.add_argument('--workers-per-gpu', type=int, default=1, metavar='N',
                   help='worker processes per GPU, filling one store (default 1)')
    p.add_argument('--block', metavar='K|auto', help='models trained at once (default auto on CUDA, 1 on CPU)'
                   if blocks else argparse.SUPPRESS)
    p.add_argument('--precision', choices=PRECISIONS, metavar='P',
                   help='float16, float32 or auto (default: float16 on CUDA)' if 'precision' in hyp else argparse.SUPPRESS)
    p.add_argument('--smoke', action='store_true', help=smoke_help(hyp, smoke))
    p.add_argument('--scan', action='store_true', help='each run on a random half, to screen every example')
    p.add_argument('--design', choices=('with-without', 'factorial'), default='with-without', metavar='DESIGN',
                   help='with-without (default) or factorial (arms a and b)')
    p.add_argument('--seed-base', type=int, metavar='N',
                   help=f'run k uses seed N + k (default 0; {SCAN_SEED_BASE} with --scan)')
    p.add_argument('--held-out', metavar='FILE', help='JSON {"easy": [indices], ...} replacing the defaults')
    p.add_argument('--hyp', action='append', default=[], metavar='KEY=VALUE',
                   help='override a hyperparameter' + hyp_example(hyp) + '; repeatable' +
                        (f'; KEY one of: {", ".join(hyp)}' if hyp else ''))
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)  # a child of a multi-GPU launch
    return p.parse_args(argv)


def smoke_help(hyp, smoke):
    """What --smoke changes, from the trainer's SMOKE dict: 'widths=[32, 32] (default [256, 256]), ...'."""
    if not smoke:
        return 'a short training to check the plumbing'
    changes = ', '.join(f'{k}={json.dumps(v)}' + (f' (default {json.dumps(hyp[k])})' if k in hyp else '')
                        for k, v in smoke.items())
    return f'check the plumbing: {changes}'


def hyp_example(hyp):
    """', e.g. --hyp epochs=30' with twice the trainer's epochs (any trainer accepts more epochs), else
    its first key at its default."""
    if 'epochs' in hyp:
        return f', e.g. --hyp epochs={json.dumps(hyp["epochs"] * 2)}'
    if hyp:
        key = next(iter(hyp))
        value = hyp[key] if isinstance(hyp[key], str) else json.dumps(hyp[key])
        return f', e.g. --hyp {key}={value}'
    return ''


def check_command(args, hyp, smoke=None, check=None, blocks=False, block=1):
    """Every check that needs no dataset, before anything is written. -> dict: the overrides of `hyp`,
    named (the overrides that name the default --out), held_out (None: the trainer's), gpus, block (an int,
    'auto', or None for the device's default). blocks, block: the trainer's BLOCKS and BLOCK. Raises UsageError."""
    if args.scan and args.design != 'with-without':
        raise UsageError('--scan and --design factorial are two designs; choose one')
    if not 1 <= args.runs <= MAX_RUNS:
        raise UsageError(f'--runs {args.runs}: expected a number of runs per arm from 1 to {MAX_RUNS:,}')
    if args.seed_base is not None and not 0 <= args.seed_base <= MAX_SEED - MAX_RUNS:
        raise UsageError(f'--seed-base {args.seed_base}: expected an integer from 0 to {MAX_SEED - MAX_RUNS}')
    named = list(args.hyp)
    if args.precision is not None:
        if 'precision' not in hyp:
            raise UsageError(f'--precision {args.precision}: this trainer has no \'precision\' hyperparameter (its '
                             f'hyp: {", ".join(hyp) or "none"}); leave out --precision')
        given = [text for text in args.hyp if text.partition('=')[0] == 'precision']
        if given:
            raise UsageError(f'--precision {args.precision} and --hyp {given[0]}: the same setting twice; give one')
        named.append(f'precision={args.precision}')
    overrides = parse_hyp(named, hyp, smoke)
    if 'precision' in hyp and overrides.get('precision', hyp['precision']) not in PRECISIONS:
        raise UsageError(f'--hyp precision={overrides["precision"]}: expected one of {", ".join(PRECISIONS)}')
    if check is not None:
        try:
            check(**{**hyp, **(smoke if args.smoke else {}), **overrides})
        except (ValueError, TypeError) as e:
            raise UsageError(f'--hyp {" ".join(named)}: {e}') from None
    if args.out is not None and not args.out.strip():
        raise UsageError(f'--out {args.out!r}: empty; expected a store folder (new, empty or a store), or leave '
                         'out --out for the default')
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f'--out {args.out}: that is a file; expected a store folder (new, empty or a store)')
    held_out = read_held_out(args.held_out) if args.held_out is not None else None
    device = check_device(args.device)
    return dict(overrides=overrides, named=named, held_out=held_out, gpus=check_gpus(args.gpus, device, args.worker,
                                                                                     args.workers_per_gpu),
                block=check_block(args.block, blocks, block))


def check_block(text, blocks, block):
    """--block -> an int >= 1, 'auto', or None (not given: auto on CUDA, 1 on a CPU)."""
    if text is None:
        return None
    if not blocks:
        fixed = f'a fixed block of {block} models at once (its BLOCK)' if block > 1 else 'one model at a time'
        raise UsageError(f'--block {text}: this trainer trains {fixed}; --block is for trainers that set BLOCKS = '
                         'True (docs/trainers.md); leave out --block')
    if text == 'auto':
        return text
    if not re.fullmatch(r'\d+', text) or int(text) < 1:
        raise UsageError(f'--block {text}: expected auto or a number of models to train at once (an integer >= 1)')
    return int(text)


def parse_hyp(texts, hyp, smoke=None):
    """['KEY=VALUE', ...] -> {key: value}, each value read and checked against the type and range of
    the default (or of the --smoke value): numbers keep their kind and may not turn negative, integers
    in a list or tuple (sizes) stay >= 1, booleans are true or false, a tuple keeps its length, a list
    holds items like the default's first. batch_size, which every trainer's step count divides by, is >= 1."""
    out = {}
    for text in texts:
        key, sep, value = text.partition('=')
        if not sep or key not in hyp:
            raise UsageError(f'--hyp {text}: expected KEY=VALUE with KEY one of {", ".join(sorted(hyp))}')
        if key in out:
            raise UsageError(f'--hyp {key}= given twice; give each hyperparameter once')
        likes = [hyp[key]] + ([smoke[key]] if smoke and key in smoke else [])
        if isinstance(hyp[key], str):
            parsed = value  # names are taken as written
        else:
            try:
                parsed = json.loads(value)
            except ValueError:
                raise UsageError(f'--hyp {text}: {value!r} is not {_unlike(None, hyp[key])}') from None
        problems = [_unlike(parsed, like) for like in likes]
        if key == 'batch_size' and is_number(parsed) and parsed < 1:
            problems = ['an integer >= 1']
        if all(problems):
            raise UsageError(f'--hyp {text}: expected {problems[0]} (the default is {json.dumps(hyp[key])})')
        out[key] = tuple(parsed) if isinstance(hyp[key], tuple) else parsed
    return out


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _unlike(value, like, size=False):
    """What `value` should have been to match `like` in type and range (None if it does).
    size: an integer inside a list or tuple, such as a layer width: >= 1."""
    if isinstance(like, bool):
        return None if isinstance(value, bool) else 'true or false'
    if isinstance(like, int):
        low = 1 if size and like >= 1 else 0 if like >= 0 else None
        ok = is_number(value) and value == int(value) and (low is None or value >= low)
        return None if ok and isinstance(value, int) else 'an integer' + ('' if low is None else f' >= {low}')
    if isinstance(like, float):
        ok = is_number(value) and math.isfinite(value) and (like < 0 or value >= 0)
        return None if ok else 'a finite number' + ('' if like < 0 else ' >= 0')
    if isinstance(like, str):
        return None if isinstance(value, str) and value else 'a name'
    if isinstance(like, (tuple, list)):
        fixed = isinstance(like, tuple)
        if not isinstance(value, list) or not value or (fixed and len(value) != len(like)):
            return f'a JSON list of {len(like)} values' if fixed else 'a non-empty JSON list'
        items = zip(value, like) if fixed else ((v, like[0]) for v in value) if like else ()
        problem = next((p for p in (_unlike(v, d, size=True) for v, d in items) if p), None)
        return None if problem is None else f'a JSON list of {"%d " % len(like) if fixed else ""}items, each {problem}'
    if isinstance(like, dict):
        return None if isinstance(value, dict) else 'a JSON object'
    return None


MAX_HELD_OUT_BYTES = 16 * 2**20  # 50,000 indices take under 0.4 MB as JSON


def read_small_file(path, limit):
    """The text of the regular file `path`, at most `limit` bytes. Opened without blocking (a FIFO never waits
    for a writer) and checked to be a regular file before reading (a device such as /dev/zero is never read):
    ValueError saying what it is instead; OSError as open raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = 'a folder' if stat.S_ISDIR(mode) else 'a FIFO' if stat.S_ISFIFO(mode) else \
                'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 'not a regular file'
            raise ValueError(f'that is {kind}, not a regular file')
        data = os.read(fd, limit + 1)
        while len(data) <= limit:
            more = os.read(fd, limit + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f'over {limit:,} bytes')
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError:
        raise ValueError('not UTF-8 text') from None


def read_held_out(path):
    """--held-out FILE -> {group: [indices]}, checked but for the range (that needs the dataset)."""
    example = '{"random": [0, 1], "easy": [45114]}'
    try:
        text = read_small_file(path, MAX_HELD_OUT_BYTES)
    except OSError as e:
        raise UsageError(f'--held-out {path}: {e.strerror or e}; expected a JSON file like {example}') from None
    except ValueError as e:
        raise UsageError(f'--held-out {path}: {e}; expected a JSON file like {example}') from None
    groups, why = parse_json(text)
    if why:
        raise UsageError(f'--held-out {path}: not valid JSON ({why}); expected an object like {example}')
    return check_held_out(groups, f'--held-out {path}')


def check_held_out(groups, where):
    example = '{"random": [0, 1], "easy": [45114]}'
    if not isinstance(groups, dict) or not groups:
        raise UsageError(f'{where}: expected a JSON object of groups of example indices, like {example}')
    for name, group in groups.items():
        if not re.fullmatch(r'[A-Za-z0-9_-]{1,40}', name):  # printed in the report and the plot as it is
            raise UsageError(f'{where}: group name {json.dumps(name)[:60]}: expected 1 to 40 letters, digits, _ or -')
        if not isinstance(group, list) or not group:
            raise UsageError(f'{where}: group {name!r} is {json.dumps(group)}, expected a non-empty list of indices')
        wrong = [i for i in group if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if wrong:
            raise UsageError(f'{where}: group {name!r} holds {json.dumps(wrong)}, expected example indices '
                             '(integers >= 0)')
    every = [i for g in groups.values() for i in g]
    twice = sorted({i for i in every if every.count(i) > 1})
    if twice:
        raise UsageError(f'{where}: {twice} listed more than once; list each example once (each is one test, '
                         'and Holm / BH count the tests)')
    return groups


def check_device(text):
    """--device -> the device name, or None for the default; refuses a device this machine lacks."""
    if text is None:
        return None
    if not re.fullmatch(r'cpu|mps|cuda(:\d+)?', text):
        raise UsageError(f'--device {text}: expected cpu, cuda or cuda:N (N a GPU index)')
    import torch
    if text.startswith('cuda'):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f'--device {text}: no CUDA device is visible here; use --device cpu')
        if ':' in text and int(text[5:]) >= count:
            raise UsageError(f'--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}')
    if text == 'mps' and not torch.backends.mps.is_available():
        raise UsageError('--device mps: the MPS backend is not available here; use --device cpu')
    return text


def check_gpus(text, device, worker, per_gpu=1):
    """--gpus and --workers-per-gpu -> the GPU indices to start per_gpu workers each on (no GPU, or one GPU
    with one worker: this process works alone)."""
    if worker:
        return []
    if per_gpu < 1:
        raise UsageError(f'--workers-per-gpu {per_gpu}: expected an integer >= 1 (worker processes per GPU)')
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if per_gpu > 1 and (device in ('cpu', 'mps') or count == 0):
        raise UsageError(f'--workers-per-gpu {per_gpu}: ' + (f'with --device {device} there is no GPU to share'
                         if device in ('cpu', 'mps') else 'no CUDA device is visible here') +
                         '; leave it out, or start more processes (Slurm tasks) on one --out')
    if text is None:
        if device is not None and device.startswith('cuda:'):
            return [int(device[5:])] if per_gpu > 1 else []  # that one GPU, shared by per_gpu workers
        return list(range(count)) if device in (None, 'cuda') else []
    try:
        ids = [int(g) for g in text.split(',')]
    except ValueError:
        raise UsageError(f'--gpus {text}: expected comma-separated GPU indices, e.g. 0,2') from None
    if any(g < 0 for g in ids) or len(set(ids)) < len(ids):
        raise UsageError(f'--gpus {text}: expected distinct GPU indices >= 0, e.g. 0,2')
    if device in ('cpu', 'mps'):
        raise UsageError(f'--gpus {text} with --device {device}: choose GPUs or the {device}')
    if count == 0:
        raise UsageError(f'--gpus {text}: no CUDA device is visible here; leave out --gpus and use --device cpu')
    if max(ids) >= count:
        raise UsageError(f'--gpus {text}: this machine has {count} CUDA device(s), 0 to {count - 1}')
    return ids
