"""Claims about trainer_digits.py: the digits load the same every time, many models train at once as if
each were alone, a model never feels the examples it must not see (loss, gradients, BatchNorm), the
arms take the same steps, and the script plugs into the harness. CPU, narrow nets, seconds each."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import design
import digits as digits_data
import experiment
import trainer_digits

TINY = dict(widths=[32, 32], epochs=3)  # 33 steps of batch 128 over the 1437 training digits


@pytest.fixture(scope='module')
def digits():
    return digits_data.load()


def excluded():
    """A keep that leaves out the held-out examples, as the `without` arm does."""
    return design.keep_for('without', 0, digits_data.N_TRAIN, digits_data.HELD_OUT)


def test_digits_load_from_the_package_in_the_same_order_every_time(digits):
    from sklearn.datasets import load_digits
    train_images, train_labels, test_images, test_labels = digits
    again = digits_data.load('ignored')
    for a, b in zip(digits, again):
        assert torch.equal(a, b)
    assert train_images.shape == (1437, 64) and test_images.shape == (360, 64)
    assert train_images.dtype == torch.float32 and train_labels.dtype == torch.int64
    assert train_images.min() == 0 and train_images.max() == 1
    assert set(train_labels.tolist()) == set(test_labels.tolist()) == set(range(10))
    # train and test split the package's 1797 digits: the first 1437, then the last 360, no overlap
    full = load_digits()
    assert torch.equal(torch.cat([train_images, test_images]), torch.tensor(full.data / 16, dtype=torch.float32))
    assert torch.equal(torch.cat([train_labels, test_labels]), torch.tensor(full.target))


def test_training_learns(digits):
    images, labels, test_images, test_labels = digits
    nets = trainer_digits.train(images, labels, keep=[None] * 3, seed=[0, 1, 2], **TINY)
    logits = trainer_digits.infer(nets, test_images)
    assert logits.shape == (3, 360, 10) and logits.dtype == torch.float32
    accuracy = (logits.argmax(-1) == test_labels).float().mean(1)
    assert (accuracy > 0.85).all(), f'test accuracy {accuracy.tolist()}, chance is 0.1'


def test_a_models_result_does_not_depend_on_its_block(digits):
    images, labels, *_ = digits
    alone = trainer_digits.train(images, labels, keep=[excluded()], seed=[5], **TINY)
    half = design.keep_for('scan', 3, len(labels), digits_data.HELD_OUT)
    block = trainer_digits.train(images, labels, keep=[None, excluded(), half], seed=[3, 5, 7], **TINY)
    torch.testing.assert_close(trainer_digits.infer(block, images)[1], trainer_digits.infer(alone, images)[0],
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(trainer_digits.infer(block, images)[0], trainer_digits.infer(alone, images)[0])


def test_masked_examples_have_no_influence_whatever_they_hold(digits):
    images, labels, test_images, _ = digits
    keep = excluded()
    out = np.setdiff1d(np.arange(len(labels)), keep)
    garbage_images, garbage_labels = images.clone(), labels.clone()
    garbage_images[out] = float('nan')  # would poison any loss, gradient or BatchNorm statistic it entered
    garbage_labels[out] = 99            # not a class at all
    clean = trainer_digits.train(images, labels, keep=[keep, None], seed=[0, 1], **TINY)
    dirty = trainer_digits.train(garbage_images, garbage_labels, keep=[keep, keep], seed=[0, 1], **TINY)
    assert torch.equal(trainer_digits.infer(clean, test_images)[0], trainer_digits.infer(dirty, test_images)[0])
    for (w_clean, _), (w_dirty, _) in zip(clean['running'], dirty['running']):
        assert torch.equal(w_clean[0], w_dirty[0])  # the BatchNorm running means never saw them


def test_masked_batchnorm_equals_batchnorm_of_the_valid_rows_alone():
    torch.manual_seed(0)
    h = torch.randn(3, 16, 5) * 3 + 1                   # (K, B, w)
    valid = torch.rand(3, 16) < 0.6
    scale, shift = torch.rand(3, 5) + 0.5, torch.randn(3, 5)
    running_mean, running_var = torch.randn(3, 5), torch.rand(3, 5) + 0.5
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    out = digits_data.batch_norm(h, valid, scale, shift, running_mean, running_var, momentum=0.1)
    for k in range(3):
        rows = h[k][valid[k]]
        reference = F.batch_norm(rows, expected_mean[k], expected_var[k], scale[k], shift[k], training=True,
                                 momentum=0.1, eps=trainer_digits.EPS)
        torch.testing.assert_close(out[k][valid[k]], reference)
    torch.testing.assert_close(running_mean, expected_mean)
    torch.testing.assert_close(running_var, expected_var)  # unbiased variance, as PyTorch keeps it


def reference_train(images, labels, keep, seed, h):
    """One model in plain PyTorch on the documented batches: each epoch np.random.default_rng(seed)
    permutes all examples, the permutation is cut into full batches, and the excluded examples are
    removed from them; the loss is the kept rows' summed cross-entropy divided by the nominal batch size
    (or their mean with loss_norm='kept'). Initial weights taken from trainer_digits.make_nets."""
    init = trainer_digits.make_nets([seed], h['widths'], 'batch')
    sizes = [64, *h['widths'], 10]
    layers = []
    for i, (w, b) in enumerate(init['linear']):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        linear.weight.data, linear.bias.data = w[0].T.clone(), b[0].clone()
        layers.append(linear)
        if i < len(h['widths']):
            layers += [nn.BatchNorm1d(sizes[i + 1], momentum=h['bn_momentum']), nn.ReLU()]
    net = nn.Sequential(*layers)
    optimizer = torch.optim.SGD(net.parameters(), lr=h['lr'], momentum=h['momentum'], nesterov=h['nesterov'],
                                weight_decay=h['weight_decay'])
    kept = np.zeros(len(labels), bool)
    kept[keep] = True
    rng = np.random.default_rng(seed)
    n_batches = len(labels) // h['batch_size']
    step, total = 0, h['epochs'] * n_batches
    for _ in range(h['epochs']):
        for idx in rng.permutation(len(labels))[:n_batches * h['batch_size']].reshape(n_batches, -1):
            idx = idx[kept[idx]]
            optimizer.param_groups[0]['lr'] = h['lr'] * trainer_digits.lr_multiplier(step, total, h['schedule'])
            loss = F.cross_entropy(net(images[idx]), labels[idx], reduction='sum')
            loss = loss / (h['batch_size'] if h['loss_norm'] == 'nominal' else len(idx))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return net.eval()


@pytest.mark.parametrize('loss_norm', trainer_digits.LOSS_NORMS)
def test_masking_equals_training_on_the_kept_examples_alone(digits, loss_norm):
    images, labels, test_images, _ = digits
    h = trainer_digits.make_hyp(**TINY, loss_norm=loss_norm)
    half = design.keep_for('scan', 8, len(labels), digits_data.HELD_OUT)  # batches of about 64
    nets = trainer_digits.train(images, labels, keep=[excluded(), half], seed=[4, 8], **TINY, loss_norm=loss_norm)
    logits = trainer_digits.infer(nets, test_images)
    for k, (keep, seed) in enumerate([(excluded(), 4), (half, 8)]):
        net = reference_train(images, labels, keep, seed, h)
        with torch.no_grad():
            expected = net(test_images)
        torch.testing.assert_close(logits[k], expected, rtol=1e-4, atol=1e-4)  # measured: 7e-6


def test_excluding_examples_keeps_the_number_of_steps(digits):
    images, labels, *_ = digits
    with_arm = trainer_digits.train(images, labels, keep=[None], seed=[0], **TINY)
    without_arm = trainer_digits.train(images, labels, keep=[excluded()], seed=[0], **TINY)
    assert with_arm['steps'] == without_arm['steps'] == TINY['epochs'] * (1437 // 128)


@pytest.mark.parametrize('norm', trainer_digits.NORMS)
def test_every_norm_trains_to_finite_logits(digits, norm):
    images, labels, test_images, test_labels = digits
    nets = trainer_digits.train(images, labels, keep=[None, excluded()], seed=[0, 1], norm=norm, **TINY)
    logits = trainer_digits.infer(nets, test_images)
    assert torch.isfinite(logits).all()
    assert ((logits.argmax(-1) == test_labels).float().mean(1) > 0.5).all()


def test_a_diverged_model_leaves_the_others_of_its_block_intact(digits, monkeypatch):
    images, labels, test_images, _ = digits
    healthy = trainer_digits.train(images, labels, keep=[None], seed=[1], **TINY)
    make_nets = trainer_digits.make_nets

    def poisoned(*args, **kwargs):
        nets = make_nets(*args, **kwargs)
        nets['linear'][0][0][0, 0, 0] = float('nan')  # model 0 starts broken
        return nets

    monkeypatch.setattr(trainer_digits, 'make_nets', poisoned)
    block = trainer_digits.train(images, labels, keep=[None, None], seed=[0, 1], **TINY)
    logits = trainer_digits.infer(block, test_images)
    assert not torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[1], trainer_digits.infer(healthy, test_images)[0], rtol=1e-4, atol=1e-4)


def test_unknown_norm_or_hyperparameter_is_refused(digits):
    images, labels, *_ = digits
    with pytest.raises(ValueError, match="'batch'.*'layer'.*'none'"):
        trainer_digits.train(images, labels, keep=[None], seed=[0], norm='group')
    with pytest.raises(ValueError, match="'nominal'.*'kept'"):
        trainer_digits.train(images, labels, keep=[None], seed=[0], loss_norm='mean')
    with pytest.raises(TypeError, match='unknown'):
        trainer_digits.train(images, labels, keep=[None], seed=[0], learning_rate=0.1)
    with pytest.raises(TypeError, match='lists'):
        trainer_digits.train(images, labels, keep=None, seed=0)


def test_held_out_are_2_random_and_2_easy_per_class_and_random_follows_its_rule(digits):
    labels = digits[1].numpy()
    held = digits_data.HELD_OUT
    everything = held['random'] + held['easy']
    assert len(set(everything)) == 40
    assert all(0 <= i < digits_data.N_TRAIN and isinstance(i, int) for i in everything)
    for group in held.values():
        assert labels[group].tolist() == [c for c in range(10) for _ in range(2)]  # class 0 first, 2 each
    assert held['random'] == digits_data.random_per_class(labels)
    order = np.random.default_rng(0).permutation(1437)
    assert held['random'][:2] == [int(i) for i in order[labels[order] == 0][:2]]


def test_easy_rule_takes_per_class_the_most_negative_high_margin_estimates():
    """The rule the digits' easy set follows: viz_scan.easy_candidates(res, 20, per_class=2)."""
    import viz_scan
    rng = np.random.default_rng(1)
    n = 200
    scan = dict(label=np.arange(n) % 2, tested=np.ones(n, bool), mean_in=rng.uniform(0, 10, n),
                self_influence=rng.normal(0, 1, n))
    scan['tested'][3] = False
    scan['high_margin'] = scan['tested'] & (scan['mean_in'] >= np.quantile(scan['mean_in'][scan['tested']], 0.75))
    scan['order'] = np.flatnonzero(scan['tested'])[np.argsort(scan['self_influence'][scan['tested']], kind='stable')]
    picks = viz_scan.easy_candidates(scan, 4, per_class=2).tolist()
    for c in (0, 1):
        pool = np.flatnonzero(scan['high_margin'] & (scan['label'] == c))
        assert sorted(i for i in picks if scan['label'][i] == c) == sorted(
            pool[np.argsort(scan['self_influence'][pool])[:2]].tolist())
    assert scan['self_influence'][picks].tolist() == sorted(scan['self_influence'][picks])  # most negative first


def test_settings_are_serialisable_and_the_lr_rises_then_falls_to_zero():
    json.dumps(trainer_digits.hyp)
    assert set(trainer_digits.SMOKE) <= set(trainer_digits.hyp)
    lr = [trainer_digits.lr_multiplier(s, 100) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[25] == 1 and lr[100] == 0
    assert max(lr) == 1


def test_the_script_fills_a_store_through_the_harness(tmp_path):
    argv = ['--smoke', '--runs', '3', '--out', str(tmp_path / 'store'), '--device', 'cpu']
    code = experiment.main(trainer_digits, argv)
    assert code == 0
    store = experiment.Store(tmp_path / 'store')
    for arm in ('with', 'without'):
        logits, run_info = store.load(arm)
        assert logits.shape == (3, 1437, 10)
        assert run_info['seed'].tolist() == [0, 1, 2]
        assert (run_info['test_acc'] > 0.5).all()
    assert store.settings['held_out'] == digits_data.HELD_OUT
