# Sourced by the bench/gpu_check*.sh device calls: what each starts with.
#   . "$(dirname "$0")/gpu_env.sh" NAME
# Sets OUT (default /tmp/NAME; every output goes under it), PY and PYTHONUNBUFFERED, moves
# to the repository root, and records the card, torch/triton and the date in $OUT/gpu.txt.
# `need_build DIR` ends the call with a line in gpu.txt when a carried build is missing.
set -u
OUT=${OUT:-/tmp/$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
timeout 5 nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
    2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"
date -u +"date %Y-%m-%d %H:%M UTC" | tee -a "$OUT/gpu.txt"

need_build() {
    if [ ! -d "$1" ]; then
        echo "no $1: compile it first (see the top of this script)" | tee -a "$OUT/gpu.txt"
        exit 1
    fi
}
