#!/usr/bin/env bash
# One device session on a lent CUDA machine (see the device tool's README): carries .whl (pydantic
# and friends, absent from the image), installs potstill without dependencies, runs the GPU checks.
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null 2>&1 \
  || echo "potstill install failed"
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, onnx, onnxruntime; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ort', onnxruntime.__version__)"
echo "== gpu_check"; GPU_CHECK_BUDGET_S=200 timeout 260 python3 bench/gpu_check.py 2>&1 | tail -40
echo "== distill_throughput"; timeout 150 python3 bench/distill_throughput.py --device cuda --out "$OUT/distill_throughput.json" 2>&1 | tail -15
echo "== potstill aoti cuda"; timeout 120 python3 bench/gpu_potstill.py 2>&1 | tail -12
ls -la "$OUT"
