#!/usr/bin/env bash
# The GPU check on the lent GPU machine, in one command under 8 minutes: Keras on JAX, no Ray,
# MLflow or TensorFlow there (bench/gpu_jax.py). Writes gpu.json to $OUT (the folder the device
# run brings back), else to bench/results/.
#   there: bash bench/device/gpu_check.sh            (carry bench/device/wheels: make device-wheels)
#   here:  bash bench/device/gpu_check.sh --dry-run  (JAX on the CPU, tiny models; a test runs it)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-bench/results}"
WHEELS=bench/device/wheels
DRY=()
if [ "${1:-}" = "--dry-run" ]; then
  DRY=(--dry-run)
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2
if ! "$PYTHON" -c "import keras" 2>/dev/null; then
  echo "gpu_check.sh: Keras does not import; run 'make device-wheels' here and carry $WHEELS" >&2
  exit 2
fi
mkdir -p "$OUT"
# No case starts after 390 s; one may run 45 s past it; the whole check stops at 470 s.
exec timeout 470 "$PYTHON" -m bench.gpu_check --backend jax "${DRY[@]}" --budget-s 390 \
  --json "$OUT/gpu.json"
