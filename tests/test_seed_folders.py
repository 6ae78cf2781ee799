"""Claims about viz.py --seed-folders: the original scripts' folders of <uuid>.pt logits, reported like a store."""
import pickle
import uuid

import numpy as np
import pytest
import torch

import experiment
import seed_import
import viz
from conftest import body, report
from store import Store

N_TRAIN = 50000  # the original's held-out indices reach 49690
RUNS = 4


@pytest.fixture(scope='module')
def seed_run(tmp_path_factory):
    """Two folders in the original's layout: one (50000, 10) float16 tensor per <uuid>.pt, saved with
    torch.save; the held-out examples are planted 1.0 higher in the with runs. -> (folders, labels, logits)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, N_TRAIN)
    held = np.concatenate([ix for ix in experiment.HELD_OUT.values()])
    root = tmp_path_factory.mktemp('seed')
    folders, logits = [], {}
    for arm, folder in (('with', 'nets10_default'), ('without', 'nets10_minus_n40')):
        (root / folder).mkdir()
        logits[arm] = rng.normal(0, 1, (RUNS, N_TRAIN, 10)).astype(np.float16)
        if arm == 'with':
            logits[arm][:, held, labels[held]] += 1.0
        for k in range(RUNS):
            torch.save(torch.from_numpy(logits[arm][k]), root / folder / f'{uuid.uuid4()}.pt')
        folders.append(root / folder)
    return folders, labels, logits


@pytest.fixture
def cifar_labels(monkeypatch, seed_run):
    monkeypatch.setattr(seed_import, 'cifar10_labels', lambda data_dir: seed_run[1])


def test_seed_folders_print_the_report_of_the_same_runs_in_a_store(seed_run, cifar_labels, tmp_path, capsys):
    """The same numbers as a store holding those logits, unpaired (no seed is shared): Welch throughout."""
    (with_dir, without_dir), labels, logits = seed_run
    res, lines, _ = report(['--seed-folders', with_dir, without_dir], capsys)
    store = Store.create(tmp_path / 's', dict(trainer=seed_import.TRAINER, hyp={}, held_out=experiment.HELD_OUT,
                                              n_train=N_TRAIN, data_fingerprint='x', seed_base=0), labels)
    names = {arm: sorted(p.name for p in d.iterdir()) for arm, d in (('with', with_dir), ('without', without_dir))}
    run = 0
    for arm in ('with', 'without'):
        order = [k for k in range(RUNS)]  # each file's content, in the sorted order of the names
        for name in names[arm]:
            k = next(k for k in order if torch.equal(torch.load(f'{(with_dir if arm == "with" else without_dir)}/{name}',
                                                                weights_only=True), torch.from_numpy(logits[arm][k])))
            store.save_run(arm, run, seed=run, logits=logits[arm][k], seconds=1.0, test_acc=0.9)
            run += 1
    direct, direct_lines, _ = report([tmp_path / 's'], capsys)
    assert res['n_pairs'] == 0 and res['control_test'] == 'welch' and (res['n_with'], res['n_without']) == (RUNS, RUNS)
    np.testing.assert_array_equal(res['self_influence'], direct['self_influence'])
    np.testing.assert_array_equal(res['control_adjusted'], direct['control_adjusted'])
    assert lines[0].startswith(f"Answer (95% CI, p; significant if p < 0.01; Welch's t-test, {RUNS} runs with and {RUNS}")
    assert f'Store {with_dir} + {without_dir} (trainer seed-folders)' in '\n'.join(lines)
    named = '\n'.join(lines).replace(f'{with_dir} + {without_dir}', 'STORE')
    assert named == '\n'.join(direct_lines).replace(str(tmp_path / 's'), 'STORE')  # every line the same
    assert all(g['mean'] > 0.5 for g in res['group_summary'].values())  # the planted +1.0 in the with runs


def refusal(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        viz.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return str(e.value.code), out


class Net:  # an object weights_only must refuse to unpickle
    pass


@pytest.mark.parametrize('bad, expected', [
    ('notes.txt', 'not a .pt run file'),
    ('wrong_shape.pt', 'a torch.float16 tensor of shape (100, 10), expected a floating-point (50000, 10) tensor'),
    ('int.pt', 'a torch.int64 tensor of shape (50000, 10)'),
    ('dict.pt', 'a dict, expected'),
    ('object.pt', 'not readable as a saved tensor'),
])
def test_anything_but_logit_tensors_is_refused_by_name(seed_run, cifar_labels, tmp_path, capsys, bad, expected):
    (with_dir, without_dir), _, _ = seed_run
    folder = tmp_path / 'with'
    folder.mkdir()
    torch.save(torch.zeros(N_TRAIN, 10, dtype=torch.float16), folder / f'{uuid.uuid4()}.pt')
    content = {'notes.txt': None, 'wrong_shape.pt': torch.zeros(100, 10, dtype=torch.float16),
               'int.pt': torch.zeros(N_TRAIN, 10, dtype=torch.int64), 'dict.pt': {'logits': torch.zeros(3)},
               'object.pt': Net()}[bad]
    if content is None:
        (folder / bad).write_text('a note')
    elif bad == 'object.pt':
        with open(folder / bad, 'wb') as f:
            pickle.dump(content, f, protocol=2)
    else:
        torch.save(content, folder / bad)
    message, out = refusal(capsys, '--seed-folders', folder, without_dir)
    assert out == '' and message.startswith(f'viz: {folder / bad}') and expected in message
    assert len(message.splitlines()) == 1


def test_without_cifar10_the_labels_are_asked_for_in_one_line(seed_run, tmp_path, capsys):
    (with_dir, without_dir), _, _ = seed_run
    message, out = refusal(capsys, '--seed-folders', with_dir, without_dir, '--data-dir', tmp_path)
    assert out == '' and len(message.splitlines()) == 1
    assert message.startswith(f'viz: CIFAR-10 not found in {tmp_path}') and '--data-dir' in message


def test_a_missing_folder_is_named_before_the_labels_and_data_dir_needs_seed_folders(seed_run, tmp_path, capsys):
    (with_dir, _), _, _ = seed_run
    message, out = refusal(capsys, '--seed-folders', with_dir, tmp_path / 'nets10_minus_n40', '--data-dir', tmp_path)
    assert out == '' and message == f"viz: {tmp_path / 'nets10_minus_n40'} is not a folder; expected one of the " \
                                    "original's run folders (e.g. nets10_default)"
    with pytest.raises(SystemExit) as e:
        viz.main([str(tmp_path), '--data-dir', str(tmp_path)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == '' and len(err.splitlines()) == 1
    assert err.startswith('viz: --data-dir goes with --seed-folders (a store holds its own labels)')
