#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then the GPU benchmarks, in under ten minutes.
# Usage (from the repository root, after `make install` or with an existing .venv):
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'faiss gpus', faiss.get_num_gpus())"
echo "== GPU tests"
timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/gpu tests/adapt || echo "GPU TESTS FAILED"
echo "== embed: ViT-B-32 (random init, no network) stage vs raw forward"
timeout 120 $PY benchmarks/embed.py --model ViT-B-32 --device cuda --n 4096 --batch-size 256 \
  --num-workers "$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))" --image-size 256 --repeats 2 || echo "EMBED BENCHMARK FAILED"
echo "== k-means: clustering stage vs raw faiss, 1M x 512, k=1000 (faiss GPU when faiss-gpu is installed)"
timeout 100 $PY benchmarks/cluster.py --n 1000000 --k 1000 --no-sklearn || echo "CLUSTER BENCHMARK FAILED"
echo "== SemDeDup rows/s (ours on the GPU by torch vs the numpy reference on the CPU), 1M rows in 1000 clusters"
timeout 100 $PY benchmarks/prune.py --n 1000000 --clusters 1000 --repeats 1 --big-cluster 0 --skip-qp \
  || echo "PRUNE BENCHMARK FAILED"
echo "== corrupted vs clean evaluation: resnet50 on the GPU (corruption stays on the CPU)"
timeout 60 $PY benchmarks/robustness.py /tmp/prunescope_bench/robust --arch resnet50 --device cuda --n 128 \
  --repeats 1 || echo "ROBUSTNESS BENCHMARK FAILED"
echo "== similarity: streamed search vs faiss flat (CPU faiss unless faiss-gpu is installed)"
timeout 60 $PY benchmarks/similarity.py /tmp/prunescope_bench/sim --sizes 1000000 || echo "SIMILARITY BENCHMARK FAILED"
