"""trainer_madry.py: the with/without self-influence experiment with the Madry-lab ResNet-9 recipe.

    python trainer_madry.py                       # 1000 runs per arm into runs/madry/
    python trainer_madry.py --smoke --runs 2      # tiny net, a fraction of an epoch: checks the plumbing

The recipe, how the runs are paired, more commands, every option in full: docs/trainers.md.
"""
import copy
import math
import sys

import startup

if __name__ == '__main__':  # Ctrl-C while torch imports (seconds) is one line; experiment.main then takes over
    startup.ctrl_c_is_one_line()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import airbench  # noqa: E402
import experiment  # noqa: E402

NAME = 'madry'
# The parameters' and inputs' dtype (autocast picks float16 per op in float16). float64 only in tests, where a
# block and its runs alone round alike and so stay equal after any training (tests/test_madry_block.py).
DTYPE = torch.float32
BLOCKS = True  # train takes keep and seed lists too: a block of models trained at once as one fused net
hyp = {
    'lr': 0.5,                       # peak, per step on the batch-mean loss
    'momentum': 0.9,                 # heavy ball, not Nesterov
    'weight_decay': 5e-4,            # L2 on every parameter, coupled to lr (torch SGD)
    'label_smoothing': 0.0,
    'epochs': 24,                    # may be fractional: ceil(epochs x batches per epoch) steps in all
    'lr_peak_epoch': 5,              # lr rises linearly from 0 to the peak here, then falls to 0 at `epochs`
    'batch_size': 512,               # last partial batch dropped
    'flip': 'random',                # per image per epoch
    'translate': 2,                  # pixels, reflect padding
    'cutout': 4,                     # side of one zeroed square per image, pixels
    'batching': 'paired',            # with keep=: 'paired' or 'rebatch', as in airbench.Loader
    'widths': (64, 128, 256, 128),   # channels: stem, stage 1, stage 2, head
    'scaling_factor': 0.2,           # fixed multiplier of the output logits
    'precision': 'auto',             # 'float16': autocast + loss scaling, float16 inference; 'auto': float16 on CUDA
}
# Overrides for --smoke: a net 1/16 as wide and 10 steps, to check the plumbing on a CPU.
SMOKE = {
    'epochs': 0.1,             # 10 of the 97 batches of an epoch
    'lr_peak_epoch': 0.02,     # step 1
    'widths': (4, 8, 16, 8),
}


def make_hyp(**overrides):
    """`hyp` with `overrides` applied; unknown names are an error."""
    h = experiment.override(hyp, overrides)
    if not 0 <= h['lr_peak_epoch'] < h['epochs']:
        raise ValueError(f"lr_peak_epoch={h['lr_peak_epoch']} must lie in [0, epochs={h['epochs']}); "
                         'lower it together with epochs.')
    if h['precision'] not in airbench.PRECISIONS:
        raise ValueError(f"precision={h['precision']!r} must be one of {', '.join(airbench.PRECISIONS)}.")
    return h


############################################
#                  Network                 #
############################################

def conv_bn(channels_in, channels_out, kernel_size=3, stride=1, padding=1):
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(channels_out),  # PyTorch defaults: eps 1e-5, momentum 0.1, affine
        nn.ReLU(),
    )


class Residual(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return x + self.module(x)


def make_net(widths=hyp['widths'], scaling_factor=hyp['scaling_factor'], device='cpu'):
    """The ResNet-9: (B, 3, 32, 32) -> (B, 10) logits. Float32 parameters, channels-last (faster on
    CUDA and CPU).
    Built on the CPU and then moved, so that a seed gives the same initial weights on every device."""
    w1, w2, w3, w4 = widths
    net = nn.Sequential(
        conv_bn(3, w1),                                      # 32x32
        conv_bn(w1, w2, kernel_size=5, stride=2, padding=2),  # 16x16
        Residual(nn.Sequential(conv_bn(w2, w2), conv_bn(w2, w2))),
        conv_bn(w2, w3),
        nn.MaxPool2d(2),                                     # 8x8
        Residual(nn.Sequential(conv_bn(w3, w3), conv_bn(w3, w3))),
        conv_bn(w3, w4, padding=0),                          # 6x6
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(w4, 10, bias=False),
        airbench.Mul(scaling_factor),
    )
    return net.to(torch.device(device), DTYPE, memory_format=torch.channels_last)


############################################
#                 Training                 #
############################################

def lr_multiplier(step, peak_step, total_steps):
    """Multiplier of the peak lr: linear from 0 at step 0 to 1 at peak_step, then to 0 at total_steps."""
    if step < peak_step:
        return step / peak_step
    return (total_steps - step) / (total_steps - peak_step)


def train(images, labels, *, keep=None, seed=0, device=None, **overrides):
    """Train one ResNet-9 and return it in eval mode, with `net.steps` the optimizer steps it took.

    images: uint8 (N, 32, 32, 3); labels int64 (N,); keep: indices of the examples to train on (default
    all; the others are never in a batch, and the run takes the same steps as without keep);
    seed fixes init, data order and augmentation; overrides: any key of `hyp`.
    The net remembers its precision (net.precision) for infer.
    With lists keep=[...] and seed=[...] it trains a block of models at once (train_block).
    """
    if isinstance(seed, (list, tuple)) or isinstance(keep, (list, tuple)):
        return train_block(images, labels, keep=keep, seed=seed, device=device, **overrides)
    h = make_hyp(**overrides)
    device = torch.device(device or airbench.default_device())
    half = airbench.resolve_precision(h['precision'], device) == 'float16'  # autocast with loss scaling; else plain float32
    torch.backends.cudnn.benchmark = device.type == 'cuda'  # autotune convs once per input shape
    torch.manual_seed(seed)
    net = make_net(h['widths'], h['scaling_factor'], device)
    # float32 inputs: the parameters stay float32 and autocast picks float16 per op
    loader = airbench.Loader(images, labels, h['batch_size'], keep=keep, flip=h['flip'], translate=h['translate'],
                             cutout=h['cutout'], seed=seed, device=device, dtype=DTYPE,
                             batching=h['batching'])
    if len(loader) == 0:
        raise ValueError(f'{len(images)} images make no full batch of {h["batch_size"]}; lower batch_size.')
    total_steps = math.ceil(h['epochs'] * len(loader))
    peak_step = int(h['lr_peak_epoch'] * len(loader))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0, momentum=h['momentum'], nesterov=False,
                                weight_decay=h['weight_decay'])
    scaler = torch.amp.GradScaler(device.type, enabled=half)

    net.train()
    step = 0
    for epoch in range(math.ceil(h['epochs'])):
        for x, y in loader:
            optimizer.param_groups[0]['lr'] = h['lr'] * lr_multiplier(step, peak_step, total_steps)
            with torch.autocast(device.type, dtype=torch.float16, enabled=half):
                loss = F.cross_entropy(net(x), y, label_smoothing=h['label_smoothing'])  # batch mean
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if step >= total_steps:
                break
        if not torch.isfinite(loss):  # one check per epoch: a sync per step would cost speed on CUDA
            raise airbench.Diverged(f'loss is {loss.item()} after {step} steps (epoch {epoch + 1})')
        if step >= total_steps:
            break
    net.eval()
    net.steps = step
    net.precision = 'float16' if half else 'float32'
    return net


class BlockScaler:
    """torch.amp.GradScaler's rule for each model of a block on its own: model m's loss is multiplied by
    its scale (from 2**16), its gradients divided by it before the step; a step where any of model m's
    gradients is not finite is skipped for model m only (its weights and momentum stay) and halves its
    scale; 2,000 finite steps in a row double it. One scaler for the block would skip every model's step
    when one model overflows, which its run alone would not. Disabled (float32): scale 1, no checks."""

    def __init__(self, k, device, enabled):
        self.k, self.enabled = k, enabled
        self.scale = torch.full((k,), 2.0 ** 16 if enabled else 1.0, device=device)
        self.good_steps = torch.zeros(k, dtype=torch.long, device=device)

    def step(self, optimizer):
        if not self.enabled:
            optimizer.step()
            return
        params = [p for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
        inverse = 1.0 / self.scale  # exact: scales are powers of 2
        bad = torch.zeros(self.k, dtype=torch.bool, device=self.scale.device)
        for p in params:
            grad = per_model(p.grad, self.k)
            grad.mul_(inverse.view(-1, *[1] * (grad.dim() - 1)))
            bad |= ~torch.isfinite(grad).flatten(1).all(1)
        if not bad.any():  # one sync per step, as GradScaler's
            optimizer.step()
        else:  # step, then put back the weights and momentum of the models whose step is skipped
            kept = []
            for p in params:
                buf = optimizer.state[p].get('momentum_buffer')
                kept.append((p, per_model(p.detach(), self.k)[bad].clone(),
                             None if buf is None else per_model(buf, self.k)[bad].clone()))
            optimizer.step()
            with torch.no_grad():
                for p, weights, buf in kept:
                    per_model(p, self.k)[bad] = weights
                    # a buffer born in this step restarts at 0: momentum x 0 + d is d, torch's first step
                    per_model(optimizer.state[p]['momentum_buffer'], self.k)[bad] = 0.0 if buf is None else buf
        grown = self.good_steps + 1
        self.scale = torch.where(bad, self.scale * 0.5, torch.where(grown == 2000, self.scale * 2.0, self.scale))
        self.good_steps = torch.where(bad | (grown == 2000), 0, grown)


def per_model(t, k):
    """A block parameter (or its gradient or momentum) as (k, ...): model m's values are the m-th of k equal
    slices of dim 0 (airbench.fuse). A view, whatever the memory format."""
    return t.unflatten(0, (k, -1))


def train_block(images, labels, *, keep, seed, device=None, **overrides):
    """Train len(seed) ResNet-9s at once as one fused net (airbench.BlockNet: grouped convolutions, one
    BatchNorm over k x C channels with each model's trained scale and bias, a batched head; one SGD over
    the stacked weights, so momentum and weight decay are each model's own) and return it in eval mode;
    infer gives (k, N, 10).

    keep, seed: lists, one entry per model. Model m is the run train(keep=keep[m], seed=seed[m]) would
    make, up to float rounding: its init (torch.manual_seed(seed[m]) then make_net), its own Loader (data
    order, flips, translations, cutout) and keep. Batches of different sizes are padded with zero images,
    masked out of the loss and the BatchNorm statistics; the block's loss is the sum of the models'
    batch-mean losses, so each model's gradient is its single run's. In float16 each model has its own
    loss scale (BlockScaler). A model whose loss is not finite at an epoch's end (where the run alone raises
    Diverged) ends with NaN weights, so NaN logits; Diverged only when every model diverged.
    """
    if not isinstance(seed, (list, tuple)) or not isinstance(keep, (list, tuple)):
        raise TypeError('a block takes lists: keep=[...] and seed=[...], one entry per model')
    if len(keep) != len(seed) or not seed:
        raise ValueError(f'{len(keep)} keep entries for {len(seed)} seeds: give one of each per model, at least one')
    h = make_hyp(**overrides)
    device = torch.device(device or airbench.default_device())
    half = airbench.resolve_precision(h['precision'], device) == 'float16'
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    singles = []
    for s in seed:
        torch.manual_seed(s)
        singles.append(make_net(h['widths'], h['scaling_factor'], device))
    first = airbench.Loader(images, labels, h['batch_size'], keep=keep[0], flip=h['flip'], translate=h['translate'],
                            cutout=h['cutout'], seed=seed[0], device=device, dtype=DTYPE, batching=h['batching'])
    loaders = [first] + [first.sibling(kp, s) for kp, s in zip(keep[1:], seed[1:])]
    per_epoch = [len(loader) for loader in loaders]
    if len(set(per_epoch)) > 1:
        raise ValueError(f'the models of a block take {per_epoch} steps per epoch: block only runs with equal '
                         "steps (with batching='rebatch', equal numbers of kept examples)")
    if per_epoch[0] == 0:
        raise ValueError(f'{len(images)} images make no full batch of {h["batch_size"]}; lower batch_size.')
    total_steps = math.ceil(h['epochs'] * per_epoch[0])
    peak_step = int(h['lr_peak_epoch'] * per_epoch[0])
    net = airbench.BlockNet(singles)
    del singles
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0, momentum=h['momentum'], nesterov=False,
                                weight_decay=h['weight_decay'])
    k = len(seed)
    scaler = BlockScaler(k, device, enabled=half)
    diverged = torch.zeros(k, dtype=torch.bool, device=device)

    net.train()
    step = 0
    for epoch in range(math.ceil(h['epochs'])):
        for batch in zip(*(loader.batches() for loader in loaders), strict=True):
            sizes = [len(idx) for idx, *_ in batch]
            b = max(sizes)
            x = torch.zeros(b, k, 3, 32, 32, device=device, dtype=DTYPE)
            y = torch.zeros(k, b, dtype=torch.long, device=device)
            valid = torch.zeros(k, b, dtype=torch.bool, device=device)
            for m, (loader, (idx, flip, shift, corner)) in enumerate(zip(loaders, batch)):
                x[:sizes[m], m] = loader.augment(idx, flip, shift, corner)
                y[m, :sizes[m]] = loader.labels[idx]
                valid[m, :sizes[m]] = True
            x = x.view(b, 3 * k, 32, 32).contiguous(memory_format=torch.channels_last)
            optimizer.param_groups[0]['lr'] = h['lr'] * lr_multiplier(step, peak_step, total_steps)
            with torch.autocast(device.type, dtype=torch.float16, enabled=half):
                logits = net(x, None if min(sizes) == b else valid)                         # (k, B, 10)
                losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction='none',
                                         label_smoothing=h['label_smoothing'])
            count = torch.tensor(sizes, device=device, dtype=losses.dtype)
            losses = torch.where(valid.flatten(), losses, 0.0).view(k, b).sum(1) / count  # (k,) batch means
            optimizer.zero_grad(set_to_none=True)
            (losses * scaler.scale).sum().backward()  # model m's weights get model m's (scaled) gradient only
            scaler.step(optimizer)
            step += 1
            if step >= total_steps:
                break
        diverged |= ~torch.isfinite(losses)  # once per epoch, as the single run
        if diverged.all():
            raise airbench.Diverged(f'every model of the block diverged: losses {losses.tolist()} after {step} '
                                    f'steps (epoch {epoch + 1})')
        if step >= total_steps:
            break
    with torch.no_grad():  # alone, a diverged run raises; here its model's logits are made NaN, so it fails alone
        for p in net.parameters():
            per_model(p, k)[diverged] = float('nan')
    net.eval()
    net.steps = step
    net.precision = 'float16' if half else 'float32'
    return net


def infer(net, images):
    """Logits (N, 10) float32 on the net's device for uint8 images (N, 32, 32, 3), (k, N, 10) for a block;
    no augmentation.
    In float16 (the default on CUDA) a float16 copy of the whole net (BatchNorm included) runs, as the
    original's model.half(); in float32 the net itself."""
    device = next(net.parameters()).device
    if airbench.resolve_precision(getattr(net, 'precision', 'auto'), device) == 'float16':
        net = copy.deepcopy(net).half()
    return airbench.infer(net, images, tta_level=0)


if __name__ == '__main__':
    raise SystemExit(experiment.main(sys.modules[__name__]))
