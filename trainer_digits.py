"""trainer_digits.py: the self-influence experiment on real data, on a laptop CPU.

    python trainer_digits.py --design factorial --runs 200 && python viz.py runs/digits-factorial
    python trainer_digits.py --smoke --runs 20      # the plumbing, in seconds

The recipe, how the runs are paired, more commands, every option in full: docs/trainers.md.
"""

import sys

import startup

if __name__ == '__main__':  # Ctrl-C while torch imports (seconds) is one line; experiment.main then takes over
    startup.ctrl_c_is_one_line()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import digits  # noqa: E402
import experiment  # noqa: E402
from digits import HELD_OUT, load  # noqa: E402, F401 (the harness reads them from this module)

NAME = 'digits'                # the store folder runs/digits and the trainer's name in its settings
DATA_DIR = False               # the data ship with scikit-learn: no --data-dir

hyp = {
    'widths': [256, 256],      # hidden units per layer; 64 pixels in, 10 logits out
    'norm': 'batch',           # after each hidden linear layer: 'batch' (BatchNorm), 'layer' (LayerNorm) or 'none'
    'bn_momentum': 0.1,        # weight of the NEW batch in BatchNorm's running statistics
                               # (PyTorch's convention, as in every trainer here)
    'epochs': 15,              # passes over the training set
    'batch_size': 128,         # nominal examples per batch, before held-out ones are removed; last partial batch dropped
    'loss_norm': 'nominal',    # the batch loss = summed cross-entropy of the kept rows / batch_size ('nominal'),
                               # or / the number of kept rows ('kept': the earlier trainer; see train)
    'lr': 0.2,                 # peak, per step, on that batch loss
    'schedule': [[0.0, 0.1], [0.25, 1.0], [1.0, 0.0]],  # lr multiplier at fractions of all steps, linear between
    'momentum': 0.9,           # SGD momentum (velocity decay per step)
    'nesterov': True,
    'weight_decay': 5e-4,      # L2 coefficient on every parameter, coupled to lr (torch SGD: lr x 5e-4 x w per step)
    'label_smoothing': 0.0,
}
SMOKE = {'widths': [32, 32], 'epochs': 2}  # a narrow net, 22 steps: seconds per block on a CPU
NORMS = ('batch', 'layer', 'none')
LOSS_NORMS = ('nominal', 'kept')
EPS = 1e-5                     # of BatchNorm and LayerNorm (PyTorch default)
BLOCK = 100                    # models trained at once: saturates 2 CPU cores
RUNS = 500                     # runs per arm by default (the harness default, 1000, is CIFAR-10's)


############################################
#       K models at once: parameters       #
############################################

def make_hyp(**overrides):
    """`hyp` with `overrides` applied; unknown names and norms are an error."""
    h = experiment.override(hyp, overrides)
    if h['norm'] not in NORMS:
        raise ValueError(f"norm={h['norm']!r}, expected 'batch' (BatchNorm), 'layer' (LayerNorm) or 'none'")
    if h['loss_norm'] not in LOSS_NORMS:
        raise ValueError(f"loss_norm={h['loss_norm']!r}, expected 'nominal' (summed loss / batch_size) or "
                         "'kept' (mean over the kept rows)")
    return h


def make_nets(seeds, widths=hyp['widths'], norm=hyp['norm'], device='cpu'):
    """Parameters of len(seeds) independent MLPs 64 -> widths -> 10, stacked on a leading model axis.
    Linear layers get PyTorch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases,
    drawn per model on the CPU from a generator seeded by its seed: the same weights on every device and
    in every block. Norm layers start at scale 1, shift 0; running statistics at mean 0, variance 1."""
    sizes = [64, *widths, 10]
    linear = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        linear.append([torch.empty(len(seeds), fan_in, fan_out), torch.empty(len(seeds), fan_out)])
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        for w, b in linear:
            bound = w.shape[1] ** -0.5
            w[k] = (torch.rand(w.shape[1:], generator=g) * 2 - 1) * bound
            b[k] = (torch.rand(b.shape[1:], generator=g) * 2 - 1) * bound
    k = len(seeds)
    return {
        'norm': norm,
        'linear': [[t.to(device) for t in layer] for layer in linear],    # [(K, in, out), (K, out)] per layer
        'affine': [[torch.ones(k, w, device=device), torch.zeros(k, w, device=device)] for w in widths],
        'running': [[torch.zeros(k, w, device=device), torch.ones(k, w, device=device)] for w in widths],
        'steps': 0,
    }


def parameters(nets):
    """The trained tensors (the norm affine only where a norm layer exists)."""
    params = [t for layer in nets['linear'] for t in layer]
    if nets['norm'] != 'none':
        params += [t for layer in nets['affine'] for t in layer]
    return params


############################################
#        K models at once: forward         #
############################################

def forward(nets, x, valid=None, momentum=hyp['bn_momentum']):
    """Logits (K, B, 10) of K models for x (K, B, 64) or (B, 64) (the same inputs for every model).
    valid (K, B) bool: training mode, BatchNorm from the valid rows' statistics (and their running
    statistics updated); None: eval mode, BatchNorm from the running statistics."""
    k = nets['linear'][0][0].shape[0]
    h = x.expand(k, *x.shape[-2:])                                       # (K, B, 64)
    *hidden, (w_out, b_out) = nets['linear']
    for (w, b), (scale, shift), (mean, var) in zip(hidden, nets['affine'], nets['running']):
        h = torch.baddbmm(b.unsqueeze(1), h, w)                              # (K, B, width)
        if nets['norm'] == 'batch' and valid is not None:
            h = digits.batch_norm(h, valid, scale, shift, mean, var, momentum, EPS)
        elif nets['norm'] == 'batch':
            h = torch.addcmul(shift.unsqueeze(1), h - mean.unsqueeze(1),
                              (scale * torch.rsqrt(var + EPS)).unsqueeze(1))
        elif nets['norm'] == 'layer':
            h = F.layer_norm(h, h.shape[-1:], eps=EPS) * scale.unsqueeze(1) + shift.unsqueeze(1)
        h = F.relu(h)
    return torch.baddbmm(b_out.unsqueeze(1), h, w_out)


############################################
#                 Training                 #
############################################

def lr_multiplier(step, total_steps, schedule=hyp['schedule']):
    """Multiple of the peak lr at `step`: piecewise linear through the (fraction of steps, multiplier) knots."""
    fractions, multipliers = zip(*schedule)
    return float(np.interp(step / total_steps, fractions, multipliers))


def train(images, labels, *, keep, seed, device=None, **overrides):
    """Train len(seed) MLPs at once; returns their parameters (a dict, see make_nets) in eval form with
    nets['steps'], the optimizer steps taken.

    images float32 (N, 64), labels int64 (N,), on `device`. keep: a list of K entries, each None (all
    examples) or the indices of the examples model k may see; seed: a list of K ints. Model k draws its
    init from seed[k] and, each epoch, a permutation of all N examples from np.random.default_rng(seed[k]);
    the examples not in keep[k] are then masked out of the batches they fall in: they add nothing to the
    loss (the kept rows' summed loss / batch_size, or / their count with loss_norm='kept'), the
    gradients or the BatchNorm statistics. Every model takes the
    same number of steps. A model that diverges ends with non-finite logits; the others are unaffected.
    """
    h = make_hyp(**overrides)
    device = torch.device(device or images.device)
    n_train = len(labels)
    kept = digits.kept_rows(keep, seed, n_train, h['batch_size'], device)  # (K, N) bool
    k, n_batches = len(seed), n_train // h['batch_size']
    rngs = [np.random.default_rng(s) for s in seed]

    nets = make_nets(seed, h['widths'], h['norm'], device)
    params = parameters(nets)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=h['lr'], momentum=h['momentum'], nesterov=h['nesterov'],
                                weight_decay=h['weight_decay'], fused=True)  # one kernel per tensor: 10x faster on CPU
    total_steps = h['epochs'] * n_batches
    for _ in range(h['epochs']):
        order = np.stack([digits.epoch_order(rng, n_train, h['batch_size']) for rng in rngs], 1)  # (batches, K, B)
        order = torch.from_numpy(order).to(device)
        for idx in order:                                   # (K, B) example indices
            valid = kept.gather(1, idx)                     # (K, B)
            x = torch.where(valid.unsqueeze(-1), images[idx], 0.0)  # masked rows hold zeros, never the example
            y = torch.where(valid, labels[idx], 0)
            logits = forward(nets, x, valid, h['bn_momentum'])
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction='none',
                                   label_smoothing=h['label_smoothing']).view(k, -1)
            # Divided by the nominal batch size, not by the count of kept rows: with the count, a removed
            # example would raise the weight of every other example of its batch (1/127 instead of 1/128),
            # a channel by which removing an example moves the whole training set, self-influence aside.
            # airbench's loss, summed over the batch with hyperparameters per 1024 examples, behaves the
            # same way: a removed example takes its own term out and leaves the others' weights alone.
            denominator = h['batch_size'] if h['loss_norm'] == 'nominal' else valid.sum(1).clamp(min=1)
            loss = torch.where(valid, loss, 0.0).sum(1) / denominator  # (K,)
            for group in optimizer.param_groups:
                group['lr'] = h['lr'] * lr_multiplier(nets['steps'], total_steps, h['schedule'])
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()                           # model k's parameters get model k's gradient only
            optimizer.step()
            nets['steps'] += 1
    for p in params:
        p.requires_grad_(False)
    return nets


@torch.no_grad()
def infer(nets, images):
    """Logits (K, N, 10) float32 of every model for images (N, 64), eval mode (running statistics)."""
    return forward(nets, images)


if __name__ == '__main__':
    raise SystemExit(experiment.main(sys.modules[__name__]))
