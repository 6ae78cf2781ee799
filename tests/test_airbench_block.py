"""A block of k airbench94 models trained at once (airbench.train94 with keep and seed lists): each model
is the run it would be alone, a diverged model leaves the others alone, and the block's rules."""
import numpy as np
import pytest
import torch

import airbench
from conftest import fake_cifar_images

N = 1000
HELD_OUT = np.arange(0, N, 37)                   # 28 examples a `without` run never sees
WITHOUT = np.setdiff1d(np.arange(N), HELD_OUT)
SMALL = dict(widths=(16, 32, 32), batch_size=100, lr=5.0, label_smoothing=0.0, flip='random', translate=2,
             cutout=4, whiten_bias_epochs=1)
# Logits of a model in a block against the same run alone, relative to the largest logit. The fused net
# sums in other orders than the single one (grouped against plain convolutions; BatchNorm statistics of a
# padded batch by masked sums against PyTorch's kernel), so each step differs by float32 rounding (about
# 1e-7 relative), and training amplifies it, unevenly from run to run. Measured on a 2-core CPU, 20 steps
# of these settings: median 1e-5, but one run in about 14 reaches 1e-3; and the same run alone at 1 and at
# 2 threads (PyTorch's kernels split their sums by thread) spreads just as far, 1.06e-3. So no tolerance
# below that holds on every machine, pinned threads or not. The data order and augmentation are compared
# exactly (the recorded batches); this catches the arithmetic: padded rows in a model's BatchNorm
# statistics give 2e-2, one example or one flip wrong once in 2,000 example-steps 6e-3 to 9e-3, another
# data order 9e-2.
TOLERANCE = 3e-3
# In float64 the same rounding is about 1e-16 per step: after 20 steps a block's logits and its runs' alone
# agree to float32 rounding of the logits (measured: equal, at 1 and at 2 threads), so any mistake shows.
TOLERANCE_FLOAT64 = 1e-6


@pytest.fixture(scope='module')
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N)
    return torch.from_numpy(fake_cifar_images(labels, rng)), torch.from_numpy(labels)


def recording(monkeypatch):
    """Every Loader's yields from now on: {id(loader): [(indices, flip, shift, corner), ...]} in creation order."""
    seen = {}
    batches = airbench.Loader.batches

    def record(self):
        for batch in batches(self):
            seen.setdefault(id(self), (self, []))[1].append([t.clone() for t in batch])
            yield batch
    monkeypatch.setattr(airbench.Loader, 'batches', record)
    return seen


def assert_close_runs(block_logits, single_logits, tolerance=TOLERANCE):
    scale = single_logits.abs().max()
    gap = (block_logits - single_logits).abs().max()
    assert torch.isfinite(block_logits).all() and gap <= tolerance * scale, f'{gap:.3g} of {scale:.3g}'


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_each_model_of_a_mixed_block_is_its_run_alone(data, monkeypatch, dtype):
    images, labels = data
    tolerance = TOLERANCE
    if dtype == 'float64':  # not a precision a user can pick: every net and norm in float64
        monkeypatch.setattr(airbench, 'dtype_for', lambda device, precision='auto': torch.float64)
        tolerance = TOLERANCE_FLOAT64
    keeps, seeds = [None, WITHOUT, None, WITHOUT], [0, 0, 1, 2]  # both arms of pair 0, and two other runs
    hyp = dict(SMALL, epochs=2)                                   # 20 steps
    seen = recording(monkeypatch)
    net = airbench.train94(images, labels, keep=keeps, seed=seeds, device='cpu', **hyp)
    logits = airbench.infer(net, images)
    assert logits.shape == (4, N, 10) and isinstance(net, airbench.BlockNet)
    block_yields = [batches for _, batches in seen.values()]
    assert len(block_yields) == 4 and all(len(b) == 20 for b in block_yields)
    seen.clear()
    for m in range(4):
        alone = airbench.train94(images, labels, keep=keeps[m], seed=seeds[m], device='cpu', **hyp)
        (_, single_yields), = seen.values()
        seen.clear()
        # the same examples in the same batches with the same flips, translations and cutouts
        for block_batch, single_batch in zip(block_yields[m], single_yields, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(block_batch, single_batch))
        assert_close_runs(logits[m], airbench.infer(alone, images), tolerance)
    # the without models never saw a held-out example; the with models did
    assert not any(np.isin(idx.numpy(), HELD_OUT).any() for idx, *_ in block_yields[1])
    assert any(np.isin(idx.numpy(), HELD_OUT).any() for idx, *_ in block_yields[0])


@pytest.mark.parametrize('norm', ['layer', 'none'])
def test_blocks_of_the_norm_ablations_are_their_runs_alone(data, norm):
    images, labels = data
    hyp = dict(SMALL, epochs=1, norm=norm)
    net = airbench.train94(images, labels, keep=[WITHOUT, None], seed=[3, 4], device='cpu', **hyp)
    logits = airbench.infer(net, images)
    for m, (keep, seed) in enumerate([(WITHOUT, 3), (None, 4)]):
        alone = airbench.train94(images, labels, keep=keep, seed=seed, device='cpu', **hyp)
        assert_close_runs(logits[m], airbench.infer(alone, images))


def test_a_diverged_model_does_not_stop_the_others(data, monkeypatch):
    images, labels = data
    hyp = dict(SMALL, epochs=1)
    init_whitening = airbench.init_whitening
    calls = []

    def poison_second(conv, x, *args):  # the block's second model starts with infinite whitening filters
        init_whitening(conv, x, *args)
        calls.append(1)
        if len(calls) == 2:
            conv.weight.data.fill_(float('inf'))
    monkeypatch.setattr(airbench, 'init_whitening', poison_second)
    net = airbench.train94(images, labels, keep=[None, None, WITHOUT], seed=[0, 1, 2], device='cpu', **hyp)
    monkeypatch.setattr(airbench, 'init_whitening', init_whitening)
    logits = airbench.infer(net, images)
    assert not torch.isfinite(logits[1]).any()
    for m, (keep, seed) in enumerate([(None, 0), (WITHOUT, 2)]):
        alone = airbench.train94(images, labels, keep=keep, seed=seed, device='cpu', **hyp)
        assert_close_runs(logits[2 * m], airbench.infer(alone, images))


def test_a_block_whose_models_all_diverge_raises(data):
    images, labels = data
    with pytest.raises(airbench.Diverged, match='every model of the block'):
        airbench.train94(images, labels, keep=[None, WITHOUT], seed=[0, 1], device='cpu',
                         **dict(SMALL, epochs=1, lr=1e30))


def test_a_block_refuses_models_with_different_steps_and_unpaired_lists(data):
    images, labels = data
    hyp = dict(SMALL, epochs=1, batching='rebatch')  # 1000 kept: 10 batches; 900 kept: 9
    with pytest.raises(ValueError, match=r'\[10, 9\] steps per epoch'):
        airbench.train94(images, labels, keep=[None, np.arange(900)], seed=[0, 1], device='cpu', **hyp)
    with pytest.raises(ValueError, match='2 keep entries for 3 seeds'):
        airbench.train94(images, labels, keep=[None, None], seed=[0, 1, 2], device='cpu', **hyp)
    with pytest.raises(TypeError, match='keep=\\[...\\] and seed=\\[...\\]'):
        airbench.train94(images, labels, keep=None, seed=[0, 1], device='cpu', **hyp)

