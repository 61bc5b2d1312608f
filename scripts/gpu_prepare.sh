#!/usr/bin/env bash
# Prepares .gpu/, the git-ignored folder that travels to the GPU machine with the device tool's `carry` (which
# cannot reach any package registry), for scripts/gpu_bench.sh:
#   site.tar.xz              what ComfyUI 0.3.75 and 0.33.0 import on the benchmark's path and that machine lacks:
#                            torchsde + trampoline (comfy.k_diffusion), kornia + kornia_rs (the pack's trainer),
#                            comfy-kitchen + comfy-aimdo (0.33.0: attention, quant ops, dynamic VRAM), as
#                            CPython 3.12 manylinux wheels (`pip download`, the device README's recipe), installed
#                            into one folder with comfy-kitchen's ROCm backend (hip/, 59 MB) left out, xz-packed;
#   comfyui-0.3.75.tar.xz    the ComfyUI of .comfyui (or $COMFYUI_075), without tests and custom_nodes;
#   comfyui-0.33.0.tar.xz    the unmodified 0.33.0 tree of ../shared/comfyui/0.33.0 (or $COMFYUI_033), without tests.
# Skipped on purpose (not imported on the benchmark's path): av (ComfyUI's nodes.py/comfy_api video types: the
# benchmark samples through comfy.sample, as KSampler does), spandrel, alembic, SQLAlchemy, pydantic(-settings),
# simpleeval, blake3 and the frontend/template packages (server, API nodes, extra nodes). torch 2.11, torchvision,
# torchaudio, transformers, numpy, safetensors, scipy, einops, pytest, ... are on the GPU machine already.
# Takes a few minutes (xz on two cores); the carry limit is 64 MiB for everything that travels.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
COMFYUI_075=${COMFYUI_075:-$REPO/.comfyui}
COMFYUI_033=${COMFYUI_033:-$REPO/../shared/comfyui/0.33.0}
PY=${PYTHON:-python3}
WHEELS=(torchsde==0.2.6 trampoline==0.1.2 kornia==0.9.0 kornia_rs==0.2.0 comfy-kitchen==0.2.31 comfy-aimdo==0.4.13)
for tree in "$COMFYUI_075" "$COMFYUI_033"; do
    [ -f "$tree/comfy/model_base.py" ] || { echo "gpu_prepare: no ComfyUI at $tree" >&2; exit 1; }
done
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
rm -rf .gpu && mkdir -p .gpu "$STAGE/whl"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
           --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$STAGE/whl" "${WHEELS[@]}"
"$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --target "$STAGE/site" "$STAGE"/whl/*.whl
rm -rf "$STAGE/site/comfy_kitchen/backends/hip" "$STAGE/site/bin"
find "$STAGE/site" -name __pycache__ -prune -exec rm -rf {} +
ls "$STAGE/whl" > .gpu/WHEELS

pack() {    # pack FOLDER ARCHIVE [tar excludes...]
    local src=$1 dest=$2; shift 2
    tar -C "$src" --exclude=__pycache__ --exclude='*.pyc' "$@" -cf - . | xz -T0 -6 > "$dest"
}
pack "$STAGE/site" .gpu/site.tar.xz &
pack "$COMFYUI_075" .gpu/comfyui-0.3.75.tar.xz --exclude=./tests --exclude=./tests-unit --exclude=./custom_nodes \
    --exclude=./temp --exclude=./output --exclude=./user --exclude=./extra_model_paths.yaml &
pack "$COMFYUI_033" .gpu/comfyui-0.33.0.tar.xz --exclude=./tests --exclude=./tests-unit --exclude=./custom_nodes \
    --exclude=./temp --exclude=./output --exclude=./user &
wait

carried=$(du -cb .gpu | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
ls -l .gpu
echo "gpu_prepare: .gpu is $((carried / 1048576)) MiB; with the working tree ($((tree / 1048576)) MiB) $(((carried + tree) / 1048576)) MiB travel (limit 64 MiB)"
[ $((carried + tree)) -le $((64 * 1048576)) ] || { echo "gpu_prepare: over the 64 MiB carry limit" >&2; exit 1; }
