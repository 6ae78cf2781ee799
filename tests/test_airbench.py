"""The airbench94 library on CPU: data files, loader, augmentations, whitening, schedules, training."""
import math
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

import airbench
from conftest import dump_like_cifar, fake_cifar_images, write_cifar

TINY = dict(widths=(16, 16, 16), batch_size=100, epochs=1, lr=5.0, label_smoothing=0.0)


@pytest.fixture(scope='module')
def data(cifar_dir):
    return airbench.load_cifar10(cifar_dir)


# ---------------------------------------------------------------- data files

def test_reader_round_trips_pickle_batches_and_tar_gz(tmp_path):
    images, labels, test_images, test_labels = write_cifar(tmp_path / 'folder', n_per_batch=30, n_test=20)
    x, y = airbench.load_cifar10(tmp_path / 'folder', download=False)
    assert x.dtype == torch.uint8 and x.shape == (150, 32, 32, 3)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    xt, yt = airbench.load_cifar10(tmp_path / 'folder', train=False, download=False)
    assert np.array_equal(xt.numpy(), test_images) and np.array_equal(yt.numpy(), test_labels)

    os.makedirs(tmp_path / 'archive')
    with tarfile.open(tmp_path / 'archive' / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        tar.add(tmp_path / 'folder' / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    xa, ya = airbench.load_cifar10(tmp_path / 'archive', download=False, md5=None)  # not the published archive
    assert np.array_equal(xa.numpy(), images) and np.array_equal(ya.numpy(), labels)


def test_reader_keeps_torchvision_order_batch_1_to_5(tmp_path):
    write_cifar(tmp_path, n_per_batch=10, n_test=10)
    _, y = airbench.load_cifar10(tmp_path, download=False)
    for i in range(1, 6):
        with open(tmp_path / 'cifar-10-batches-py' / f'data_batch_{i}', 'rb') as f:
            batch = pickle.load(f, encoding='bytes')
        assert y[10 * (i - 1):10 * i].tolist() == batch[b'labels']


def test_truncated_batch_is_rejected_naming_the_file(tmp_path):
    write_cifar(tmp_path, n_per_batch=30, n_test=10)
    path = tmp_path / 'cifar-10-batches-py' / 'data_batch_3'
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(airbench.DataError, match='data_batch_3 is truncated or corrupt'):
        airbench.load_cifar10(tmp_path, download=False)


def test_truncated_archive_is_rejected(tmp_path):
    write_cifar(tmp_path / 'src', n_per_batch=30, n_test=10)
    archive = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(tmp_path / 'src' / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    archive.write_bytes(archive.read_bytes()[:20000])
    with pytest.raises(airbench.DataError, match='cifar-10-python.tar.gz'):
        airbench.load_cifar10(tmp_path, download=False)


def test_mislabelled_batch_is_rejected(tmp_path):
    write_cifar(tmp_path, n_per_batch=30, n_test=10)
    folder = tmp_path / 'cifar-10-batches-py'
    shutil.copy(folder / 'data_batch_3', folder / 'data_batch_2')  # batch 3 in batch 2's place
    with pytest.raises(airbench.DataError, match="data_batch_2 is labelled 'training batch 3 of 5'"):
        airbench.load_cifar10(tmp_path, download=False)


def test_labels_out_of_range_are_rejected(tmp_path):
    write_cifar(tmp_path, n_per_batch=30, n_test=10)
    path = tmp_path / 'cifar-10-batches-py' / 'data_batch_1'
    batch = pickle.loads(path.read_bytes(), encoding='bytes')
    batch[b'labels'][0] = 10
    with open(path, 'wb') as f:
        dump_like_cifar(batch, f)
    with pytest.raises(airbench.DataError, match='labels outside 0..9'):
        airbench.load_cifar10(tmp_path, download=False)


def test_missing_dataset_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(airbench.DataError, match='cifar-10-python.tar.gz'):
        airbench.load_cifar10(tmp_path, download=False)


# ---------------------------------------------------------------- loader and augmentation

def test_normalisation_uses_cifar_statistics():
    images = torch.full((2, 32, 32, 3), 128, dtype=torch.uint8)
    x = airbench.normalise(images, 'cpu', torch.float32)
    expected = [(128 / 255 - m) / s for m, s in zip(airbench.CIFAR_MEAN, airbench.CIFAR_STD)]
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0, :, 5, 7], torch.tensor(expected))


def test_flip_mirrors_the_image(data):
    images, labels = data
    loader = airbench.Loader(images, labels, 50, flip='random', device='cpu')
    idx = torch.arange(8)
    flip = torch.tensor([True, False] * 4)
    zeros = torch.zeros(8, 2, dtype=torch.long)
    x = loader.augment(idx, flip, zeros, zeros)
    assert torch.equal(x[0], loader.images[0].flip(-1))
    assert torch.equal(x[1], loader.images[1])


def test_translate_shifts_by_at_most_2_pixels_with_reflect_padding(data):
    images, labels = data
    loader = airbench.Loader(images, labels, 50, flip='none', translate=2, device='cpu')
    base = loader.images[:1]
    padded = torch.nn.functional.pad(base, (2, 2, 2, 2), mode='reflect')
    for dy in range(5):
        for dx in range(5):
            shift = torch.tensor([[dy, dx]])
            x = loader.augment(torch.tensor([0]), torch.tensor([False]), shift, shift)
            assert torch.equal(x[0], padded[0, :, dy:dy + 32, dx:dx + 32])
    x = loader.augment(torch.tensor([0]), torch.tensor([False]), torch.tensor([[2, 2]]), torch.tensor([[0, 0]]))
    assert torch.equal(x, base)  # offset 2 of 0..4 is the unshifted image
    for _, _, shift, _ in loader.batches():
        assert shift.min() >= 0 and shift.max() <= 4  # i.e. -2..+2 pixels


def test_cutout_zeroes_exactly_one_4x4_square(data):
    images, labels = data
    loader = airbench.Loader(images, labels, 100, flip='none', cutout=4, device='cpu')
    for idx, flip, shift, corner in loader.batches():
        x = loader.augment(idx, flip, shift, corner)
        changed = (x != loader.images[idx]).any(1)  # (B, 32, 32)
        zero = (x == 0).all(1)
        for b in range(len(idx)):
            y0, x0 = corner[b].tolist()
            square = torch.zeros(32, 32, dtype=torch.bool)
            square[y0:y0 + 4, x0:x0 + 4] = True
            assert torch.equal(changed[b], square & (loader.images[idx[b]] != 0).any(0))
            assert zero[b][square].all()
        break


def test_steps_per_epoch_follow_drop_last(data):
    images, labels = data  # 1000 examples
    for bs in (100, 128, 512, 1000):
        loader = airbench.Loader(images, labels, bs, device='cpu')
        assert len(loader) == 1000 // bs == len(list(loader))
        sizes = [len(i) for i, *_ in loader.batches()]
        assert sizes == [bs] * (1000 // bs)
    loader = airbench.Loader(images, labels, 128, device='cpu', drop_last=False)
    assert len(loader) == math.ceil(1000 / 128)


def test_excluded_indices_never_appear_in_a_batch_and_steps_are_unchanged(data):
    images, labels = data
    excluded = torch.arange(0, 1000, 7)
    keep = np.setdiff1d(np.arange(1000), excluded)
    full = airbench.Loader(images, labels, 128, seed=3, device='cpu')
    part = airbench.Loader(images, labels, 128, keep=keep, seed=3, device='cpu')
    for epoch in range(3):
        a, b = list(full.batches()), list(part.batches())
        assert len(a) == len(b) == 1000 // 128
        for (ia, fa, sa, ca), (ib, fb, sb, cb) in zip(a, b):
            assert not np.isin(ib.numpy(), excluded.numpy()).any()
            kept = ~np.isin(ia.numpy(), excluded.numpy())
            # the same batch minus the excluded examples, with the same augmentation for each
            assert torch.equal(ia[kept], ib) and torch.equal(fa[kept], fb) and torch.equal(sa[kept], sb)
    assert not np.isin(part.kept.nonzero()[:, 0].numpy(), excluded.numpy()).any()


def test_rebatch_cuts_the_kept_examples_into_full_batches(data):
    images, labels = data  # 1000 examples
    excluded = np.arange(0, 1000, 7)  # 143: 857 kept, 8 full batches of 100
    keep = np.setdiff1d(np.arange(1000), excluded)
    paired = airbench.Loader(images, labels, 100, keep=keep, translate=2, seed=3, device='cpu')
    rebatch = airbench.Loader(images, labels, 100, keep=keep, translate=2, seed=3, device='cpu', batching='rebatch')
    assert len(rebatch) == 8
    for epoch in range(3):
        batches, paired_batches = list(rebatch.batches()), list(paired.batches())
        assert [len(idx) for idx, *_ in batches] == [100] * 8
        seen = torch.cat([idx for idx, *_ in batches])
        assert len(set(seen.tolist())) == 800 and not np.isin(seen.numpy(), excluded).any()
        # each kept example keeps the augmentation it has in the paired run (one draw for all N per epoch)
        flip, shift = torch.zeros(1000, dtype=torch.bool), torch.zeros(1000, 2, dtype=torch.long)
        for idx, f, s, _ in paired_batches:
            flip[idx], shift[idx] = f, s
        in_both = torch.cat([idx for idx, *_ in paired_batches])
        for idx, f, s, _ in batches:
            both = np.isin(idx.numpy(), in_both.numpy())
            assert torch.equal(f[both], flip[idx[both]]) and torch.equal(s[both], shift[idx[both]])
    with pytest.raises(ValueError, match="batching='by class'"):
        airbench.Loader(images, labels, 100, device='cpu', batching='by class')


def test_rebatch_without_keep_is_the_paired_loader(data):
    images, labels = data
    a = airbench.Loader(images, labels, 128, translate=2, seed=5, device='cpu')
    b = airbench.Loader(images, labels, 128, translate=2, seed=5, device='cpu', batching='rebatch')
    for (ia, fa, sa, _), (ib, fb, sb, _) in zip(a.batches(), b.batches()):
        assert torch.equal(ia, ib) and torch.equal(fa, fb) and torch.equal(sa, sb)


def test_alternating_flip_flips_each_image_every_other_epoch(data):
    images, labels = data
    loader = airbench.Loader(images, labels, 100, flip='alternate', device='cpu')
    f0 = loader.draw_epoch()[1]
    loader.epoch += 1
    f1 = loader.draw_epoch()[1]
    loader.epoch += 1
    f2 = loader.draw_epoch()[1]
    assert torch.equal(f1, ~f0) and torch.equal(f2, f0) and 0.3 < f0.float().mean() < 0.7


# ---------------------------------------------------------------- network and its initialisation

def test_whitening_maps_its_patches_to_near_identity_covariance(data):
    images, labels = data
    x = airbench.normalise(images[:500], 'cpu', torch.float32)
    conv = torch.nn.Conv2d(3, 24, 2, bias=False)
    airbench.init_whitening(conv, x, eps=0.0)
    with torch.no_grad():
        out = conv(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()  # the 12 positive filters
    moment = out.T @ out / len(out)
    assert torch.allclose(moment, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(conv.weight[12:], -conv.weight[:12])


def test_net_shapes_dirac_init_and_frozen_batchnorm_scale():
    torch.manual_seed(0)
    net = airbench.make_net(widths=(16, 32, 32), device='cpu')
    assert net(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    conv = net[2].conv1  # 24 -> 16: its first 16 filters are not identity (more inputs than outputs)
    conv2 = net[2].conv2  # 16 -> 16: identity
    assert torch.equal(conv2.weight[:, :, 1, 1], torch.eye(16)) and conv2.weight[:, :, [0, 2]].abs().sum() == 0
    assert conv.bias is None and not net[0].weight.requires_grad
    bns = [m for m in net.modules() if isinstance(m, airbench.BatchNorm)]
    assert len(bns) == 6 and all(not b.weight.requires_grad and b.bias.requires_grad for b in bns)
    assert all(b.eps == 1e-12 and abs(b.momentum - 0.4) < 1e-12 for b in bns)


# ---------------------------------------------------------------- schedules

def test_lr_schedule_matches_recipe():
    total = 1000  # peak at int(0.23 * 1000) = 230
    assert airbench.lr_multiplier(0, total) == pytest.approx(0.2)
    assert airbench.lr_multiplier(115, total) == pytest.approx(0.6)
    assert airbench.lr_multiplier(230, total) == pytest.approx(1.0)
    assert airbench.lr_multiplier(615, total) == pytest.approx(1.0 - 0.93 * 385 / 770)
    assert airbench.lr_multiplier(1000, total) == pytest.approx(0.07)


def test_sgd_uses_per_1024_hyperparameters_and_bias_scaler():
    # lr 5.0, momentum 0.85, batch 512: k = 1024 * (1 + 1 / 0.15)
    k = 1024 * (1 + 1 / 0.15)
    lr, wd = 5.0 / k, 0.0153 * 512 / k
    seen = {}
    real_sgd = torch.optim.SGD

    def spy(groups, **kw):
        seen['groups'], seen['kw'] = [dict(g) for g in groups], kw  # copies: training changes 'lr' in place
        return real_sgd(groups, **kw)
    torch.optim.SGD = spy
    try:
        images = torch.zeros(600, 32, 32, 3, dtype=torch.uint8) + 100
        airbench.train94(images, torch.zeros(600, dtype=torch.long), device='cpu', widths=(8, 8, 8),
                         batch_size=512, epochs=0.1, lr=5.0)
    finally:
        torch.optim.SGD = real_sgd
    biases, others = seen['groups']
    assert biases['lr'] == pytest.approx(64 * lr) and biases['lr'] * biases['weight_decay'] == pytest.approx(wd)
    assert others['lr'] == pytest.approx(lr) and others['lr'] * others['weight_decay'] == pytest.approx(wd)
    assert seen['kw'] == dict(momentum=0.85, nesterov=True)
    assert len(biases['params']) == 6


def test_lookahead_decay_and_update_match_recipe():
    assert airbench.lookahead_decay(500, 1000) == pytest.approx(0.95 ** 5 * 0.125)
    assert airbench.lookahead_decay(1000, 1000) == pytest.approx(0.95 ** 5)
    net = torch.nn.BatchNorm1d(3)
    look = airbench.Lookahead(net)
    with torch.no_grad():
        net.bias.fill_(1.0)
    look.update(0.25)  # ema = 0.25 * 0 + 0.75 * 1, copied back to the live weights
    assert torch.allclose(net.bias, torch.full((3,), 0.75))
    with torch.no_grad():
        net.bias.fill_(5.0)
    look.update(1.0)  # the final update: live weights become the EMA
    assert torch.allclose(net.bias, torch.full((3,), 0.75))
    assert net.num_batches_tracked.dtype == torch.long and len(look.ema) == 4  # the integer buffer is left alone


# ---------------------------------------------------------------- training

def test_training_learns_the_generated_task(cifar_dir, data):
    images, labels = data
    test_images, test_labels = airbench.load_cifar10(cifar_dir, train=False)
    net = airbench.train94(images, labels, seed=0, device='cpu', **{**TINY, 'epochs': 4})
    assert airbench.evaluate(net, test_images, test_labels, tta_level=0) > 0.6  # chance is 0.1
    tta = airbench.infer(net, test_images[:10], tta_level=2)
    assert tta.shape == (10, 10) and torch.isfinite(tta).all()


def test_same_seed_same_logits_different_seed_different(data):
    images, labels = data
    runs = [airbench.infer(airbench.train94(images, labels, seed=s, device='cpu', **TINY), images[:100])
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_unknown_hyperparameter_is_an_error(data):
    with pytest.raises(TypeError, match='unknown hyperparameter'):
        airbench.train94(*data, device='cpu', learning_rate=5.0)


def test_excluded_examples_have_no_influence_at_all(data):
    """Training with keep= is bit-identical whatever the excluded images and labels hold."""
    images, labels = data
    excluded = np.arange(0, 600, 5)  # inside the first 5000 too: out of the whitening statistics
    keep = np.setdiff1d(np.arange(len(labels)), excluded)
    garbage_images, garbage_labels = images.clone(), labels.clone()
    garbage_images[excluded] = 255 - garbage_images[excluded]
    garbage_labels[excluded] = (garbage_labels[excluded] + 3) % 10
    a = airbench.train94(images, labels, keep=keep, seed=4, device='cpu', **TINY)
    b = airbench.train94(garbage_images, garbage_labels, keep=keep, seed=4, device='cpu', **TINY)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    c = airbench.train94(garbage_images, garbage_labels, seed=4, device='cpu', **TINY)  # sanity: they matter when kept
    assert not torch.equal(a[0].weight, c[0].weight)


def test_diverged_training_raises(data):
    images, labels = data
    with pytest.raises(airbench.Diverged):
        airbench.train94(images, labels, device='cpu', **{**TINY, 'lr': 1e30})


# ---------------------------------------------------------------- the norm ablations and the bias scaler

FAST = dict(widths=(8, 8, 8), batch_size=50, epochs=1, lr=10.0, scaling_factor=1.0, label_smoothing=0.0,
            whiten_bias_epochs=1)  # learns the generated task in 12 steps, about 55% test accuracy


# without BatchNorm the net needs a lower learning rate: 48 steps at lr 2
@pytest.mark.parametrize('settings', [dict(norm='layer', lr=2.0, epochs=4), dict(norm='none', lr=2.0, epochs=4),
                                      dict(bias_scaler=1.0)])
def test_the_norm_ablations_and_no_bias_scaler_train_and_learn(settings):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 800)
    images, labels = torch.from_numpy(fake_cifar_images(labels, rng)), torch.from_numpy(labels)
    net = airbench.train94(images[:600], labels[:600], seed=0, device='cpu', **{**FAST, **settings})
    kinds = {type(m) for m in net.modules() if isinstance(m, airbench.NORM_LAYERS)}
    assert kinds == {{'layer': airbench.LayerNorm, 'none': airbench.Bias}.get(settings.get('norm'), airbench.BatchNorm)}
    assert airbench.evaluate(net, images[600:], labels[600:], tta_level=0) >= 0.3  # chance: 0.1


@pytest.mark.parametrize('norm', ['batch', 'layer', 'none'])
def test_only_batchnorm_lets_examples_of_a_batch_influence_each_other(norm):
    torch.manual_seed(0)
    net = airbench.make_net((16, 16, 16), device='cpu', norm=norm)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, airbench.NORM_LAYERS):
                m.bias.normal_()  # trained biases, not zeros
        net.train()
        x = torch.randn(17, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        alone = net(x[:9])[0]                                       # example 0 among examples 1..8
        among_others = net(torch.cat([x[:1], x[9:]]))[0]            # example 0 among examples 9..16
    if norm == 'batch':
        assert (alone - among_others).abs().max() > 1e-3
    else:
        assert torch.allclose(alone, among_others, rtol=1e-5, atol=1e-6)


def test_make_hyp_names_the_norm_choices():
    with pytest.raises(ValueError, match="norm='group', expected 'batch' .* 'layer' .* or 'none'"):
        airbench.make_hyp(norm='group')
