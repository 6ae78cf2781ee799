"""trainer_digits_conv.py: the self-influence experiment on the 8x8 digits with an airbench-style convnet.

    python trainer_digits_conv.py --design factorial --runs 350 && python viz.py runs/digitsconv-factorial
    python trainer_digits_conv.py --smoke --runs 4      # the plumbing

The recipe, how the runs are paired, more commands, every option in full: docs/trainers.md.
"""

import sys

import startup

if __name__ == '__main__':  # Ctrl-C while torch imports (seconds) is one line; experiment.main then takes over
    startup.ctrl_c_is_one_line()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import airbench  # noqa: E402
import digits  # noqa: E402
import experiment  # noqa: E402
from digits import HELD_OUT, load  # noqa: E402, F401 (the harness reads them from this module)

NAME = 'digitsconv'            # the store folder runs/digitsconv and the trainer's name in its settings
DATA_DIR = False               # the data ship with scikit-learn: no --data-dir

hyp = {
    'widths': [16, 32],        # channels of the conv groups; each group halves the resolution
    'pad': 2,                  # zero pixels around the 8x8 digit: a 12x12 canvas (12 -> 6 -> 3 -> global max)
    'translate': 2,            # pixels, each direction, per example per epoch (the canvas moves, the digit stays whole)
    'flip': 'none',            # 'random': horizontal flip per example per epoch, or 'none' (a mirrored digit is often
                               # another symbol: docs/results.md)
    'epochs': 8,               # passes over the training set: 88 steps
    'batch_size': 128,         # examples per batch before removed ones are masked; last partial batch dropped
    'lr': 10.0,                # per 1024 examples (airbench's experiment: 5.0 over ~970 steps; here 88)
    'momentum': 0.85,          # Nesterov
    'weight_decay': 0.0153,    # per 1024 examples, decoupled from lr
    'bias_scaler': 64.0,       # lr multiplier of the BatchNorm biases (decay unchanged)
    'norm': 'batch',           # after each conv: 'batch' (BatchNorm), 'layer' (each example's channels and pixels,
                               # per model: GroupNorm with one group) or 'none' (a bias only); scale frozen at 1
    'bn_momentum': 0.4,        # weight of the NEW batch in the running statistics (PyTorch's convention, as in
                               # every trainer here; the original airbench writes 0.6, the weight of the old)
    'scaling_factor': 1 / 3,   # fixed multiplier of the logits (airbench: 1/9 after 256 channels; here 32)
    'label_smoothing': 0.0,
    'lookahead': True,         # EMA of the weights pulled in every 5 steps, the EMA at the end (airbench)
}
SMOKE = {'widths': [8, 8], 'epochs': 1}
EPS = 1e-12                    # of BatchNorm (airbench)
FLIPS = ('random', 'none')     # airbench's names; its 'alternate' is not offered here
NORMS = ('batch', 'layer', 'none')
BLOCK = 50                     # models trained at once
RUNS = 300                     # runs per arm by default


def make_hyp(**overrides):
    """`hyp` with `overrides` applied; unknown names are an error."""
    h = experiment.override(hyp, overrides)
    if not h['widths'] or h['pad'] < 0 or h['translate'] < 0:
        raise ValueError(f"widths={h['widths']}, pad={h['pad']}, translate={h['translate']}: expected at least "
                         'one conv group and non-negative padding and translation')
    if h['flip'] not in FLIPS:
        raise ValueError(f"flip={h['flip']!r}, expected 'random' (per example per epoch) or 'none'")
    if h['norm'] not in NORMS:
        raise ValueError(f"norm={h['norm']!r}, expected 'batch' (BatchNorm), 'layer' (per example) or 'none'")
    experiment.nesterov_momentum(h)
    return h


############################################
#          Data and augmentation           #
############################################

def canvas(images, pad, translate):
    """(N, 64) digits -> (N, 8 + 2 (pad + translate)) squared, zero-padded: every crop of side
    8 + 2 pad holds the whole digit."""
    margin = pad + translate
    return F.pad(images.view(-1, 8, 8), (margin,) * 4)


def draw_epoch(rng, n_train, batch_size, translate):
    """One model's epoch: batches (n_batches, batch_size) int64, then flip (n_train,) bool and shift
    (n_train, 2) int64 in 0..2 translate (the crop's corner; translate = centred), for every example."""
    order = digits.epoch_order(rng, n_train, batch_size)
    flip = rng.random(n_train) < 0.5
    shift = rng.integers(0, 2 * translate + 1, (n_train, 2))
    return order, flip, shift


def augment(padded, idx, flip, shift, size):
    """Crops of side `size` of padded[idx] at corners `shift`, mirrored where `flip`.
    padded (N, P, P); idx, flip (R,); shift (R, 2) -> (R, size, size)."""
    x = airbench.crop(padded[idx].unsqueeze(1), shift[:, 0], shift[:, 1], size).squeeze(1)
    return torch.where(flip.view(-1, 1, 1), x.flip(-1), x)


############################################
#       K models at once: parameters       #
############################################

def conv_init(g, c_out, c_in):
    """(c_out, c_in, 3, 3): PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), then the first c_in
    filters the identity (airbench's Dirac init)."""
    w = (torch.rand(c_out, c_in, 3, 3, generator=g) * 2 - 1) * (9 * c_in) ** -0.5
    torch.nn.init.dirac_(w[:c_in])
    return w


def make_nets(seeds, widths=hyp['widths'], device='cpu'):
    """Parameters of len(seeds) independent convnets, drawn per model on the CPU from a generator seeded
    by its seed (the same weights on every device and in every block).
    convs: per conv (K x c_out, c_in, 3, 3), model k's filters at rows k c_out .. (k+1) c_out, the
    layout of a grouped convolution; shifts, running: per BatchNorm (K, c_out); linear (K, widths[-1], 10)."""
    k = len(seeds)
    shapes = []
    c_in = 1
    for w in widths:
        shapes += [(w, c_in), (w, w)]
        c_in = w
    convs = [torch.empty(k, c_out, c_in, 3, 3) for c_out, c_in in shapes]
    linear = torch.empty(k, widths[-1], 10)
    for m, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        for conv, (c_out, c_in) in zip(convs, shapes):
            conv[m] = conv_init(g, c_out, c_in)
        linear[m] = (torch.rand(widths[-1], 10, generator=g) * 2 - 1) * widths[-1] ** -0.5
    return {
        'convs': [c.flatten(0, 1).to(device) for c in convs],
        'shifts': [torch.zeros(k, c_out, device=device) for c_out, _ in shapes],     # norm biases
        'scales': [torch.ones(k, c_out, device=device) for c_out, _ in shapes],      # frozen at 1
        'running': [[torch.zeros(k, c_out, device=device), torch.ones(k, c_out, device=device)]
                    for c_out, _ in shapes],
        'linear': linear.to(device),
        'steps': 0,
    }


############################################
#        K models at once: forward         #
############################################

def per_model(h, k):
    """(B, K c, H, W) channels-last -> a (K, B H W, c) view of the same memory (no copy)."""
    b, kc, height, width = h.shape
    return h.permute(0, 2, 3, 1).reshape(b * height * width, k, kc // k).transpose(0, 1)


def from_per_model(h, b, height, width):
    """Inverse of per_model: (K, B H W, c) -> (B, K c, H, W) channels-last."""
    k, _, c = h.shape
    return h.transpose(0, 1).reshape(b, height, width, k * c).permute(0, 3, 1, 2)


def norm(nets, i, h, valid, hp):
    """Norm layer i of every model on h (B, K c, H, W), of the kind hp['norm']. 'batch': valid (K, B) bool
    is training, each model's statistics from its valid rows and all their pixels (running statistics
    updated with hp['bn_momentum']), None is eval. 'layer' and 'none' see one example at a time, so a
    masked row touches no other row."""
    k = len(nets['shifts'][i])
    if hp['norm'] == 'layer':  # groups = models: each example normalised over its own model's channels and pixels
        return F.group_norm(h, k, nets['scales'][i].flatten(), nets['shifts'][i].flatten(), EPS)
    if hp['norm'] == 'none':
        return h + nets['shifts'][i].view(1, -1, 1, 1)
    mean, var = nets['running'][i]
    if valid is None:
        scale = (nets['scales'][i] * torch.rsqrt(var + EPS)).view(1, -1, 1, 1)
        return torch.addcmul(nets['shifts'][i].view(1, -1, 1, 1), h - mean.view(1, -1, 1, 1), scale)
    b, _, height, width = h.shape
    rows = valid.unsqueeze(-1).expand(k, b, height * width).reshape(k, -1)   # (K, B H W) in per_model's order
    out = digits.batch_norm(per_model(h, k), rows, nets['scales'][i], nets['shifts'][i], mean, var,
                            hp['bn_momentum'], EPS)
    return from_per_model(out, b, height, width)


def forward(nets, x, valid=None):
    """Logits (K, B, 10) for x (B, K, S, S), model k's images in channel k (channels-last), with the
    hyperparameters the nets were trained with (nets['hyp']). valid (K, B) bool: training mode; None:
    eval mode (BatchNorm from the running statistics)."""
    hp = nets['hyp']
    k = nets['linear'].shape[0]
    h = x
    for i, conv in enumerate(nets['convs']):
        h = F.conv2d(h, conv, padding=1, groups=k)
        if i % 2 == 0:
            h = F.max_pool2d(h, 2)
        h = F.gelu(norm(nets, i, h, valid, hp))
    h = h.amax((2, 3)).view(len(h), k, -1).transpose(0, 1)                 # (K, B, widths[-1])
    return torch.bmm(h, nets['linear']) * hp['scaling_factor']


############################################
#                 Training                 #
############################################

def train(images, labels, *, keep, seed, device=None, **overrides):
    """Train len(seed) convnets at once; returns their parameters (a dict, see make_nets) after the
    last lookahead update, with nets['steps'] (optimizer steps taken) and nets['hyp'] (for infer).

    images float32 (N, 64) in [0, 1], labels int64 (N,). keep: K entries, None (all examples) or the
    indices model k may see; seed: K ints (init, batches and augmentations of model k). Every model
    takes the same steps; a removed example is masked out of the batch it falls in. A model that
    diverges ends with non-finite logits; the others of its block are unaffected.
    """
    h = make_hyp(**overrides)
    device = torch.device(device or images.device)
    n_train, batch_size = len(labels), h['batch_size']
    kept = digits.kept_rows(keep, seed, n_train, batch_size, device)  # (K, N) bool
    k, n_batches = len(seed), n_train // batch_size
    padded = canvas(images.to(device), h['pad'], h['translate'])
    size = 8 + 2 * h['pad']
    rngs = [np.random.default_rng(s) for s in seed]

    nets = make_nets(seed, h['widths'], device)
    nets['hyp'] = h
    # Per 1024 examples -> torch SGD, as airbench: a Nesterov step is about 1 + 1/(1 - momentum) gradients.
    kilostep_scale = 1024 * (1 + 1 / (1 - h['momentum']))
    lr = h['lr'] / kilostep_scale
    lr_biases = lr * h['bias_scaler']
    wd = h['weight_decay'] * batch_size / kilostep_scale            # absolute decay per step at the peak lr
    weights = [*nets['convs'], nets['linear']]
    for p in weights + nets['shifts']:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD([dict(params=nets['shifts'], lr=lr_biases, weight_decay=wd / lr_biases),
                                 dict(params=weights, lr=lr, weight_decay=wd / lr)],
                                momentum=h['momentum'], nesterov=True, fused=True)
    base_lrs = [group['lr'] for group in optimizer.param_groups]
    live = [*weights, *nets['shifts'], *(t for pair in nets['running'] for t in pair)]
    ema = [t.detach().clone() for t in live]
    total_steps = h['epochs'] * n_batches
    for _ in range(h['epochs']):
        draws = [draw_epoch(rng, n_train, batch_size, h['translate']) for rng in rngs]
        order = torch.from_numpy(np.stack([d[0] for d in draws], 1)).to(device)    # (batches, K, B)
        flipped = np.stack([d[1] for d in draws]) & (h['flip'] == 'random')                   # (K, N)
        flip = torch.from_numpy(flipped).to(device)
        shift = torch.from_numpy(np.stack([d[2] for d in draws])).to(device)       # (K, N, 2)
        for idx in order:                                                          # (K, B)
            valid = kept.gather(1, idx)
            x = augment(padded, idx.flatten(), flip.gather(1, idx).flatten(),
                        shift.gather(1, idx.unsqueeze(-1).expand(k, batch_size, 2)).flatten(0, 1), size)
            x = torch.where(valid.view(-1, 1, 1), x, 0.0)   # masked rows hold zeros, never the example
            x = x.view(k, batch_size, size, size).transpose(0, 1).contiguous(memory_format=torch.channels_last)
            y = torch.where(valid, labels[idx], 0)
            logits = forward(nets, x, valid)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction='none',
                                   label_smoothing=h['label_smoothing'])
            loss = torch.where(valid.flatten(), loss, 0.0).sum()  # summed: a removed row leaves the others' weight alone
            multiplier = airbench.lr_multiplier(nets['steps'], total_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group['lr'] = base * multiplier
            optimizer.zero_grad(set_to_none=True)
            loss.backward()                                 # model k's parameters get model k's gradient only
            optimizer.step()
            nets['steps'] += 1
            if h['lookahead'] and nets['steps'] % 5 == 0:
                lookahead(live, ema, airbench.lookahead_decay(nets['steps'], total_steps))
    if h['lookahead']:
        lookahead(live, ema, 1.0)                           # the live weights become the EMA
    for p in weights + nets['shifts']:
        p.requires_grad_(False)
    return nets


@torch.no_grad()
def lookahead(live, ema, decay):
    """Move the EMA toward the live tensors, then copy it into them (elementwise: per model)."""
    for e, t in zip(ema, live):
        e.lerp_(t, 1 - decay)
        t.copy_(e)


@torch.no_grad()
def infer(nets, images, chunk=512):
    """Logits (K, N, 10) float32 of every model for images (N, 64): the centred, unflipped digit, eval mode."""
    h, k = nets['hyp'], nets['linear'].shape[0]
    size = 8 + 2 * h['pad']
    out = []
    for part in images.split(chunk):
        x = canvas(part, h['pad'], 0).unsqueeze(1).expand(-1, k, size, size)
        x = x.contiguous(memory_format=torch.channels_last)
        out.append(forward(nets, x))
    return torch.cat(out, 1)


if __name__ == '__main__':
    raise SystemExit(experiment.main(sys.modules[__name__]))
