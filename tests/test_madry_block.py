"""A block of k Madry ResNet-9s trained at once (trainer_madry.train with keep and seed lists): each model is
the run it would be alone, each keeps its own loss scale in float16, a diverged model fails alone."""
import numpy as np
import pytest
import torch

import airbench
import experiment
import trainer_madry
from conftest import fake_cifar_images
from store import Store
from test_airbench_block import recording

N = 1000
HELD_OUT = np.arange(0, N, 37)                   # 28 examples a `without` run never sees
WITHOUT = np.setdiff1d(np.arange(N), HELD_OUT)
SMALL = dict(widths=(8, 16, 16, 8), batch_size=100, lr_peak_epoch=0.5)
KEEPS, SEEDS = [None, WITHOUT, None, WITHOUT], [0, 0, 1, 2]  # both arms of pair 0, and two other runs


@pytest.fixture(scope='module')
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N)
    return torch.from_numpy(fake_cifar_images(labels, rng)), torch.from_numpy(labels)


def block_and_singles(images, labels, monkeypatch, **hyp):
    """(block logits (4, N, 10), [each model's run alone (N, 10)], the block's and the singles' Loader yields)."""
    seen = recording(monkeypatch)
    net = trainer_madry.train(images, labels, keep=KEEPS, seed=SEEDS, device='cpu', **hyp)
    logits = trainer_madry.infer(net, images)
    block_yields = [batches for _, batches in seen.values()]
    seen.clear()
    singles, single_yields = [], []
    for keep, seed in zip(KEEPS, SEEDS):
        singles.append(trainer_madry.infer(trainer_madry.train(images, labels, keep=keep, seed=seed, device='cpu',
                                                               **hyp), images))
        (_, batches), = seen.values()
        single_yields.append(batches)
        seen.clear()
    return logits, singles, block_yields, single_yields


def test_in_float64_each_model_of_a_mixed_block_is_its_run_alone(data, monkeypatch):
    # In float64 the fused net's other summation orders (grouped convolutions, masked BatchNorm sums) round
    # at 1e-16, so even after 10 steps of the recipe's lr 0.5, whose max-pools and ReLUs amplify float32's
    # 1e-7 to percents within 3 steps, a model and its run alone agree to the float32 rounding of the logits
    # infer returns (6e-8 relative). A model that saw one wrong example, a padded row in its statistics or
    # another model's gradient differs by percents.
    monkeypatch.setattr(trainer_madry, 'DTYPE', torch.float64)
    images, labels = data
    logits, singles, block_yields, single_yields = block_and_singles(
        images, labels, monkeypatch, **SMALL, epochs=1, precision='float32')  # 10 steps
    assert logits.shape == (4, N, 10)
    for m in range(4):
        for block_batch, single_batch in zip(block_yields[m], single_yields[m], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(block_batch, single_batch))  # same data, same augmentation
        gap, scale = (logits[m] - singles[m]).abs().max(), singles[m].abs().max()
        assert gap <= 1e-6 * scale, f'model {m}: {gap:.3g} of {scale:.3g}'
    assert not any(np.isin(idx.numpy(), HELD_OUT).any() for idx, *_ in block_yields[1])
    assert any(np.isin(idx.numpy(), HELD_OUT).any() for idx, *_ in block_yields[0])


def test_in_float32_a_block_starts_as_its_runs_alone(data, monkeypatch):
    # One step in float32. The logits after it are small (about 0.015) differences of larger terms, so the
    # fused net's rounding shows at up to 1.4e-3 of the largest logit (measured here); holding out 28 of the
    # 1,000 examples moves them by 9e-2 of it, another seed by 1.3 times it.
    images, labels = data
    hyp = dict(SMALL, epochs=0.1, lr_peak_epoch=0.0, precision='float32')  # 1 step at the peak lr
    logits, singles, _, _ = block_and_singles(images, labels, monkeypatch, **hyp)
    for m in range(4):
        assert (logits[m] - singles[m]).abs().max() <= 1e-2 * singles[m].abs().max()


def test_a_float16_block_is_its_runs_alone_to_float16_noise(data):
    # Two steps with autocast and a loss scale per model. float16 rounds at 1e-3, so a model and its float16
    # run alone differ about as much as that run and its float32 twin (measured here: 0.05 and 0.11 of the
    # largest logit, against 0.11 and 0.12); another seed differs by more than the largest logit.
    images, labels = data
    hyp = dict(SMALL, epochs=0.2, lr_peak_epoch=0.0)
    keeps, seeds = [None, WITHOUT], [0, 1]
    net = trainer_madry.train(images, labels, keep=keeps, seed=seeds, device='cpu', **hyp, precision='float16')
    logits = trainer_madry.infer(net, images[:200])
    assert net.precision == 'float16' and logits.shape == (2, 200, 10) and torch.isfinite(logits).all()
    for m, (keep, seed) in enumerate(zip(keeps, seeds)):
        alone, twin = (trainer_madry.infer(trainer_madry.train(images, labels, keep=keep, seed=seed, device='cpu',
                                                               **hyp, precision=p), images[:200])
                       for p in ['float16', 'float32'])
        assert (logits[m] - alone).abs().max() <= 2 * (twin - alone).abs().max(), m


def test_a_block_scaler_skips_only_the_overflowing_models_step():
    k = 3
    weight = torch.nn.Parameter(torch.ones(k * 2, 4))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    scaler = trainer_madry.BlockScaler(k, 'cpu', enabled=True)
    grad = torch.full((k * 2, 4), 2.0 ** 16)  # a scaled gradient of 1 for every model
    grad[2, 1] = float('inf')                 # model 1 overflows
    weight.grad = grad
    scaler.step(optimizer)
    after = trainer_madry.per_model(weight.detach(), k)
    assert torch.equal(after[1], torch.ones(2, 4))                 # model 1: no step
    assert torch.allclose(after[[0, 2]], torch.full((2, 2, 4), 0.9))  # the others: one step of lr x gradient 1
    assert torch.equal(trainer_madry.per_model(optimizer.state[weight]['momentum_buffer'], k)[1], torch.zeros(2, 4))
    assert scaler.scale.tolist() == [2.0 ** 16, 2.0 ** 15, 2.0 ** 16]


def test_a_diverged_model_fails_alone_and_a_block_of_diverged_models_raises(data, monkeypatch):
    images, labels = data
    make_net = trainer_madry.make_net
    made = []

    def poison_second(*args, **kwargs):  # the block's second model starts with an infinite head
        net = make_net(*args, **kwargs)
        made.append(net)
        if len(made) == 2:
            net[-2].weight.data.fill_(float('inf'))
        return net
    monkeypatch.setattr(trainer_madry, 'make_net', poison_second)
    hyp = dict(SMALL, epochs=0.2, lr_peak_epoch=0.0)  # 2 steps at the peak lr
    for precision in ['float32', 'float16']:
        made.clear()
        net = trainer_madry.train(images, labels, keep=[None, None, WITHOUT], seed=[0, 1, 2], device='cpu', **hyp,
                                  precision=precision)
        logits = trainer_madry.infer(net, images[:200])
        assert not torch.isfinite(logits[1]).any() and torch.isfinite(logits[[0, 2]]).all(), precision
    monkeypatch.setattr(trainer_madry, 'make_net', make_net)
    with pytest.raises(airbench.Diverged, match='every model of the block'):
        trainer_madry.train(images, labels, keep=[None, WITHOUT], seed=[0, 1], device='cpu', **dict(hyp, lr=1e30),
                            precision='float32')


def test_the_madry_trainer_in_blocks_of_four_stores_the_runs_it_stores_one_at_a_time(cifar_dir, tmp_path, monkeypatch):
    """--block 4 through the command line mixes both arms of runs 0 and 1; in float64 (as the first test)
    each stored run is the float16 rounding of the run --block 1 stores with the same seed."""
    monkeypatch.setattr(trainer_madry, 'DTYPE', torch.float64)
    held_out = tmp_path / 'held_out.json'
    held_out.write_text('{"random": [0, 1, 2, 3, 4], "easy": [900, 901, 902, 903, 904]}')
    train_block, blocks = trainer_madry.train_block, []

    def recorded(*args, seed, **kwargs):
        blocks.append(len(seed))
        return train_block(*args, seed=seed, **kwargs)
    monkeypatch.setattr(trainer_madry, 'train_block', recorded)
    stores = {}
    for block in ['1', '4']:
        argv = ['--smoke', '--runs', '2', '--out', str(tmp_path / block), '--data-dir', cifar_dir, '--device', 'cpu',
                '--held-out', str(held_out), '--hyp', 'batch_size=100', '--block', block]
        assert experiment.main(trainer_madry, argv) == 0
        stores[block] = Store(tmp_path / block)
    assert blocks == [4]  # --block 1 trains each run alone; --block 4 all four at once
    for arm in experiment.ARMS:
        assert stores['4'].stored(arm) == [0, 1]
        for run in (0, 1):
            a, b = stores['1'].read_run(arm, run), stores['4'].read_run(arm, run)
            assert a['seed'] == b['seed']
            one, fused = a['logits'].astype(np.float32), b['logits'].astype(np.float32)
            assert np.abs(one - fused).max() <= 1e-3 * np.abs(one).max()  # float16 rounding of equal logits
    assert not np.allclose(stores['1'].read_run('with', 0)['logits'], stores['1'].read_run('with', 1)['logits'])
