"""airbench's precision setting on the CPU: 'float16' runs the arithmetic of the CUDA path (a float16
channels-last net, norm layers in float32) on any device; 'auto' is float16 on CUDA only."""
import numpy as np
import pytest
import torch

import airbench
from conftest import fake_cifar_images

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
