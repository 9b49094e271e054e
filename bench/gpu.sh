#!/usr/bin/env bash
# The one script to run on a lent GPU machine (it has torch, triton, transformers; maybe not
# pytest or gguf): kernel tests on CUDA (bf16/fp16 cases switch on), then the kernel benchmark.
set -u
cd "$(dirname "$0")/.."
python -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
if python -c "import pytest" 2>/dev/null; then
  timeout 240 python -m pytest -q -x tests/test_triton_attention.py 2>&1 | tail -5
else
  echo "pytest not installed: kernel tests skipped"
fi
timeout 300 python bench/kernels.py
# the engine end to end on CUDA (Triton backend, prefix cache, window eviction, forks, sampler)
timeout 300 python bench/gpu_engine.py 2>&1 | grep -v " INFO "
# speculative decoding with and without (needs the default GGUF and the gguf package there)
timeout 240 python bench/speculative.py --quick 2>&1 | grep -v " INFO " \
  || echo "bench/speculative.py did not run here"
