#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite once per ComfyUI version, each in its own environment (envs.sh):
#   ComfyUI 0.3.75   .venv/ + .comfyui/ (from the registry)
#   ComfyUI 0.33.0   .venv-0.33.0/ + .comfyui-0.33.0/ (a copy of ../shared/comfyui/0.33.0, or of the source tree
#                    $COMFY_DG_COMFYUI_SOURCE); when that tree is absent this run is skipped with one line, except
#                    under CI=true, where that fails
# COMFYUI_PATH=/path/to/ComfyUI runs the suite once, against that existing ComfyUI (with .venv/).
# Extra arguments go to pytest. Ends with each version's test counts and time; fails if any run failed. Torch runs
# one thread per process here unless OMP_NUM_THREADS is set.
# The browser test needs Debian's chromium: installed here with apt when missing (as root, or with sudo that
# needs no password); where that cannot be done the browser test skips, except under CI=true, where it fails.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$here/scripts/envs.sh"
[ -z "${COMFYUI_PATH:-}" ] || export COMFYUI_PATH="$(absolute "$COMFYUI_PATH")"
[ -z "${COMFY_DG_COMFYUI_SOURCE:-}" ] || export COMFY_DG_COMFYUI_SOURCE="$(absolute "$COMFY_DG_COMFYUI_SOURCE")"
cd "$here"
in_ci=false
case "${CI:-}" in 1|true|TRUE|True|yes) in_ci=true ;; esac

# Each run: "python|ComfyUI folder".
runs=()
if [ -n "${COMFYUI_PATH:-}" ]; then
  bash scripts/setup.sh || exit 1
  runs+=("$here/.venv/bin/python|$COMFYUI_PATH")
else
  bash scripts/setup.sh || exit 1
  runs+=("$here/.venv/bin/python|$here/.comfyui")
  src="$(comfy_dg_source "$here")"
  if [ -f "$src/main.py" ]; then
    bash scripts/setup.sh --source "$src" || exit 1
    v="$(comfyui_version "$src")"
    runs+=("$here/.venv-$v/bin/python|$here/.comfyui-$v")
  elif $in_ci; then
    echo "[test] FAILED: no ComfyUI source tree at $src (CI=true tests both versions; set COMFY_DG_COMFYUI_SOURCE)" >&2
    exit 1
  else
    echo "[test] skipping the second ComfyUI: no source tree at $src (set COMFY_DG_COMFYUI_SOURCE to test one)"
  fi
fi

if [ ! -x /usr/bin/chromium ] && command -v apt-get > /dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  echo "[test] installing Debian's chromium for the browser test"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends chromium > /dev/null; } \
    || echo "[test] could not install chromium (needs root or sudo): the browser test will skip"
fi

# The suite runs small models in several processes at once (pytest, a server, a browser): one torch thread each
# (unless OMP_NUM_THREADS says otherwise), since on a shared or small machine competing thread pools spin and run
# an order of magnitude slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
logs="$(mktemp -d)"
summary=()
status=0
for run in "${runs[@]}"; do
  py="${run%%|*}"
  comfy="${run#*|}"
  v="$(comfyui_version "$comfy")"
  frontend="$("$py" -c 'import importlib.metadata as m; print(m.version("comfyui-frontend-package"))' 2>/dev/null \
    || echo "?")"
  echo "[test] ComfyUI $v ($comfy, frontend $frontend, $py)"
  start=$SECONDS
  # -P: the repo's `nodes/` package must not shadow ComfyUI's top-level `nodes` module.
  COMFYUI_PATH="$comfy" COMFY_DG_ARTIFACTS="${COMFY_DG_ARTIFACTS:-$here/tests/.artifacts/browser-$v}" \
    "$py" -P -m pytest "$@" 2>&1 | tee "$logs/$v.log"
  rc=${PIPESTATUS[0]}
  took=$((SECONDS - start))
  counts="$(grep -E '[0-9]+ (passed|failed|errors?|skipped|xfailed|deselected)' "$logs/$v.log" | tail -n 1 \
    | sed -E 's/^=+ //; s/ =+$//')"
  [ "$rc" = 0 ] || status=1
  summary+=("ComfyUI $v: ${counts:-no test ran (pytest exit $rc)}; $((took / 60)) min $((took % 60)) s wall$([ "$rc" = 0 ] || echo ", FAILED")")
done
rm -rf "$logs"
echo
for line in "${summary[@]}"; do echo "[test] $line"; done
exit "$status"
