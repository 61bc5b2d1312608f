#!/usr/bin/env bash
# Set up (if needed) and start ComfyUI with comfy-dg loaded (CPU unless a GPU is there): http://127.0.0.1:8188
# Extra arguments go to ComfyUI's main.py (e.g. --port 8189).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
comfy="$(cat "$here/.venv/comfyui-path")"
mkdir -p "$comfy/models/discriminators"
cd "$comfy"
cpu=--cpu
"$here/.venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && cpu=""
exec "$here/.venv/bin/python" main.py $cpu --listen 127.0.0.1 --port 8188 --disable-auto-launch "$@"
