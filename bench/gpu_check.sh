#!/usr/bin/env bash
# The prepared device check: installs sb_keras if needed, then runs
# bench/gpu_check.py (checks on the device's kernels, tests, throughput table,
# a short real-data training run) and writes device_check.{json,md}.
#
#   bash bench/gpu_check.sh [--out DIR] [--data-dir DIR] [--quick]
#
# Uses $PYTHON if set, else .venv/bin/python if present, else creates .venv
# (pip, from requirements.txt; on a machine with nvidia-smi also TensorFlow's
# CUDA libraries, `tensorflow[and-cuda]` at the pinned version). Works on a
# CPU-only machine too: what needs a GPU is skipped and listed as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=3 PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -r requirements.txt
    .venv/bin/pip install -q -e . --no-deps
  fi
  PY=.venv/bin/python
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! "$PY" -c "import tensorflow as tf, sys; sys.exit(not tf.config.list_physical_devices('GPU'))" 2>/dev/null; then
    tf_version=$("$PY" -c "import tensorflow as tf; print(tf.__version__)")
    echo "nvidia-smi present but TensorFlow sees no GPU: installing tensorflow[and-cuda]==$tf_version"
    "$PY" -m pip install -q "tensorflow[and-cuda]==$tf_version" || echo "could not install the CUDA libraries (offline?); continuing on CPU"
  fi
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" bench/gpu_check.py "$@"
