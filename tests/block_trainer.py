"""A trainer module that sets BLOCKS = True, for tests/test_blocks.py: no learning, so that the harness's
handling of blocks is what is tested. Each model's logits are drawn from its seed and its number of kept
examples (logits()), so a stored run shows which seed and keep it was trained with.

    python tests/block_trainer.py ARGS...     experiment.main on this module (ARGS: its command line)

Environment:
    BLOCK_LOG=FILE      each train call appends a JSON line: pid, whether lists were passed, seeds, kept counts,
                        steps per model and precision
    PAUSE_AT=FILE:N     the N-th train call of this process writes FILE, then waits (for a signal)
    DIVERGE_SEED=S      the model of seed S diverges: its logits are NaN, the others train on
    DIVERGE_ALL=1       every model diverges: train raises airbench.Diverged
    RENDEZVOUS=DIR:N    before its first training, wait until N processes have started one
    TRAIN_S=SECONDS     each train call sleeps this long (default 0)
"""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import airbench  # noqa: E402
import experiment  # noqa: E402

N_TRAIN, N_TEST = 64, 16
NAME, BLOCKS = 'blocks', True
hyp = {'epochs': 1, 'batch_size': 8, 'batching': 'paired', 'precision': 'auto'}
HELD_OUT = {'random': [0, 1], 'easy': [5, 9]}
DATA_DIR = False
_calls = []


def load(data_dir):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(N_TRAIN, 4, generator=g), torch.randint(0, 10, (N_TRAIN,), generator=g),
            torch.rand(N_TEST, 4, generator=g), torch.randint(0, 10, (N_TEST,), generator=g))


def logits(seed, n_kept, n):
    """(n, 10) float32: what the model of this seed and number of kept examples infers."""
    out = torch.randn(n, 10, generator=torch.Generator().manual_seed(int(seed)))
    out[:, 0] += n_kept / 1000
    return out


def train(images, labels, *, keep, seed, device, **h):
    assert h['precision'] in ('float32', 'float16'), h['precision']  # resolved before it reaches a trainer
    listed = isinstance(seed, list)
    seeds, keeps = (seed, keep) if listed else ([seed], [keep])
    assert len(seeds) == len(keeps) >= 1
    kept = [len(images) if k is None else len(k) for k in keeps]
    n = [k if h['batching'] == 'rebatch' else len(images) for k in kept]
    steps = [math.ceil(h['epochs'] * (m // h['batch_size'])) for m in n]
    _calls.append(1)
    if os.environ.get('BLOCK_LOG'):
        with open(os.environ['BLOCK_LOG'], 'a') as f:
            f.write(json.dumps(dict(pid=os.getpid(), listed=listed, seeds=seeds, kept=kept, steps=steps,
                                    precision=h['precision'])) + '\n')
    _meet()
    pause = os.environ.get('PAUSE_AT', '')
    if pause and len(_calls) == int(pause.rsplit(':', 1)[1]):
        open(pause.rsplit(':', 1)[0], 'w').close()
        time.sleep(120)  # a signal ends it
    time.sleep(float(os.environ.get('TRAIN_S', '0')))
    if os.environ.get('DIVERGE_ALL'):
        raise airbench.Diverged(f'loss is nan after 1 step (every model of a block of {len(seeds)})')
    p = torch.zeros(1, requires_grad=True)  # optimizer steps, as a real trainer's, for workers.time_steps
    optimizer = torch.optim.SGD([p], lr=0.1)
    for _ in range(max(steps)):
        p.grad = torch.zeros(1)
        optimizer.step()
    diverged = os.environ.get('DIVERGE_SEED')
    nets = [(s, k, diverged is not None and s == int(diverged)) for s, k in zip(seeds, kept)]
    return nets if listed else nets[0]


def infer(net, images):
    nets = net if isinstance(net, list) else [net]
    out = torch.stack([logits(s, k, len(images)) * (math.nan if bad else 1) for s, k, bad in nets])
    return out if isinstance(net, list) else out[0]


def _meet():
    spec = os.environ.get('RENDEZVOUS')
    if not spec or len(_calls) > 1:
        return
    folder, n = spec.rsplit(':', 1)
    open(os.path.join(folder, str(os.getpid())), 'w').close()
    deadline = time.time() + 60
    while len(os.listdir(folder)) < int(n) and time.time() < deadline:
        time.sleep(0.01)


if __name__ == '__main__':
    sys.exit(experiment.main(sys.modules[__name__], sys.argv[1:]))
