"""trainer_madry.py: the with/without self-influence experiment with the Madry-lab ResNet-9 recipe.

Does adding an easy CIFAR-10 training example make the retrained net less confident on it (negative
self-influence), while adding a random example makes it more confident, with a second, conventional
recipe? The ResNet-9 of the datamodels CIFAR-10 example: residual conv-BN-ReLU net, heavy-ball SGD,
24 epochs, flip + translate + cutout, float16 autocast on a GPU, logits from a float16 copy of the net;
to see whether the effect survives outside airbench's training tricks.

    python trainer_madry.py                       # 1000 runs per arm into runs/madry/
    python trainer_madry.py --smoke --runs 2      # tiny net, a fraction of an epoch: checks the plumbing

Measured costs and results: docs/speed.md, docs/results.md.
"""
import copy
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import airbench
import experiment

NAME = 'madry'
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
    return net.to(torch.device(device), memory_format=torch.channels_last)


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
    """
    h = make_hyp(**overrides)
    device = torch.device(device or airbench.default_device())
    half = airbench.resolve_precision(h['precision'], device) == 'float16'  # autocast with loss scaling; else plain float32
    torch.backends.cudnn.benchmark = device.type == 'cuda'  # autotune convs once per input shape
    torch.manual_seed(seed)
    net = make_net(h['widths'], h['scaling_factor'], device)
    # float32 inputs: the parameters stay float32 and autocast picks float16 per op
    loader = airbench.Loader(images, labels, h['batch_size'], keep=keep, flip=h['flip'], translate=h['translate'],
                             cutout=h['cutout'], seed=seed, device=device, dtype=torch.float32,
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


def infer(net, images):
    """Logits (N, 10) float32 on the net's device for uint8 images (N, 32, 32, 3); no augmentation.
    In float16 (the default on CUDA) a float16 copy of the whole net (BatchNorm included) runs, as the
    original's model.half(); in float32 the net itself."""
    device = next(net.parameters()).device
    if airbench.resolve_precision(getattr(net, 'precision', 'auto'), device) == 'float16':
        net = copy.deepcopy(net).half()
    return airbench.infer(net, images, tta_level=0)


if __name__ == '__main__':
    raise SystemExit(experiment.main(sys.modules[__name__]))
