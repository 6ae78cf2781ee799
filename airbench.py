"""airbench.py: the airbench94 CIFAR-10 training recipe as a small library, on CUDA and on CPU.

    import airbench
    images, labels = airbench.load_cifar10('data')                  # uint8 (50000, 32, 32, 3), int64
    net = airbench.train94(images, labels, seed=0, lr=5.0, label_smoothing=0, batch_size=512)
    logits = airbench.infer(net, images)                            # (50000, 10) float32, no TTA

The recipe (94% CIFAR-10 test accuracy in a few seconds on one A100): a frozen 2x2 whitening conv fit
to the training patches, three conv groups of widths 64/256/256 with BatchNorm (scale frozen at 1),
Nesterov SGD with hyperparameters per 1024 examples, a triangular learning rate, and lookahead
(an EMA pulled into the live weights every 5 steps). The net runs channels-last (faster on CUDA and on
CPU); precision 'auto' is float16 with BatchNorm in float32 on CUDA and float32 elsewhere, and
'float16' runs the CUDA arithmetic on any device. In float32 on CPU, training is bit-identical to the
airbench 0.1.8 package the original experiment called (tests/test_reference.py). norm='layer' or
'none' replaces each BatchNorm by a per-example LayerNorm or by a bias (the ablations).

With lists keep=[...] and seed=[...], train94 trains a block of models at once as one fused net
(grouped convolutions, one BatchNorm over k x C channels, batched heads), each the run it would be
alone (train_block); infer then returns (k, N, 10).

`keep=` restricts training to a subset of the examples: the others are never in a batch nor in the
whitening statistics. With batching 'paired' (the default) every kept example sees the same batches
and augmentations as in the run without the restriction, minus the excluded examples, and the run takes
the same steps; with 'rebatch' the kept examples are cut into full batches, as the original experiment
did (its `without` arm trained a loader built on the kept images alone).
"""
import copy
import hashlib
import io
import math
import os
import pickle
import socket
import sys
import tarfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from design import kept_mask, nesterov_momentum, override

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# Library defaults. The self-influence experiment sets lr 5.0, label_smoothing 0, batch_size 512, flip 'random'.
hyp = {
    'lr': 11.5,                # per 1024 examples
    'momentum': 0.85,          # Nesterov
    'weight_decay': 0.0153,    # per 1024 examples, decoupled from lr
    'bias_scaler': 64.0,       # lr multiplier for BatchNorm biases (decay unchanged)
    'label_smoothing': 0.2,
    'batch_size': 1024,        # last partial batch dropped
    'epochs': 9.9,             # the last one partial: ceil(epochs x batches per epoch) steps in all
    'whiten_bias_epochs': 3,   # the whitening bias trains for this many epochs, then freezes
    'flip': 'alternate',       # 'random' (per image per epoch), 'alternate' (random, then flipped each epoch) or 'none'
    'translate': 2,            # pixels, reflect padding
    'cutout': 0,               # side of one zeroed square per image, pixels (0: none)
    'widths': (64, 256, 256),  # channels of the three conv groups
    'bn_momentum': 0.4,        # weight of the new batch in the running statistics (PyTorch's; the original's 0.6 weighs the old)
    'scaling_factor': 1 / 9,   # fixed multiplier of the output logits
    'batching': 'paired',      # with keep=: 'paired' (the others leave their batches) or 'rebatch' (full batches)
    'norm': 'batch',           # after each conv: 'batch' (BatchNorm), 'layer' (per example: GroupNorm, one group)
                               # or 'none' (a bias only); scale frozen at 1, bias trained with bias_scaler
    'precision': 'auto',       # 'float16' (channels-last net, norms in float32), 'float32', or 'auto':
                               # float16 on CUDA, float32 elsewhere
}
FLIPS = ('random', 'alternate', 'none')
BATCHINGS = ('paired', 'rebatch')
NORMS = ('batch', 'layer', 'none')
PRECISIONS = ('auto', 'float32', 'float16')


def default_device():
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def resolve_precision(precision, device):
    """'auto' -> 'float16' on CUDA, 'float32' elsewhere; 'float32' and 'float16' stay as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}, expected 'auto', 'float32' or 'float16'")
    if precision == 'auto':
        return 'float16' if torch.device(device).type == 'cuda' else 'float32'
    return precision


def dtype_for(device, precision='auto'):
    """The net's dtype: float16 (norm layers stay float32) or float32, see resolve_precision."""
    return torch.float16 if resolve_precision(precision, device) == 'float16' else torch.float32


############################################
#               CIFAR-10 files             #
############################################

class DataError(Exception):
    """Dataset missing or unreadable; the message says which file to put where."""


TRAIN_FILES = [f'data_batch_{i}' for i in range(1, 6)]
TEST_FILES = ['test_batch']
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'  # published with the archive; torchvision checks the same


def load_cifar10(data_dir='data', train=True, download=True, md5=CIFAR10_MD5):
    """CIFAR-10 from the standard python version, in torchvision's order (data_batch_1 .. 5).

    Looks for data_dir/cifar-10-batches-py/, then data_dir/cifar-10-python.tar.gz (read in place once its
    MD5 matches `md5`; None skips that check, for an archive you packed yourself), else downloads the
    archive. Returns images uint8 (N, 32, 32, 3), labels int64 (N,), on CPU. The batches are pickles:
    they are read without running anything from them (see _BatchUnpickler).
    """
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f'--data-dir {data_dir} is a file, expected a folder holding cifar-10-batches-py/ or '
                        'cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/ itself): pass that folder.')
    names = TRAIN_FILES if train else TEST_FILES
    folder = os.path.join(data_dir, 'cifar-10-batches-py')
    archive = os.path.join(data_dir, 'cifar-10-python.tar.gz')
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(data_dir, names[0])):
        folder = data_dir  # data_dir is the extracted cifar-10-batches-py/ folder itself
    if not os.path.isdir(folder) and not os.path.exists(archive):
        if not download:
            raise DataError(f'CIFAR-10 not found in {data_dir}: expected {folder}/ or {archive}. '
                            'Put cifar-10-python.tar.gz there, or allow the download.')
        _download(data_dir, archive)
    if os.path.isdir(folder):
        batches = []
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise DataError(f'{path} is missing. Put the complete cifar-10-batches-py/ folder '
                                f'(or cifar-10-python.tar.gz) in {data_dir}.')
            with open(path, 'rb') as f:
                batches.append(_read_batch(f.read(), path, name))
    else:
        batches = _read_archive(archive, names, md5)
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_archive(archive, names, md5):
    """The named batches, read from the tar.gz in memory: the bytes whose MD5 is checked are the bytes read."""
    try:
        with open(archive, 'rb') as f:
            raw = f.read()  # 163 MB for the real archive
        found = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if md5 is not None and found != md5:
            raise DataError(f'{archive} has MD5 {found}, expected {md5} (the published cifar-10-python.tar.gz): '
                            'a partial download or another file. Delete it and rerun to download it again, '
                            f'or put the genuine archive from {CIFAR10_URL} there.')
        with tarfile.open(fileobj=io.BytesIO(raw), mode='r:gz') as tar:
            batches = []
            for name in names:
                try:
                    member = tar.extractfile(f'cifar-10-batches-py/{name}')
                except KeyError:
                    raise DataError(f'{archive} has no cifar-10-batches-py/{name}: not the '
                                    'CIFAR-10 python archive. Replace it with cifar-10-python.tar.gz.')
                batches.append(_read_batch(member.read(), f'{archive}:{name}', name))
            return batches
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f'{archive} is truncated or corrupt ({e}). Delete it and rerun to download '
                        'again, or put a complete cifar-10-python.tar.gz there.') from e


# The only globals the genuine batches reference: they were pickled by Python 2's cPickle (protocol 2)
# from a dict of byte strings, lists of ints and one numpy uint8 array, and the array is rebuilt by
# numpy's reconstructor (named numpy.core.multiarray there, numpy._core.multiarray by numpy 2) from the
# ndarray type and a dtype. Anything else is refused when the pickle names it, before it can be built.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # taken from numpy, so that numpy.core (deprecated) is not imported
_ALLOWED = {('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
            ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
            ('numpy', 'ndarray'): np.ndarray,
            ('numpy', 'dtype'): np.dtype}


class _BatchUnpickler(pickle.Unpickler):
    """Reads one CIFAR-10 batch; raises DataError on any global outside _ALLOWED (e.g. posix.system)."""

    def __init__(self, raw, where):
        super().__init__(io.BytesIO(raw), encoding='bytes')  # Python 2 strings stay bytes
        self.where = where

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise DataError(f'{self.where} is not a CIFAR-10 batch: its pickle references {module}.{name}, '
                            'which no real batch does; refused before anything was built from it. Delete it '
                            'and rerun to download again, or put the genuine cifar-10-python.tar.gz '
                            f'(MD5 {CIFAR10_MD5}) in the data folder.')
        return _ALLOWED[module, name]


def _read_batch(raw, where, name):
    """One pickled batch -> (uint8 (n, 32, 32, 3), int64 (n,)), checked."""
    fix = 'Delete it and rerun to download again, or put a fresh cifar-10-python.tar.gz in the data folder.'
    try:
        d = _BatchUnpickler(raw, where).load()
        data, labels = np.asarray(d[b'data']), np.asarray(d[b'labels'], dtype=np.int64)
    except DataError:
        raise
    except Exception as e:  # a truncated pickle fails in many ways
        raise DataError(f'{where} is truncated or corrupt ({type(e).__name__}: {e}). {fix}') from e
    expected = 'testing batch 1 of 1' if name == 'test_batch' else f'training batch {name[-1]} of 5'
    found = d.get(b'batch_label', b'').decode(errors='replace')
    if found != expected:
        raise DataError(f'{where} is labelled {found!r}, expected {expected!r}: a file in the wrong place. {fix}')
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f'{where} holds data {data.dtype} {data.shape} and {len(labels)} labels, expected '
                        f'uint8 (n, 3072) and n labels. {fix}')
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f'{where} has labels outside 0..9. {fix}')
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _download(data_dir, archive):
    """Fetch cifar-10-python.tar.gz to `archive` with torchvision's downloader (which only fetches; its
    dataset class would unpickle the batches); the MD5 is checked when the archive is read. A partial
    download never takes the archive's name, and concurrent downloads (a job array) each write their own file."""
    from torchvision.datasets.utils import download_url
    print(f'downloading {CIFAR10_URL} (163 MB) to {data_dir}/', file=sys.stderr, flush=True)
    part = f'{archive}.part-{socket.gethostname()}-{os.getpid()}'
    made = _missing_folders(data_dir)  # the downloader makes them: a failed download removes them again
    try:
        download_url(CIFAR10_URL, data_dir, os.path.basename(part))
        os.replace(part, archive)
    except Exception as e:
        raise DataError(f'CIFAR-10 not found in {data_dir} and the download failed ({type(e).__name__}: {e}); '
                        f'offline? Put cifar-10-python.tar.gz in {data_dir}/ or pass another --data-dir.') from e
    finally:
        if os.path.exists(part):
            os.remove(part)
        if made and not os.path.exists(archive):
            for folder in made:  # deepest first
                try:
                    os.rmdir(folder)
                except OSError:
                    break  # not empty: something else was put there meanwhile


def _missing_folders(path):
    """The folders of `path` that do not exist yet, deepest first ([] if it exists)."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def fingerprint(images, labels):
    """A short hash of the dataset, so that a store knows which data made its runs."""
    import hashlib
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


############################################
#            Loader and augmentation       #
############################################

def normalise(images, device, dtype):
    """uint8 (N, 32, 32, 3) -> normalised (N, 3, 32, 32) in `dtype` on `device`, channels-last."""
    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)


def crop(padded, dy, dx, size=32):
    """Per-image crops: padded (B, C, H, W), offsets dy, dx (B,) -> (B, C, size, size)."""
    B, C = padded.shape[:2]
    ar = torch.arange(size, device=padded.device)
    rows = (dy[:, None] + ar).view(B, 1, size, 1)
    cols = (dx[:, None] + ar).view(B, 1, 1, size)
    return padded[torch.arange(B, device=padded.device).view(B, 1, 1, 1),
                  torch.arange(C, device=padded.device).view(1, C, 1, 1), rows, cols]


def cutout_mask(y0, x0, size, side=32):
    """(B, 1, side, side) bool: True inside the size x size square at (y0, x0) of each image."""
    ar = torch.arange(side, device=y0.device)
    in_rows = (ar >= y0[:, None]) & (ar < y0[:, None] + size)
    in_cols = (ar >= x0[:, None]) & (ar < x0[:, None] + size)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


class Loader:
    """Batches of augmented, normalised CIFAR images kept on `device` for the whole run.

    Each epoch draws, from `seed`, one permutation of all N examples and one augmentation per example
    (flip, translation offsets, cutout corner). With batching 'paired' it cuts the permutation into
    N // batch_size batches (drop_last) and then removes the examples not in `keep` from the batches
    they fall in: runs that differ only in `keep` take the same number of steps with the same batches,
    minus the excluded examples. With 'rebatch' it first removes the examples not in `keep` from the
    permutation and then cuts it into len(keep) // batch_size full batches. Either way every kept
    example gets the same augmentation as in a run without `keep`.
    """

    def __init__(self, images, labels, batch_size, *, keep=None, flip='random', translate=0, cutout=0,
                 seed=0, device=None, dtype=None, drop_last=True, batching='paired'):
        if flip not in FLIPS:
            raise ValueError(f"flip={flip!r}, expected 'random', 'alternate' or 'none'")
        if batching not in BATCHINGS:
            raise ValueError(f"batching={batching!r}, expected 'paired' or 'rebatch'")
        self.device = torch.device(device or default_device())
        self.dtype = dtype or dtype_for(self.device)
        self.n = len(images)
        self.batch_size, self.flip, self.translate, self.cutout = batch_size, flip, translate, cutout
        self.drop_last, self.batching = drop_last, batching
        self.labels = torch.as_tensor(labels).to(self.device)
        self.images = normalise(images, self.device, self.dtype)  # (N, 3, 32, 32)
        if translate:
            self.padded = F.pad(self.images, (translate,) * 4, mode='reflect')
        self.kept = torch.from_numpy(kept_mask(keep, self.n))  # (N,) bool, on the CPU
        self.kept_device = self.kept.to(self.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def sibling(self, keep, seed):
        """A loader of the same images (shared, not copied) with its own keep and seed, as if built alone."""
        other = copy.copy(self)
        other.__dict__.pop('first_flip', None)
        other.kept = torch.from_numpy(kept_mask(keep, self.n))
        other.kept_device = other.kept.to(self.device)
        other.generator = torch.Generator().manual_seed(seed)
        other.epoch = 0
        return other

    def __len__(self):
        n = int(self.kept.sum()) if self.batching == 'rebatch' else self.n  # examples cut into batches
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def first_kept(self, n):
        """The first n kept images, un-augmented (for the whitening statistics)."""
        return self.images[self.kept.nonzero()[:n, 0].to(self.device)]

    def draw_epoch(self):
        """This epoch's random choices for all N examples, drawn on the CPU so that a seed gives the
        same data order on every device."""
        g, n = self.generator, self.n
        order = torch.randperm(n, generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        if self.flip == 'alternate':
            if self.epoch == 0:
                self.first_flip = flip
            flip = self.first_flip ^ bool(self.epoch % 2)
        elif self.flip == 'none':
            flip = torch.zeros(n, dtype=torch.bool)
        shift = torch.randint(0, 2 * self.translate + 1, (n, 2), generator=g)
        corner = torch.randint(0, 32 - self.cutout + 1, (n, 2), generator=g)
        return order, flip, shift, corner

    def batches(self):
        """One epoch: for each batch, (indices, flip, shift, corner) of its kept examples."""
        order, flip, shift, corner = (t.to(self.device) for t in self.draw_epoch())
        self.epoch += 1
        if self.batching == 'rebatch':
            order = order[self.kept_device[order]]
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            idx = idx[self.kept_device[idx]]  # 'rebatch': already all kept
            if len(idx):
                yield idx, flip[idx], shift[idx], corner[idx]

    def __iter__(self):
        for idx, flip, shift, corner in self.batches():
            yield self.augment(idx, flip, shift, corner), self.labels[idx]

    def augment(self, idx, flip, shift, corner):
        if self.translate:
            x = crop(self.padded[idx], shift[:, 0], shift[:, 1])
        else:
            x = self.images[idx]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.cutout:
            x = x.masked_fill(cutout_mask(corner[:, 0], corner[:, 1], self.cutout), 0)
        return x.contiguous(memory_format=torch.channels_last)


############################################
#                  Network                 #
############################################

class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class BatchNorm(nn.BatchNorm2d):
    """Scale frozen at 1, bias trained; `momentum` is the weight of the new batch (PyTorch's convention)."""

    def __init__(self, num_features, momentum, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad = False


class LayerNorm(nn.GroupNorm):
    """Each example normalised over all its channels and pixels (one group), in float32; scale frozen at 1."""

    def __init__(self, num_features, eps=1e-12):
        super().__init__(1, num_features, eps=eps)
        self.weight.requires_grad = False

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class Bias(nn.Module):
    """No normalisation: a bias per channel, trained like BatchNorm's."""

    def __init__(self, num_features):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        return x + self.bias.to(x.dtype).view(1, -1, 1, 1)


NORM_LAYERS = (BatchNorm, LayerNorm, Bias)


def make_norm(norm, channels, momentum):
    if norm == 'batch':
        return BatchNorm(channels, momentum)
    return LayerNorm(channels) if norm == 'layer' else Bias(channels)


class Conv(nn.Conv2d):
    """A conv whose bias (if any) starts at zero and whose first in_channels filters start as the identity."""

    def __init__(self, channels_in, channels_out, kernel_size=3, padding='same', bias=False):
        super().__init__(channels_in, channels_out, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, channels_in, channels_out, momentum, norm='batch'):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = make_norm(norm, channels_out, momentum)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = make_norm(norm, channels_out, momentum)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


WHITEN_WIDTH = 2 * 3 * 2 * 2  # 12 patch eigenvectors and their negatives


def make_net(widths=hyp['widths'], bn_momentum=hyp['bn_momentum'], scaling_factor=hyp['scaling_factor'],
             device=None, norm='batch', dtype=None):
    """The airbench94 net: (B, 3, 32, 32) -> (B, 10) logits, in `dtype` (default: dtype_for(device))."""
    device = torch.device(device or default_device())
    w1, w2, w3 = widths
    net = nn.Sequential(
        # whitening: weights set from the data, then frozen; the bias starts at 0. (The Dirac filters this
        # init also gives it count only through the lookahead EMA, which starts before whitening.)
        Conv(3, WHITEN_WIDTH, kernel_size=2, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(WHITEN_WIDTH, w1, bn_momentum, norm),
        ConvGroup(w1, w2, bn_momentum, norm),
        ConvGroup(w2, w3, bn_momentum, norm),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(w3, 10, bias=False),
        Mul(scaling_factor),
    )
    net[0].weight.requires_grad = False
    net = net.to(device=device, dtype=dtype or dtype_for(device), memory_format=torch.channels_last)
    for m in net.modules():
        if isinstance(m, NORM_LAYERS) and net[0].weight.dtype == torch.float16:
            m.float()  # norm parameters and statistics in float32 under a float16 net, else the net's dtype
    return net


@torch.no_grad()
def init_whitening(conv, images, eps=5e-4):
    """Set the 2x2 conv to whiten the patches of `images` (n, 3, 32, 32): filters are the eigenvectors
    of the (uncentred) 12x12 patch second-moment matrix over sqrt(eigenvalue + eps), then their negatives."""
    c, (h, w) = images.shape[1], conv.weight.shape[2:]
    patches = images.float().unfold(2, h, 1).unfold(3, w, 1)            # (n, c, 31 rows, 31 columns, h, w)
    # patches ordered column by column, as in the original, so that their sum rounds the same
    patches = patches.permute(0, 3, 2, 1, 4, 5).reshape(-1, c * h * w)   # (n * 31 * 31, 12)
    moment = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment, UPLO='U')  # the original's triangle: its signs
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).view(-1, c, h, w)
    conv.weight.copy_(torch.cat([filters, -filters]))


############################################
#                 Training                 #
############################################

class Diverged(Exception):
    """Training produced a non-finite loss."""


# Both schedules are computed in float32 in the original's order of operations: one rounding
# difference in a learning rate and the weights differ from the next step on.
f32 = np.float32


def lr_multiplier(step, total_steps):
    """Triangular schedule: 0.2 at step 0, 1.0 at int(0.23 x total_steps), 0.07 at total_steps.
    float32, each segment as slope x step + intercept."""
    peak = int(0.23 * total_steps)
    (x0, y0), (x1, y1) = ((0, 0.2), (peak, 1.0)) if step < peak else ((peak, 1.0), (total_steps, 0.07))
    slope = (f32(y1) - f32(y0)) / f32(x1 - x0)
    return slope * f32(step) + (f32(y0) - slope * f32(x0))


def lookahead_decay(step, total_steps):
    """Weight of the EMA at a lookahead update (every 5 steps): 0.95^5 x (step / total_steps)^3, float32."""
    x = f32(step) / f32(total_steps)
    return float(f32(0.95 ** 5) * (x * x * x))


class Lookahead:
    """An EMA copy of every float parameter and buffer, pulled into the live weights at each update."""

    def __init__(self, net):
        self.live = [t for t in net.state_dict().values() if t.is_floating_point()]
        self.ema = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self, decay):
        for e, t in zip(self.ema, self.live):
            e.lerp_(t, 1 - decay)
            t.copy_(e)


def make_hyp(**overrides):
    """The library defaults with `overrides` applied; unknown names and choices are an error (before
    anything is trained: the harness calls it on the command line's --hyp)."""
    h = override(hyp, overrides)
    if h['flip'] not in FLIPS:
        raise ValueError(f"flip={h['flip']!r}, expected 'random', 'alternate' or 'none'")
    if h['batching'] not in BATCHINGS:
        raise ValueError(f"batching={h['batching']!r}, expected 'paired' or 'rebatch'")
    nesterov_momentum(h)
    if h['norm'] not in NORMS:
        raise ValueError(f"norm={h['norm']!r}, expected 'batch' (BatchNorm), 'layer' (per example) or 'none'")
    if h['precision'] not in PRECISIONS:
        raise ValueError(f"precision={h['precision']!r}, expected 'auto', 'float32' or 'float16'")
    return h


def make_optimizer(net, h):
    """Nesterov SGD with the per-1024-examples hyperparameters of h -> (optimizer, its base lrs per group).
    A Nesterov step is about 1 + 1/(1 - momentum) times the gradient, so dividing by that keeps the step
    scale independent of momentum. Norm biases (the first group) train at lr x bias_scaler."""
    kilostep_scale = 1024 * (1 + 1 / (1 - h['momentum']))
    lr = h['lr'] / kilostep_scale
    wd = h['weight_decay'] * h['batch_size'] / kilostep_scale  # absolute decay per step
    lr_biases = lr * h['bias_scaler']
    norm_biases = [m.bias for m in net.modules() if isinstance(m, (*NORM_LAYERS, BlockNorm))]
    others = [p for p in net.parameters() if p.requires_grad and not any(p is b for b in norm_biases)]
    optimizer = torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                                 dict(params=others, lr=lr, weight_decay=wd / lr)],
                                momentum=h['momentum'], nesterov=True)
    return optimizer, (lr_biases, lr)


def set_lr(optimizer, base_lrs, step, total_steps):
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group['lr'] = float(f32(base_lr) * lr_multiplier(step, total_steps))  # float32, as the original


def train94(images, labels, *, keep=None, seed=0, device=None, compile=False, **hyperparameters):
    """Train one airbench94 net and return it (lookahead weights, eval-ready).

    images: uint8 (N, 32, 32, 3); labels (N,); keep: indices of the examples to train on (default all);
    seed fixes init, data order and augmentation; hyperparameters: any key of `hyp`.
    With lists keep=[...] and seed=[...] (one entry each per model) it trains a block of models at
    once and returns a BlockNet (see train_block).
    """
    if isinstance(seed, (list, tuple)) or isinstance(keep, (list, tuple)):
        return train_block(images, labels, keep=keep, seed=seed, device=device, compile=compile, **hyperparameters)
    h = make_hyp(**hyperparameters)
    device = torch.device(device or default_device())
    dtype = dtype_for(device, h['precision'])
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # autotune convs once per input shape
    torch.manual_seed(seed)
    net = make_net(h['widths'], h['bn_momentum'], h['scaling_factor'], device, norm=h['norm'], dtype=dtype)
    loader = Loader(images, labels, h['batch_size'], keep=keep, flip=h['flip'], translate=h['translate'],
                    cutout=h['cutout'], seed=seed, device=device, dtype=dtype, batching=h['batching'])
    total_steps = math.ceil(len(loader) * h['epochs'])
    # The EMA starts from the weights before whitening, as in the original (its first pull, at decay
    # 1e-7, then moves the whitening filters by a rounding error).
    lookahead = Lookahead(net)
    init_whitening(net[0], loader.first_kept(5000))
    optimizer, base_lrs = make_optimizer(net, h)
    model = torch.compile(net) if compile else net

    step = 0
    for epoch in range(math.ceil(h['epochs'])):
        net[0].bias.requires_grad = epoch < h['whiten_bias_epochs']
        net.train()
        for x, y in loader:
            set_lr(optimizer, base_lrs, step, total_steps)
            loss = F.cross_entropy(model(x), y, label_smoothing=h['label_smoothing'], reduction='sum')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 5 == 0:
                lookahead.update(lookahead_decay(step, total_steps))
            if step >= total_steps:
                break
        if not torch.isfinite(loss):  # one check per epoch: a sync per step would cost speed on CUDA
            raise Diverged(f'loss is {loss.item()} after {step} steps (epoch {epoch + 1})')
        if step >= total_steps:
            break
    lookahead.update(1.0)  # decay 1: live weights become the EMA
    net.eval()
    return net


############################################
#         K models at once: a block        #
############################################

class BlockNorm(nn.Module):
    """The norm layers of k models over their k x C channels, model m's at channels m C .. (m+1) C.
    BatchNorm: each channel's statistics are its model's own; `valid` (B, k) bool, set by BlockNet for a
    batch with padded rows, leaves those rows out of the statistics (they still get an output, which the
    loss ignores). LayerNorm: GroupNorm with k groups, one per model. In the parameters' dtype (float32 for
    a float16 net), as the single layers.
    A trained BatchNorm scale (torch's nn.BatchNorm2d, as the Madry ResNet-9) is stacked as the bias is."""

    def __init__(self, layers):
        super().__init__()
        first = layers[0]
        self.k, self.channels = len(layers), len(first.bias)
        self.kind = 'batch' if isinstance(first, nn.BatchNorm2d) else 'layer' if isinstance(first, LayerNorm) else 'none'
        self.eps, self.momentum = getattr(first, 'eps', None), getattr(first, 'momentum', None)
        self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]))
        trained_scale = getattr(first, 'weight', None) is not None and first.weight.requires_grad
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in layers])) if trained_scale else None
        if self.kind == 'batch':
            self.register_buffer('running_mean', torch.cat([m.running_mean for m in layers]))
            self.register_buffer('running_var', torch.cat([m.running_var for m in layers]))
        self.valid = None

    def forward(self, x):
        if self.kind == 'none':
            return x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        if self.kind == 'layer':
            return F.group_norm(x.to(self.bias.dtype), self.k, None, self.bias, self.eps).to(x.dtype)
        if not self.training or self.valid is None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                self.momentum, self.eps)
        b, _, height, width = x.shape
        rows = self.valid.repeat_interleave(self.channels, 1).view(b, -1, 1, 1)        # (B, k C, 1, 1)
        count = self.valid.sum(0).repeat_interleave(self.channels) * (height * width)  # (k C,) pixels per channel
        xf = x.to(self.bias.dtype)  # float32 for a float16 net
        mean = torch.where(rows, xf, 0.0).sum((0, 2, 3)) / count
        centred = xf - mean.view(1, -1, 1, 1)
        var = torch.where(rows, centred, 0.0).square().sum((0, 2, 3)) / count         # biased, to normalise
        with torch.no_grad():  # PyTorch's running variance is unbiased
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        scale = torch.rsqrt(var + self.eps) if self.weight is None else torch.rsqrt(var + self.eps) * self.weight
        out = centred * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


class BlockLinear(nn.Module):
    """k heads at once: (B, k w) -> (k, B, 10), model m's features at columns m w .. (m+1) w."""

    def __init__(self, layers):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # (k, 10, w)

    def forward(self, x):
        k, _, w = self.weight.shape
        return torch.bmm(x.view(len(x), k, w).transpose(0, 1), self.weight.transpose(1, 2))


def fuse(modules):
    """k modules of the same structure -> one holding all k: convs grouped (groups=k), norms over k x C
    channels, heads batched; the weights copied, so model m's start is exactly its single net's."""
    first, k = modules[0], len(modules)
    if isinstance(first, nn.Conv2d):
        conv = nn.Conv2d(k * first.in_channels, k * first.out_channels, first.kernel_size, stride=first.stride,
                         padding=first.padding, bias=first.bias is not None, groups=k, device='meta')
        conv.weight = nn.Parameter(torch.cat([m.weight.detach() for m in modules]).contiguous(
            memory_format=torch.channels_last), requires_grad=first.weight.requires_grad)
        if first.bias is not None:
            conv.bias = nn.Parameter(torch.cat([m.bias.detach() for m in modules]))
        return conv
    if isinstance(first, (*NORM_LAYERS, nn.BatchNorm2d)):
        return BlockNorm(modules)
    if isinstance(first, nn.Linear):
        return BlockLinear(modules)
    if not first._modules:
        return first  # no weights: GELU, pooling, Flatten, Mul
    fused = copy.copy(first)
    fused._modules = {name: fuse([m._modules[name] for m in modules]) for name in first._modules}
    return fused


class BlockNet(nn.Module):
    """k airbench94 nets fused into one: (B, 3k, 32, 32), model m's images at channels 3m .. 3m+3, or
    (B, 3, 32, 32) for all -> (k, B, 10). `valid` (k, B) bool marks the real rows of a padded batch."""

    def __init__(self, nets):
        super().__init__()
        self.k = len(nets)
        self.net = fuse(nets)

    def forward(self, x, valid=None):
        if x.shape[1] == 3:
            x = x.repeat(1, self.k, 1, 1).contiguous(memory_format=torch.channels_last)
        for m in self.net.modules():
            if isinstance(m, BlockNorm):
                m.valid = None if valid is None else valid.T
        return self.net(x)


def train_block(images, labels, *, keep, seed, device=None, compile=False, **hyperparameters):
    """Train len(seed) airbench94 nets at once, one forward and backward of a BlockNet per step, and
    return it (lookahead weights, eval-ready; infer gives (k, N, 10)).

    keep, seed: lists, one entry per model. Model m is the run train94(keep=keep[m], seed=seed[m]) would
    make, up to float rounding: its init (built under torch.manual_seed(seed[m])), whitening from its
    first 5,000 kept images, its own Loader (data order, flips, translations, cutout), its keep. Batches
    of different sizes (a model without some examples) are padded with zero images and those rows masked
    out of the loss and the BatchNorm statistics. Every model takes the same steps (else ValueError).
    A model whose loss is not finite goes on with non-finite weights, and so non-finite logits; the
    others are unaffected (no op mixes models). Diverged only when every model diverged.
    """
    if not isinstance(seed, (list, tuple)) or not isinstance(keep, (list, tuple)):
        raise TypeError('a block takes lists: keep=[...] and seed=[...], one entry per model')
    if len(keep) != len(seed) or not seed:
        raise ValueError(f'{len(keep)} keep entries for {len(seed)} seeds: give one of each per model, at least one')
    h = make_hyp(**hyperparameters)
    device = torch.device(device or default_device())
    dtype = dtype_for(device, h['precision'])
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    singles = []
    for s in seed:
        torch.manual_seed(s)
        singles.append(make_net(h['widths'], h['bn_momentum'], h['scaling_factor'], device, norm=h['norm'],
                                dtype=dtype))
    first = Loader(images, labels, h['batch_size'], keep=keep[0], flip=h['flip'], translate=h['translate'],
                   cutout=h['cutout'], seed=seed[0], device=device, dtype=dtype, batching=h['batching'])
    loaders = [first] + [first.sibling(kp, s) for kp, s in zip(keep[1:], seed[1:])]
    steps = [len(loader) for loader in loaders]
    if len(set(steps)) > 1:
        raise ValueError(f'the models of a block take {steps} steps per epoch: block only runs with equal '
                         "steps (with batching='rebatch', equal numbers of kept examples)")
    total_steps = math.ceil(steps[0] * h['epochs'])
    net = BlockNet(singles)
    lookahead = Lookahead(net)  # from the weights before whitening, as the single run
    whiten = net.net[0].weight
    with torch.no_grad():
        for m, (single, loader) in enumerate(zip(singles, loaders)):
            init_whitening(single[0], loader.first_kept(5000))
            whiten[m * WHITEN_WIDTH:(m + 1) * WHITEN_WIDTH] = single[0].weight
    del singles
    optimizer, base_lrs = make_optimizer(net, h)
    model = torch.compile(net) if compile else net
    k = len(seed)
    diverged = torch.zeros(k, dtype=torch.bool, device=device)

    step = 0
    for epoch in range(math.ceil(h['epochs'])):
        net.net[0].bias.requires_grad = epoch < h['whiten_bias_epochs']
        net.train()
        for batch in zip(*(loader.batches() for loader in loaders), strict=True):
            sizes = [len(idx) for idx, *_ in batch]
            b = max(sizes)
            x = torch.zeros(b, k, 3, 32, 32, device=device, dtype=dtype)
            y = torch.zeros(k, b, dtype=torch.long, device=device)
            valid = torch.zeros(k, b, dtype=torch.bool, device=device)
            for m, (loader, (idx, flip, shift, corner)) in enumerate(zip(loaders, batch)):
                x[:sizes[m], m] = loader.augment(idx, flip, shift, corner)
                y[m, :sizes[m]] = loader.labels[idx]
                valid[m, :sizes[m]] = True
            x = x.view(b, 3 * k, 32, 32).contiguous(memory_format=torch.channels_last)
            set_lr(optimizer, base_lrs, step, total_steps)
            logits = model(x, None if min(sizes) == b else valid)                        # (k, B, 10)
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=h['label_smoothing'],
                                     reduction='none')
            # (k,): each model's own, summed in float32 at least (float64 where tests check a block in float64)
            losses = torch.where(valid.flatten(), losses, 0.0)
            losses = losses.to(torch.promote_types(losses.dtype, torch.float32)).view(k, b).sum(1)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # model m's weights get the gradient of model m's loss only
            optimizer.step()
            step += 1
            if step % 5 == 0:
                lookahead.update(lookahead_decay(step, total_steps))
            if step >= total_steps:
                break
        diverged |= ~torch.isfinite(losses)  # once per epoch, as the single run
        if diverged.all():
            raise Diverged(f'every model of the block diverged: losses {losses.tolist()} after {step} steps '
                           f'(epoch {epoch + 1})')
        if step >= total_steps:
            break
    lookahead.update(1.0)
    net.eval()
    return net


############################################
#                Inference                 #
############################################

@torch.no_grad()
def infer(net, images, tta_level=0, batch_size=2000):
    """Logits (N, 10) float32 on the net's device for uint8 images (N, 32, 32, 3), in eval mode; (k, N, 10)
    for a BlockNet. tta_level 1 averages with the mirror image; 2 also with two 1-pixel reflect-padded
    translations."""
    param = next(net.parameters())
    net.eval()
    out = []
    for chunk in torch.as_tensor(images).split(batch_size):
        x = normalise(chunk, param.device, param.dtype)
        logits = _mirror(net, x) if tta_level >= 1 else net(x).float()
        if tta_level >= 2:
            padded = F.pad(x, (1,) * 4, mode='reflect')
            shifted = [_mirror(net, padded[:, :, :32, :32]), _mirror(net, padded[:, :, 2:, 2:])]
            logits = 0.5 * logits + 0.25 * (shifted[0] + shifted[1])
        out.append(logits)
    return torch.cat(out, dim=1 if isinstance(net, BlockNet) else 0)


def _mirror(net, x):
    return 0.5 * (net(x).float() + net(x.flip(-1)).float())


def evaluate(net, images, labels, tta_level=2):
    """Accuracy in [0, 1] (a list of k for a BlockNet); tta_level 2 is the library's way to report test accuracy."""
    accuracy = (infer(net, images, tta_level).argmax(-1).cpu() == torch.as_tensor(labels)).float().mean(-1)
    return accuracy.tolist() if isinstance(net, BlockNet) else accuracy.item()
