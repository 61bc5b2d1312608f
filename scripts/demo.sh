#!/usr/bin/env bash
# The main job: set up (if needed), then run the embedded demo — the pack's small digits model sampled with and
# without Discriminator Guidance through a real, headless ComfyUI — and print where the comparison image and
# the metrics are. Extra arguments go to `python -m harness.demo`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
cd "$here"
export COMFYUI_PATH="${COMFYUI_PATH:-$(cat .venv/comfyui-path)}"
exec .venv/bin/python -m harness.demo "$@"
