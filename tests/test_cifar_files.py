import os

import airbench
from conftest import write_cifar


def test_the_extracted_batches_folder_itself_is_accepted_as_data_dir(tmp_path):
    write_cifar(str(tmp_path), n_per_batch=20, n_test=20)
    folder = tmp_path / 'cifar-10-batches-py'
    before = sorted(os.listdir(folder))
    images, labels = airbench.load_cifar10(str(folder), download=False)
    parent_images, parent_labels = airbench.load_cifar10(str(tmp_path), download=False)
    assert images.shape == (100, 32, 32, 3) and (images == parent_images).all() and (labels == parent_labels).all()
    assert sorted(os.listdir(folder)) == before  # nothing downloaded or written into it


def test_a_failed_download_leaves_none_of_the_folders_it_made(tmp_path, monkeypatch):
    import pytest
    import torchvision.datasets.utils

    def offline(url, root, filename):  # as torchvision does: the folders first, then the fetch fails
        os.makedirs(root, exist_ok=True)
        raise OSError('Network is unreachable')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', offline)
    with pytest.raises(airbench.DataError, match='download failed'):
        airbench.load_cifar10(str(tmp_path / 'nonexistent' / 'cifar'))
    assert os.listdir(tmp_path) == []


def test_a_file_as_data_dir_is_refused_in_one_line_and_nothing_is_downloaded(tmp_path, monkeypatch):
    import pytest
    import torchvision.datasets.utils

    def fetched(*a, **k):
        raise AssertionError('a download was tried')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', fetched)
    (tmp_path / 'cifar.tar.gz').write_text('not a folder')
    with pytest.raises(airbench.DataError) as e:
        airbench.load_cifar10(str(tmp_path / 'cifar.tar.gz'))
    assert 'is a file, expected a folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz' in str(e.value)
    assert '\n' not in str(e.value) and os.listdir(tmp_path) == ['cifar.tar.gz']
