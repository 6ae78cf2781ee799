"""The worked example of docs/trainers.md is a trainer a user can copy: saved as its own file beside the
project, it fills a store through the harness and viz.py reports on it. Tiny size: generated CIFAR-format
data (1000 training images), --smoke, two runs per arm (the fewest a report takes)."""
import json
import os
import re
import subprocess
import sys

import numpy as np

from store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_source():
    """The first python block of docs/trainers.md: the file the page tells a user to save."""
    with open(os.path.join(ROOT, 'docs', 'trainers.md')) as f:
        return re.search(r'```python\n(.*?)```', f.read(), re.S)[1]


def test_the_documented_trainer_fills_a_store_and_viz_reports_on_it(cifar_dir, tmp_path):
    (tmp_path / 'trainer_resnet18.py').write_text(example_source())
    (tmp_path / 'held_out.json').write_text(json.dumps({'random': [0, 1], 'easy': [500, 501]}))
    env = {**os.environ, 'PYTHONPATH': ROOT}
    run = subprocess.run([sys.executable, 'trainer_resnet18.py', '--smoke', '--runs', '2', '--device', 'cpu',
                          '--data-dir', cifar_dir, '--held-out', 'held_out.json'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    store = Store(tmp_path / 'runs' / 'resnet18-smoke')
    assert store.settings['trainer'] == 'resnet18' and store.settings['hyp']['epochs'] == 0.1
    for arm in ('with', 'without'):
        logits, run_info = store.load(arm)
        assert logits.shape == (2, 1000, 10) and np.isfinite(logits).all() and run_info['seed'].tolist() == [0, 1]
    report = subprocess.run([sys.executable, os.path.join(ROOT, 'viz.py'), 'runs/resnet18-smoke', '--controls', '0'],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and 'Random examples:' in report.stdout, report.stderr


def test_the_documented_trainer_offers_its_hyperparameters_on_the_command_line(tmp_path):
    (tmp_path / 'trainer_resnet18.py').write_text(example_source())
    run = subprocess.run([sys.executable, 'trainer_resnet18.py', '--help'], cwd=tmp_path,
                         env={**os.environ, 'PYTHONPATH': ROOT, 'COLUMNS': '1000'}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert 'torchvision' in run.stdout and 'KEY one of: lr, momentum, weight_decay, epochs, batch_size' in run.stdout
