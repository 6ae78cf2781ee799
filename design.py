"""design.py: the designs of the experiment, apart from how runs are stored.

Which arms a store may have, the seed of each run, and which training examples a run of each arm may
see: with/without (a run sees every example, or all but the held-out ones), the factorial design (arms
`a`, `b`: run k of both shares seed k, and each held-out example is removed from exactly one of the two
by a fair coin drawn from the seed), and the scan (arm `scan`: each run on a random half); and `override`,
where every trainer's make_hyp starts. numpy only.
"""
import math

import numpy as np

ARMS = ('with', 'without')  # the experiment; a scan store has the single arm 'scan'
FACTORIAL_ARMS = ('a', 'b')  # the factorial design: each held-out example is removed from one run of the pair
DESIGNS = (list(ARMS), list(FACTORIAL_ARMS), ['scan'])  # the arms a store may have
SCAN_SEED_BASE = 1_000_000  # scans use seeds from here on, experiments from 0: the ranges never meet
MAX_RUNS = 1_000_000        # run files are named by six digits: runs 0 .. 999,999


def override(hyp, overrides):
    """Where every trainer's make_hyp starts: `hyp` with `overrides` applied -> a new dict; a name that is
    not in `hyp` is a TypeError naming the known ones."""
    unknown = set(overrides) - set(hyp)
    if unknown:
        raise TypeError(f'unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(hyp)}')
    h = {**hyp, **overrides}
    check_values(h)
    return h


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_values(h):
    """ValueError for a value of a name shared by the trainers that would crash or mislead the run: momentum
    in [0, 1) (above 0 where 'nesterov' is true: torch refuses Nesterov without momentum), label_smoothing in
    [0, 1), bn_momentum in [0, 1] (every recipe's is the weight of the new batch in BatchNorm's running
    statistics, PyTorch's convention: above 1 they leave every finite value), batch_size a positive integer,
    weight_decay >= 0, schedule a list of [fraction, multiplier] pairs with fractions rising within [0, 1]
    and multipliers >= 0. Names a trainer lacks are not checked."""
    if 'momentum' in h and not (_number(h['momentum']) and 0 <= h['momentum'] < 1):
        raise ValueError(f"momentum={h['momentum']!r}: expected a number in [0, 1)")
    if h.get('nesterov') is True:
        nesterov_momentum(h)
    if 'label_smoothing' in h and not (_number(h['label_smoothing']) and 0 <= h['label_smoothing'] < 1):
        raise ValueError(f"label_smoothing={h['label_smoothing']!r}: expected a number in [0, 1) (0: none)")
    if 'bn_momentum' in h and not (_number(h['bn_momentum']) and 0 <= h['bn_momentum'] <= 1):
        raise ValueError(f"bn_momentum={h['bn_momentum']!r}: expected a number in [0, 1], the weight of the new "
                         "batch in BatchNorm's running statistics")
    if 'batch_size' in h and not (isinstance(h['batch_size'], int) and not isinstance(h['batch_size'], bool)
                                  and h['batch_size'] >= 1):
        raise ValueError(f"batch_size={h['batch_size']!r}: expected a positive integer")
    if 'weight_decay' in h and not (_number(h['weight_decay']) and h['weight_decay'] >= 0):
        raise ValueError(f"weight_decay={h['weight_decay']!r}: expected a number >= 0")
    if 'schedule' in h:
        s = h['schedule']
        pairs = isinstance(s, (list, tuple)) and len(s) >= 1 and all(
            isinstance(k, (list, tuple)) and len(k) == 2 and all(_number(x) for x in k) for k in s)
        if not (pairs and all(0 <= f <= 1 and m >= 0 for f, m in s)
                and all(a[0] < b[0] for a, b in zip(s[:-1], s[1:]))):
            raise ValueError(f'schedule={s!r}: expected [[fraction, multiplier], ...] pairs, fractions rising '
                             'within [0, 1], multipliers >= 0, e.g. [[0.0, 0.1], [0.25, 1.0], [1.0, 0.0]]')


def nesterov_momentum(h):
    """ValueError unless momentum > 0: the check of a trainer whose SGD is Nesterov's."""
    if not h['momentum'] > 0:
        raise ValueError(f"momentum={h['momentum']!r}: Nesterov momentum needs a number in (0, 1)")


def seed_for(run, seed_base=0):
    """Run k of both arms uses the same seed: init, data order and augmentation are paired."""
    return seed_base + run


def held_out_indices(held_out):
    """{group: [indices]} -> (m,) int64, every held-out example in group order."""
    return np.asarray([i for g in held_out.values() for i in g], dtype=np.int64)


def factorial_split(seed, m):
    """(m,) bool, True where held-out example j is removed from run `a` of the pair with this seed (and
    kept in run `b`), False where it is removed from `b`. A fair coin per example, not an exact half:
    exact halves would make the signs of two examples anti-correlated (-1/(m-1)), which leaves a share
    of the cross-influences in each self-influence estimate and makes them unidentifiable by regression."""
    return np.random.default_rng([11, seed]).integers(0, 2, m).astype(bool)


def keep_for(arm, seed, n_train, held_out):
    """Indices of the training examples a run of `arm` may see (None: all of them).
    with: all; without: all but the held-out ones; a / b: all but the held-out ones the seed's
    factorial_split removes from that run; scan: a random half drawn from the run's seed."""
    if arm == 'with':
        return None
    if arm == 'without':
        return np.setdiff1d(np.arange(n_train), held_out_indices(held_out))
    if arm in FACTORIAL_ARMS:
        held = held_out_indices(held_out)
        removed_from_a = factorial_split(seed, len(held))
        return np.setdiff1d(np.arange(n_train), held[removed_from_a if arm == 'a' else ~removed_from_a])
    if arm == 'scan':
        return np.sort(np.random.default_rng([7, seed]).permutation(n_train)[:n_train // 2])
    raise ValueError(f'arm {arm!r}, expected with, without, a, b or scan')


def kept_mask(keep, n_train):
    """keep (None: every example, or the indices of the examples a run may see) -> (n_train,) bool,
    True where the run may see the example. numpy; torch users take torch.from_numpy of it."""
    if keep is None:
        return np.ones(n_train, dtype=bool)
    mask = np.zeros(n_train, dtype=bool)
    mask[np.asarray(keep, dtype=np.int64)] = True
    return mask


def kept_bits(arm, seed, n_train, held_out):
    """keep_for as packed bits, one per training example (None when a run sees all of them)."""
    keep = keep_for(arm, seed, n_train, held_out)
    return None if keep is None else np.packbits(kept_mask(keep, n_train))
