"""The embedded demo: `python -m harness.demo` (the README's main command runs it after set-up).

Starts a real ComfyUI headless with this pack, queues the demo workflow — the pack's small digits model sampled
with and without Discriminator Guidance, same seeds — and writes the comparison image and the sample-quality
metrics (against held-out real digits) to out/demo/, then prints where they are.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

from . import REPO

DEMO = os.path.join(REPO, "demo")
MODEL_FILE = os.path.join(DEMO, "models", "digits_model.safetensors")
DISC_FILE = os.path.join(DEMO, "discriminators", "digits_dg.safetensors")
# The quality benchmark's best setting for the demo discriminator (features, w = 4, whole window, heun 18,
# DG on each step's first evaluation): FD −27.8% over 3 seeds × 1000 samples.
DEFAULTS = {"weight": 4.0, "intermediate_weight": 0.0, "end_percent": 1.0, "sampler": "heun", "steps": 18}


def demo_prompt(batch=512, seed=0, weight=1.0, intermediate_weight=0.0, end_percent=1.0, sampler="heun", steps=18):
    """The demo graph in ComfyUI's API format."""
    def ksampler(model):
        return {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler, "scheduler": "karras",
            "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["4", 0], "denoise": 1.0}}
    return {
        "1": {"class_type": "DGLoadDemoModel", "inputs": {}},
        "2": {"class_type": "LoadDiscriminator", "inputs": {"discriminator_name": "digits_dg.safetensors"}},
        "3": {"class_type": "DiscriminatorGuidanceV2", "inputs": {
            "model": ["1", 0], "discriminator": ["2", 0], "weight": weight, "intermediate_weight": intermediate_weight,
            "start_percent": 0.0, "end_percent": end_percent, "schedule": "constant", "boost": 1.0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": ksampler(["1", 0]),
        "6": ksampler(["3", 0]),
        "7": {"class_type": "DGDecodeDigits", "inputs": {"samples": ["5", 0], "scale": 8}},
        "8": {"class_type": "DGDecodeDigits", "inputs": {"samples": ["6", 0], "scale": 8}},
        "9": {"class_type": "ImageFromBatch", "inputs": {"image": ["7", 0], "batch_index": 0, "length": 64}},
        "10": {"class_type": "ImageFromBatch", "inputs": {"image": ["8", 0], "batch_index": 0, "length": 64}},
        "11": {"class_type": "DGComparisonGrid", "inputs": {
            "images_a": ["9", 0], "images_b": ["10", 0], "label_a": "unguided", "label_b": f"DG w={weight:g}",
            "columns": 8}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "dg_demo"}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "demo_unguided"}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "demo_guided"}},
    }


def main(argv=None):
    from comfy_dg.comfy_env import comfyui_path
    from .comfy_server import ComfyServer
    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512, help="samples per arm")
    p.add_argument("--out", default=os.path.join(REPO, "out", "demo"))
    a = p.parse_args(argv)
    for f in (MODEL_FILE, DISC_FILE):
        if not os.path.isfile(f):
            raise SystemExit(f"comfy-dg: the demo file {f} is missing; rebuild it with "
                             "`.venv/bin/python -m harness.bench.quality --export-demo`.")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="comfy-dg-demo-") as base:
        server = ComfyServer(comfyui_path(), base)
        print("starting ComfyUI (headless, CPU) with comfy-dg ...", flush=True)
        server.start()
        try:
            print(f"running the demo workflow: {a.batch} digits without and with DG, same seeds ...", flush=True)
            hist = server.run(demo_prompt(batch=a.batch, **DEFAULTS), timeout=600)
            if hist["status"]["status_str"] != "success":
                raise SystemExit(f"comfy-dg: the demo workflow failed: {hist['status']}\n{server.read_log()[-3000:]}")
            image = hist["outputs"]["12"]["images"][0]
            grid = os.path.join(a.out, "comparison.png")
            shutil.copy(os.path.join(base, "output", image["subfolder"], image["filename"]), grid)
            latents = {}
            for node, name in (("13", "unguided"), ("14", "guided")):
                lat = hist["outputs"][node]["latents"][0]
                latents[name] = load_file(os.path.join(base, "output", lat["subfolder"], lat["filename"]))["latent_tensor"]
        finally:
            server.stop()
    metrics = quality(latents)
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump({"settings": {**DEFAULTS, "batch": a.batch}, "metrics": metrics}, f, indent=1)
    print("\n| samples | FD ↓ | KID ×1e3 ↓ | precision ↑ | recall ↑ | classifier confidence ↑ |")
    print("|---|---|---|---|---|---|")
    for name, m in metrics.items():
        print(f"| {name} | {m['fd']:.4f} | {m['kid'] * 1e3:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | "
              f"{m['confidence']:.3f} |")
    change = metrics["guided"]["fd"] / metrics["unguided"]["fd"] - 1
    print(f"\nFD with DG: {change:+.1%} (vs held-out real digits; lower is closer to real data)")
    print(f"comparison image: {grid}\nmetrics: {os.path.join(a.out, 'metrics.json')}\n"
          f"time: {time.perf_counter() - t0:.0f} s")


def quality(latents):
    """Metrics of each batch of samples against the held-out 30% of the digits (the benchmark's split)."""
    from .bench.metrics import DigitClassifier, evaluate, train_classifier
    from .bench.quality import CACHE, Phase, digits_split
    x_train, y_train, x_test = digits_split()
    clf = DigitClassifier()
    clf.load_state_dict(Phase(CACHE, "classifier").get(lambda: train_classifier(x_train, y_train).state_dict()))
    clf.eval().requires_grad_(False)
    return {name: evaluate(clf, x_test, x.float().clamp(-1, 1)) for name, x in latents.items()}


if __name__ == "__main__":
    main()
