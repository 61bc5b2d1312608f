"""The quality benchmark's pipeline, in its smoke size (the numbers are not checked, only that they come out)."""
import pytest
import json
import os
import subprocess
import sys

from conftest import COMFYUI, REPO

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run


def test_quality_benchmark_smoke(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=COMFYUI, COMFY_DG_DEVICE="cpu", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "harness.bench.quality", "--smoke", "--cache", str(tmp_path / "cache"),
                          "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in ("floor_fd", "unguided_fd", "features_fd", "standalone_fd", "features_fd_change", "unguided_recall"):
        assert isinstance(summary[key], float), key
    assert "| sampling | FD ↓ |" in run.stdout
    assert os.path.getsize(tmp_path / "out" / "smoke" / "comparison_grid.png") > 1000
    cached = os.listdir(tmp_path / "cache" / "smoke")
    assert any(f.startswith("model_") for f in cached) and any(f.startswith("samples_") for f in cached)
