#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite against a real ComfyUI. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
cd "$here"
export COMFYUI_PATH="${COMFYUI_PATH:-$(cat .venv/comfyui-path)}"
# -P: the repo's `nodes/` package must not shadow ComfyUI's top-level `nodes` module.
exec .venv/bin/python -P -m pytest "$@"
