"""The speed/memory benchmark (`python -m harness.bench.speed`) end to end in its --smoke mode: three
subprocess runs (unguided, standalone, features from the sampler's own forward, features by a second pass) on the
small model, a markdown table and a final JSON line."""
import pytest
import json
import math
import os
import subprocess
import sys

from conftest import COMFYUI, REPO

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run

HEADER = "| config         |         s |    s/step | × unguided |   peak MB | +% memory | 2nd passes |"
CONFIGS = ("unguided", "standalone", "features", "features_2pass")


def test_smoke_prints_table_and_json():
    env = dict(os.environ, COMFYUI_PATH=COMFYUI, COMFY_DG_DEVICE="cpu")
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-m", "harness.bench.speed", "--smoke"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)   # a hang guard: 4 processes, each builds a model
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert HEADER in lines
    table = lines[lines.index(HEADER) + 2:]
    table = table[:table.index("")]
    rows = {line.split("|")[1].strip(): line for line in table}
    assert set(rows) == set(CONFIGS)
    # The hook's own per-evaluation work on a full-size SD1.5 UNet, before and after the per-run set-up.
    assert any(line.startswith("| sd15 | 0.86B | 686 |") for line in lines)
    for label in ("standalone time", "features time", "standalone memory", "features memory"):
        assert any(line.strip().startswith(label) and line.rstrip().endswith(("met", "not met")) for line in lines)

    result = json.loads(lines[-1])
    assert result["benchmark"] == "speed" and result["model"] == "tiny" and result["latent"] == 8
    assert result["steps"] == 2
    positive = [f"{c}_{k}" for c in CONFIGS for k in ("s", "s_per_step", "peak_mb")] + \
        ["standalone_ratio", "features_ratio", "params"]
    for key in positive:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key
    for c in CONFIGS:
        assert math.isclose(result[f"{c}_s_per_step"], result[f"{c}_s"] / 2, rel_tol=1e-2)
    assert math.isclose(result["standalone_ratio"], result["standalone_s"] / result["unguided_s"], rel_tol=1e-2)
    # Memory overheads are relative differences of peak RSS: finite, and above -100% (noise can make them < 0).
    for key in ("standalone_mem_overhead", "features_mem_overhead"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > -1, key
    assert set(result["met"]) == {"standalone_time", "features_time", "standalone_memory", "features_memory"}
    assert result["targets"] == {"standalone_ratio": 1.05, "features_ratio": 1.35, "mem_overhead": 0.15}
    # Which path ran: the head trained under the negative prompt never takes its own pass (2 steps of euler:
    # 2 guided evaluations); the prompt-independent one takes one per guided evaluation.
    assert result["features_second_passes_per_run"] == 0
    assert result["features_2pass_second_passes_per_run"] == 2
    assert result["unguided_second_passes_per_run"] == result["standalone_second_passes_per_run"] == 0
    assert result["hook_sd15_before_ms"] > 0 and result["hook_sd15_after_ms"] > 0
