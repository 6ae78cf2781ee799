"""bench_airbench.py: how fast does train94 (or the Madry ResNet-9, --recipe madry) run on this device,
against the FLOP floor, and per model when K models train at once (--blocks)?

Times whole train94 runs (and inference on the training set) on random CIFAR-shaped uint8 images,
which cost the same FLOPs as CIFAR-10, and prints s/run, s/step, images/s and the achieved share of
the device's peak (the floor: 0.236 GFLOP forward per image at full width, x3 for a training step).
With --blocks 1,2,4,8 each K is timed side by side in this one process: seconds per model-run and the
ratio of throughput to K = 1.

    python bench/bench_airbench.py                             # experiment settings, 5 runs, 50,000 images
    python bench/bench_airbench.py --preset library --runs 5   # the library defaults (lr 11.5, batch 1024, ...)
    python bench/bench_airbench.py --device cpu --n-train 2000 --widths 16,32,32 --epochs 0.5 --runs 2
    python bench/bench_airbench.py --blocks 1,2,4,8 --runs 2 --precision float16
    python bench/bench_airbench.py --recipe madry --epochs 1 --blocks 1,2,4,8 --runs 2
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench  # noqa: E402
import trainer_madry  # noqa: E402

PRESETS = {
    'experiment': dict(lr=5.0, label_smoothing=0.0, batch_size=512, flip='random'),
    'library': dict(),
}
# recipe -> (its hyp with overrides, train(images, labels, keep=, seed=, device=, **hyp), infer(net, images), make_net)
RECIPES = {
    'airbench': (lambda **o: airbench.make_hyp(**o), airbench.train94, airbench.infer,
                 lambda h, device, dtype: airbench.make_net(h['widths'], device=device, dtype=dtype)),
    'madry': (trainer_madry.make_hyp, trainer_madry.train, trainer_madry.infer,
              lambda h, device, dtype: trainer_madry.make_net(h['widths'], device=device)),
}
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0}  # dense float16 tensor-core peak


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def forward_flops(make_net, hyp, device):
    """FLOPs of one image's forward pass, counted by torch."""
    dtype = airbench.dtype_for(device, hyp['precision'])
    net = make_net(hyp, device, dtype)
    x = torch.zeros(1, 3, 32, 32, device=device, dtype=next(net.parameters()).dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--recipe', choices=RECIPES, default='airbench')
    p.add_argument('--preset', choices=PRESETS, default='experiment', help='airbench only')
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--n-train', type=int, default=50000)
    p.add_argument('--device', default=None)
    p.add_argument('--widths', help='e.g. 16,32,32 (default: the recipe\'s; madry: four widths)')
    p.add_argument('--epochs', type=float)
    p.add_argument('--compile', action='store_true', help='torch.compile the net')
    p.add_argument('--precision', choices=airbench.PRECISIONS, default='auto')
    p.add_argument('--blocks', help='e.g. 1,2,4,8: time blocks of K models at once, per model')
    args = p.parse_args()

    device = torch.device(args.device or airbench.default_device())
    make_hyp, train, infer, make_net = RECIPES[args.recipe]
    hyp = make_hyp(**(PRESETS[args.preset] if args.recipe == 'airbench' else {}))
    if args.widths:
        hyp['widths'] = tuple(int(w) for w in args.widths.split(','))
    if args.epochs:  # the Madry schedule's peak moves with it, at the same share of the run
        hyp = dict(hyp, epochs=args.epochs, **({'lr_peak_epoch': hyp['lr_peak_epoch'] * args.epochs / hyp['epochs']}
                                              if 'lr_peak_epoch' in hyp else {}))
    hyp['precision'] = args.precision
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n_train, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.n_train,), generator=g)
    steps = math.ceil(args.n_train // hyp['batch_size'] * hyp['epochs'])
    flops = forward_flops(make_net, hyp, device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    preset = f'preset {args.preset}' if args.recipe == 'airbench' else 'the Madry recipe'
    print(f'device {name}; {preset}; {args.n_train} images; {steps} steps of {hyp["batch_size"]}; '
          f'forward {flops / 1e9:.3f} GFLOP/image (airbench94: 0.236 at full width)')

    if args.blocks:
        return time_blocks([int(k) for k in args.blocks.split(',')], train, infer, images, labels, hyp, device,
                           args.runs)
    extra = dict(compile=args.compile) if args.recipe == 'airbench' else {}
    # One warm-up run: cuDNN autotuning, allocator and (with --compile) compilation.
    train(images, labels, seed=0, device=device, **extra, **hyp)
    sync(device)
    train_s, infer_s = [], []
    for run in range(args.runs):
        start = time.perf_counter()
        net = train(images, labels, seed=run + 1, device=device, **extra, **hyp)
        sync(device)
        mid = time.perf_counter()
        infer(net, images).half().cpu()
        sync(device)
        train_s.append(mid - start)
        infer_s.append(time.perf_counter() - mid)
        print(f'run {run}  train {train_s[-1]:.3f} s  infer {infer_s[-1]:.3f} s', flush=True)

    t, i = statistics.median(train_s), statistics.median(infer_s)
    trained = steps * hyp['batch_size']
    work = 3 * flops * trained + flops * args.n_train  # training steps + inference on the training set
    achieved = work / (t + i) / 1e12
    share = f'{achieved / peak:.1%} of {peak:.0f} TFLOP/s peak' if peak else 'no known peak for this device'
    print(f'median of {args.runs}: {t:.3f} s/run training ({t / steps * 1e3:.2f} ms/step, '
          f'{trained / t:,.0f} images/s), {i:.3f} s inference on {args.n_train} images, '
          f'{t + i:.3f} s/run in all; {achieved:.3g} TFLOP/s = {share}')


def time_blocks(blocks, train, infer, images, labels, hyp, device, runs):
    """Seconds per model-run (training + inference on the training set) for blocks of K models, each K
    warmed up once and then timed `runs` times; the ratio is throughput per model against the first K."""
    per_model = {}
    for k in blocks:
        times = []
        for rep in range(runs + 1):  # the first: warm-up (cuDNN autotuning, allocator), not counted
            seeds = [rep * k + m for m in range(k)]
            start = time.perf_counter()
            net = train(images, labels, keep=[None] * k, seed=seeds, device=device, **hyp)
            infer(net, images).half().cpu()
            sync(device)
            times.append((time.perf_counter() - start) / k)
        per_model[k] = min(times[1:])
        base = per_model[blocks[0]]
        print(f'K={k:<3} {per_model[k]:8.3f} s per model-run  x{base / per_model[k]:.2f} the throughput of K={blocks[0]}',
              flush=True)


if __name__ == '__main__':
    main()
