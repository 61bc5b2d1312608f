"""The pack inside a real ComfyUI server: nodes registered, prompts validated and run under the executor."""
import os

import pytest
import torch
from safetensors.torch import load_file

import nodes as comfy_nodes
from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator, guide
from comfy_dg import load_discriminator, save_discriminator
from comfy_dg.taps import UNetMiddle
from harness.tiny import empty_conditioning, tiny_model
from conftest import COMFYUI, REPO
from harness.comfy_server import ComfyServer
from digits import write_digit_folder

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy"))
    srv = ComfyServer(COMFYUI, base, [os.path.join(REPO, "tests", "comfy_nodes", "dg_test_nodes")])
    folder = os.path.join(base, "models", "discriminators")
    torch.manual_seed(0)
    info = DiscriminatorInfo(4, "SD15")
    save_discriminator(StandaloneDiscriminator(info, width=16, levels=2, emb_dim=32),
                       os.path.join(folder, "standalone.safetensors"))
    # A sharper one (its output layer × 300): log r that varies by whole units between samples, so the rejection
    # sampler has something to reject.
    sharp = StandaloneDiscriminator(info, width=16, levels=2, emb_dim=32)
    with torch.no_grad():
        sharp.out.weight.mul_(300.0)
    save_discriminator(sharp, os.path.join(folder, "sharp.safetensors"))
    m = tiny_model("EPS", seed=0)
    save_discriminator(FeatureHeadDiscriminator(info, feature_channels=UNetMiddle.channels(m.model), width=32),
                       os.path.join(folder, "sub", "features.safetensors"))
    with open(os.path.join(folder, "legacy.pt"), "wb") as f:
        f.write(b"\x80\x04K\x01.")   # a (harmless) pickle
    # A second folder, declared the way users share model folders between installs.
    shared = os.path.join(base, "shared_models")
    save_discriminator(StandaloneDiscriminator(info, width=16, levels=2, emb_dim=32),
                       os.path.join(shared, "discriminators", "from_yaml.safetensors"))
    yaml_path = os.path.join(base, "extra_model_paths.yaml")
    with open(yaml_path, "w") as f:
        f.write(f"shared:\n  base_path: {shared}\n  discriminators: discriminators\n")
    write_digit_folder(os.path.join(base, "input", "digits"), 48)
    srv.start(extra_args=["--extra-model-paths-config", yaml_path])
    yield srv
    srv.stop()


def graph(disc="standalone.safetensors", weight=2.0, start=0.0, end=1.0, sampler="heun", prefix="dg",
          model_type="EPS", w2=0.0, legacy_first=None):
    """The guided graph; with legacy_first (True/False) through the deprecated first Discriminator Guidance node
    (its first_evaluation_only input), as a workflow saved before intermediate_weight existed."""
    dg_inputs = {"model": ["1", 0], "discriminator": ["2", 0], "weight": weight, "start_percent": start,
                 "end_percent": end, "schedule": "constant", "boost": 1.0}
    if legacy_first is None:
        dg_node = {"class_type": "DiscriminatorGuidanceV2", "inputs": {**dg_inputs, "intermediate_weight": w2}}
    else:
        dg_node = {"class_type": "DiscriminatorGuidance", "inputs": {**dg_inputs,
                                                                      "first_evaluation_only": legacy_first}}
    return {
        "1": {"class_type": "DGTestTinyModel", "inputs": {"seed": 0, "model_type": model_type, "family": "SD15"}},
        "2": {"class_type": "LoadDiscriminator", "inputs": {"discriminator_name": disc}},
        "3": dg_node,
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["3", 0], "seed": 11, "steps": 5, "cfg": 3.0, "sampler_name": sampler,
                         "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["4", 0],
                         "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }


def saved_latent(server, hist, node="6"):
    out = hist["outputs"][node]["latents"][0]
    path = os.path.join(server.base, "output", out["subfolder"], out["filename"])
    return load_file(path)["latent_tensor"]


def in_process(disc_path, weight, sampler, w2, model_type="EPS"):
    m = tiny_model(model_type, seed=0)
    pos, neg = empty_conditioning(m)
    with torch.inference_mode():
        g = guide(m, load_discriminator(disc_path), weight=weight, intermediate_weight=w2)
        (out,) = comfy_nodes.KSampler().sample(g, 11, 5, 3.0, sampler, "normal", pos, neg,
                                               {"samples": torch.zeros(2, 4, 8, 8)})
    return out["samples"]


def test_nodes_are_registered_with_tooltips(server):
    info = server.get("/object_info")
    load, apply = info["LoadDiscriminator"], info["DiscriminatorGuidanceV2"]
    assert apply["display_name"] == "Discriminator Guidance"
    assert info["DiscriminatorGuidance"]["deprecated"] is True      # kept for saved workflows, hidden from search
    spec = load["input"]["required"]["discriminator_name"]
    names = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert {"standalone.safetensors", "sub/features.safetensors", "legacy.pt", "from_yaml.safetensors"} <= set(names)
    assert apply["output"] == ["MODEL"] and load["output"] == ["DISCRIMINATOR"]
    for spec in apply["input"]["required"].values():
        assert spec[1].get("tooltip"), spec
    assert apply["description"] and load["description"]


@pytest.mark.parametrize("disc,model_type,sampler,w2", [
    ("standalone.safetensors", "EPS", "heun", 0.0),
    ("standalone.safetensors", "EPS", "heun", 0.5),
    ("from_yaml.safetensors", "EPS", "euler", 0.0),
    ("sub/features.safetensors", "EPS", "dpmpp_2m", 0.0),
    ("standalone.safetensors", "FLOW", "euler_ancestral", 0.0),
])
def test_guided_prompt_matches_in_process_run(server, disc, model_type, sampler, w2):
    hist = server.run(graph(disc, sampler=sampler, prefix=f"g_{model_type}_{sampler}", model_type=model_type, w2=w2))
    assert hist["status"]["status_str"] == "success", hist["status"]
    served = saved_latent(server, hist)
    folder = "shared_models" if disc == "from_yaml.safetensors" else "models"
    path = os.path.join(server.base, folder, "discriminators", disc)
    torch.testing.assert_close(served, in_process(path, 2.0, sampler, w2, model_type), rtol=1e-5, atol=1e-5)
    plain = saved_latent(server, server.run(graph(disc, weight=0.0, sampler=sampler, model_type=model_type,
                                                  prefix=f"p_{model_type}_{sampler}")))
    assert not torch.allclose(served, plain, atol=1e-3)


@pytest.mark.parametrize("first", [True, False])
def test_workflows_saved_with_the_first_node_keep_their_behaviour(server, first):
    """first_evaluation_only on: w₂ = 0; off: every evaluation with w, as before intermediate_weight existed."""
    hist = server.run(graph(sampler="heun", prefix=f"legacy_{first}", legacy_first=first))
    assert hist["status"]["status_str"] == "success", hist["status"]
    path = os.path.join(server.base, "models", "discriminators", "standalone.safetensors")
    expected = in_process(path, 2.0, "heun", 0.0 if first else 2.0)
    torch.testing.assert_close(saved_latent(server, hist), expected, rtol=1e-5, atol=1e-5)


def test_bad_window_is_refused_at_validation(server):
    status, body = server.post_prompt(graph(start=0.8, end=0.2))
    assert status == 400
    assert "swap" in str(body["node_errors"]["3"])


@pytest.mark.parametrize("name", ["nope.safetensors", "../../escape.safetensors", "/etc/passwd"])
def test_unknown_or_escaping_discriminator_names_are_refused(server, name):
    # ComfyUI 0.3.75 lets a V3 combo value outside its list through validation; the node refuses it.
    status, body = server.post_prompt(graph(disc=name))
    if status == 400:
        assert "2" in body["node_errors"]
        return
    hist = server.run(graph(disc=name, prefix="x"))
    assert hist["status"]["status_str"] == "error"
    assert "models/discriminators" in str(hist["status"]["messages"])


def test_pickle_file_fails_with_its_reason_and_the_server_keeps_serving(server):
    hist = server.run(graph(disc="legacy.pt", prefix="bad"))
    assert hist["status"]["status_str"] == "error"
    messages = str(hist["status"]["messages"])
    assert "pickle" in messages and "safetensors" in messages
    ok = server.run(graph(prefix="after_bad"))
    assert ok["status"]["status_str"] == "success"


def training_graph(name, steps=40):
    return {
        "1": {"class_type": "DGTestTinyModel", "inputs": {"seed": 0, "model_type": "EPS", "family": "SD15"}},
        "2": {"class_type": "DGTestTinyVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "DGEncodeRealImages", "inputs": {"folder": "digits", "vae": ["2", 0], "resolution": 64,
                                                            "batch_size": 16}},
        "4": {"class_type": "DGSampleFakeLatents",
              "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2], "count": 48,
                         "batch_size": 16, "seed": 0, "steps": 4, "cfg": 3.0, "sampler_name": "euler",
                         "scheduler": "normal", "width": 64, "height": 64}},
        "5": {"class_type": "DGTrainDiscriminator",
              "inputs": {"model": ["1", 0], "real_latents": ["3", 0], "fake_latents": ["4", 0], "filename": name,
                         "architecture": "features", "steps": steps, "batch_size": 16, "learning_rate": 3e-4,
                         "weight_decay": 1e-7, "heldout_fraction": 0.2, "eval_every": 10, "patience": 0,
                         "augment": True, "seed": 0}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}},
        "7": {"class_type": "DiscriminatorGuidanceV2",
              "inputs": {"model": ["1", 0], "discriminator": ["5", 0], "weight": 1.0, "intermediate_weight": 0.0,
                         "start_percent": 0.0, "end_percent": 1.0, "schedule": "constant", "boost": 1.0}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "9": {"class_type": "KSampler",
              "inputs": {"model": ["7", 0], "seed": 1, "steps": 4, "cfg": 3.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["8", 0],
                         "denoise": 1.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "trained"}},
    }


def test_training_graph_runs_end_to_end(server):
    hist = server.run(training_graph("trained_in_graph"), timeout=300)
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert hist["outputs"]["6"]["images"], "the training plot was not shown"
    assert hist["outputs"]["5"]["images"], "the trainer does not show its plot on the node"
    assert torch.isfinite(saved_latent(server, hist, node="10")).all()
    path = os.path.join(server.base, "models", "discriminators", "trained_in_graph.safetensors")
    assert load_discriminator(path).info.training["steps"] == 40
    # Load Discriminator lists the new file without a restart.
    spec = server.get("/object_info/LoadDiscriminator")["LoadDiscriminator"]["input"]["required"]["discriminator_name"]
    assert "trained_in_graph.safetensors" in (spec[1]["options"] if spec[0] == "COMBO" else spec[0])
    cache = os.path.join(server.base, "user", "comfy-dg", "cache")
    assert sorted(f.split("-")[0] for f in os.listdir(cache)) == ["fake", "real"]


def run_watching_previews(server, prompt, metadata):
    """Queue `prompt` over a websocket client as the frontend does and collect the binary preview messages sent
    while it runs: [(node id or None, PIL image)]. `metadata`: the client declares supports_preview_metadata (the
    current frontend does), so previews come with their node id."""
    import asyncio
    import io as _io
    import json
    import struct
    import uuid

    import aiohttp
    from PIL import Image

    cid = uuid.uuid4().hex

    async def go():
        previews = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={cid}") as ws:
                if metadata:
                    await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
                async with session.post(server.url + "/prompt", json={"prompt": prompt, "client_id": cid}) as r:
                    assert r.status == 200, await r.text()
                    pid = (await r.json())["prompt_id"]
                while True:
                    msg = await ws.receive(timeout=600)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        data = bytes(msg.data)
                        (event,) = struct.unpack(">I", data[:4])
                        if event == 1:          # PREVIEW_IMAGE: image type, then the image
                            previews.append((None, Image.open(_io.BytesIO(data[8:]))))
                        elif event == 4:        # PREVIEW_IMAGE_WITH_METADATA: JSON length, JSON, image
                            (n,) = struct.unpack(">I", data[4:8])
                            meta = json.loads(data[8:8 + n])
                            previews.append((meta["node_id"], Image.open(_io.BytesIO(data[8 + n:]))))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        m = json.loads(msg.data)
                        if m["type"] == "execution_error":
                            raise AssertionError(m["data"])
                        if m["type"] == "executing" and m["data"].get("node") is None \
                                and m["data"].get("prompt_id") == pid:
                            return previews
                    else:
                        raise AssertionError(f"websocket closed: {msg}")
    return asyncio.run(go())


@pytest.mark.parametrize("metadata", [True, False])
def test_training_shows_its_heldout_plot_live_on_the_node(server, metadata):
    g = training_graph(f"live_{metadata}", steps=40)
    g = {k: v for k, v in g.items() if k in ("1", "2", "3", "4", "5")}
    previews = run_watching_previews(server, g, metadata)
    # One preview per held-out evaluation (steps 10, 20, 30, 40), each a plot of accuracy and BCE.
    plots = [(node, im) for node, im in previews if node in ("5", None)]
    assert len(plots) == 4, [(n, im.size) for n, im in previews]
    for node, im in plots:
        assert im.format == "PNG" and max(im.size) <= 768 and im.size[0] > im.size[1]
        assert sum(1 for n in im.convert("L").histogram() if n) > 20, "the preview is not a plot"
    # The plots differ as training moves on.
    assert plots[0][1].tobytes() != plots[-1][1].tobytes()


PACK_NODES = ["LoadDiscriminator", "DiscriminatorGuidanceV2", "DiscriminatorGuidance", "DGEncodeRealImages",
              "DGSampleFakeLatents", "DGCombineLatents", "DGTrainDiscriminator", "DGComparisonGrid", "DGRankByRealism",
              "DGLoadDemoModel", "DGDecodeDigits", "DGSamplerHeunBoosted", "DGRejectionSampler"]


def test_every_node_has_a_help_page_where_the_frontend_looks(server):
    import urllib.request
    info = server.get("/object_info")
    ours = sorted(k for k, v in info.items() if v["python_module"].split(".")[:2] == ["custom_nodes", "comfy-dg"])
    assert ours == sorted(PACK_NODES)
    for name in ours:
        # The frontend's NodeHelpService: /extensions/<pack folder>/docs/<node id>/<locale>.md, then <node id>.md.
        pack = info[name]["python_module"].split(".")[1].split("@")[0]
        with urllib.request.urlopen(f"{server.url}/extensions/{pack}/docs/{name}.md", timeout=30) as r:
            text = r.read().decode()
        assert text.startswith(f"# {info[name]['display_name']}\n"), name
        for key in info[name]["input"].get("required", {}) | info[name]["input"].get("optional", {}):
            assert f"**{key}**" in text, f"{name}'s help page does not explain '{key}'"
    # The pack's web folder holds no script, so the frontend loads no extension code from it.
    assert not [e for e in server.get("/extensions") if "/comfy-dg/" in e]


def rank_graph(source, keep=3):
    return {
        "1": {"class_type": "DGTestTinyModel", "inputs": {"seed": 0, "model_type": "EPS", "family": "SD15"}},
        "2": {"class_type": "LoadDiscriminator", "inputs": {"discriminator_name": "sub/features.safetensors"}},
        "3": {"class_type": "DGTestTinyVAE", "inputs": {"seed": 0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 6}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": 3, "steps": 3, "cfg": 3.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["4", 0],
                         "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["3", 0]}},
        "7": {"class_type": "DGRankByRealism",
              "inputs": {"model": ["1", 0], "discriminator": ["2", 0], "keep": keep, "sigma": 0.1, "draws": 2,
                         "seed": 0, "vae": ["3", 0], **({"latent": ["5", 0]} if source == "latent" else
                                                        {"images": ["6", 0]})}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"ranked_{source}"}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
    }


@pytest.mark.parametrize("source", ["latent", "images"])
def test_rank_by_realism_keeps_the_best_and_shows_the_scores(server, source):
    hist = server.run(rank_graph(source))
    assert hist["status"]["status_str"] == "success", hist["status"]
    kept = saved_latent(server, hist, node="8")
    assert kept.shape == (3, 4, 8, 8)
    assert len(hist["outputs"]["9"]["images"]) == 3
    assert hist["outputs"]["7"]["images"], "the scored grid is not shown on the node"


def test_rank_by_realism_wants_exactly_one_batch(server):
    g = rank_graph("latent")
    g["7"]["inputs"]["images"] = ["6", 0]
    hist = server.run(g)
    assert hist["status"]["status_str"] == "error"
    assert "exactly one" in str(hist["status"]["messages"])


def custom_graph(sampler_node, prefix):
    return {
        "1": {"class_type": "DGTestTinyModel", "inputs": {"seed": 0, "model_type": "EPS", "family": "SD15"}},
        "2": {"class_type": "LoadDiscriminator", "inputs": {"discriminator_name": "sharp.safetensors"}},
        "3": sampler_node,
        "4": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2],
                                                    "cfg": 3.0}},
        "5": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 5,
                                                         "denoise": 1.0}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "8": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["5", 0], "guider": ["4", 0],
                                                                "sampler": ["3", 0], "sigmas": ["6", 0],
                                                                "latent_image": ["7", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix}},
    }


def test_rejection_sampler_runs_in_sampler_custom_advanced(server):
    def rejection(retries):
        return {"class_type": "DGRejectionSampler", "inputs": {"discriminator": ["2", 0], "base": "heun",
                                                               "quantile": 0.5, "max_retries": retries}}
    plain = server.run(custom_graph({"class_type": "KSamplerSelect", "inputs": {"sampler_name": "heun"}}, "rs_plain"))
    same = server.run(custom_graph(rejection(0), "rs_none"))
    judged = server.run(custom_graph(rejection(3), "rs_judged"))
    for hist in (plain, same, judged):
        assert hist["status"]["status_str"] == "success", hist["status"]
    # No retries: exactly the plain heun sampler; with retries the discriminator changes some samples.
    assert torch.equal(saved_latent(server, same, "9"), saved_latent(server, plain, "9"))
    out = saved_latent(server, judged, "9")
    assert torch.isfinite(out).all() and not torch.equal(out, saved_latent(server, plain, "9"))
