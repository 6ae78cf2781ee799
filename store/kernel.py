"""The margin of each training example in one run (stats.margins, bit for bit, without scipy): used where a
run is saved (its run file keeps its margins), where a run file's kept margins are checked, and where the
margins file is built from logits."""
import numpy as np

SPOT = 16  # examples of a run file whose kept margins are recomputed before the file's margins are trusted


class Kernel:
    """stats.margins of one run, (n, 10) float16 -> (n,) float64, equal to it bit for bit
    (tests/test_viz_cache.py) and about twice as fast: the ten classes as rows of a (10, n) array, so the
    max and the sum are elementwise over rows. The sum adds the exponentials in the order numpy's pairwise
    sum adds ten contiguous values (eight partial sums paired, then the last two in turn); anything else
    could change the last bit. Each example's margin depends on its own ten logits only, so the margins
    of some examples are those of the whole run at those examples."""

    def __init__(self, labels):
        n = len(labels)
        self.at_label = np.asarray(labels) * n + np.arange(n)  # flat positions in (10, n)
        self.work = np.empty((10, n))

    def __call__(self, logits, out=None):
        x = self.work
        x[:] = logits.T
        flat = x.reshape(-1)
        correct = flat[self.at_label]
        flat[self.at_label] = -np.inf
        top = x.max(0)
        # NaN/inf logits give a non-finite margin, as in stats.margins
        with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
            x -= top
            np.exp(x, out=x)
            s = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))
            s += x[8]
            s += x[9]
            np.log(s, out=s)
            np.subtract(correct, top, out=correct)
            return np.subtract(correct, s, out=out)


def spot_positions(n, run):
    """SPOT examples spread over 0..n-1, shifted by the run so that files are checked at different ones."""
    step = max(1, n // SPOT)
    return np.unique((np.arange(SPOT) * n // SPOT + run % step) % n)


def margins_agree(margins, logits, labels, run):
    """Whether a run file's kept margins, (n,) float64, are those of its logits (n, 10) at SPOT examples."""
    at = spot_positions(len(labels), run)
    return np.array_equal(margins[at], Kernel(labels[at])(logits[at]), equal_nan=True)
