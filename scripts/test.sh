#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite against a real ComfyUI. Extra arguments go to pytest.
# The browser test needs Debian's chromium: installed here with apt when missing (as root, or with sudo that
# needs no password); where that cannot be done the browser test skips, except under CI=true, where it fails.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup.sh"
cd "$here"
if [ ! -x /usr/bin/chromium ] && command -v apt-get > /dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  echo "[test] installing Debian's chromium for the browser test"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends chromium > /dev/null; } \
    || echo "[test] could not install chromium (needs root or sudo): the browser test will skip"
fi
export COMFYUI_PATH="${COMFYUI_PATH:-$(cat .venv/comfyui-path)}"
# -P: the repo's `nodes/` package must not shadow ComfyUI's top-level `nodes` module.
exec .venv/bin/python -P -m pytest "$@"
