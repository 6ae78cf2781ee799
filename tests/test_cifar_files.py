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
