# The environments the scripts set up and test in (sourced by setup.sh and test.sh; defines functions only).
# Each is a virtual environment plus a ComfyUI, both git-ignored folders of this repo:
#   .venv/            + .comfyui/            ComfyUI 0.3.75 from the registry (or COMFYUI_PATH, an existing ComfyUI)
#   .venv-<version>/  + .comfyui-<version>/  a copy of a ComfyUI source tree (the tests' second ComfyUI:
#                                            $COMFY_DG_COMFYUI_SOURCE, by default ../shared/comfyui/0.33.0)
# The version in the folder names is read from the tree's comfyui_version.py, only to name the folders.

# The source tree of the second ComfyUI the tests run against.
comfy_dg_source() {
  echo "${COMFY_DG_COMFYUI_SOURCE:-$1/../shared/comfyui/0.33.0}"
}

# A ComfyUI tree's version (its comfyui_version.py), or the folder's name when it has none.
comfyui_version() {
  local v
  v="$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$1/comfyui_version.py" 2>/dev/null | head -n 1)"
  echo "${v:-$(basename "$1")}"
}

# An absolute path for a folder given relative to where the command was run (unchanged when it does not exist).
absolute() {
  (cd "$1" 2> /dev/null && pwd) || echo "$1"
}
