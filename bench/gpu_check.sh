#!/usr/bin/env bash
# The GPU check, as one script: library speed with the experiment's settings and with the library
# defaults, the airbench==0.1.8 package on the same data (if its source folder is given), then both
# trainers end to end and the analysis, all on random CIFAR-shaped uint8 data (same FLOPs as CIFAR-10;
# the accuracies mean nothing): float16 on CUDA by default (--precision auto), --block auto, a block
# against its runs alone, the factorial design, several workers per GPU.
#   bash bench/gpu_check.sh OUT_DIR [FOLDER_HOLDING_THE_airbench_PACKAGE]
set -u
OUT=${1:-/tmp/gpu_check}; PKG=${2:+$(cd "$2" && pwd)}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); export PYTHONUNBUFFERED=1
DATA=/tmp/random_cifar; STORES=/tmp/gpu_check_runs; rm -rf "$STORES"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

python3 - "$DATA" <<'PY'
import os, pickle, sys, numpy as np, torch
root = sys.argv[1]; folder = os.path.join(root, 'cifar-10-batches-py'); os.makedirs(folder, exist_ok=True)
rng = np.random.default_rng(0)
parts = []
for name, label in [*[(f'data_batch_{i}', f'training batch {i} of 5') for i in range(1, 6)], ('test_batch', 'testing batch 1 of 1')]:
    data = rng.integers(0, 256, (10000, 3072), dtype=np.uint8); labels = rng.integers(0, 10, 10000)
    pickle.dump({b'batch_label': label.encode(), b'data': data, b'labels': labels.tolist()}, open(os.path.join(folder, name), 'wb'))
    parts.append((data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels))
os.makedirs(os.path.join(root, 'cifar10'), exist_ok=True)  # the package's format
for name, (x, y) in [('train.pt', (np.concatenate([p[0] for p in parts[:5]]), np.concatenate([p[1] for p in parts[:5]]))), ('test.pt', parts[5])]:
    torch.save({'images': torch.tensor(np.ascontiguousarray(x)), 'labels': torch.tensor(y), 'classes': [str(i) for i in range(10)]}, os.path.join(root, 'cifar10', name))
print('random CIFAR-format data written to', root)
PY

sample() {  # GPU utilisation samples every 200 ms into $OUT/util_$1.csv while the command runs
  local tag=$1; shift
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 > "$OUT/util_$tag.csv" 2>/dev/null &
  local smi=$!
  "$@" 2>&1 | tee "$OUT/$tag.log"
  kill $smi 2>/dev/null
  awk '{s+=$1; n++} END {if (n) printf "GPU utilisation during '"$tag"': mean %.0f%% over %d samples\n", s/n, n}' "$OUT/util_$tag.csv" | tee -a "$OUT/summary.txt"
}

sample bench_experiment timeout 90 python3 bench/bench_airbench.py --runs 5
sample bench_blocks timeout 150 python3 bench/bench_airbench.py --runs 2 --blocks 1,2,4,8
# A block of 3 against the same 3 runs alone, in float16 on CUDA: same seeds, so the same data order;
# logits agree to float16 noise (printed as the largest difference over the logit scale).
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/block_check.log" | tee -a "$OUT/summary.txt"
import torch, airbench
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (10000, 32, 32, 3), dtype=torch.uint8, generator=g); labels = torch.randint(0, 10, (10000,), generator=g)
hyp = dict(lr=5.0, label_smoothing=0.0, batch_size=512, flip='random', epochs=2)
seeds = [0, 1, 2]; keeps = [None, list(range(40, 10000)), None]
block = airbench.infer(airbench.train94(images, labels, keep=keeps, seed=seeds, device='cuda', **hyp), images)
for k, (keep, seed) in enumerate(zip(keeps, seeds)):
    alone = airbench.infer(airbench.train94(images, labels, keep=keep, seed=seed, device='cuda', **hyp), images)
    print(f'block check seed {seed}: max |block - alone| / max |alone| = {((block[k] - alone).abs().max() / alone.abs().max()).item():.2e}')
PY
sample bench_madry_blocks timeout 120 python3 bench/bench_airbench.py --recipe madry --epochs 2 --runs 1 --blocks 1,2,4,8
# The same for the Madry ResNet-9 (autocast float16, a loss scale per model), 2 epochs on 10,000 images;
# its training amplifies rounding (docs/fidelity.md), so the noise line is the yardstick: one run alone twice.
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/madry_block_check.log" | tee -a "$OUT/summary.txt"
import torch, trainer_madry
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (10000, 32, 32, 3), dtype=torch.uint8, generator=g); labels = torch.randint(0, 10, (10000,), generator=g)
hyp = dict(epochs=2, lr_peak_epoch=0.5)
seeds = [0, 1, 2]; keeps = [None, list(range(40, 10000)), None]
block = trainer_madry.infer(trainer_madry.train(images, labels, keep=keeps, seed=seeds, device='cuda', **hyp), images)
for k, (keep, seed) in enumerate(zip(keeps, seeds)):
    alone = trainer_madry.infer(trainer_madry.train(images, labels, keep=keep, seed=seed, device='cuda', **hyp), images)
    print(f'madry block check seed {seed}: max |block - alone| / max |alone| = {((block[k] - alone).abs().max() / alone.abs().max()).item():.2e}')
again = trainer_madry.infer(trainer_madry.train(images, labels, keep=keeps[-1], seed=seeds[-1], device='cuda', **hyp), images)
print(f'madry noise: the same run alone twice (cuDNN is not deterministic): {((again - alone).abs().max() / alone.abs().max()).item():.2e}')
PY
sample bench_library timeout 75 python3 bench/bench_airbench.py --preset library --runs 5
if [ -n "$PKG" ]; then
  (cd "$DATA" && export PYTHONPATH="$PKG" && sample package timeout 75 python3 - <<'PY'
import time, torch, airbench
print('package', airbench.__file__)
def run():
    loader = airbench.CifarLoader('cifar10', train=True, batch_size=512, aug=dict(flip=True, translate=2))
    torch.cuda.synchronize(); t = time.perf_counter()
    net = airbench.train94(loader, learning_rate=5.0, label_smoothing=0.0, tta_level=0, verbose=False)
    torch.cuda.synchronize(); return time.perf_counter() - t
run()  # warm-up
times = [run() for _ in range(5)]
print('package airbench 0.1.8 train94, experiment settings: runs', ' '.join(f'{t:.3f}' for t in times),
      f'median {sorted(times)[2]:.3f} s/run training')
PY
  )
fi
sample trainer_airbench timeout 120 python3 trainer_airbench.py --runs 10 --data-dir "$DATA" --out "$STORES/airbench"
sample trainer_madry timeout 150 python3 trainer_madry.py --runs 2 --data-dir "$DATA" --out "$STORES/madry"
sample trainer_factorial timeout 60 python3 trainer_airbench.py --design factorial --runs 4 --data-dir "$DATA" --out "$STORES/factorial"
sample workers_per_gpu timeout 90 python3 trainer_airbench.py --runs 8 --block 1 --workers-per-gpu 4 --data-dir "$DATA" --out "$STORES/per_gpu"
for s in airbench madry factorial; do timeout 30 python3 viz.py "$STORES/$s" > "$OUT/viz_$s.log" 2>&1; echo "viz $s: rc $?" | tee -a "$OUT/summary.txt"; done
python3 - "$STORES" <<'PY' | tee -a "$OUT/summary.txt"
import sys, json, numpy as np; sys.path.insert(0, '.')
from experiment import Store, ARMS
for t in ('airbench', 'madry', 'per_gpu'):
    try:
        s = Store(f'{sys.argv[1]}/{t}')
    except Exception as e:
        print(t, 'no store:', e); continue
    sec = np.concatenate([s.load(a)[1]['seconds'] for a in ARMS])
    print(f'{t}: {len(sec)} runs stored, {np.mean(sec):.2f} s/run mean (train + inference on 60k + store), '
          f'projected {2000 * np.mean(sec) / 3600:.2f} h for 1000 runs per arm on this GPU')
PY
grep -h "median\|^K=\|block auto" "$OUT"/*.log | tee -a "$OUT/summary.txt"
