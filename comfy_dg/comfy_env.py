"""Finding a real ComfyUI for the command-line tools (benchmarks, training CLI); inside ComfyUI it is already there."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        stamp = os.path.join(REPO, ".venv", "comfyui-path")
        path = open(stamp).read().strip() if os.path.isfile(stamp) else os.path.join(REPO, ".comfyui")
    if not os.path.isfile(os.path.join(path, "comfy", "model_base.py")):
        raise SystemExit(f"comfy-dg: no ComfyUI at {path}. Run `bash scripts/setup.sh`, or set COMFYUI_PATH to "
                         "your ComfyUI folder.")
    return path


def ensure_comfyui(cpu: bool | None = None):
    """Make ComfyUI importable (appended, so its top-level `nodes` wins) and, by default on machines without
    a GPU, select the CPU."""
    if "comfy" in sys.modules:
        return
    path = comfyui_path()
    # This repo's `nodes/` package would shadow ComfyUI's top-level `nodes` module: ComfyUI goes first.
    here = [p for p in sys.path if os.path.abspath(p or os.getcwd()) == REPO]
    sys.path[:] = [p for p in sys.path if p not in here and p != path] + [path, REPO]
    from comfy.cli_args import args
    if cpu is None:
        import torch
        cpu = os.environ.get("COMFY_DG_DEVICE") == "cpu" or not torch.cuda.is_available()
    args.cpu = bool(cpu)
