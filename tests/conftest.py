"""Tests run against a real ComfyUI: COMFYUI_PATH, or the one scripts/setup.sh put in .comfyui/."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".comfyui")
if not os.path.isfile(os.path.join(COMFYUI, "comfy", "model_base.py")):
    raise RuntimeError(f"No ComfyUI at {COMFYUI}: run `bash scripts/setup.sh`, or set COMFYUI_PATH.")
# Appended, ComfyUI first: its top-level `nodes` module must win over this repo's `nodes/` package.
for p in (COMFYUI, REPO, os.path.join(REPO, "tests")):
    if p not in sys.path:
        sys.path.append(p)

from comfy.cli_args import args  # noqa: E402

if os.environ.get("COMFY_DG_TEST_DEVICE", "cpu") == "cpu":
    args.cpu = True


@pytest.fixture(autouse=True)
def _no_grad_leaks():
    import torch
    yield
    assert torch.is_grad_enabled(), "a test left autograd disabled"
