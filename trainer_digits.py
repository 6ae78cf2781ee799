"""trainer_digits.py: the self-influence experiment on a real dataset, on a laptop CPU.

Question: does adding an easy training example make the retrained net less confident on it (negative
self-influence), as the CIFAR-10 experiment reports, while a random example makes it more confident?
The CIFAR-10 trainers need GPU-hours; here the same designs run on scikit-learn's 8x8 handwritten digits
(1,797 images, 10 classes, shipped inside scikit-learn: no download) with a 64-256-256-10 MLP with
BatchNorm, trained BLOCK models at a time in one batched forward.

    python trainer_digits.py --scan --runs 500 && python viz.py --scan --trainer digits     # screen every digit
    python trainer_digits.py --design factorial --runs 200 && python viz.py runs/digits-factorial   # confirm
    python trainer_digits.py --runs 100 && python viz.py --trainer digits                   # with/without, controls
    python trainer_digits.py --smoke --runs 20                                              # the plumbing, seconds

Data: the package's order, the first 1437 images train and the last 360 test; pixels 0..16 scaled to
[0, 1]; float32 on every device (a net this small gains nothing from float16). Run k of both arms
shares seed k: it fixes the init (a torch generator) and the order of the examples (a numpy
generator), and a run that must not see an example removes it from the batch it falls in, so both
arms take the same steps on the same batches. BatchNorm statistics, the loss and the gradients of a
model see only its kept examples, and the loss is divided by the nominal batch size, so a removed
example changes no other example's weight (see train); a model's result does not depend on the other
models of its block (tests/test_digits.py checks all three). `hyp['norm']` switches BatchNorm for
LayerNorm ('layer') or no normalisation ('none'); `hyp['loss_norm'] = 'kept'` restores the earlier
mean over the kept rows.

Cost on a 2-core VM (Intel Xeon 2.5 GHz, torch 2.14.1, float32): 0.21 s per model in blocks of 100 on
the idle VM (2 x 500 runs: 3 min 41 s). Shared with other jobs (load 4 to 10): the 500-run scan took
10 min 1 s, the 200-pair factorial store 7 min 52 s, 2 x 100 with/without runs 2 min 49 s.

Last result (README, "Without a GPU"): no negative self-influence survives the controls on digits.
Factorial design, 200 pairs: the 20 easy digits (2 per class, picked by the scan) +0.000 [-0.010,
+0.010] control-adjusted, none of them at p < 0.01; the 20 random digits +0.313 [+0.296, +0.329], 12 of
20 positive. With/without, 100 runs per arm: easy shift +0.081, of which +0.079 is shared by digits
never removed. Removing digit 780 alone (an atypical 4) moves its margin by -3.43; its controls lose
0.141.
"""

import numpy as np
import torch
import torch.nn.functional as F

import airbench
import experiment
from design import kept_mask

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
BLOCK = 100                    # models trained at once: saturates the 2 cores (see the cost above)
RUNS = 500                     # runs per arm by default (the harness default, 1000, is CIFAR-10's)
N_TRAIN = 1437                 # the first 1437 of the 1797 digits; the last 360 are the test set

# Held-out examples, indices into the 1437 training digits: 2 random and 2 easy per class, by a rule
# fixed before any confirmation run (random_per_class, easy_per_class below):
# - random: per class, the first 2 digits of that class in np.random.default_rng(0).permutation(1437);
# - easy: from a scan on seeds 1,000,000 on (`python trainer_digits.py --scan --runs 500`, the loss
#   divided by the nominal batch size), per class the 2 most negative scan estimates among the
#   high-margin digits (mean margin when included in the top quartile of all tested digits; a class with
#   fewer than 2 of them falls back to the top quartile of its own class), whatever their sign or
#   p-value, random picks skipped (the same 20 as `viz.py --scan`'s easy candidates at 2 per class,
#   viz_scan.easy_candidates(res, 20, per_class=2), whenever no fallback or skip is needed, as here).
#   Confirmation uses disjoint seeds (0 on).
# Both lists run class 0 to class 9. held_out_from_scan() redraws the set from a scan store.
HELD_OUT = {
    'random': [101, 1342, 1030, 1071, 1143, 12, 1160, 226, 270, 876,
               419, 1129, 960, 880, 870, 624, 1325, 284, 405, 589],
    # scan of 500 runs (seeds 1,000,000 to 1,000,499), high margin: mean margin when included >= 10.07
    'easy': [786, 1335, 1, 1050, 1084, 1207, 789, 193, 1268, 919,
             885, 176, 351, 1094, 610, 44, 1069, 684, 1296, 1027],
}
PER_CLASS = 2  # held-out digits per class and group: no class piles up (the earlier easy set held 7 fours)


def random_per_class(labels, per_class=PER_CLASS, seed=0):
    """The random held-out digits: per class (0 first), the first `per_class` digits of that class in
    np.random.default_rng(seed).permutation(len(labels)). labels (N,) ints -> list of ints."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [int(i) for c in np.unique(labels) for i in order[labels[order] == c][:per_class]]


def easy_per_class(scan, per_class=PER_CLASS, exclude=()):
    """The easy held-out digits from a scan analysis (the dict of viz_scan.analyse): per class (0 first),
    the `per_class` high-margin digits with the most negative self-influence estimate, whatever its sign
    or p-value, digits in `exclude` skipped. High margin: scan['high_margin'] (mean margin when included
    in the top quartile of all tested digits); a class with fewer than `per_class` such digits takes the
    top quartile of its own tested digits instead."""
    picks = []
    for c in np.unique(scan['label']):
        pool = scan['tested'] & (scan['label'] == c) & ~np.isin(scan['index'], list(exclude))
        high = pool & scan['high_margin']
        if high.sum() < per_class:
            high = pool & (scan['mean_in'] >= np.quantile(scan['mean_in'][pool], 0.75))
        candidates = np.flatnonzero(high)
        picks += [int(i) for i in candidates[np.argsort(scan['self_influence'][candidates], kind='stable')][:per_class]]
    return picks


def held_out_from_scan(path, labels=None):
    """{'random': [...], 'easy': [...]} by the rule above, from the scan store at `path`."""
    import viz_scan
    scan = viz_scan.analyse(viz_scan.open_scan(path))
    random = random_per_class(scan['label'] if labels is None else labels)
    return {'random': random, 'easy': easy_per_class(scan, exclude=random)}


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

def make_hyp(**overrides):
    """`hyp` with `overrides` applied; unknown names and norms are an error."""
    unknown = set(overrides) - set(hyp)
    if unknown:
        raise TypeError(f'unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(hyp)}')
    h = {**hyp, **overrides}
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


def check_block(keep, seed):
    """A block of models is given as two lists of the same length: keep=[...] and seed=[...]."""
    if not isinstance(seed, (list, tuple)) or not isinstance(keep, (list, tuple)):
        raise TypeError('train takes lists: keep=[...] and seed=[...], one entry per model of the block')
    if len(keep) != len(seed):
        raise ValueError(f'{len(keep)} keep entries for {len(seed)} seeds: give one of each per model')


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
    check_block(keep, seed)
    device = torch.device(device or images.device)
    n_train, k = len(labels), len(seed)
    n_batches = n_train // h['batch_size']
    if n_batches == 0:
        raise ValueError(f'{n_train} examples make no full batch of {h["batch_size"]}; lower batch_size.')
    kept = torch.from_numpy(np.stack([kept_mask(keep_k, n_train) for keep_k in keep])).to(device)  # (K, N) bool
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
    raise SystemExit(experiment.main('digits', hyp, SMOKE, train, infer, __doc__, load=load, held_out=HELD_OUT,
                                     block=BLOCK, runs=RUNS, check=make_hyp, data_dir=False))
