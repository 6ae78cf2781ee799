"""trainer_digits.py: the with/without self-influence experiment on a real dataset, on a laptop CPU.

Claim tested: adding an easy training example makes the retrained net less confident on it (negative
self-influence), while adding a random example makes it more confident. The CIFAR-10 trainers need
GPU-hours for this; here the same experiment runs on scikit-learn's 8x8 handwritten digits (1,797
images, 10 classes, shipped inside scikit-learn: no download) with a 64-256-256-10 MLP with BatchNorm,
trained BLOCK models at a time in one batched forward, so 2 x 500 trainings fit in minutes on 2 cores.

    python trainer_digits.py && python viz.py --trainer digits   # 500 runs per arm into runs/digits/
    python trainer_digits.py --smoke --runs 20                   # a narrow net, 2 epochs: the plumbing
    python trainer_digits.py --scan && python viz.py --scan --trainer digits   # random halves: rank every example

Data: the package's order, the first 1437 images train and the last 360 test; pixels 0..16 scaled to
[0, 1]; float32 on every device (a net this small gains nothing from float16). Run k of both arms
shares seed k: it fixes the init (a torch generator) and the order of the examples (a numpy
generator), and the `without` arm removes the 40 held-out examples from the batches they fall in, so
both arms take the same steps on the same batches. BatchNorm statistics, the loss and
the gradients of a model see only its kept examples; a model's result does not depend on the other
models of its block (tests/test_digits.py checks both). `hyp['norm']` switches BatchNorm for LayerNorm
('layer') or no normalisation ('none'), the variants that shrank or flipped the effect on CIFAR-10.

Cost, measured on a 2-core VM (Intel Xeon 2.5 GHz, torch 2.14.1, float32): 0.21 s per model in
blocks of 100 (0.40 in blocks of 10, no gain beyond 50); the default 2 x 500 trainings took 3 min 41 s
end to end, the 3000-run scan 7 min, `--smoke --runs 20` 9 s (mostly importing torch and scikit-learn).

Last result (500 runs per arm; README): random digits +0.358 [+0.325, +0.390]; of the 20 scan-chosen
easy digits, the 13 that are not 4s -0.124 on average, 12 of them significantly negative (paired
t-test, p < 0.01), while the 7 fours gain +0.454: removing 7 fours together lowers the margin of
each remaining held-out 4 (cross-influence within the held-out set).
"""

import numpy as np
import torch
import torch.nn.functional as F

import airbench
import experiment

hyp = {
    'widths': [256, 256],      # hidden units per layer; 64 pixels in, 10 logits out
    'norm': 'batch',           # after each hidden linear layer: 'batch' (BatchNorm), 'layer' (LayerNorm) or 'none'
    'bn_momentum': 0.1,        # weight of the new batch in BatchNorm's running statistics (PyTorch default)
    'epochs': 15,              # passes over the training set
    'batch_size': 128,         # examples per batch before held-out ones are removed; last partial batch dropped
    'lr': 0.2,                 # peak, per step on the batch-mean loss
    'schedule': [[0.0, 0.1], [0.25, 1.0], [1.0, 0.0]],  # lr multiplier at fractions of all steps, linear between
    'momentum': 0.9,
    'nesterov': True,
    'weight_decay': 5e-4,      # L2 on every parameter, coupled to lr (torch SGD)
    'label_smoothing': 0.0,
}
SMOKE = {'widths': [32, 32], 'epochs': 2}  # a narrow net, 22 steps: seconds per block on a CPU
NORMS = ('batch', 'layer', 'none')
EPS = 1e-5                     # of BatchNorm and LayerNorm (PyTorch default)
BLOCK = 100                    # models trained at once: saturates the 2 cores (see the cost above)
RUNS = 500                     # runs per arm by default (the harness default, 1000, is CIFAR-10's)
N_TRAIN = 1437                 # the first 1437 of the 1797 digits; the last 360 are the test set

# Held-out examples, indices into the 1437 training digits.
HELD_OUT = {
    # np.random.default_rng(0).choice(1437, 20, replace=False)
    'random': [1304, 437, 383, 1343, 725, 868, 804, 1390, 903, 927,
               249, 1160, 906, 23, 780, 107, 1206, 720, 1045, 58],
    # The scan's choice (discovery: `python trainer_digits.py --scan --runs 3000`, seeds 1,000,000 to
    # 1,002,999; `python viz.py --scan --trainer digits`): the 20 most negative self-influence estimates
    # among the high-margin digits (mean margin when included in the top quartile, >= 12.68), most
    # negative first. The with/without experiment confirms them on disjoint seeds (0 to 499).
    'easy': [372, 707, 1225, 1091, 919, 610, 229, 1268, 1036, 1169,
             885, 1429, 577, 631, 1407, 613, 817, 956, 1220, 273],
}


############################################
#                   Data                   #
############################################

def load(data_dir=None):
    """(train images, train labels, test images, test labels) from scikit-learn's digits; data_dir is
    unused (the data ship with the package). Images float32 (N, 64) in [0, 1], labels int64 (N,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise airbench.DataError('the digits data ship with scikit-learn, which is not installed: '
                                 'pip install scikit-learn') from e
    digits = load_digits()
    images = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # (1797, 64), pixels were 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return images[:N_TRAIN], labels[:N_TRAIN], images[N_TRAIN:], labels[N_TRAIN:]


############################################
#       K models at once: parameters       #
############################################

def settings(**overrides):
    """`hyp` with `overrides` applied; unknown names and norms are an error."""
    unknown = set(overrides) - set(hyp)
    if unknown:
        raise TypeError(f'unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(hyp)}')
    h = {**hyp, **overrides}
    if h['norm'] not in NORMS:
        raise ValueError(f"norm={h['norm']!r}, expected 'batch' (BatchNorm), 'layer' (LayerNorm) or 'none'")
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

def batch_norm(h, valid, scale, shift, running_mean, running_var, momentum, eps=EPS):
    """BatchNorm over the valid rows of each model, as if the others were not in the batch.
    h (K, B, w); valid (K, B) bool; scale, shift, running_* (K, w). Updates the running statistics in
    place (variance unbiased, as PyTorch does). Invalid rows must hold finite values (train zeroes them)."""
    count = valid.sum(1, dtype=h.dtype).view(-1, 1, 1)                  # (K, 1, 1) valid rows per model
    share = valid.to(h.dtype).unsqueeze(1) / count.clamp(min=1)         # (K, 1, B): 1/count, 0 if masked
    mean = torch.bmm(share, h)                                           # (K, 1, w); matmuls beat sums on CPU
    centred = h - mean
    var = torch.bmm(share, centred * centred)                            # (K, 1, w), biased, to normalise
    with torch.no_grad():
        running_mean.lerp_(mean.squeeze(1), momentum)
        running_var.lerp_((var * count / (count - 1).clamp(min=1)).squeeze(1), momentum)
    return torch.addcmul(shift.unsqueeze(1), centred, scale.unsqueeze(1) * torch.rsqrt(var + eps))


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
            h = batch_norm(h, valid, scale, shift, mean, var, momentum)
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


def epoch_order(rng, n_train, batch_size):
    """One epoch's batches: a permutation of all n_train examples cut into n_train // batch_size batches
    (the last partial one dropped) -> (batches, batch_size) int64."""
    n_batches = n_train // batch_size
    return rng.permutation(n_train)[:n_batches * batch_size].reshape(n_batches, batch_size)


def train(images, labels, *, keep, seed, device=None, **overrides):
    """Train len(seed) MLPs at once; returns their parameters (a dict, see make_nets) in eval form with
    nets['steps'], the optimizer steps taken.

    images float32 (N, 64), labels int64 (N,), on `device`. keep: a list of K entries, each None (all
    examples) or the indices of the examples model k may see; seed: a list of K ints. Model k draws its
    init from seed[k] and, each epoch, a permutation of all N examples from np.random.default_rng(seed[k]);
    the examples not in keep[k] are then masked out of the batches they fall in: they add nothing to the
    loss (a mean over the valid rows), the gradients or the BatchNorm statistics. Every model takes the
    same number of steps. A model that diverges ends with non-finite logits; the others are unaffected.
    """
    h = settings(**overrides)
    if not isinstance(seed, (list, tuple)) or not isinstance(keep, (list, tuple)):
        raise TypeError('train takes lists: keep=[...] and seed=[...], one entry per model of the block')
    if len(keep) != len(seed):
        raise ValueError(f'{len(keep)} keep entries for {len(seed)} seeds: give one of each per model')
    device = torch.device(device or images.device)
    n_train, k = len(labels), len(seed)
    n_batches = n_train // h['batch_size']
    if n_batches == 0:
        raise ValueError(f'{n_train} examples make no full batch of {h["batch_size"]}; lower batch_size.')
    kept = torch.ones(k, n_train, dtype=torch.bool)  # (K, N): which examples each model may see
    for row, keep_k in zip(kept, keep):
        if keep_k is not None:
            row[:] = False
            row[torch.as_tensor(keep_k, dtype=torch.long)] = True
    kept = kept.to(device)
    rngs = [np.random.default_rng(s) for s in seed]

    nets = make_nets(seed, h['widths'], h['norm'], device)
    params = parameters(nets)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=h['lr'], momentum=h['momentum'], nesterov=h['nesterov'],
                                weight_decay=h['weight_decay'], fused=True)  # one kernel per tensor: 10x faster on CPU
    total_steps = h['epochs'] * n_batches
    for _ in range(h['epochs']):
        order = np.stack([epoch_order(rng, n_train, h['batch_size']) for rng in rngs], 1)  # (batches, K, B)
        order = torch.from_numpy(order).to(device)
        for idx in order:                                   # (K, B) example indices
            valid = kept.gather(1, idx)                     # (K, B)
            x = torch.where(valid.unsqueeze(-1), images[idx], 0.0)  # masked rows hold zeros, never the example
            y = torch.where(valid, labels[idx], 0)
            logits = forward(nets, x, valid, h['bn_momentum'])
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction='none',
                                   label_smoothing=h['label_smoothing']).view(k, -1)
            loss = torch.where(valid, loss, 0.0).sum(1) / valid.sum(1).clamp(min=1)  # (K,) mean over valid rows
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
    raise SystemExit(experiment.main('digits', hyp, SMOKE, train, infer, __doc__, load=load, held_out=HELD_OUT,
                                     block=BLOCK, runs=RUNS, check=settings))
