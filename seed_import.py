"""seed_import.py: the original scripts' output as a store, so that viz.py reports it like any other.

    python viz.py --seed-folders nets10_default nets10_minus_n40 [--data-dir data]

The original saved each run's logits with torch.save, one (50000, 10) tensor per file named by a random
UUID: the `with` arm in one folder (nets10_default/*.pt), the `without` arm (the 40 held-out examples of
experiment.HELD_OUT removed) in another. Files are read with torch.load(weights_only=True), which runs no
code from them; anything but one floating-point (n_train, 10) tensor per .pt file is refused by name. The
runs carry no seed, so they are stored unpaired (the without runs numbered after the with runs, so no seed
matches): the report uses Welch's tests. The labels come from CIFAR-10's training set in --data-dir.
torch is imported here only: viz.py reads stores without it.
"""
import os

import numpy as np

from store import Store, StoreError, labels_digest

TRAINER = 'seed-folders'  # the trainer name of an imported store


def cifar10_labels(data_dir):
    """CIFAR-10's training labels (50000,) in torchvision's order, as the original's runs were made on."""
    import airbench
    if not (os.path.isdir(os.path.join(data_dir, 'cifar-10-batches-py'))
            or os.path.exists(os.path.join(data_dir, 'cifar-10-python.tar.gz'))):
        raise StoreError(f'CIFAR-10 not found in {data_dir}: its training labels are the labels of the seed\'s runs. '
                         'Put cifar-10-python.tar.gz (or cifar-10-batches-py/) there, or pass --data-dir')
    try:
        return airbench.load_cifar10(data_dir, download=False)[1].numpy()
    except airbench.DataError as e:
        raise StoreError(f'{e} (the labels of the seed\'s runs; pass --data-dir)') from None


def check_folder(folder):
    if not os.path.isdir(folder):
        raise StoreError(f'{folder} is not a folder; expected one of the original\'s run folders (e.g. nets10_default)')


def read_folder(folder, n_train):
    """Every run file of one of the original's folders, sorted by name -> [(name, logits (n_train, 10) float16)]."""
    import torch
    check_folder(folder)
    names = sorted(os.listdir(folder))
    other = [n for n in names if not n.endswith('.pt')]
    if other:
        raise StoreError(f'{os.path.join(folder, other[0])}: not a .pt run file; a seed folder holds only the '
                         f'original\'s <uuid>.pt files ({len(other)} other file(s)). Move it out.')
    if not names:
        raise StoreError(f'{folder} holds no .pt run file; expected the original\'s <uuid>.pt files')
    runs = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            logits = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # weights_only refuses any pickled object but tensors and plain containers
            raise StoreError(f'{path}: not readable as a saved tensor ({type(e).__name__}: '
                             f'{str(e).splitlines()[0] if str(e) else ""}); expected torch.save of one logit tensor') from None
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or tuple(logits.shape) != (n_train, 10):
            found = (f'a {logits.dtype} tensor of shape {tuple(logits.shape)}' if isinstance(logits, torch.Tensor)
                     else f'a {type(logits).__name__}')
            raise StoreError(f'{path}: {found}, expected a floating-point ({n_train}, 10) tensor of logits')
        runs.append((name, logits.to(torch.float16).numpy()))
    return runs


def import_folders(with_dir, without_dir, out, labels, held_out=None):
    """A store at `out` holding the runs of both folders, unpaired. -> the Store."""
    import experiment
    held_out = held_out or experiment.HELD_OUT
    labels = np.asarray(labels, dtype=np.int64)
    n_train = len(labels)
    arms = [read_folder(with_dir, n_train), read_folder(without_dir, n_train)]
    settings = dict(trainer=TRAINER, hyp={}, held_out=held_out, n_train=n_train,
                    data_fingerprint='labels-' + labels_digest(labels)[:16], seed_base=0)
    store = Store.create(out, settings, labels)
    run = 0
    for arm, files in zip(('with', 'without'), arms):
        for name, logits in files:
            store.save_run(arm, run, seed=run, logits=logits, seconds=float('nan'), test_acc=float('nan'), source=name)
            run += 1
    return store
