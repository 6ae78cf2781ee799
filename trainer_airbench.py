"""trainer_airbench.py: does adding an example make the airbench94 net more or less confident on it?

Trains N networks on all 50,000 CIFAR-10 training images (arm `with`) and N on all but 40 held-out
examples (arm `without`: 20 random, 20 "easy"), storing every run's float16 logits on all 50,000
training images. Run k of both arms shares seed k (init, data order, augmentation). Then
`python viz.py` prints, per held-out example, the self-influence: mean margin with - without.
Killing it loses at most the runs in progress; the same command continues.

    python trainer_airbench.py                       # 1000 runs per arm into runs/airbench/, every GPU
    python trainer_airbench.py --smoke --runs 2      # a tiny net on a CPU: the whole pipeline

Recipe: airbench94 (airbench.py) with the experiment's settings: lr 5.0, no label smoothing, batch 512,
random flip + 2 px translation, 9.9 epochs, no test-time augmentation; float16 on CUDA, float32 on a CPU
(--hyp precision=float16|float32), BatchNorm after each conv (--hyp norm=layer|none: the ablations). Measured costs and results:
docs/speed.md, docs/results.md.
"""
import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    os.write(2, b'\ninterrupted while starting; nothing was written.\n')
    os._exit(130)


if __name__ == '__main__':  # Ctrl-C while torch imports (seconds) is one line; experiment.main then takes over
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import airbench  # noqa: E402
import experiment  # noqa: E402

NAME = 'airbench'
hyp = airbench.make_hyp(
    lr=5.0,              # per 1024 examples (library default 11.5)
    label_smoothing=0.0,  # library default 0.2
    batch_size=512,       # library default 1024
    flip='random',        # independently per image per epoch (library default: alternating)
)
SMOKE = dict(widths=(16, 32, 32), epochs=0.2)  # a tiny net, a fifth of an epoch
make_hyp = airbench.make_hyp
BLOCKS = True  # train takes keep and seed lists too: a block of models trained at once as one fused net
MIN_STEPS = 5  # the lookahead's first update; a shorter run ends at the EMA's start, its initial weights


def train(images, labels, *, keep, seed, device, **hyp):
    """One net (keep an index array or None, seed an int), or with lists a block of len(seed) nets, each
    the run it would be alone with its keep and seed (airbench.train_block)."""
    return airbench.train94(images, labels, keep=keep, seed=seed, device=device, **hyp)


def infer(net, images):
    """(N, 10) logits of one net; (k, N, 10) of a block."""
    return airbench.infer(net, images, tta_level=0)


if __name__ == '__main__':
    raise SystemExit(experiment.main(sys.modules[__name__]))
