"""The README's main command: the embedded demo through a headless ComfyUI (small batch here)."""
import pytest
import json
import os
import subprocess
import sys

from conftest import COMFYUI, REPO

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run


def test_demo_runs_and_reports(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=COMFYUI, COMFY_DG_DEVICE="cpu")
    run = subprocess.run([sys.executable, "-m", "harness.demo", "--batch", "64", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"comparison image: {tmp_path / 'comparison.png'}" in run.stdout
    assert os.path.getsize(tmp_path / "comparison.png") > 1000
    metrics = json.load(open(tmp_path / "metrics.json"))["metrics"]
    assert set(metrics) == {"unguided", "guided"}
    assert metrics["unguided"]["fd"] != metrics["guided"]["fd"]   # DG changed the samples
