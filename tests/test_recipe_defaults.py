"""The recipes' defaults are pinned: every hyperparameter of the airbench experiment (trainer_airbench.py's
train94 call) and of the Madry recipe (trainer_madry.py) equals the value the experiment was run with
(RECIPE.md, written out below), and airbench's library defaults equal those of the airbench 0.1.8
package that the original experiment called. Changing any default, e.g. whiten_bias_epochs from 3 to 2,
fails here even where the bit-identity tests (test_reference.py) set that value on both sides."""
import ast
import inspect
import os

import pytest
import torch
import torch.nn as nn

import airbench
import trainer_airbench
import trainer_madry
from test_reference import package_folder

# RECIPE.md, trainer 1: airbench94 as the original experiment set it.
AIRBENCH_EXPERIMENT = {
    'lr': 5.0,                   # per 1024 examples; the experiment's, not the library's 11.5
    'momentum': 0.85,            # Nesterov
    'weight_decay': 0.0153,      # per 1024 examples
    'bias_scaler': 64.0,         # lr multiplier of the BatchNorm biases
    'label_smoothing': 0.0,      # the experiment's, not the library's 0.2
    'batch_size': 512,           # the experiment's, not the library's 1024
    'epochs': 9.9,
    'whiten_bias_epochs': 3,
    'flip': 'random',            # independently per image per epoch
    'translate': 2,              # pixels, reflect padding
    'cutout': 0,                 # no cutout
    'widths': (64, 256, 256),
    'bn_momentum': 0.4,          # 1 - the original's 0.6
    'scaling_factor': 1 / 9,
    'batching': 'paired',        # this project's choice for the without arm (docs/fidelity.md)
    'norm': 'batch',             # the recipe's BatchNorm (layer and none: this project's ablations)
    'precision': 'auto',         # the recipe's float16 on CUDA; float32 on a CPU
}

# RECIPE.md, trainer 2: the Madry-lab ResNet-9 (datamodels CIFAR-10 example).
MADRY = {
    'lr': 0.5, 'momentum': 0.9, 'weight_decay': 5e-4, 'label_smoothing': 0.0, 'epochs': 24, 'lr_peak_epoch': 5,
    'batch_size': 512, 'flip': 'random', 'translate': 2, 'cutout': 4, 'batching': 'paired',
    'widths': (64, 128, 256, 128), 'scaling_factor': 0.2, 'precision': 'auto',
}


def test_the_airbench_experiment_trains_with_the_recipes_settings(monkeypatch):
    assert trainer_airbench.hyp == AIRBENCH_EXPERIMENT
    assert {k: type(v) for k, v in trainer_airbench.hyp.items()} == {k: type(v) for k, v in AIRBENCH_EXPERIMENT.items()}
    calls = []
    monkeypatch.setattr(airbench, 'train94', lambda images, labels, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(airbench, 'infer', lambda net, images, **kwargs: calls.append(kwargs))
    trainer_airbench.train(None, None, keep=None, seed=3, device='cpu', **trainer_airbench.hyp)
    trainer_airbench.infer(None, None)
    assert calls == [dict(keep=None, seed=3, device='cpu', **AIRBENCH_EXPERIMENT), dict(tta_level=0)]
    # what is not a hyperparameter of the dict: normalisation, BatchNorm eps, whitening, schedules
    assert airbench.CIFAR_MEAN == (0.4914, 0.4822, 0.4465) and airbench.CIFAR_STD == (0.2470, 0.2435, 0.2616)
    net = airbench.make_net()
    assert {m.eps for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-12}
    assert net[0].weight.shape == (24, 3, 2, 2)  # the whitening conv: 12 eigenvectors and their negatives
    assert inspect.signature(airbench.init_whitening).parameters['eps'].default == 5e-4
    total = 1000
    assert airbench.lr_multiplier(0, total) == pytest.approx(0.2)
    assert airbench.lr_multiplier(int(0.23 * total), total) == pytest.approx(1.0)
    assert airbench.lr_multiplier(total, total) == pytest.approx(0.07)
    assert airbench.lookahead_decay(500, total) == pytest.approx(0.95 ** 5 * 0.5 ** 3)


def test_airbench_library_defaults_are_the_airbench_0_1_8_packages():
    """The package's `hyp` dict, read from its source (lib_airbench94.py), against airbench.hyp."""
    path = os.path.join(package_folder(), 'lib_airbench94.py')
    with open(path) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'hyp')
    ref = eval(compile(ast.Expression(node.value), path, 'eval'), {'__builtins__': {}})  # literals and 1/9
    opt, aug, net = ref['opt'], ref['aug'], ref['net']
    assert airbench.hyp == {
        'lr': opt['lr'], 'momentum': opt['momentum'], 'weight_decay': opt['weight_decay'],
        'bias_scaler': opt['bias_scaler'], 'label_smoothing': opt['label_smoothing'],
        'batch_size': opt['batch_size'], 'epochs': opt['train_epochs'],
        'whiten_bias_epochs': opt['whiten_bias_epochs'],
        'flip': 'alternate' if aug['flip'] else 'none',  # the package's flip=True alternates (docs/fidelity.md)
        'translate': aug['translate'],
        'cutout': 0,                                      # the package has no cutout
        'widths': tuple(net['widths'][b] for b in ('block1', 'block2', 'block3')),
        'bn_momentum': pytest.approx(1 - net['batchnorm_momentum']),  # PyTorch's convention against its own
        'scaling_factor': net['scaling_factor'],
        'batching': 'paired',                             # keep= is this project's
        'norm': 'batch',                                  # the recipe's BatchNorm; the ablations are this project's
        'precision': 'auto',                              # the recipe's float16 on CUDA, float32 on a CPU
    }
    assert airbench.evaluate.__defaults__[0] == net['tta_level']
    experiment_changes = {k: v for k, v in trainer_airbench.hyp.items() if v != airbench.hyp[k]}
    assert experiment_changes == dict(lr=5.0, label_smoothing=0.0, batch_size=512, flip='random')


def test_the_madry_recipe_trains_with_the_recipes_settings(monkeypatch):
    assert trainer_madry.hyp == MADRY
    net = trainer_madry.make_net()
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(m.eps, m.momentum, m.affine) for m in norms} == {(1e-5, 0.1, True)}  # PyTorch's defaults
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.bias is None)
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(3, 64, 3, 1, 1, True), (64, 128, 5, 2, 2, True), (128, 128, 3, 1, 1, True),
                     (128, 128, 3, 1, 1, True), (128, 256, 3, 1, 1, True), (256, 256, 3, 1, 1, True),
                     (256, 256, 3, 1, 1, True), (256, 128, 3, 1, 0, True)]
    assert net[-2].bias is None and net[-1].scale == 0.2
    made = []
    real = torch.optim.SGD
    monkeypatch.setattr(torch.optim, 'SGD', lambda params, **kwargs: made.append(kwargs) or real(params, **kwargs))
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    trainer_madry.train(images, torch.arange(64) % 10, device='cpu', widths=(4, 8, 8, 8), batch_size=32,
                        epochs=0.5, lr_peak_epoch=0.1)
    assert made == [dict(lr=0.0, momentum=0.9, nesterov=False, weight_decay=5e-4)]  # heavy ball, coupled decay
