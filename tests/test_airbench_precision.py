"""airbench's precision setting on the CPU: 'float16' runs the arithmetic of the CUDA path (a float16
channels-last net, norm layers in float32) on any device; 'auto' is float16 on CUDA only. And float16
stores of both CIFAR-10 trainers made and reported through the command line."""
import importlib

import numpy as np
import pytest
import torch

import airbench
import experiment
from conftest import fake_cifar_images, report
from store import Store

# A small net that learns the generated task in 12 steps (about 55% test accuracy in float32, chance
# 10%): float16 convolutions' backward passes take about 1 s per step here on a CPU.
FAST = dict(widths=(8, 8, 8), batch_size=50, epochs=1, lr=10.0, scaling_factor=1.0, label_smoothing=0.0,
            whiten_bias_epochs=1)


@pytest.fixture(scope='module')
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 800)
    images, labels = torch.from_numpy(fake_cifar_images(labels, rng)), torch.from_numpy(labels)
    return (images[:600], labels[:600]), (images[600:], labels[600:])


def test_auto_is_float16_on_cuda_only_and_bad_precisions_are_refused():
    assert airbench.resolve_precision('auto', 'cpu') == 'float32'
    assert airbench.resolve_precision('auto', torch.device('cuda')) == 'float16'
    assert airbench.resolve_precision('float16', 'cpu') == 'float16'
    assert airbench.dtype_for('cpu') == torch.float32 and airbench.dtype_for('cuda') == torch.float16
    assert airbench.dtype_for('cpu', 'float16') == torch.float16
    assert airbench.dtype_for('cuda', 'float32') == torch.float32
    with pytest.raises(ValueError, match="precision='half', expected 'auto', 'float32' or 'float16'"):
        airbench.resolve_precision('half', 'cpu')
    with pytest.raises(ValueError, match="precision='bfloat16', expected 'auto', 'float32' or 'float16'"):
        airbench.make_hyp(precision='bfloat16')


def test_float16_on_the_cpu_learns_as_float32_does(data):
    train, test = data
    nets = {p: airbench.train94(*train, seed=0, device='cpu', precision=p, **FAST) for p in ('float32', 'float16')}
    net = nets['float16']
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, airbench.BatchNorm)]
    assert {m.weight.dtype for m in convs} == {torch.float16}
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert {t.dtype for m in norms for t in (m.bias, m.running_mean, m.running_var)} == {torch.float32}
    logits = airbench.infer(net, train[0])
    assert torch.isfinite(logits).all()
    accuracy = {p: airbench.evaluate(n, *test, tta_level=0) for p, n in nets.items()}
    assert accuracy['float16'] >= 0.35 and abs(accuracy['float16'] - accuracy['float32']) <= 0.05, accuracy


def test_a_diverged_float16_run_raises(data):
    train, _ = data
    # lr 1e6 per 1024 examples: steps of about 130 x the gradient (8,000 for the biases), each still a float16
    with pytest.raises(airbench.Diverged):
        airbench.train94(*train, seed=0, device='cpu', precision='float16', **dict(FAST, epochs=0.5, lr=1e6))


@pytest.mark.parametrize('name', ['trainer_airbench', 'trainer_madry'])
def test_a_float16_store_of_either_cifar_trainer_is_made_and_reported(name, cifar_dir, tmp_path, capsys):
    """The GPU's arithmetic end to end on the CPU: --precision float16 through the command line stores finite
    float16 logits with the precision in the store's settings, and viz reports the store."""
    held_out = tmp_path / 'held_out.json'
    held_out.write_text('{"random": [0, 1, 2, 3, 4], "easy": [900, 901, 902, 903, 904]}')
    out = tmp_path / 'store'
    argv = ['--smoke', '--runs', '2', '--out', str(out), '--data-dir', cifar_dir, '--device', 'cpu', '--held-out',
            str(held_out), '--precision', 'float16', '--hyp', 'batch_size=100']  # 2 steps of 100 a run
    if name == 'trainer_airbench':  # float16 convolutions' backward is slow on a CPU: 10 s a run at the smoke widths
        argv += ['--hyp', 'widths=[8,8,8]']
    assert experiment.main(importlib.import_module(name), argv) == 0
    store = Store(out)
    assert store.settings['hyp']['precision'] == 'float16'
    for arm in experiment.ARMS:
        logits, _ = store.load(arm)
        assert logits.shape == (2, 1000, 10) and logits.dtype == np.float16 and np.isfinite(logits).all()
    _, lines, _ = report([out], capsys)
    assert any(line.startswith('Easy examples') for line in lines)
