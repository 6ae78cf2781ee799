"""digits.py: what the two digits trainers share (trainer_digits.py, trainer_digits_conv.py).

scikit-learn's 8x8 handwritten digits (shipped inside the package: no download), the held-out digits
and the rule that chose them, one epoch's batches, a block's keep and seed lists as masks, and
BatchNorm over the kept rows of each model of a block.
"""
import numpy as np
import torch

import airbench
from design import kept_mask

N_TRAIN = 1437                 # the first 1437 of the 1797 digits; the last 360 are the test set
PER_CLASS = 2                  # held-out digits per class and group: no class piles up

# Held-out examples, indices into the 1437 training digits, class 0 to class 9 in each list, by a rule
# fixed before any confirmation run:
# - random: per class, the first 2 digits of that class in np.random.default_rng(0).permutation(1437)
#   (random_per_class below);
# - easy: from a scan of the MLP (trainer_digits.py) on seeds 1,000,000 to 1,000,499, the loss divided by
#   the nominal batch size: per class the 2 most negative scan estimates among the high-margin digits
#   (mean margin when included >= 10.07, the top quartile), whatever their sign or p-value:
#   viz_scan.easy_candidates(res, 20, per_class=2). Confirmation uses disjoint seeds (0 on).
HELD_OUT = {
    'random': [101, 1342, 1030, 1071, 1143, 12, 1160, 226, 270, 876,
               419, 1129, 960, 880, 870, 624, 1325, 284, 405, 589],
    'easy': [786, 1335, 1, 1050, 1084, 1207, 789, 193, 1268, 919,
             885, 176, 351, 1094, 610, 44, 1069, 684, 1296, 1027],
}


def random_per_class(labels, per_class=PER_CLASS, seed=0):
    """The random held-out digits: per class (0 first), the first `per_class` digits of that class in
    np.random.default_rng(seed).permutation(len(labels)). labels (N,) ints -> list of ints."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [int(i) for c in np.unique(labels) for i in order[labels[order] == c][:per_class]]


def load(data_dir=None):
    """(train images, train labels, test images, test labels) from scikit-learn's digits; data_dir is
    unused (the data ship with the package). Images float32 (N, 64) in [0, 1], labels int64 (N,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise airbench.DataError('the digits data ship with scikit-learn, which is not installed: '
                                 'pip install scikit-learn') from e
    data = load_digits()
    images = torch.tensor(data.data / 16.0, dtype=torch.float32)  # (1797, 64), pixels were 0..16
    labels = torch.tensor(data.target, dtype=torch.int64)
    return images[:N_TRAIN], labels[:N_TRAIN], images[N_TRAIN:], labels[N_TRAIN:]


def epoch_order(rng, n_train, batch_size):
    """One epoch's batches: a permutation of all n_train examples cut into n_train // batch_size batches
    (the last partial one dropped) -> (batches, batch_size) int64."""
    n_batches = n_train // batch_size
    return rng.permutation(n_train)[:n_batches * batch_size].reshape(n_batches, batch_size)


def kept_rows(keep, seed, n_train, batch_size, device):
    """A block of models, given as keep=[...] and seed=[...] (one entry each per model), checked and
    turned into (K, N) bool on `device`: True where model k may see the example."""
    if not isinstance(seed, (list, tuple)) or not isinstance(keep, (list, tuple)):
        raise TypeError('train takes lists: keep=[...] and seed=[...], one entry per model of the block')
    if len(keep) != len(seed):
        raise ValueError(f'{len(keep)} keep entries for {len(seed)} seeds: give one of each per model')
    if n_train // batch_size == 0:
        raise ValueError(f'{n_train} examples make no full batch of {batch_size}; lower batch_size.')
    return torch.from_numpy(np.stack([kept_mask(keep_k, n_train) for keep_k in keep])).to(device)


def batch_norm(h, valid, scale, shift, running_mean, running_var, momentum, eps=1e-5):
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
