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
timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider tests/gpu tests/adapt || echo "GPU TESTS FAILED"
echo "== embed: ViT-B-32 (random init, no network) stage vs raw forward"
timeout 240 $PY benchmarks/embed.py --model ViT-B-32 --device cuda --n 4096 --batch-size 256 \
  --num-workers "$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))" --image-size 256 --repeats 2 || echo "EMBED BENCHMARK FAILED"
echo "== corrupted vs clean evaluation: resnet50 on the GPU (corruption stays on the CPU)"
timeout 150 $PY benchmarks/robustness.py /tmp/prunescope_bench/robust --arch resnet50 --device cuda --n 128 \
  --repeats 1 || echo "ROBUSTNESS BENCHMARK FAILED"
echo "== similarity: streamed search vs faiss flat (CPU faiss unless faiss-gpu is installed)"
timeout 150 $PY benchmarks/similarity.py /tmp/prunescope_bench/sim --sizes 1000000 || echo "SIMILARITY BENCHMARK FAILED"
