"""bench_airbench.py: how fast does train94 (or the Madry ResNet-9, --recipe madry) run on this device,
against the FLOP floor, and per model when K models train at once (--blocks) or N worker processes share
the device (--workers)?

Times whole train94 runs (and inference on the training set) on random CIFAR-shaped uint8 images,
which cost the same FLOPs as CIFAR-10, and prints s/run, s/step, images/s and the achieved share of
the device's peak (the floor: 0.236 GFLOP forward per image at full width, x3 for a training step).
With --blocks 1,2,4,8 and/or --workers 1,2,4 it prints one table instead: a row per recipe, net, K and
number of workers (N processes each training blocks of K, after one warm-up run each), with seconds per
model-run amortised over all of them (wall time / model-runs) and the throughput against the first K and
against the first worker count. --recipe airbench,madry and --nets smoke,full put both recipes and both
nets (the trainers' --smoke widths, the full widths) in that one table. On a CPU the cores are split
between the workers (torch threads = cores / N), so there workers measure the split, not an overlap.

    python bench/bench_airbench.py                             # experiment settings, 5 runs, 50,000 images
    python bench/bench_airbench.py --preset library --runs 5   # the library defaults (lr 11.5, batch 1024, ...)
    python bench/bench_airbench.py --device cpu --n-train 2000 --widths 16,32,32 --epochs 0.5 --runs 2
    python bench/bench_airbench.py --blocks 1,2,4,8 --runs 2 --precision float16
    python bench/bench_airbench.py --recipe madry --epochs 1 --blocks 1,2,4,8 --runs 2
    python bench/bench_airbench.py --blocks 1,4 --workers 1,2,4 --runs 2          # K and workers per GPU
    python bench/bench_airbench.py --recipe airbench,madry --nets smoke,full --blocks 1,2,4 --device cpu \\
        --n-train 1024 --epochs 1 --runs 1 --precision float32                    # 2 steps a run, one table
"""
import argparse
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench  # noqa: E402
import trainer_airbench  # noqa: E402
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
SMOKE_WIDTHS = {'airbench': trainer_airbench.SMOKE['widths'], 'madry': trainer_madry.SMOKE['widths']}
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


def bench_hyp(recipe, args, widths=None):
    """The recipe's hyp with the bench's overrides; widths None: the recipe's own."""
    hyp = RECIPES[recipe][0](**(PRESETS[args.preset] if recipe == 'airbench' else {}))
    if widths:
        hyp['widths'] = tuple(widths)
    if args.epochs:  # the Madry schedule's peak moves with it, at the same share of the run
        hyp = dict(hyp, epochs=args.epochs, **({'lr_peak_epoch': hyp['lr_peak_epoch'] * args.epochs / hyp['epochs']}
                                              if 'lr_peak_epoch' in hyp else {}))
    hyp['precision'] = args.precision
    return hyp


def random_data(n):
    """n random CIFAR-shaped uint8 images and labels, the same in every process."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--recipe', default='airbench', help='airbench, madry, or both in one table: airbench,madry')
    p.add_argument('--nets', help="smoke, full or smoke,full: the trainers' --smoke widths and/or the full net "
                                  '(a table; default: full)')
    p.add_argument('--preset', choices=PRESETS, default='experiment', help='airbench only')
    p.add_argument('--runs', type=int, default=5, help='timed runs (per worker and K in a table), after one warm-up')
    p.add_argument('--n-train', type=int, default=50000)
    p.add_argument('--device', default=None)
    p.add_argument('--widths', help="e.g. 16,32,32 (default: the recipe's; madry: four widths); one recipe only")
    p.add_argument('--epochs', type=float)
    p.add_argument('--compile', action='store_true', help='torch.compile the net (not in a table)')
    p.add_argument('--precision', choices=airbench.PRECISIONS, default='auto')
    p.add_argument('--blocks', help='e.g. 1,2,4,8: time blocks of K models at once, per model')
    p.add_argument('--workers', help='e.g. 1,2,4: time N worker processes on the device at once, per model')
    args = p.parse_args()

    recipes = args.recipe.split(',')
    nets = args.nets.split(',') if args.nets else ['full']
    for option, given, allowed in [('recipe', recipes, RECIPES), ('nets', nets, ('smoke', 'full'))]:
        if not set(given) <= set(allowed):
            p.error(f'--{option} {",".join(given)}: expected a comma list of {", ".join(allowed)}')
    if args.widths and (len(recipes) > 1 or args.nets):
        p.error('--widths sets the net of one recipe; with several recipes or --nets, name the nets by --nets')
    widths = [int(w) for w in args.widths.split(',')] if args.widths else None
    device = torch.device(args.device or airbench.default_device())
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    if args.blocks or args.workers or len(recipes) > 1 or args.nets:
        blocks = [int(k) for k in (args.blocks or '1').split(',')]
        workers = [int(w) for w in (args.workers or '1').split(',')]
        return time_table(recipes, nets, blocks, workers, args, device, name, widths)

    recipe = recipes[0]
    _, train, infer, make_net = RECIPES[recipe]
    hyp = bench_hyp(recipe, args, widths)
    images, labels = random_data(args.n_train)
    steps = math.ceil(args.n_train // hyp['batch_size'] * hyp['epochs'])
    flops = forward_flops(make_net, hyp, device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    preset = f'preset {args.preset}' if recipe == 'airbench' else 'the Madry recipe'
    print(f'device {name}; {preset}; {args.n_train} images; {steps} steps of {hyp["batch_size"]}; '
          f'forward {flops / 1e9:.3f} GFLOP/image (airbench94: 0.236 at full width)')

    extra = dict(compile=args.compile) if recipe == 'airbench' else {}
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


def time_table(recipes, nets, blocks, workers, args, device, name, widths=None):
    """A row per recipe, net, K and worker count: seconds per model-run (training + inference on the
    training set) amortised over every timed run of every worker; the throughput against the first K
    (same workers) and against the first worker count (same K)."""
    cores = torch.get_num_threads()
    split = ', split between the workers' if device.type == 'cpu' else ''
    print(f'device {name}; {args.n_train} random CIFAR-shaped images; precision {args.precision}; '
          f'{args.runs} timed run(s) per worker and K after a warm-up; {cores} torch threads{split}')
    print(f'| recipe | widths | steps | K | workers | s per model-run | against K={blocks[0]} '
          f'| against {workers[0]} worker(s) |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |', flush=True)
    for recipe in recipes:
        for net in nets:
            hyp = bench_hyp(recipe, args, widths or (SMOKE_WIDTHS[recipe] if net == 'smoke' else None))
            steps = math.ceil(args.n_train // hyp['batch_size'] * hyp['epochs'])
            per_model = {}
            for k in blocks:
                for w in workers:
                    threads = max(1, cores // w) if device.type == 'cpu' else None
                    job = (recipe, hyp, k, args.runs, args.n_train, str(device), threads)
                    t = per_model[k, w] = time_worker(*job) if w == 1 else time_workers(w, *job)
                    print(f'| {recipe} | {"/".join(map(str, hyp["widths"]))} | {steps} | {k} | {w} | {t:.3f} '
                          f'| x{per_model[blocks[0], w] / t:.2f} | x{per_model[k, workers[0]] / t:.2f} |',
                          flush=True)


def time_worker(recipe, hyp, k, runs, n_train, device, threads=None, barrier=None):
    """One worker: a warm-up block (cuDNN autotuning, allocator), then `runs` blocks of k models, each
    trained and its logits on the training set taken. Alone: seconds per model-run. With a barrier
    (one of several workers): the (start, end) wall-clock times of its timed part, begun together."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    _, train, infer, _ = RECIPES[recipe]
    images, labels = random_data(n_train)
    for rep in range(runs + 1):
        if rep == 1:
            if barrier:
                barrier.wait()
            start, clock = time.time(), time.perf_counter()
        net = train(images, labels, keep=[None] * k, seed=[rep * k + m for m in range(k)], device=device, **hyp)
        infer(net, images).half().cpu()
        sync(device)
    return (start, time.time()) if barrier else (time.perf_counter() - clock) / (runs * k)


def _worker(queue, *job):
    queue.put(time_worker(*job))


def time_workers(workers, recipe, hyp, k, runs, n_train, device, threads):
    """`workers` processes on the device at once (spawned: CUDA does not survive a fork), each a
    time_worker; seconds per model-run: the wall time from their common start to the last one's end over
    all their model-runs."""
    ctx = multiprocessing.get_context('spawn')
    queue, barrier = ctx.Queue(), ctx.Barrier(workers)
    procs = [ctx.Process(target=_worker, args=(queue, recipe, hyp, k, runs, n_train, device, threads, barrier))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:  # the results are two floats each: they fit the queue's pipe before they are read
        proc.join()
    if any(proc.exitcode for proc in procs):
        sys.exit(f'a worker failed (exit codes {[proc.exitcode for proc in procs]}): see its traceback above')
    spans = [queue.get() for _ in procs]
    return (max(end for _, end in spans) - min(start for start, _ in spans)) / (workers * runs * k)


if __name__ == '__main__':
    main()
