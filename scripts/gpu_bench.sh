#!/usr/bin/env bash
# The one command for the GPU machine: from a fresh copy of the repo with .gpu/ carried (scripts/gpu_prepare.sh
# makes it), unpack the wheels and both ComfyUI trees (no network), then run `python -m harness.bench.gpu` on
# ComfyUI 0.3.75 and 0.33.0. Its figures go to $OUT (or out/gpu/): gpu_bench.json, gpu_bench.md, gpu_bench.log.
# Arguments go to the benchmark (e.g. --budget 300, --sections sampling --families flux, --smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
PY=${PYTHON:-python3}
WORK=${GPU_WORK:-/tmp/comfy_dg_gpu}
RESULTS=${OUT:-$PWD/out/gpu}
mkdir -p "$WORK" "$RESULTS"
for f in site comfyui-0.3.75 comfyui-0.33.0; do
    [ -f ".gpu/$f.tar.xz" ] || { echo "gpu_bench: .gpu/$f.tar.xz is missing: run scripts/gpu_prepare.sh and carry .gpu" >&2; exit 2; }
done
unpack() {
    rm -rf "$WORK/$1" && mkdir -p "$WORK/$1" && xz -dc ".gpu/$1.tar.xz" | tar -C "$WORK/$1" -xf -
}
unpack site & unpack comfyui-0.3.75 & unpack comfyui-0.33.0 & wait
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_bench: set-up in $(( $(date +%s) - T0 )) s; $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
PYTHONUNBUFFERED=1 "$PY" -m harness.bench.gpu --comfyui "$WORK/comfyui-0.3.75" "$WORK/comfyui-0.33.0" --out "$RESULTS" "$@"
status=$?
echo "gpu_bench: exit $status after $(( $(date +%s) - T0 )) s; figures in $RESULTS"
exit $status
