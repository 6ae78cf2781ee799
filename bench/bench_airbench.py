"""bench_airbench.py: how fast does train94 run on this device, against the FLOP floor, and per model
when K models train at once (--blocks)?

Times whole train94 runs (and inference on the training set) on random CIFAR-shaped uint8 images,
which cost the same FLOPs as CIFAR-10, and prints s/run, s/step, images/s and the achieved share of
the device's peak (the floor: 0.236 GFLOP forward per image at full width, x3 for a training step).
With --blocks 1,2,4,8 each K is timed side by side in this one process: seconds per model-run and the
ratio of throughput to K = 1.

    python bench/bench_airbench.py                             # experiment settings, 5 runs, 50,000 images
    python bench/bench_airbench.py --preset library --runs 5   # the library defaults (lr 11.5, batch 1024, ...)
    python bench/bench_airbench.py --device cpu --n-train 2000 --widths 16,32,32 --epochs 0.5 --runs 2
    python bench/bench_airbench.py --blocks 1,2,4,8 --runs 2 --precision float16
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

PRESETS = {
    'experiment': dict(lr=5.0, label_smoothing=0.0, batch_size=512, flip='random'),
    'library': dict(),
}
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0}  # dense float16 tensor-core peak


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def forward_flops(hyp, device):
    """FLOPs of one image's forward pass, counted by torch."""
    net = airbench.make_net(hyp['widths'], device=device, dtype=airbench.dtype_for(device, hyp['precision']))
    x = torch.zeros(1, 3, 32, 32, device=device, dtype=airbench.dtype_for(device, hyp['precision']))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=PRESETS, default='experiment')
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--n-train', type=int, default=50000)
    p.add_argument('--device', default=None)
    p.add_argument('--widths', help='e.g. 16,32,32 (default: the recipe\'s 64,256,256)')
    p.add_argument('--epochs', type=float)
    p.add_argument('--compile', action='store_true', help='torch.compile the net')
    p.add_argument('--precision', choices=airbench.PRECISIONS, default='auto')
    p.add_argument('--blocks', help='e.g. 1,2,4,8: time blocks of K models at once, per model')
    args = p.parse_args()

    device = torch.device(args.device or airbench.default_device())
    hyp = airbench.make_hyp(**PRESETS[args.preset])
    if args.widths:
        hyp['widths'] = tuple(int(w) for w in args.widths.split(','))
    if args.epochs:
        hyp['epochs'] = args.epochs
    hyp['precision'] = args.precision
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n_train, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.n_train,), generator=g)
    steps = math.ceil(args.n_train // hyp['batch_size'] * hyp['epochs'])
    flops = forward_flops(hyp, device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f'device {name}; preset {args.preset}; {args.n_train} images; {steps} steps of {hyp["batch_size"]}; '
          f'forward {flops / 1e9:.3f} GFLOP/image (recipe: 0.236 at full width)')

    if args.blocks:
        return time_blocks([int(k) for k in args.blocks.split(',')], images, labels, hyp, device, args.runs)
    # One warm-up run: cuDNN autotuning, allocator and (with --compile) compilation.
    airbench.train94(images, labels, seed=0, device=device, compile=args.compile, **hyp)
    sync(device)
    train_s, infer_s = [], []
    for run in range(args.runs):
        start = time.perf_counter()
        net = airbench.train94(images, labels, seed=run + 1, device=device, compile=args.compile, **hyp)
        sync(device)
        mid = time.perf_counter()
        airbench.infer(net, images).half().cpu()
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


def time_blocks(blocks, images, labels, hyp, device, runs):
    """Seconds per model-run (training + inference on the training set) for blocks of K models, each K
    warmed up once and then timed `runs` times; the ratio is throughput per model against the first K."""
    per_model = {}
    for k in blocks:
        times = []
        for rep in range(runs + 1):  # the first: warm-up (cuDNN autotuning, allocator), not counted
            seeds = [rep * k + m for m in range(k)]
            start = time.perf_counter()
            net = airbench.train94(images, labels, keep=[None] * k, seed=seeds, device=device, **hyp)
            airbench.infer(net, images).half().cpu()
            sync(device)
            times.append((time.perf_counter() - start) / k)
        per_model[k] = min(times[1:])
        base = per_model[blocks[0]]
        print(f'K={k:<3} {per_model[k]:8.3f} s per model-run  x{base / per_model[k]:.2f} the throughput of K={blocks[0]}',
              flush=True)


if __name__ == '__main__':
    main()
