"""Run stores in the real format (Store.create + save_run) whose margins are planted, for the analysis
tests (test_viz.py, test_factorial.py, test_scan.py)."""
import numpy as np

from store import Store


def logits_with_margins(margins, labels):
    """(..., n, 10) logits whose margins are `margins` (..., n): label logit = margin, one other class at 0,
    the other eight at -30 (they move the margin by 1e-12). Float16 storage: margins to about 0.004."""
    labels = np.asarray(labels)
    logits = np.full((*np.shape(margins), 10), -30.0)
    np.put_along_axis(logits, np.broadcast_to(((labels + 1) % 10)[:, None], logits.shape[:-1] + (1,)), 0.0, -1)
    np.put_along_axis(logits, np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)),
                      np.asarray(margins, dtype=np.float64)[..., None], -1)
    return logits.astype(np.float16)


def write_arms(path, held_out, labels, margins, seed_base=0):
    """A store whose every example has the planted margins: margins {arm: (runs, n_train)}, run k of every
    arm with seed seed_base + k; rows of NaN are not written (a missing run)."""
    settings = dict(trainer='toy', hyp={}, held_out=held_out, n_train=len(labels), data_fingerprint='toy',
                    seed_base=seed_base, arms=list(margins))
    store = Store.create(path, settings, labels)
    for arm, m in margins.items():
        for run, row in enumerate(m):
            if not np.isnan(row).all():
                store.save_run(arm, run, seed=seed_base + run, logits=logits_with_margins(row, labels),
                               seconds=1.0, test_acc=0.9)
    return store
