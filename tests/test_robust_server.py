"""The pack under load and abuse in one real ComfyUI server: hostile discriminator files (one of each fuzz
category) fail their prompts clearly while the server keeps serving; options out of range are refused at
validation; a queue of ≥ 50 prompts mixing unguided runs and two discriminators gives, prompt for prompt, the
bits of a solo in-process run; memory returns to its baseline and no discriminator outlives its prompts. And, in
process: a features discriminator does not keep its diffusion model alive once ComfyUI unloads it."""
import gc
import json
import os
import re
import shutil
import time
import weakref

import pytest
import torch
from safetensors.torch import load_file

import nodes as comfy_nodes
from comfy_dg import (DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator, guide, load_discriminator,
                      save_discriminator)
from harness.comfy_server import ComfyServer
from comfy_dg.taps import UNetMiddle
from harness.tiny import empty_conditioning, tiny_model
from conftest import COMFYUI, REPO
from robust_fuzz import generate

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run

N_PROMPTS = 54
SAMPLERS = ("euler", "dpmpp_2m", "heun")
RSS_TOLERANCE_MB = 25


@pytest.fixture(scope="module")
def fuzz_cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    marker = tmp_path_factory.mktemp("pickle") / "unpickled"
    cases = generate(folder, marker)
    firsts = {}
    for c in cases:
        firsts.setdefault(c.category, c)
    firsts.setdefault("pickle-suffix", next(c for c in cases if c.name.endswith(".pt")))
    return list(firsts.values()), marker


def classic_cache():
    """ComfyUI's classic cache keeps only the last prompt's outputs, so what outlives a prompt is the pack's doing.
    Newer ComfyUI defaults to a RAM-pressure cache that keeps every output (a discriminator included) until RAM
    runs short; where ComfyUI offers --cache-classic the server runs with it."""
    from comfy.cli_args import parser
    return ["--cache-classic"] if any("--cache-classic" in a.option_strings for a in parser._actions) else []


@pytest.fixture(scope="module")
def server(tmp_path_factory, fuzz_cases):
    base = str(tmp_path_factory.mktemp("comfy"))
    srv = ComfyServer(COMFYUI, base, [os.path.join(REPO, "tests", "comfy_nodes", "dg_test_nodes")])
    folder = os.path.join(base, "models", "discriminators")
    torch.manual_seed(0)
    info = DiscriminatorInfo(4, "SD15")
    save_discriminator(StandaloneDiscriminator(info, width=16, levels=2, emb_dim=32),
                       os.path.join(folder, "standalone.safetensors"))
    m = tiny_model("EPS", seed=0, attention=False)
    save_discriminator(FeatureHeadDiscriminator(info, feature_channels=UNetMiddle.channels(m.model), width=32,
                                                emb_dim=32), os.path.join(folder, "features.safetensors"))
    for case in fuzz_cases[0]:
        shutil.copy(case.path, os.path.join(folder, case.name))
    srv.start(extra_args=classic_cache())
    yield srv
    srv.stop()


def graph(disc=None, seed=11, model_seed=0, weight=2.0, sampler="euler", prefix="out", **options):
    g = {
        "1": {"class_type": "DGTestFastModel", "inputs": {"seed": model_seed}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": seed, "steps": 4, "cfg": 3.0, "sampler_name": sampler,
                         "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["4", 0],
                         "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }
    if disc is not None:
        g["2"] = {"class_type": "LoadDiscriminator", "inputs": {"discriminator_name": disc}}
        g["3"] = {"class_type": "DiscriminatorGuidanceV2",
                  "inputs": {"model": ["1", 0], "discriminator": ["2", 0], "weight": weight, "intermediate_weight": 0.0,
                             "start_percent": 0.0, "end_percent": 1.0, "schedule": "constant", "boost": 1.0,
                             **options}}
        g["5"]["inputs"]["model"] = ["3", 0]
    return g


def saved_latent(server, hist, node="6"):
    out = hist["outputs"][node]["latents"][0]
    return load_file(os.path.join(server.base, "output", out["subfolder"], out["filename"]))["latent_tensor"]


def report(server, nonce, reset_peak=False):
    hist = server.run({"1": {"class_type": "DGTestMemoryReport",
                             "inputs": {"nonce": nonce, "trim": True, "reset_peak": reset_peak}}})
    assert hist["status"]["status_str"] == "success", hist["status"]
    return json.loads(hist["outputs"]["1"]["report"][0])


def error_text(hist):
    return " ".join(str(m[1].get("exception_message", "")) for m in hist["status"]["messages"]
                    if m[0] == "execution_error")


# --- hostile files ----------------------------------------------------------------------------------------------

def test_hostile_files_fail_their_prompts_and_the_server_keeps_serving(server, fuzz_cases):
    cases, marker = fuzz_cases
    assert len(cases) >= 14
    assert server.run(graph("standalone.safetensors", prefix="warm_bad"))["status"]["status_str"] == "success"
    before = report(server, 100, reset_peak=True)
    for case in cases:
        status, body = server.post_prompt(graph(case.name, prefix="bad"))
        if status == 400:       # refused at validation: acceptable, if it names the node
            assert "2" in body.get("node_errors", {}), (case, body)
            continue
        hist = server.run(graph(case.name, prefix="bad"))
        assert hist["status"]["status_str"] == "error", case
        text = error_text(hist)
        assert case.name in text and re.search(case.expected, text), f"{case}: {text}"
        assert server.get("/system_stats")["system"]["python_version"]
    assert not os.path.exists(marker), "a pickle payload ran inside the server"
    after = report(server, 101)
    ok = server.run(graph("standalone.safetensors", prefix="after_bad"))
    assert ok["status"]["status_str"] == "success"
    assert server.proc.poll() is None
    growth = (after["hwm_kb"] - before["rss_kb"]) / 1024
    print(f"\nserver: {len(cases)} hostile files (one per fuzz category) each failed its prompt; server still "
          f"serving; peak RSS {growth:+.1f} MB over the RSS before them")
    assert growth < 50, f"the server's peak RSS grew by {growth:.1f} MB while refusing hostile files"
    assert after["discriminators"] == 0, after


@pytest.mark.parametrize("field, value", [
    ("weight", 25.0), ("weight", -1.0), ("intermediate_weight", 20.5), ("boost", 11.0), ("boost", -0.5),
    ("start_percent", 1.5), ("end_percent", -0.5), ("class_label", -2),
])
def test_out_of_range_options_are_refused_at_validation_or_apply_time(server, field, value):
    """Outside the ranges the node declares: refused at validation (HTTP 400) or when the node runs, with a
    message that names the option and the value."""
    prompt = graph("standalone.safetensors", prefix="range", **{field: value})
    status, body = server.post_prompt(prompt)
    if status == 400:
        text = json.dumps(body.get("node_errors", {}).get("3", body))
    else:
        hist = server.run(prompt)
        assert hist["status"]["status_str"] == "error", f"{field}={value} was accepted and the prompt ran"
        text = error_text(hist)
    assert field in text and str(value) in text, text


# --- load -------------------------------------------------------------------------------------------------------

def load_plan():
    """(name, discriminator or None, seed, model seed, sampler, weight) for each queued prompt."""
    plan = []
    for i in range(N_PROMPTS):
        disc = (None, "standalone.safetensors", "features.safetensors")[i % 3]
        plan.append((f"q{i:02d}", disc, 1000 + i, (i // 3) % 2, SAMPLERS[(i // 2) % len(SAMPLERS)],
                     (1.0, 2.5)[(i // 6) % 2]))
    return plan


def solo_in_process(server, disc, seed, model_seed, sampler, weight, models, discs):
    """The same prompt computed here, alone, in a fresh process state of its own: same model, file and sampler."""
    if model_seed not in models:
        models[model_seed] = tiny_model("EPS", seed=model_seed, attention=False)
    m = models[model_seed]
    if disc is not None:
        if disc not in discs:
            with torch.inference_mode():
                discs[disc] = load_discriminator(os.path.join(server.base, "models", "discriminators", disc))
        with torch.inference_mode():
            m = guide(m, discs[disc], weight=weight)
    pos, neg = empty_conditioning(m)
    with torch.inference_mode():
        (out,) = comfy_nodes.KSampler().sample(m, seed, 4, 3.0, sampler, "normal", pos, neg,
                                               {"samples": torch.zeros(2, 4, 8, 8)})
    return out["samples"]


def test_a_queue_of_prompts_matches_solo_runs_bit_for_bit_and_memory_returns(server):
    # Warm up: one prompt of each kind, so one-time costs (imports, first allocations) are not counted.
    for i, disc in enumerate((None, "standalone.safetensors", "features.safetensors")):
        assert server.run(graph(disc, seed=i, prefix="warm"))["status"]["status_str"] == "success"
    baseline = report(server, 1, reset_peak=True)
    assert baseline["discriminators"] == 0, baseline

    plan = load_plan()
    t0 = time.perf_counter()
    ids = {}
    for name, disc, seed, model_seed, sampler, weight in plan:       # all queued before the first finishes
        status, body = server.post_prompt(graph(disc, seed=seed, model_seed=model_seed, sampler=sampler,
                                                weight=weight, prefix=name))
        assert status == 200, body
        ids[name] = body["prompt_id"]
    queued_at_once = server.get("/queue")
    pending = len(queued_at_once["queue_pending"]) + len(queued_at_once["queue_running"])
    results, deadline = {}, time.time() + 600
    while len(results) < len(ids) and time.time() < deadline:
        for name, pid in ids.items():
            if name not in results:
                hist = server.get(f"/history/{pid}")
                if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                    results[name] = hist[pid]
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    assert len(results) == len(ids), f"{len(ids) - len(results)} prompts did not finish"
    after = report(server, 2)

    models, discs, mismatched = {}, {}, []
    for name, disc, seed, model_seed, sampler, weight in plan:
        hist = results[name]
        assert hist["status"]["status_str"] == "success", (name, hist["status"])
        served = saved_latent(server, hist)
        solo = solo_in_process(server, disc, seed, model_seed, sampler, weight, models, discs)
        if not torch.equal(served, solo):
            mismatched.append(f"{name} ({disc}, {sampler}): max |Δ| {float((served - solo).abs().max()):.3g}")
    print(f"\nload: {len(plan)} prompts ({pending} pending at once after queueing) in {wall:.1f} s "
          f"({wall / len(plan):.2f} s each); RSS baseline {baseline['rss_kb'] / 1024:.1f} MB, after "
          f"{after['rss_kb'] / 1024:.1f} MB (peak during the queue {after['hwm_kb'] / 1024:.1f} MB); live discriminators after: "
          f"{after['discriminators']}, guidance patches: {after['guidance_patches']}")
    assert not mismatched, "queued results differ from solo runs:\n" + "\n".join(mismatched)
    assert pending >= 40, "the prompts were not queued together"
    # Nothing of the pack outlives its prompts: no discriminator module, tensor or guidance patch.
    assert after["discriminators"] == 0 and after["discriminator_tensors"] == 0, after
    assert after["guidance_patches"] == 0, after
    growth = (after["rss_kb"] - baseline["rss_kb"]) / 1024
    assert growth < RSS_TOLERANCE_MB, f"RSS grew by {growth:.1f} MB over the queue"
    # The queue did load discriminators (so the zero counts above mean they were released, not never made).
    assert sum(1 for _, d, *_ in plan if d) >= 30


def test_the_memory_report_sees_a_live_discriminator(server):
    """Control for the counts above: while a prompt's outputs are cached, its discriminator is live and counted."""
    g = graph("standalone.safetensors", prefix="held")
    g["7"] = {"class_type": "DGTestMemoryReport", "inputs": {"nonce": 3, "trim": True, "after": ["5", 0]}}
    hist = server.run(g)
    assert hist["status"]["status_str"] == "success"
    held = json.loads(hist["outputs"]["7"]["report"][0])
    assert held["discriminators"] >= 1 and held["discriminator_tensors"] > 0, held


# --- in process: the features discriminator and the diffusion model ---------------------------------------------

def test_a_features_discriminator_does_not_keep_its_diffusion_model_alive():
    import comfy.model_management
    m = tiny_model("EPS", seed=3, attention=False)
    info = DiscriminatorInfo(4, "SD15")
    with torch.inference_mode(False):
        disc = FeatureHeadDiscriminator(info, feature_channels=UNetMiddle.channels(m.model), width=32, emb_dim=32)
    guided = guide(m, disc, weight=2.0)
    pos, neg = empty_conditioning(guided)
    with torch.inference_mode():
        (out,) = comfy_nodes.KSampler().sample(guided, 1, 3, 3.0, "euler", "normal", pos, neg,
                                               {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(out["samples"]).all()
    network, base_model = weakref.ref(m.model.diffusion_model), weakref.ref(m.model)
    del m, guided, pos, neg, out
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    gc.collect()
    assert network() is None and base_model() is None, "the diffusion model is still alive: " + \
        ", ".join(type(r).__name__ for r in gc.get_referrers(network() or base_model())[:5])
    # The discriminator itself is still usable with another model (it holds only its head).
    assert sum(p.numel() for p in disc.parameters()) > 0
    other = tiny_model("EPS", seed=4, attention=False)
    guide(other, disc, weight=1.0)
