#!/usr/bin/env bash
# From a fresh machine to a report: venv, install, real data, then the quick pipeline
# (teacher -> two distilled students -> ONNX/OpenVINO FP32/INT8 -> parity -> profile -> report).
#   scripts/quickstart.sh [extra `edgekt pipeline` options, e.g. --set profile.seconds=3]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${EDGEKT_DATA:-}" ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "installing the Debian package dataset-fashion-mnist (real Fashion-MNIST IDX files)"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      $SUDO apt-get install -y -qq dataset-fashion-mnist; } || true
fi
DATASET=fashion-mnist
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${EDGEKT_DATA:-}" ]; then
  DATASET=digits
  echo "Fashion-MNIST is not available: running on scikit-learn's embedded digits instead."
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[all]"
# litert-torch (extra litert-export, the .tflite converter) pins typing-extensions < 4.13 through
# xdsl; pip backtracks for many minutes when it is resolved together with the rest, so it is
# installed in a second pass with the versions that satisfy both (pydantic < 2.12).
.venv/bin/python -m pip install -q "litert-torch>=0.10,<0.11" "pydantic<2.12" "typing-extensions<4.13"

start=$(date +%s)
.venv/bin/edgekt pipeline --preset quick --set "data.name=$DATASET" "$@"
echo "quick pipeline finished in $(( $(date +%s) - start )) s; report: runs/pipeline_quick/report.md"
