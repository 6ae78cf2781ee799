#!/usr/bin/env bash
# The GPU check, as one script that fits one call of under 8 minutes on a lent GPU: every step runs under
# `timeout` with its own budget, cut to what is left of CAP (440 s), and a step with under 10 s left is
# skipped and says so. On generated learnable CIFAR-format data (tests/conftest.py's write_cifar: 50,000 +
# 10,000 images, so accuracies mean something):
#   1. a block of 3 against the same 3 runs alone, airbench and Madry, float16: the same data order
#      (every Loader batch: indices, flips, translations, cutouts) and logits agreeing to float16 noise;
#   2. float16 against float32 test accuracy at the same seeds, both recipes;
#   3. both trainers end to end (--precision auto: float16; --block auto), the factorial design,
#      --workers-per-gpu 2, viz on each store;
#   4. speed: the experiment settings (5 runs), the PyPI airbench 0.1.8 package on the same data, and
#      the throughput table by K models at once and workers per GPU (bench_airbench.py --blocks --workers).
#   bash bench/gpu_check.sh OUT_DIR [FOLDER_HOLDING_THE_airbench_PACKAGE]
# The package row needs airbench 0.1.8's source, and the device machine is offline: the tests fetch it into
# ~/.cache/self-influence-reference/airbench-0.1.8/ (tests/test_reference.py); copy that folder to
# .carry/airbench-0.1.8 and carry .carry, or pass the folder holding airbench/. Without it the row says why.
#   DEVICE=cpu bash bench/gpu_check.sh OUT   runs every piece on the CPU at a tiny size (a plumbing check:
#                                            its times and accuracies mean nothing; no cap unless CAP=...)
set -u
OUT=${1:-/tmp/gpu_check}; DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); export PYTHONUNBUFFERED=1 DEVICE
for PKG in "${2:-}" .carry/airbench-0.1.8 "${XDG_CACHE_HOME:-$HOME/.cache}/self-influence-reference/airbench-0.1.8"; do
  [ -n "$PKG" ] && [ -f "$PKG/airbench/lib_airbench94.py" ] && break
done
[ -f "$PKG/airbench/lib_airbench94.py" ] && PKG=$(cd "$PKG" && pwd) || PKG=
DATA=/tmp/gpu_check_data; STORES=/tmp/gpu_check_runs; rm -rf "$STORES"
if [ "$DEVICE" = cpu ]; then  # a tiny size: 5 x 1024 + 200 images, smoke nets, 10 steps a run
  export TINY=1; CAP=${CAP:-100000}; PER_BATCH=1024; N_TEST=200
  TRAIN=(--device cpu --smoke --hyp epochs=1 --held-out "$DATA/held_out.json"); MADRY=(); RUNS=2
  BENCH=(--device cpu --n-train 1024 --epochs 1 --runs 1 --nets smoke); BLOCKS=1,2; WORKERS=1,2
else
  export TINY=; CAP=${CAP:-440}; PER_BATCH=10000; N_TEST=10000
  TRAIN=(); MADRY=(--hyp epochs=8); RUNS=3  # Madry: 8 of its 24 epochs, so 2 runs per arm fit
  BENCH=(--epochs 2); BLOCKS=1,4; WORKERS=1,2,4  # 2 epochs (195 steps): the step's speed, at a fifth of the cost
fi
START=$SECONDS

step() {  # step NAME BUDGET_S COMMAND...: COMMAND under timeout min(BUDGET_S, what is left of CAP), into $OUT/NAME.log
  local name=$1 budget=$2; shift 2
  local left=$((CAP - (SECONDS - START))); local t=$((left < budget ? left : budget)) began=$SECONDS smi=
  if [ "$t" -lt 10 ]; then
    echo "$name: skipped, $left s left of the $CAP s cap" | tee -a "$OUT/summary.txt"; return
  fi
  if [ "$DEVICE" != cpu ]; then  # GPU utilisation every 200 ms while it runs
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 > "$OUT/util_$name.csv" 2>/dev/null &
    smi=$!
  fi
  timeout -k 5 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  local util=
  [ -n "$smi" ] && util=$(awk '{s+=$1; n++} END {if (n) printf ", GPU %.0f%% busy (mean of %d samples)", s/n, n}' "$OUT/util_$name.csv")
  echo "$name: rc $rc$([ "$rc" = 124 ] && echo ' (timed out)') in $((SECONDS - began)) s of $t$util" | tee -a "$OUT/summary.txt"
}

if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"; fi

step data 30 python3 - "$DATA" "$PER_BATCH" "$N_TEST" <<'PY'
import json, os, sys
import torch
sys.path.insert(0, 'tests')
try:
    import pytest  # noqa: F401  (conftest.py defines fixtures with it)
except ImportError:  # the device machine may lack pytest; conftest needs only its decorator at import
    import types
    sys.modules['pytest'] = types.SimpleNamespace(fixture=lambda **kw: (lambda f: f))
from conftest import write_cifar
root, per_batch, n_test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, y, tx, ty = write_cifar(root, n_per_batch=per_batch, n_test=n_test)
os.makedirs(os.path.join(root, 'cifar10'), exist_ok=True)  # the package's format, the same images
for name, (images, labels) in [('train.pt', (x, y)), ('test.pt', (tx, ty))]:
    torch.save({'images': torch.tensor(images), 'labels': torch.tensor(labels), 'classes': [str(i) for i in range(10)]},
               os.path.join(root, 'cifar10', name))
with open(os.path.join(root, 'held_out.json'), 'w') as f:  # for the tiny set: the default's indices run to 49,999
    json.dump({'random': list(range(20)), 'easy': list(range(20, 40))}, f)
print(f'learnable CIFAR-format data: {len(x)} + {len(tx)} images in {root}')
PY

# 1. A block against its runs alone. Same seeds give the same Loader draws: compared exactly. Logits:
# largest |block - alone| over the largest |alone|; the yardstick is one run alone twice (cuDNN is not
# deterministic) -- training amplifies rounding, so "float16 noise" is that figure, not 1e-3. On a CPU the
# yardstick is 0 (deterministic kernels), and Madry's gap is percents: its max-pools and ReLUs amplify
# float32 rounding that far within 3 steps (tests/test_madry_block.py), so there the data order is the check.
step block_check 90 python3 - "$DATA" <<'PY'
import os, sys
import numpy as np, torch
import airbench, trainer_madry
device, tiny = os.environ['DEVICE'], bool(os.environ['TINY'])
x, y = airbench.load_cifar10(sys.argv[1], train=True, download=False)
x, y = x[:1000 if tiny else 10000], y[:1000 if tiny else 10000]
recipes = {
    'airbench': (airbench.train94, airbench.infer, dict(lr=5.0, label_smoothing=0.0, batch_size=512, flip='random', epochs=2)),
    'madry': (trainer_madry.train, trainer_madry.infer, dict(epochs=2, lr_peak_epoch=0.5)),
}
seen, batches = [], airbench.Loader.batches
def record(self):  # every Loader's yields, in order (as tests/test_airbench_block.py records them)
    mine = []
    seen.append(mine)
    for batch in batches(self):
        mine.append([t.cpu().clone() for t in batch])
        yield batch
airbench.Loader.batches = record
seeds, keeps = [0, 1, 2], [None, np.arange(40, len(x)), None]
for recipe, (train, infer, hyp) in recipes.items():
    if tiny:
        hyp = dict(hyp, widths=(16, 32, 32) if recipe == 'airbench' else (4, 8, 16, 8), batch_size=100)
    seen.clear()
    block = infer(train(x, y, keep=keeps, seed=seeds, device=device, **hyp), x)
    block_yields = list(seen)
    for m, (keep, seed) in enumerate(zip(keeps, seeds)):
        seen.clear()
        alone = infer(train(x, y, keep=keep, seed=seed, device=device, **hyp), x)
        same = len(seen[0]) == len(block_yields[m]) and all(
            torch.equal(a, b) for p, q in zip(seen[0], block_yields[m]) for a, b in zip(p, q))
        gap = ((block[m] - alone).abs().max() / alone.abs().max()).item()
        print(f'{recipe} block check seed {seed}: data order {"the same" if same else "DIFFERENT"} '
              f'({len(seen[0])} batches); max |block - alone| / max |alone| = {gap:.2e}')
    again = infer(train(x, y, keep=keep, seed=seed, device=device, **hyp), x)
    print(f'{recipe} noise: the same run alone twice: {((again - alone).abs().max() / alone.abs().max()).item():.2e}')
PY

# 2. float16 against float32 at the same seeds, on learnable data (the issue: within a few points).
step precision_check 60 python3 - "$DATA" <<'PY'
import os, sys
import torch
import airbench, trainer_madry
device, tiny = os.environ['DEVICE'], bool(os.environ['TINY'])
x, y = airbench.load_cifar10(sys.argv[1], train=True, download=False)
tx, ty = airbench.load_cifar10(sys.argv[1], train=False, download=False)
n = 600 if tiny else 10000
x, y = x[:n], y[:n]
recipes = {  # tiny: tests/test_airbench_precision.py's fast net (float16 is slow on a CPU)
    'airbench': (airbench.train94, airbench.infer, dict(widths=(8, 8, 8), batch_size=50, epochs=1, lr=10.0,
                 scaling_factor=1.0, label_smoothing=0.0) if tiny else dict(lr=5.0, label_smoothing=0.0, batch_size=512, epochs=1)),
    'madry': (trainer_madry.train, trainer_madry.infer, dict(widths=(4, 8, 16, 8), batch_size=50, epochs=1, lr_peak_epoch=0.2)
              if tiny else dict(epochs=2, lr_peak_epoch=0.5)),
}
for recipe, (train, infer, hyp) in recipes.items():
    for seed in (0, 1):
        acc = {}
        for precision in ('float16', 'float32'):
            net = train(x, y, seed=seed, device=device, precision=precision, **hyp)
            acc[precision] = (infer(net, tx).argmax(-1).cpu() == torch.as_tensor(ty)).float().mean().item()
        gap = acc['float16'] - acc['float32']
        print(f'{recipe} seed {seed} on {n} learnable images: test accuracy float16 {acc["float16"]:.3f}, '
              f'float32 {acc["float32"]:.3f}, difference {gap:+.3f}{"" if abs(gap) <= 0.03 else "  MORE THAN 3 POINTS"}')
PY

# 3. The trainers end to end, then the analysis of each store (viz needs 2 runs per arm).
step trainer_airbench 45 python3 trainer_airbench.py "${TRAIN[@]}" --runs $RUNS --data-dir "$DATA" --out "$STORES/airbench"
step trainer_madry 60 python3 trainer_madry.py "${TRAIN[@]}" "${MADRY[@]}" --runs 2 --data-dir "$DATA" --out "$STORES/madry"
step trainer_factorial 30 python3 trainer_airbench.py "${TRAIN[@]}" --design factorial --runs 2 --data-dir "$DATA" --out "$STORES/factorial"
if [ -n "$TINY" ]; then
  echo "workers_per_gpu: not on the CPU (the trainer refuses --workers-per-gpu without a GPU)" | tee -a "$OUT/summary.txt"
else
  step workers_per_gpu 40 python3 trainer_airbench.py --runs 2 --block 1 --workers-per-gpu 2 --data-dir "$DATA" --out "$STORES/per_gpu"
fi
for s in airbench madry factorial; do step "viz_$s" 20 python3 viz.py "$STORES/$s"; done
step stores 15 python3 - "$STORES" <<'PY'
import sys
import numpy as np
from experiment import Store, ARMS
for t in ('airbench', 'madry', 'per_gpu'):
    try:
        s = Store(f'{sys.argv[1]}/{t}')
        sec = np.concatenate([s.load(a)[1]['seconds'] for a in ARMS])
    except Exception as e:
        print(t, 'no store:', e); continue
    print(f'{t}: {len(sec)} runs stored, {np.mean(sec):.2f} s/run mean (train + inference on 60k + store), '
          f'projected {2000 * np.mean(sec) / 3600:.2f} h for 1000 runs per arm on this device')
PY

# 4. Speed, last: a table prints row by row, so a cut keeps the rows done. Our library at the experiment
# settings, then the package at the same settings on the same data.
step bench_experiment 45 python3 bench/bench_airbench.py --runs 5 ${TINY:+--device cpu --n-train 1024 --widths 16,32,32 --epochs 1 --runs 1}
if [ -z "$PKG" ]; then
  echo "package airbench 0.1.8: no row: its source is not here (looked in ${2:-no folder given}, .carry/airbench-0.1.8 and ~/.cache/self-influence-reference/airbench-0.1.8; the device machine is offline)" | tee -a "$OUT/summary.txt"
elif [ -n "$TINY" ]; then  # the package's train94 needs CUDA: on the CPU, only that it imports
  echo "package airbench 0.1.8: no row on the CPU (its train94 needs CUDA); found at $PKG" | tee -a "$OUT/summary.txt"
  (cd "$DATA" && PYTHONPATH="$PKG" step package_import 20 python3 -c 'import airbench; print("package", airbench.__file__)')
elif ! python3 -c 'import torchvision' 2>/dev/null; then
  echo "package airbench 0.1.8: no row: it imports torchvision, which this python lacks" | tee -a "$OUT/summary.txt"
else
  (cd "$DATA" && PYTHONPATH="$PKG" step package 45 python3 - <<'PY'
import time, torch, airbench
print('package', airbench.__file__)
def run():
    loader = airbench.CifarLoader('cifar10', train=True, batch_size=512, aug=dict(flip=True, translate=2))
    torch.cuda.synchronize(); t = time.perf_counter()
    airbench.train94(loader, learning_rate=5.0, label_smoothing=0.0, tta_level=0, verbose=False)
    torch.cuda.synchronize(); return time.perf_counter() - t
run()  # warm-up
times = [run() for _ in range(5)]
print('package airbench 0.1.8 train94, experiment settings: runs', ' '.join(f'{t:.3f}' for t in times),
      f'median {sorted(times)[2]:.3f} s/run training')
PY
  )
fi
# K models at once by workers per GPU, per model-run amortised (training + logits on the training set).
step throughput 100 python3 bench/bench_airbench.py "${BENCH[@]}" --runs 1 --blocks "$BLOCKS" --workers "$WORKERS"
step throughput_madry 50 python3 bench/bench_airbench.py "${BENCH[@]}" --recipe madry --epochs 1 --runs 1 --blocks "$BLOCKS"
grep -h "median\|^| \|block check\|noise:\|test accuracy\|block auto\|runs stored" "$OUT"/*.log | tee -a "$OUT/summary.txt"
echo "gpu_check: $((SECONDS - START)) s in all (cap $CAP s)" | tee -a "$OUT/summary.txt"
