#!/usr/bin/env bash
# Run the browser test and copy its screenshots (each workflow loaded in the real ComfyUI frontend, and the CPU
# demo after it ran) into docs/screenshots/ for the README. Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
cd "$here"
export COMFYUI_PATH="${COMFYUI_PATH:-$(cat .venv/comfyui-path)}"
COMFY_DG_UPDATE_DOCS=1 exec .venv/bin/python -P -m pytest tests/test_browser.py -q "$@"
