"""Generated data in the real CIFAR-10 file format, for tests that cannot download CIFAR-10."""
import os
import pickle
import struct
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_cifar_images(labels, rng):
    """An easy, learnable task: each class is a coloured stripe pattern of its own angle, plus noise.
    labels (n,) -> uint8 (n, 32, 32, 3)."""
    yy, xx = np.mgrid[0:32, 0:32]
    angle = labels[:, None, None] * np.pi / 10
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.6)              # (n, 32, 32)
    colour = np.stack([np.cos(labels), np.sin(labels), np.cos(2 * labels)], -1)     # (n, 3)
    img = 128 + 60 * stripes[..., None] * (0.5 + 0.5 * colour[:, None, None, :])
    img = img + rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array reconstructor (under numpy._core in numpy 2)


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the real CIFAR-10 batches (protocol 2; the real batches.meta
    is 158 bytes at protocol 2, 156 at protocol 1): str and bytes as Python 2 strings, numpy's array
    reconstructor under its numpy 1 name. Python 3's own protocol 2 wraps every bytes object in a
    call to _codecs.encode, which the real files never contain."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode('latin1') if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack('<i', len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b'numpy.core.multiarray\n_reconstruct\n')
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def dump_like_cifar(obj, f):
    """Pickle `obj` into the open binary file `f` the way the real CIFAR-10 files were pickled."""
    _Py2Pickler(f, protocol=2).dump(obj)


def write_cifar(root, n_per_batch=200, n_test=200, seed=0):
    """Write root/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) as CIFAR-10 does.
    Returns (train images (5 n, 32, 32, 3), train labels, test images, test labels)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    out = []
    for name, n, label in [*[(f'data_batch_{i}', n_per_batch, f'training batch {i} of 5') for i in range(1, 6)],
                           ('test_batch', n_test, 'testing batch 1 of 1')]:
        labels = rng.integers(0, 10, n)
        images = fake_cifar_images(labels, rng)
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CIFAR rows: R plane, G plane, B plane
        with open(os.path.join(folder, name), 'wb') as f:
            dump_like_cifar({b'batch_label': label.encode(), b'labels': labels.tolist(), b'data': data,
                             b'filenames': [f'{i}.png'.encode() for i in range(n)]}, f)
        out.append((images, labels))
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        dump_like_cifar({b'label_names': [f'class{i}'.encode() for i in range(10)]}, f)
    train_images = np.concatenate([o[0] for o in out[:5]])
    train_labels = np.concatenate([o[1] for o in out[:5]])
    return train_images, train_labels, out[5][0], out[5][1]


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory):
    """A data folder holding a generated CIFAR-format set: 1000 training and 200 test images."""
    root = tmp_path_factory.mktemp('data')
    write_cifar(root)
    return str(root)


def report(argv, capsys):
    """viz's command line on argv -> (its result, the report's lines on stdout, the notes on stderr)."""
    import viz
    res = viz.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return res, out.splitlines(), err


def body(lines):
    """A report's lines after its headline (the answer, ended by the first blank line)."""
    return lines[lines.index('') + 1:]


def written(csv_path, json_path):
    """What a report wrote with --csv and --json: (the CSV's rows as dicts, the JSON document)."""
    import csv
    import json
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    with open(json_path) as f:
        return rows, json.load(f)
