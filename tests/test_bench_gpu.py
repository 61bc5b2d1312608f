"""The GPU benchmark (`python -m harness.bench.gpu`) end to end in its --smoke mode: the same code path on tiny
models on the CPU. Every configuration must give a number or a stated refusal, the table and the final JSON line
must have their structure, and the files go where --out says."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import COMFYUI, REPO
from harness.bench import gpu

SAMPLING_HEADER = ("| ComfyUI | patcher | model | dtype | config | s/step | × unguided | peak MiB | +% VRAM | "
                   "2nd passes | note |")


def positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.slow     # subprocesses: sampling, training, the CLI and pytest, on tiny models
def test_smoke_gives_every_configuration_a_number_or_a_reason(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=COMFYUI, COMFY_DG_DEVICE="cpu")
    env.pop("PYTHONPATH", None)
    env.pop("OUT", None)
    p = subprocess.run([sys.executable, "-m", "harness.bench.gpu", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    for heading in ("## Environment", "## Sampling", "## Training", "## Training CLI", "## autograd_weights",
                    "## Correctness", "## Targets"):
        assert any(line.startswith(heading) for line in lines), heading
    assert SAMPLING_HEADER in lines

    result = json.loads(lines[-1])
    assert result["benchmark"] == "gpu" and result["smoke"] is True and result["device"] == "cpu"
    assert result["targets"] == {"standalone_ratio": 1.05, "features_ratio": 1.35, "vram_overhead": 0.20,
                                 "train_steps_per_s": 5.0}
    rows = result["rows"]
    assert all(r["status"] in gpu.STATUSES for r in rows)
    bad = [r for r in rows if r["status"] in ("error", "skipped")]
    assert not bad, bad
    assert result["counts"]["ok"] == sum(r["status"] == "ok" for r in rows)
    (env_row,) = [r for r in rows if r["section"] == "env"]
    assert env_row["patcher_class"] in ("ModelPatcher", "ModelPatcherDynamic")

    dtypes = [d for d in gpu.DTYPES if d != "fp8" or env_row["fp8_weights"]]
    sampling = {(r["family"], r["dtype"], r["config"]): r for r in rows if r["section"] == "sampling"}
    assert set(sampling) == {(f, d, c) for f in gpu.FAMILIES for d in dtypes for c in gpu.CONFIGS}
    for (family, dtype, config), r in sampling.items():
        if family == "flux" and config == "features":
            assert r["status"] == "refused" and "UNets only" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert positive(r["s_per_step"]) and positive(r["peak_mb"]) and r["finite"] is True
        # One timed run: its time (rounded to 0.1 ms in the row) over the steps.
        assert math.isclose(r["s_per_step"] * result["steps"], r["times"][0], rel_tol=0, abs_tol=5e-5)
        # Which path ran: the head trained under the negative prompt reads the sampler's own forward (no pass of
        # its own); the prompt-independent head takes one per guided evaluation (euler, 1 step: 1 evaluation).
        assert r["second_passes"] == (result["steps"] if config == "features_2pass" else 0), r
        if config != "unguided":
            base = sampling[(family, dtype, "unguided")]
            assert math.isclose(r["ratio"], r["s_per_step"] / base["s_per_step"], rel_tol=1e-9)
            assert r["vram_overhead"] > -1 and positive(r["disc_params"])

    training = {(r["family"], r["config"]): r for r in rows if r["section"] == "training"}
    assert set(training) == {(f, a) for f in gpu.TRAIN_FAMILIES for a in gpu.ARCHITECTURES}
    for r in training.values():
        assert r["status"] == "ok" and positive(r["steps_per_s"]) and positive(r["peak_mb"]) and r["batch"] == 8
        assert r["finite"] is True

    (cli,) = [r for r in rows if r["section"] == "cli"]
    assert cli["status"] == "ok" and cli["backend"] == "gloo" and positive(cli["wall_s"])
    (aw,) = [r for r in rows if r["section"] == "autograd"]
    assert aw["status"] == "ok" and aw["inference_params"] == aw["params"] > 0 and aw["inference_left"] == 0
    assert positive(aw["weights_mb"]) and aw["transient_mb"] >= 0
    correctness = [r for r in rows if r["section"] == "correctness"]
    assert len(correctness) == 3 and all(r["status"] == "ok" for r in correctness), correctness

    verdicts = {(v["target"], v["dtype"]): v for v in result["verdicts"]}
    assert ("sdxl standalone s/step", dtypes[0]) in verdicts and ("sd15 features training steps/s", "fp16") in verdicts
    assert all(v["verdict"] in ("met", "not met") for v in verdicts.values())

    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "gpu_bench.md").read_text().strip() in p.stdout
    assert "=== sampling" in (tmp_path / "gpu_bench.log").read_text()


def test_verdicts():
    def row(config, **values):
        return {"section": "sampling", "family": "sdxl", "comfyui": "x", "patcher": "default", "dtype": "fp16",
                "config": config, "status": "ok", **values}
    rows = [row("unguided", s_per_step=1.0), row("standalone", ratio=1.04, vram_overhead=0.21),
            dict(row("features"), status="error", reason="boom"),
            {"section": "training", "family": "sd15", "comfyui": "x", "patcher": "default", "config": "features",
             "status": "ok", "steps_per_s": 4.9}]
    got = {v["target"]: v["verdict"] for v in gpu.verdicts(rows)}
    assert got == {"sdxl standalone s/step": "met", "sdxl standalone VRAM": "not met",
                   "sdxl features s/step": "not measured", "sdxl features VRAM": "not measured",
                   "sd15 features training steps/s": "not met"}
