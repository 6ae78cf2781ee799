"""Reading CIFAR-10 files never runs code from them, and the archive read is the published one."""
import functools
import hashlib
import http.server
import io
import os
import pickle
import pickletools
import re
import tarfile
import threading

import numpy as np
import pytest

import airbench
from conftest import dump_like_cifar, write_cifar

# A one-image data_batch_1 written by Python 2.7.18's cPickle.dumps(batch, 2) with numpy 1.16.6, as the
# real batches were: the 3072 data bytes (0..255 twelve times) sit between these two parts.
GENUINE_HEAD = (b'\x80\x02}q\x01(U\x04dataq\x02cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04'
                b'K\x00\x85U\x01b\x87Rq\x05(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nq\x06U\x02u1K\x00K\x01\x87Rq\x07'
                b'(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x0c\x00\x00')
GENUINE_TAIL = (b'tbU\x06labelsq\x08]q\tK\x07aU\x0bbatch_labelq\nU\x15training batch 1 of 5q\x0bU\tfilenamesq\x0c'
                b']q\rU\x05x.pngq\x0eau.')
GENUINE_ROW = bytes(range(256)) * 12


class RunsOnLoad:
    """Unpickles as the call func(arg): what an attacker puts in a batch."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def crafted_batch(marker, call, protocol):
    """Batch 1 in every other respect, whose b'data' creates the file `marker` when unpickled; protocol 2
    as the real files (GLOBAL opcodes), 5 as Python 3's newest (STACK_GLOBAL)."""
    payload = {'os.system': RunsOnLoad(os.system, f'touch {marker}'),
               'exec': RunsOnLoad(exec, f'open({str(marker)!r}, "w").close()')}[call]
    batch = {b'batch_label': b'training batch 1 of 5', b'labels': [0], b'data': payload}
    if protocol == 5:
        return pickle.dumps(batch, protocol=5)
    f = io.BytesIO()
    dump_like_cifar(batch, f)
    return f.getvalue()


def globals_in(raw):
    return {arg.replace(' ', '.') for op, arg, _ in pickletools.genops(raw) if op.name == 'GLOBAL'}


def pack(folder, archive):
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(folder / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    return hashlib.md5(archive.read_bytes()).hexdigest()


CRAFTED = [('os.system', 2, f'{os.system.__module__}.system'),  # posix.system on Linux
           ('exec', 5, 'builtins.exec')]


@pytest.mark.parametrize('call, protocol, forbidden', CRAFTED)
def test_crafted_batch_is_refused_naming_the_global_and_runs_nothing(tmp_path, call, protocol, forbidden):
    write_cifar(tmp_path, n_per_batch=10, n_test=10)
    marker = tmp_path / 'created-by-the-pickle'
    raw = crafted_batch(marker, call, protocol)
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_1').write_bytes(raw)
    with pytest.raises(airbench.DataError, match=r'data_batch_1 is not a CIFAR-10 batch: its pickle references '
                                                 + re.escape(forbidden)):
        airbench.load_cifar10(tmp_path, download=False)
    assert not marker.exists()
    pickle.loads(raw)  # the same bytes read with plain pickle do run: the attack is real
    assert marker.exists()


def test_tar_gz_holding_a_crafted_batch_is_refused(tmp_path):
    write_cifar(tmp_path / 'src', n_per_batch=10, n_test=10)
    marker = tmp_path / 'created-by-the-pickle'
    (tmp_path / 'src' / 'cifar-10-batches-py' / 'data_batch_1').write_bytes(crafted_batch(marker, 'os.system', 2))
    archive = tmp_path / 'cifar-10-python.tar.gz'
    md5 = pack(tmp_path / 'src', archive)
    with pytest.raises(airbench.DataError, match='MD5'):  # the default check stops it first
        airbench.load_cifar10(tmp_path, download=False)
    forbidden = re.escape(f'{os.system.__module__}.system')
    with pytest.raises(airbench.DataError, match=r'cifar-10-python.tar.gz:data_batch_1 is not a CIFAR-10 batch: '
                                                 r'its pickle references ' + forbidden):
        airbench.load_cifar10(tmp_path, download=False, md5=md5)  # even when its checksum is trusted
    assert not marker.exists()


def test_genuine_python2_batch_loads(tmp_path):
    write_cifar(tmp_path, n_per_batch=10, n_test=10)
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_1').write_bytes(GENUINE_HEAD + GENUINE_ROW + GENUINE_TAIL)
    x, y = airbench.load_cifar10(tmp_path, download=False)
    assert x.shape == (41, 32, 32, 3) and y[0] == 7
    planes = np.frombuffer(GENUINE_ROW, np.uint8).reshape(3, 32, 32)  # R, G, B planes, rows in order
    assert np.array_equal(x[0].numpy(), planes.transpose(1, 2, 0))


def test_generated_batches_reference_only_what_the_genuine_ones_do(tmp_path):
    write_cifar(tmp_path, n_per_batch=10, n_test=10)
    genuine = globals_in(GENUINE_HEAD + GENUINE_ROW + GENUINE_TAIL)
    assert genuine == {'numpy.core.multiarray._reconstruct', 'numpy.ndarray', 'numpy.dtype'}
    for name in airbench.TRAIN_FILES + airbench.TEST_FILES:
        raw = (tmp_path / 'cifar-10-batches-py' / name).read_bytes()
        assert raw[:2] == b'\x80\x02' and globals_in(raw) == genuine


def test_local_archive_with_another_md5_is_refused_saying_what_to_do(tmp_path):
    write_cifar(tmp_path / 'src', n_per_batch=10, n_test=10)
    md5 = pack(tmp_path / 'src', tmp_path / 'cifar-10-python.tar.gz')
    with pytest.raises(airbench.DataError, match=f'has MD5 {md5}, expected {airbench.CIFAR10_MD5} .*'
                                                 'Delete it and rerun to download it again'):
        airbench.load_cifar10(tmp_path, download=False)


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on the loopback address (torchvision's downloader speaks HTTP); yields
    (folder, base URL)."""
    folder = tmp_path / 'www'
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_downloaded_archive_is_checked_before_use(tmp_path, monkeypatch, served):
    write_cifar(tmp_path / 'src', n_per_batch=10, n_test=10)
    folder, url = served
    md5 = pack(tmp_path / 'src', folder / 'cifar-10-python.tar.gz')
    monkeypatch.setattr(airbench, 'CIFAR10_URL', f'{url}/cifar-10-python.tar.gz')
    with pytest.raises(airbench.DataError, match=f'has MD5 {md5}, expected {airbench.CIFAR10_MD5}'):
        airbench.load_cifar10(tmp_path / 'data')
    assert os.listdir(tmp_path / 'data') == ['cifar-10-python.tar.gz']  # no partial download left behind
    x, _ = airbench.load_cifar10(tmp_path / 'fresh', md5=md5)  # the same download, its MD5 expected: read
    assert x.shape == (50, 32, 32, 3)


def test_truncated_archive_is_still_reported_as_truncated(tmp_path):
    write_cifar(tmp_path / 'src', n_per_batch=30, n_test=10)
    archive = tmp_path / 'cifar-10-python.tar.gz'
    pack(tmp_path / 'src', archive)
    archive.write_bytes(archive.read_bytes()[:20000])
    with pytest.raises(airbench.DataError, match='cifar-10-python.tar.gz is truncated or corrupt'):
        airbench.load_cifar10(tmp_path, download=False, md5=None)
