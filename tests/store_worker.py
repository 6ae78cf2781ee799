"""A process for the store's tests (tests/test_store.py), started as a subprocess.

    python tests/store_worker.py train STORE RUNS [GO_FILE]   the real worker loop (experiment.main) with a
                                                            trivial trainer: each finished run prints one line
    python tests/store_worker.py load STORE [GO_FILE]         Store(STORE).load('with'), checked row by row
    python tests/store_worker.py create STORE K [GO_FILE]     Store.create with dataset number K
    python tests/store_worker.py claim STORE                  Store(STORE).claim('with', 0)

GO_FILE: a barrier after the imports: the process writes GO_FILE.ready-..., then starts its work when
GO_FILE appears, so that several processes start at one instant. Environment:
    KILL_AT=FUNC:TEXT[:N]   SIGKILL this process at the N-th (default 1st) call of os.FUNC (link, replace,
                            rename, remove) or of open whose path arguments contain TEXT, before the call runs
    LOAD_REPEAT=K           load: repeat K times
    RENDEZVOUS=DIR:N        train: before its first training, wait until N workers have started one
    PAUSE_IN_TRAIN=FILE     train: in its first training, write FILE and wait until FILE.go appears (the
                            test stops it meanwhile with SIGSTOP, as a suspended job or a paused machine)
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import store  # noqa: E402

N_TRAIN, N_TEST = 64, 16


def kill_at(spec):
    """Wrap os.FUNC (or the built-in open) so that the process dies by SIGKILL there, leaving whatever
    it was doing half done."""
    import builtins
    func, text, *nth = spec.split(':')
    left = [int(nth[0]) if nth else 1]
    owner = builtins if func == 'open' else os
    real = getattr(owner, func)

    def wrapper(*args, **kwargs):
        if any(text in str(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(owner, func, wrapper)


def dataset(k=0):
    """A tiny dataset as torch tensors: (images, labels, test images, test labels)."""
    import torch
    g = torch.Generator().manual_seed(k)
    return (torch.rand(N_TRAIN, 4, generator=g), torch.randint(0, 10, (N_TRAIN,), generator=g),
            torch.rand(N_TEST, 4, generator=g), torch.randint(0, 10, (N_TEST,), generator=g))


def fake_train(images, labels, *, keep, seed, device, **hyp):
    """No training: the 'net' is its seed and the logits are drawn from it."""
    meet()
    pause = os.environ.pop('PAUSE_IN_TRAIN', None)
    if pause:
        open(pause, 'w').close()
        while not os.path.exists(f'{pause}.go'):
            time.sleep(0.01)
    return seed


def fake_infer(seed, images):
    import torch
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(len(images), 10, generator=g)


_met = []


def meet():
    """RENDEZVOUS=DIR:N: mark this worker as training and wait (up to 60 s) for N workers to be."""
    spec = os.environ.get('RENDEZVOUS')
    if not spec or _met:
        return
    folder, n = spec.rsplit(':', 1)
    open(os.path.join(folder, str(os.getpid())), 'w').close()
    deadline = time.time() + 60
    while len(os.listdir(folder)) < int(n):
        if time.time() > deadline:
            raise SystemExit(f'rendezvous: only {len(os.listdir(folder))} of {n} workers started training')
        time.sleep(0.01)
    _met.append(True)


# This module is also a trainer module (experiment.read_trainer): a trivial trainer on `dataset()`.
NAME, hyp, HELD_OUT = 'fake', {'epochs': 1, 'batch_size': 8}, {'random': [0, 1], 'easy': [5, 9]}
train, infer = fake_train, fake_infer


def load(data_dir):
    return dataset()


def train_main(out, runs):
    import experiment
    return experiment.main(sys.modules[__name__], ['--smoke', '--runs', str(runs), '--out', out, '--device', 'cpu'])


def load_main(path):
    """Load the with arm, repeatedly, and check that every row is its run file's logits."""
    s = store.Store(path)
    for _ in range(int(os.environ.get('LOAD_REPEAT', '1'))):
        logits, run_info = s.load('with')
        assert len(logits) == len(run_info['run']) == len(set(run_info['run'].tolist()))
        for i, run in enumerate(run_info['run']):
            assert np.array_equal(logits[i], s.read_run('with', int(run))['logits']), run
    print('loaded', len(run_info['run']), flush=True)
    return 0


def create_main(path, k):
    labels = np.full(N_TRAIN, k % 10, np.int64)
    settings = dict(trainer='fake', hyp={}, held_out={'random': [0]}, n_train=N_TRAIN,
                    data_fingerprint=f'data{k}', seed_base=0)
    try:
        store.Store.create(path, settings, labels)
    except store.StoreError as e:
        print(f'refused: {e}'.splitlines()[0], flush=True)
        return 3
    print(f'created by {k}', flush=True)
    return 0


if __name__ == '__main__':
    mode, path, *rest = sys.argv[1:]
    go = rest[1] if mode in ('train', 'create') and len(rest) > 1 else rest[0] if mode == 'load' and rest else None
    if mode == 'train':
        for module in ('airbench', 'experiment', 'torch', 'tqdm'):
            __import__(module)  # every import before the barrier
    if os.environ.get('KILL_AT'):
        kill_at(os.environ['KILL_AT'])
    if go:
        open(f'{go}.ready-{os.getpid()}-{time.time_ns()}', 'w').close()  # pids repeat across namespaces
    while go and not os.path.exists(go):
        time.sleep(0.001)
    if mode == 'train':
        sys.exit(train_main(path, int(rest[0])))
    if mode == 'load':
        sys.exit(load_main(path))
    if mode == 'claim':
        sys.exit(0 if store.Store(path).claim('with', 0) else 1)
    sys.exit(create_main(path, int(rest[0])))
