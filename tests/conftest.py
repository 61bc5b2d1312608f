"""Tests run against a real ComfyUI: COMFYUI_PATH, or the one scripts/setup.sh put in .comfyui/.

Shared fixtures live here; helper modules (analytic.py, builders.py, gmm.py, probe.py) hold shared code. No test
module imports another. Markers: `slow` for tests that start a server, a browser or a subprocess, or train;
`-m "not slow"` runs the pure and in-process tests.
"""
import asyncio
import contextlib
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


class _RepoRootIsNoTestPackage:
    """The repo root's __init__.py is ComfyUI's entry point for the pack (ComfyUI imports the folder as a package,
    whatever its name). pytest would collect the root as a test package and import that file on its own, which
    fails for a folder name that is no Python identifier (the README's `comfy-dg`, names with dots): to pytest
    the root is a plain folder."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if os.path.samefile(path, REPO):
            return pytest.Dir.from_parent(parent, path=path)


def pytest_configure(config):
    config.pluginmanager.register(_RepoRootIsNoTestPackage(), "comfy_dg_repo_root")
    config.addinivalue_line("markers", "slow: starts a server, a browser or a subprocess, or trains (deselect with "
                                       "-m 'not slow')")


def _global_state():
    import comfy.samplers
    import folder_paths
    return {"folders": {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()},
            "user": folder_paths.get_user_directory(), "input": folder_paths.get_input_directory(),
            "output": folder_paths.get_output_directory(), "sample_sampler": hasattr(comfy, "sample_sampler"),
            "samplers": list(comfy.samplers.SAMPLER_NAMES)}


@pytest.fixture(scope="session", autouse=True)
def _no_global_state_leaks():
    """ComfyUI's process-wide state (model folders, user/input/output folders, sampler lists) is the same after the
    whole run as before it: tests that change it restore it."""
    import comfy  # noqa: F401
    before = _global_state()
    yield
    after = _global_state()
    if "discriminators" not in before["folders"]:   # loading the pack registers its folder for good, as in ComfyUI
        after["folders"].pop("discriminators", None)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


@pytest.fixture(autouse=True)
def _no_grad_leaks():
    import torch
    yield
    assert torch.is_grad_enabled(), "a test left autograd disabled"


@pytest.fixture(scope="session")
def pack():
    """The pack's nodes, loaded into this process once, the way ComfyUI loads a custom node folder."""
    import nodes as comfy_nodes
    if "DiscriminatorGuidanceV2" not in comfy_nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(comfy_nodes.load_custom_node(REPO, ignore=set()))
    return comfy_nodes.NODE_CLASS_MAPPINGS


@contextlib.contextmanager
def comfy_folders(discriminators=None, user=None, extensions=None):
    """ComfyUI's discriminators folder (and user folder) pointed elsewhere for a while, then restored."""
    import folder_paths
    saved, saved_user = folder_paths.folder_names_and_paths["discriminators"], folder_paths.get_user_directory()
    try:
        if discriminators is not None:
            folder_paths.folder_names_and_paths["discriminators"] = ([str(discriminators)], extensions or saved[1])
        if user is not None:
            folder_paths.set_user_directory(str(user))
        yield
    finally:
        folder_paths.folder_names_and_paths["discriminators"] = saved
        folder_paths.set_user_directory(saved_user)


@pytest.fixture
def discriminator_folder(tmp_path):
    """A fresh models/discriminators folder for one test."""
    with comfy_folders(discriminators=tmp_path):
        yield str(tmp_path)


@pytest.fixture
def every_progress_update(monkeypatch):
    """Newer ComfyUI's ProgressBar passes an update to its hook only 0.1 s and 0.5% after the last one; a test that
    acts at a given step needs every update (where ComfyUI has no throttle, nothing changes)."""
    import comfy.utils
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            monkeypatch.setattr(comfy.utils, name, 0)
