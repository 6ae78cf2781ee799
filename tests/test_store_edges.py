"""The store's edges: nothing outside it touched, no silent change of what it means, every odd file one
clear line. Each test is an attack from outside that once went wrong (docs/store.md lists them)."""
import json
import os

import numpy as np
import pytest

from store import Store, StoreError
from test_store import ARMS, moved, toy_store

HELD = {'random': [0, 1, 2, 3], 'easy': [30, 31, 32, 33]}  # not in sorted order: 'easy' < 'random'


def factorial_store(path, runs, hyp=None):
    rng = np.random.default_rng(0)
    settings = dict(trainer='toy', hyp=hyp or {'lr': 1.0, 'epochs': 2}, held_out=HELD, n_train=40,
                    data_fingerprint='toy', seed_base=0, arms=['a', 'b'])
    s = Store.create(path, settings, np.arange(40) % 10)
    for run in range(runs):
        for arm in 'ab':
            s.save_run(arm, run, run, rng.normal(0, 1, (40, 10)).astype(np.float16), 1.0, 0.5)
    return s


def rewrite_settings(path, **dump):
    """settings.json as a person tidying files leaves it (json.tool --sort-keys, jq -S, another indent)."""
    with open(path / 'settings.json') as f:
        settings = json.load(f)
    with open(path / 'settings.json', 'w') as f:
        json.dump(settings, f, **dump)
    return settings


# ---------------------------------------------------------------------------------------------------
# Settings compared as the store reads them
# ---------------------------------------------------------------------------------------------------

def test_settings_rewritten_with_sorted_keys_reordering_the_held_out_groups_are_refused_by_name(tmp_path):
    factorial_store(tmp_path, 3).load('a')  # a pack is built
    rewrite_settings(tmp_path, sort_keys=True)
    with pytest.raises(StoreError, match=r'the order of the held-out groups \(now \["easy", "random"\]\) no longer '
                                         'matches'):
        Store(tmp_path)
    assert moved(tmp_path) == [] and len(os.listdir(tmp_path / 'a')) == 3


def test_an_older_factorial_store_with_reordered_groups_is_refused_at_loading_and_nothing_is_moved(tmp_path):
    factorial_store(tmp_path, 3).load('a')
    settings = rewrite_settings(tmp_path, sort_keys=True)
    del settings['checksums']['groups']  # as written before the groups' order was recorded
    (tmp_path / 'settings.json').write_text(json.dumps(settings, sort_keys=True))
    with pytest.raises(StoreError, match=r'every run file of .*a \(3\) .*trained on other examples.*reordered\? '
                                         'Nothing was moved'):
        Store(tmp_path).load('a')
    assert moved(tmp_path) == [] and len(os.listdir(tmp_path / 'a')) == 3


def test_key_order_and_whitespace_alone_change_nothing(tmp_path):
    s = factorial_store(tmp_path, 3, hyp={'lr': 1.0, 'epochs': 2})
    before = np.asarray(s.load('a')[0]).copy()
    settings = rewrite_settings(tmp_path, indent=7)
    settings['hyp'] = dict(reversed(settings['hyp'].items()))
    (tmp_path / 'settings.json').write_text(json.dumps(dict(reversed(settings.items())), indent=3))
    assert np.array_equal(Store(tmp_path).load('a')[0], before) and moved(tmp_path) == []
    again = dict(trainer='toy', hyp={'epochs': 2, 'lr': 1.0}, held_out=HELD, n_train=40, data_fingerprint='toy',
                 seed_base=0, arms=['a', 'b'])
    Store.create(tmp_path, again, np.arange(40) % 10)  # the same settings, keys in another order


def test_a_command_with_the_groups_in_another_order_is_refused_naming_the_order(tmp_path):
    factorial_store(tmp_path, 1)
    other = dict(trainer='toy', hyp={'lr': 1.0, 'epochs': 2}, held_out=dict(reversed(HELD.items())), n_train=40,
                 data_fingerprint='toy', seed_base=0, arms=['a', 'b'])
    with pytest.raises(StoreError, match=r"held_out: groups in the order \['random', 'easy'\] in the store, "
                                         r"\['easy', 'random'\] in this command"):
        Store.create(tmp_path, other, np.arange(40) % 10)


def test_the_other_settings_message_names_the_differing_hyperparameter_however_long_the_settings(tmp_path):
    hyp = {f'knob_{i:02d}': 0.123456789 for i in range(40)}
    toy_store(tmp_path, 1, hyp=hyp)
    settings = dict(trainer='toy', hyp={**hyp, 'knob_37': 0.5}, held_out={'random': [0, 1], 'easy': [30, 32]},
                    n_train=40, data_fingerprint='toy', seed_base=0, arms=list(ARMS))
    with pytest.raises(StoreError) as e:
        Store.create(tmp_path, settings, np.arange(40) % 10)
    lines = str(e.value).splitlines()
    assert '  hyp.knob_37: store has 0.123456789, this command has 0.5' in lines
    assert '  held_out.easy: store has [30, 31], this command has [30, 32]' in lines
    assert not any('knob_36' in line for line in lines)
