"""workers.py: the worker loop that fills a run store, for experiment.py's main.

What a worker does: claims runs nobody has stored, failed or claimed (the store/ package), trains them `block` at a
time (runs of equal optimizer steps; `auto`: the block size timed fastest per model, choose_block), stores each
run's logits with its seed, and gives back what it holds when stopped; one or more processes per GPU (launch),
any number of processes on any number of machines sharing one folder. How it behaves for a
person: a progress bar on a terminal or a line now and then in a log, one line per run, a summary line;
on a CPU, a few timed steps first and a note when the runs would take long. SIGTERM, SIGINT or SIGHUP: the first
gives back the runs in progress and stops (Stopped), a second ends the process at once.
"""
import contextlib
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from design import keep_for, seed_for
from store import CLAIM_REFRESH, Store, StoreError

COST_STEPS = 3         # training steps timed before the first full-size run on a CPU
AUTO_STEPS = 5         # training steps timed per block size by --block auto (the first absorbs the warm-up)
AUTO_MAX_BLOCK = 64    # the largest block --block auto tries
COST_NOTE_S = 600.0    # say the cost when the runs to do would take longer than this on the CPU (seconds)
LONG_RUN_S = 60.0      # a block of runs longer than this moves the progress bar step by step
PROGRESS_S = float(os.environ.get('EXPERIMENT_PROGRESS_S', '60'))  # seconds between progress lines in a log
SAME_SIGNAL_S = 1.0    # a second signal this soon after the first is the same request delivered twice (Slurm
                       # signals every process of a job, and a multi-GPU parent forwards what it gets)


def work(store, runs, train, infer, hyp, data, test, device, block=1, progress=True, steps=None, say_cost=False,
         steps_of=None):
    """Train every (arm, run) with run < `runs` that no one has stored, failed or claimed, `block` at a time
    (an int, or 'auto': choose_block times a few sizes first). steps: optimizer steps per run (None: unknown);
    steps_of(arm, run): a run's optimizer steps, when they may differ (a block holds runs of equal steps only);
    say_cost: time a few steps first and, on a CPU, say what the runs will cost if that is long. progress:
    a bar on a terminal, else a line now and then.
    A first SIGTERM or SIGINT (catch_signals) abandons the block in progress, gives its runs back at once
    and raises Stopped, naming them."""
    images, labels = (t.to(device) for t in data)  # on the device once, not copied again every run
    todo = [(arm, run) for run in range(runs) for arm in store.arms]  # arms interleaved: both grow together
    store.clean_leftovers()
    mine, held = set(), []  # claims to keep fresh; the block claimed now
    threading.Thread(target=_heartbeat, args=(store, mine), daemon=True).start()

    def finished():
        return sum(store.counts(runs).values()) + sum(r < runs for _, r in store.failed())

    def unclaimed(jobs):  # pass after pass, until one finds nothing: runs another worker gave back are redone
        found = True
        while found:
            found, failed = False, store.failed()
            for arm, run in jobs:
                if os.path.exists(store.run_file(arm, run)) or (arm, run) in failed or not store.claim(arm, run):
                    continue
                # finished by another worker between the look and the claim: nothing to do
                if os.path.exists(store.run_file(arm, run)) or os.path.exists(store.failure_file(arm, run)):
                    store.release(arm, run)
                    continue
                found = True
                yield arm, run

    def claim_block():  # what is claimed is in `mine` at once, whatever stops the claiming
        held.clear()
        for claims in groups:  # a block is filled from one group; an exhausted group yields nothing
            for job in claims:
                held.append(job)
                mine.add(job)
                if len(held) == block:
                    return list(held)
            if held:
                return list(held)
        return []

    def give_back(jobs):
        for job in jobs:
            store.release(*job)
            mine.discard(job)

    if block == 'auto':
        block = 1
        if finished() < len(todo):
            with abandonable():
                block = choose_block(train, images, labels, hyp, device, min(AUTO_MAX_BLOCK, len(todo) - finished()))
    block_s = None  # seconds per block of runs, once known
    if say_cost and device.type == 'cpu' and steps and finished() < len(todo):
        with abandonable():
            block_s = cost_of_runs(train, images, labels, hyp, device, block, steps,
                                   len(images) + len(test[0]), len(todo) - finished())
    shown = Progress(len(todo), finished(), progress)
    seconds = []  # per finished run, this worker
    by_steps = {}  # runs of equal optimizer steps, in the order of todo
    for job in todo:
        by_steps.setdefault(steps_of(*job) if block > 1 and steps_of else None, []).append(job)
    groups = [unclaimed(jobs) for jobs in by_steps.values()]
    try:  # the bar ends its line before any error message
        while jobs := claim_block():
            _SIGNALS.check()
            long = shown.bar is not None and steps and block_s and block_s > LONG_RUN_S
            within = _move_bar_per_step(shown.bar, len(jobs), steps) if long else None
            start = time.perf_counter()
            try:
                seconds += train_block(store, jobs, train, infer, hyp, (images, labels), test, device, shown.write,
                                       blocked=block > 1)
            finally:
                if within is not None:
                    within.remove()
                give_back(jobs)
            block_s = time.perf_counter() - start
            shown.update(finished())
            _SIGNALS.check()
    except BaseException as e:  # a signal, or a failure while claiming (a full disk at a block's second claim)
        give_back(list(mine))
        if isinstance(e, Stopped):
            e.given = [job for job in held if not os.path.exists(store.run_file(*job))
                       and not os.path.exists(store.failure_file(*job))]
        raise
    finally:
        shown.close()
    store.clean_leftovers()  # claims of workers that died after finishing their runs
    say(summary(store, runs, seconds))


def summary(store, runs, seconds):
    """The last line of a worker: the store's runs per arm, failures, and this worker's runs."""
    counts = store.counts(runs)
    failed = sum(r < runs for _, r in store.failed())
    line = f'{store.path}: ' + ', '.join(f'{counts[a]}/{runs} runs {a}' for a in store.arms)
    if failed:
        line += f', {failed} failed (see failed/)'
    line += _summary_notes(store, runs)
    if seconds:
        line += f'; this worker: {len(seconds)} runs, {np.mean(seconds):.2f} s/run'
    return line


def _summary_notes(store, runs):
    """What a count up to `runs` leaves out: runs other live workers still hold, runs stored beyond --runs."""
    note = ''
    held = store.in_progress()
    if held:
        note += f', {held} more held by other live workers (the same command later completes any they give up)'
    beyond = sum(r >= runs for a in store.arms for r in store.stored(a))
    if beyond:
        note += f'; the store also holds {beyond} run(s) beyond --runs {runs} (all of them are reported by viz)'
    return note


def train_block(store, jobs, train, infer, hyp, data, test, device, log, blocked):
    """Train the runs `jobs` [(arm, run)] together, store each (or record that it failed) and log one
    line per run. blocked: train takes lists of keeps and seeds (else one run). -> seconds per stored run.
    A block trainer's diverged model has non-finite logits and fails alone; airbench.Diverged fails every
    run of the block. Training may be abandoned by a signal (Stopped); storing is not: no half-written
    file is left."""
    import torch
    images, labels = data
    seeds = [seed_for(run, store.settings['seed_base']) for _, run in jobs]
    keeps = [keep_for(arm, seed, len(labels), store.settings['held_out']) for (arm, _), seed in zip(jobs, seeds)]
    start = time.perf_counter()
    try:
        with abandonable():
            if blocked:
                net = train(images, labels, keep=keeps, seed=seeds, device=device, **hyp)
                logits, test_logits = infer(net, images), infer(net, test[0])
            else:
                net = train(images, labels, keep=keeps[0], seed=seeds[0], device=device, **hyp)
                logits, test_logits = infer(net, images)[None], infer(net, test[0])[None]
    except _diverged() as e:
        for (arm, run), seed in zip(jobs, seeds):
            if store.save_failure(arm, run, seed, str(e), device=str(device), host=socket.gethostname(),
                                  block=len(jobs)):
                log(f'{arm:<7} run {run:>5}  seed {seed:>6}  FAILED: {e} (recorded in failed/)')
        return []
    if tuple(logits.shape) != (len(jobs), len(labels), 10):
        raise TypeError(f'infer returned logits of shape {tuple(logits.shape)} for a block of {len(jobs)} run(s) '
                        f'on {len(labels)} examples, expected ({len(jobs)}, {len(labels)}, 10) (docs/trainers.md)')
    logits = logits.half()  # (K, n_train, 10): stored as float16; beyond float16's range is inf, a failed run
    finite = torch.isfinite(logits).flatten(1).all(1).tolist()
    test_acc = (test_logits.argmax(-1).cpu() == test[1].cpu()).float().mean(-1).tolist()
    logits = logits.cpu().numpy()
    took = (time.perf_counter() - start) / len(jobs)
    seconds = []
    for k, ((arm, run), seed) in enumerate(zip(jobs, seeds)):
        if not finite[k]:
            if store.save_failure(arm, run, seed, 'non-finite logits on the training set',
                                  device=str(device), host=socket.gethostname(), block=len(jobs)):
                log(f'{arm:<7} run {run:>5}  seed {seed:>6}  FAILED: non-finite logits (recorded in failed/)')
            continue
        if not store.save_run(arm, run, seed, logits[k], took, test_acc[k], device=_device_name(device),
                              host=socket.gethostname(), torch=torch.__version__, block=len(jobs)):
            continue  # its claim was taken over while this worker was stopped: the store said so
        seconds.append(took)
        log(f'{arm:<7} run {run:>5}  seed {seed:>6}  {took:7.2f} s  test_acc {test_acc[k]:.4f}')
    return seconds


############################################
#      What a run costs, and progress      #
############################################

class _StepBudget(Exception):
    """Raised from an optimizer-step hook to cut a training short."""


def _on_every_step(hook):
    """Call hook() after every optimizer step of any trainer (torch's global step hook): the trainers
    need no code for being timed or for moving the progress bar. Returns a handle with .remove()."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    return register_optimizer_step_post_hook(lambda optimizer, args, kwargs: hook())


def time_steps(train, images, labels, hyp, device, block=1, n=COST_STEPS):
    """(seconds before the first step, seconds per step) of one training (a block of `block` models)
    cut after n optimizer steps."""
    import torch
    stamps, cuda = [], torch.device(device).type == 'cuda'

    def stamp():
        if cuda:
            torch.cuda.synchronize(device)  # the step's kernels, not only their launch
        stamps.append(time.perf_counter())
        if len(stamps) >= n:
            raise _StepBudget
    handle = _on_every_step(stamp)
    start = time.perf_counter()
    keep, seed = (None, seed_for(0)) if block == 1 else ([None] * block, [seed_for(k) for k in range(block)])
    try:
        train(images, labels, keep=keep, seed=seed, device=device, **hyp)
    except _StepBudget:
        pass
    finally:
        handle.remove()
    if not stamps:
        return time.perf_counter() - start, 0.0
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else stamps[0] - start
    return max(stamps[0] - start - per_step, 0.0), per_step


def choose_block(train, images, labels, hyp, device, largest=AUTO_MAX_BLOCK):
    """--block auto: time AUTO_STEPS steps at K = 1, 2, 4, ... up to `largest` models at once, stopping where
    memory runs out or the seconds per model-step stop falling; -> the fastest K per model, said in one line."""
    import torch
    timings, k, why = {}, 1, f'largest tried (at most {largest})'
    while k <= largest:
        try:
            timings[k] = time_steps(train, images, labels, hyp, device, k, AUTO_STEPS)[1] / k  # s per model-step
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            why = f'K={k} ran out of memory'
            break
        if k > 1 and timings[k] >= timings[k // 2]:
            why = f'K={k} no faster per model'
            break
        k *= 2
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()  # the timed blocks' memory, for the runs (the error and its frames are gone)
    best = min(timings, key=timings.get) if timings else 1
    said = ', '.join(f'K={k} {s * 1000:.2f}' for k, s in timings.items())
    say(f'block auto: {best} models at once (ms per model-step over {AUTO_STEPS} steps: {said}; stopped: {why})',
        sys.stderr)
    return best


def out_of_memory(e):
    """Whether exception `e` says memory ran out: torch.cuda.OutOfMemoryError, the CPU allocator's
    RuntimeError ("can't allocate memory", "not enough memory"), MPS's, numpy's MemoryError."""
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and bool(
        re.search(r"out of memory|can't allocate memory|not enough memory", str(e)))


def memory_line(e, device, overrides, blocks=False):
    """The one line for a run that ran out of memory: how much it asked for, and what to change (blocks:
    the trainer offers --block)."""
    asked = re.search(r'(tried to allocate [\d.,]+ ?\w+)', str(e))
    given = f' (--hyp {" ".join(overrides)})' if overrides else ''
    fewer = ', or train fewer models at once (--block)' if blocks else ''
    return (f'not enough memory on {device} for a run with these settings{given}: '
            f'{asked[1] if asked else type(e).__name__}. The net or the batch is too large for it: lower the '
            f'size of the net (its widths) or batch_size{fewer}.')


def cost_of_runs(train, images, labels, hyp, device, block, steps, n_infer, left):
    """Time COST_STEPS training steps, extrapolate to a run and to the `left` runs to do, and say it on
    stderr when that is long (COST_NOTE_S). Inference on n_infer images is counted as forward passes,
    a third of a training step per batch (forward + backward is about three forwards).
    Returns the estimated seconds per block of `block` runs."""
    setup, per_step = time_steps(train, images, labels, hyp, device, block)
    per_block = setup + steps * per_step + per_step / 3 * n_infer / hyp.get('batch_size', 512)
    per_run = per_block / block
    if per_run * left > COST_NOTE_S:
        print(f'note: on this CPU a full-size run takes about {_minutes(per_run)} min ({steps} steps at '
              f'{per_step:.2f} s, timed over {COST_STEPS} steps, then logits on {n_infer:,} images), so the '
              f'{left} runs to do take about {_duration(per_run * left)}. --smoke checks the plumbing in seconds; '
              'python trainer_digits.py gets a real result in minutes on a CPU. Going on.',
              file=sys.stderr, flush=True)
    return per_block


def _minutes(seconds):
    m = seconds / 60
    return f'{m:.0f}' if m >= 10 else f'{m:.1f}' if m >= 0.1 else f'{m:.2f}'


def _duration(seconds):
    hours = seconds / 3600
    if hours < 2:
        return f'{seconds / 60:.0f} min'
    return f'{hours:,.0f} h' + (f' ({hours / 24:,.0f} days)' if hours >= 48 else '')


def _move_bar_per_step(bar, share, steps):
    """Move the bar by `share` runs over `steps` optimizer steps, stopping short of the end (the block
    counts as done when its runs are stored). Returns the hook's handle."""
    start, done = bar.n, [0]
    bar.bar_format = '{l_bar}{bar}| {n:.2f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]'

    def step():
        done[0] += 1
        bar.update(start + share * min(done[0] / steps, 0.99) - bar.n)
    return _on_every_step(step)


def launch(devices, out, runs):
    """One worker process per entry of `devices` ('cuda:0', 'cuda:0', 'cuda:1', ...: a device named twice is
    shared by two workers), all on the same store; the parent shows the overall progress and passes
    SIGTERM and SIGINT on to the workers (a second one: they end at once, and so does the parent)."""
    procs = [subprocess.Popen([sys.executable, sys.argv[0], *sys.argv[1:], '--worker', '--device', device])
             for device in devices]
    got = []  # (signal, time) received

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
        got.append((signum, time.monotonic()))
        if len(got) > 1 and got[-1][1] - got[0][1] > SAME_SIGNAL_S:
            os._exit(128 + signum)
    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    shown = None
    while any(p.poll() is None for p in procs):
        time.sleep(0.5 if got else 5)
        try:
            store = Store(out)
        except StoreError:
            continue  # not made yet
        shown = shown or Progress(runs * len(store.arms), sum(store.counts(runs).values()))
        shown.update(sum(store.counts(runs).values()))
    if shown is not None:
        shown.close()
    codes = [p.wait() for p in procs]
    return 128 + got[0][0] if got else max(codes)


############################################
#     Signals, and progress for a person   #
############################################

class Stopped(BaseException):
    """A worker stopped by SIGTERM or SIGINT; .given: the runs it gave back [(arm, run)]. A BaseException,
    so that no trainer's `except Exception` takes it for a failed run."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum, self.given = signum, []

    def line(self):
        name = signal.Signals(self.signum).name
        if not self.given:
            return f'stopped by {name}: no run was in progress; the same command continues'
        runs = '; '.join(f'{arm} {_ranges([r for a, r in self.given if a == arm])}'
                         for arm in dict.fromkeys(a for a, _ in self.given))
        return (f'stopped by {name}: gave back {len(self.given)} run(s) in progress for any worker to redo at '
                f'once ({runs}); the same command continues')


class _Signals:
    """The first SIGTERM or SIGINT raises Stopped at once where work may be dropped (training: see
    abandonable) and at the next check elsewhere (claiming, storing); a second ends the process at once."""

    def __init__(self):
        self.first = None        # (signal, time) of the first
        self.abandonable = False

    def handle(self, signum, frame):
        now = time.monotonic()
        if self.first is not None:
            if now - self.first[1] > SAME_SIGNAL_S:
                os._exit(128 + signum)  # its claims go stale and are taken over (CLAIM_TIMEOUT)
            return
        self.first = (signum, now)
        if self.abandonable:
            raise Stopped(signum)

    def check(self):
        if self.first is not None:
            raise Stopped(self.first[0])


_SIGNALS = _Signals()
# SIGHUP: the terminal or ssh session closed; the worker gives its claims back as for SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def catch_signals():
    """From here on SIGTERM and SIGINT stop this worker cleanly (see work), until restore_signals(); the
    first raises Stopped at once until the worker holds something (abandonable False)."""
    global _SIGNALS
    _SIGNALS = _Signals()
    _SIGNALS.abandonable = True
    _SIGNALS.before = {signum: signal.signal(signum, _SIGNALS.handle) for signum in STOP_SIGNALS}


def holding():
    """From here files are written and runs claimed: a first signal waits for the next check."""
    _SIGNALS.abandonable = False


def restore_signals():
    for signum, handler in getattr(_SIGNALS, 'before', {}).items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def abandonable():
    """Within, a first signal raises Stopped at once: for training, which leaves nothing half-done."""
    before, _SIGNALS.abandonable = _SIGNALS.abandonable, True
    try:
        _SIGNALS.check()
        yield
    finally:
        _SIGNALS.abandonable = before


def _ranges(runs):
    """[0, 1, 2, 5] -> 'runs 0-2, 5'."""
    runs, parts = sorted(runs), []
    for r in runs:
        if parts and parts[-1][1] == r - 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])
    return ('run ' if len(runs) == 1 else 'runs ') + ', '.join(f'{a}' if a == b else f'{a}-{b}' for a, b in parts)


class Progress:
    """The progress of a store's runs, for a person: a tqdm bar on a terminal; when stderr is a file (a
    Slurm log) a line at most every PROGRESS_S seconds, as a block finishes (done/total, runs per hour
    over this process's time, ETA). show=False: neither (a multi-GPU parent shows it)."""

    def __init__(self, total, done, show=True, every=None):
        from tqdm import tqdm
        terminal = show and on_terminal()
        self.bar = tqdm(total=total, initial=done, unit='run', dynamic_ncols=True) if terminal else None
        self.total, self.first, self.lines = total, done, show and not terminal
        self.every = PROGRESS_S if every is None else every
        self.start = self.last = time.monotonic()

    def write(self, line):
        """One line of the log, above the bar if there is one."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            say(line)

    def update(self, done):
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif self.lines and now - self.last >= self.every:
            self.last = now
            say(progress_line(done, self.total, done - self.first, now - self.start), sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def say(line, file=None):
    """One line in one write: workers sharing a log (the workers of a launch) never split each other's lines."""
    file = file or sys.stdout
    file.write(line + '\n')
    file.flush()


def on_terminal():
    return sys.stderr.isatty()


def progress_line(done, total, new, seconds):
    """'14:02:11  250/400 runs (62%), 1,200 runs/h, ETA 8 min': `new` runs finished in `seconds`."""
    rate = new / seconds * 3600 if seconds > 0 else 0.0
    left = (total - done) / rate * 3600 if rate > 0 else 0.0
    eta = f', ETA {_duration(left) if left >= 60 else "under a minute"}' if left > 0 else ''
    return f'{time.strftime("%H:%M:%S")}  {done}/{total} runs ({done / max(total, 1):.0%}), {rate:,.0f} runs/h{eta}'


def _heartbeat(store, mine):
    while True:
        time.sleep(CLAIM_REFRESH)
        store.touch_claims(mine)


def _diverged():
    import airbench
    return airbench.Diverged


def _device_name(device):
    import torch
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
