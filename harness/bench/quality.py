"""Quality benchmark: does discriminator guidance bring samples closer to real data?

    python -m harness.bench.quality [--smoke] [--seeds 3] [--samples 1000]

Real data: sklearn's digits (1797 8×8 images), a stratified 70/30 split (seed 0); the 30% is used only for
metrics. The model: a small real ComfyUI model (ComfyUI's SD1.5 UNet architecture at 1M parameters, EPS, on a
one-channel pixel-space "Digits" latent) trained here on the 70%. Fakes: its samples through ComfyUI's sampler.
Discriminators: the pack's Trainer, each architecture. Sampling with and without DG through comfy_dg.guide and
ComfyUI's sampler, same seeds, heun 18 steps (karras), DG on each step's first evaluation (as the official
code). Metrics against the held-out 30% in a digit classifier's feature space: FD and KID (torchmetrics),
k-NN precision/recall (k = 3), classifier confidence; mean ± std over seeds; the floor is held-out vs an
equal-size train subset. Every phase is cached under .cache/bench/ (delete it to start over).
Prints a markdown table, writes a comparison grid (real | unguided | guided, same seeds) and ends with a JSON line.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from .. import REPO

CACHE = os.path.join(REPO, ".cache", "bench")


def log(msg):
    print(msg, flush=True)


class Phase:
    """A cached step: load its safetensors file if it exists, else compute and save it."""

    def __init__(self, cache, name):
        self.path = os.path.join(cache, name + ".safetensors")

    def get(self, compute):
        from safetensors.torch import load_file
        from comfy_dg.atomic import save_safetensors
        if os.path.isfile(self.path):
            return load_file(self.path)
        out = compute()
        save_safetensors({k: v.contiguous() for k, v in out.items()}, self.path)
        return out


def digits_split(seed=0):
    """(train images, train labels, held-out images): (N, 1, 8, 8) in [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images / 8.0 - 1.0, dtype=torch.float32)[:, None]
    idx_train, idx_test = train_test_split(np.arange(len(x)), test_size=0.3, stratify=d.target, random_state=seed)
    return x[idx_train], torch.tensor(d.target[idx_train]), x[idx_test]


def percent_for_sigma(model_sampling, sigma):
    """The schedule percent at which σ falls to `sigma` (bisection on percent_to_sigma)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sample(model, n, seed, sampler, steps, batch=500):
    """n digits of `model` (cfg 1, karras, the same noise per seed), `sampler` a sampler name (KSampler's path) or
    a SAMPLER object (SamplerCustomAdvanced's path, e.g. the rejection sampler's)."""
    import comfy.sample
    import comfy.samplers
    from harness.tiny import empty_conditioning
    pos, neg = empty_conditioning(model)
    sigmas = None if isinstance(sampler, str) else \
        comfy.samplers.calculate_sigmas(model.model.model_sampling, "karras", steps)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        noise = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed * 100003 + i))
        latent = torch.zeros(b, 1, 8, 8)
        with torch.inference_mode():
            if sigmas is None:
                out.append(comfy.sample.sample(model, noise, steps, 1.0, sampler, "karras", pos, neg, latent,
                                               seed=seed, disable_pbar=True))
            else:
                out.append(comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, pos, neg, latent,
                                                      seed=seed, disable_pbar=True))
    return torch.cat(out).clamp(-1, 1)


def add_pipeline_arguments(p):
    """The options of the pipeline that levers.py and rank.py share with this benchmark (same defaults)."""
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model-steps", type=int, default=600)
    p.add_argument("--fakes", type=int, default=5000)
    p.add_argument("--disc-steps", type=int, default=3000)
    p.add_argument("--sampler", default="heun")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--out", default=os.path.join(REPO, "out", "bench"))


def disc_config(arch, disc_steps, **levers):
    """The benchmark's training settings for `arch`; `levers` override TrainConfig fields (its defaults are the
    pack's). Digits have a handedness: no flips; shifts of up to one pixel."""
    from comfy_dg.training import TrainConfig
    return TrainConfig(**{"architecture": arch, "steps": disc_steps, "batch_size": 128,
                          "eval_every": max(10, disc_steps // 20), "patience": 4, "heldout_fraction": 0.15,
                          "flip": False, "translate": 0.125, **levers})


def config_key(cfg, fakes):
    """A short stable name of a training configuration and its fake count, for cache files."""
    import dataclasses
    import hashlib
    text = json.dumps([dataclasses.asdict(cfg), int(fakes)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def train_discriminator(model, x_train, fakes, cfg, path):
    """The pack's Trainer on the digits (cached at `path`); the reconstruction objective takes the model's
    denoiser under the prompt the benchmark samples with."""
    from comfy_dg import load_discriminator, save_discriminator
    from comfy_dg.training import Trainer
    from comfy_dg.training.conditioning import prompt_conds
    from harness.tiny import empty_conditioning
    if not os.path.isfile(path):
        prompt = None
        if cfg.objective == "reconstruction":
            prompt = prompt_conds(model, empty_conditioning(model)[0], tuple(x_train.shape[1:]))
        save_discriminator(Trainer(model, x_train, fakes, cfg, prompt=prompt).run(), path)
    return load_discriminator(path)


def prepare(cache, model_steps, n_fakes, sampler, steps):
    """The digits split, the metric's classifier, the small model and its fakes (each cached)."""
    from harness.bench.metrics import DigitClassifier, train_classifier
    from harness.tiny import tiny_model
    from harness.tiny_train import train_diffusion
    x_train, y_train, x_test = digits_split()
    clf_state = Phase(cache, "classifier").get(lambda: train_classifier(x_train, y_train).state_dict())
    clf = DigitClassifier()
    clf.load_state_dict(clf_state)
    clf.eval().requires_grad_(False)

    def make_model():
        m = tiny_model("EPS", family="Digits", attention=False)
        train_diffusion(m, x_train, steps=model_steps, batch_size=128, lr=2e-3)
        return m.model.diffusion_model.state_dict()
    t = time.perf_counter()
    model = tiny_model("EPS", family="Digits", attention=False,
                       state_dict=Phase(cache, f"model_{model_steps}").get(make_model))
    log(f"model: ready ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    tag = f"m{model_steps}"
    fakes = Phase(cache, f"fakes_{tag}_{n_fakes}").get(lambda: {"x": sample(model, n_fakes, 999, sampler, steps)})["x"]
    log(f"fakes: {len(fakes)} ({time.perf_counter() - t:.0f} s)")
    return x_train, y_train, x_test, clf, model, fakes, tag


def grid(panels, path, scale=6):
    """panels: [(samples (N, 1, 8, 8) in [-1, 1], label)] side by side, labelled (real | unguided | guided)."""
    from PIL import Image
    from comfy_dg.pictures import side_by_side
    images = [(((x.clamp(-1, 1) + 1) / 2).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
               .movedim(1, -1).expand(-1, -1, -1, 3), label) for x, label in panels]
    Image.fromarray(side_by_side(images, columns=8)).save(path)
    return path


def main(argv=None):
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui()
    from comfy_dg import guide, save_discriminator
    from harness.bench.metrics import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a ≤2-minute run that checks the pipeline, not the numbers")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--model-steps", type=int, default=600,
                   help="training steps of the small model: 600 leaves it imperfect (FD ≈ 3× the floor), "
                        "which is where DG has something to fix; 4000 reaches the floor")
    p.add_argument("--fakes", type=int, default=5000)
    p.add_argument("--disc-steps", type=int, default=3000)
    p.add_argument("--weights", default="1,2,4,6,8")
    p.add_argument("--archs", default="features,standalone", help="discriminator architectures to train and sweep")
    p.add_argument("--windows", default="all,σ≥0.045", help="guidance windows to sweep: all, σ≥0.045")
    p.add_argument("--sampler", default="heun")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--out", default=os.path.join(REPO, "out", "bench"))
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--export-demo", action="store_true",
                   help="write the model and the features discriminator as the pack's embedded demo files (demo/)")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.samples, a.model_steps, a.fakes, a.disc_steps, a.weights = 1, 64, 30, 128, 20, "1"
        a.steps, a.cache, a.out = 6, os.path.join(a.cache, "smoke"), os.path.join(a.out, "smoke")
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    x_train, y_train, x_test, clf, model, fakes, tag = prepare(a.cache, a.model_steps, a.fakes, a.sampler, a.steps)
    log(f"data: {len(x_train)} train / {len(x_test)} held-out digits")

    discs, disc_keys = {}, {}
    for arch in a.archs.split(","):
        cfg = disc_config(arch, a.disc_steps)
        disc_keys[arch] = config_key(cfg, len(fakes))
        path = os.path.join(a.cache, f"disc_{arch}_{tag}_{disc_keys[arch]}.safetensors")
        t = time.perf_counter()
        discs[arch] = train_discriminator(model, x_train, fakes, cfg, path)
        tr = discs[arch].info.training
        log(f"discriminator {arch}: best step {tr['best_step']}, held-out acc by σ band "
            f"{[round(b['acc'], 2) for b in tr['heldout_bands']]} ({time.perf_counter() - t:.0f} s)")

    if a.export_demo:
        from harness.demo import DISC_FILE, MODEL_FILE
        from comfy_dg import small_models
        os.makedirs(os.path.dirname(MODEL_FILE), exist_ok=True)
        small_models.save(model, None, MODEL_FILE)
        save_discriminator(discs["features"], DISC_FILE)
        log(f"demo files written: {MODEL_FILE}, {DISC_FILE}")

    ms = model.model.model_sampling
    windows = {"all": (0.0, 1.0), "σ≥0.045": (0.0, percent_for_sigma(ms, 0.045))}
    windows = {k: windows[k] for k in a.windows.split(",")}
    configs = {"unguided": None}
    for arch in discs:
        for w in [float(v) for v in a.weights.split(",")]:
            for wname, (s0, s1) in windows.items():
                configs[f"{arch} w={w:g} {wname}"] = (arch, w, s0, s1)

    results = {}
    samples_by_config = {}
    for name, spec in configs.items():
        runs = []
        t = time.perf_counter()
        for seed in range(a.seeds):
            key = tag + ("_unguided" if spec is None else f"_{spec[0]}{disc_keys[spec[0]]}_w{spec[1]:g}_{spec[2]:.4f}_{spec[3]:.4f}")

            def compute(spec=spec, seed=seed):
                m = model if spec is None else guide(model, discs[spec[0]], weight=spec[1], start_percent=spec[2],
                                                      end_percent=spec[3], intermediate_weight=0.0)
                return {"x": sample(m, a.samples, seed, a.sampler, a.steps)}
            x = Phase(a.cache, f"samples_{key}_{a.sampler}{a.steps}_s{seed}_n{a.samples}").get(compute)["x"]
            if seed == 0:
                samples_by_config[name] = x
            runs.append(evaluate(clf, x_test, x))
        results[name] = {k: (statistics.mean(r[k] for r in runs), statistics.pstdev(r[k] for r in runs))
                         for k in runs[0]}
        log(f"{name}: FD {results[name]['fd'][0]:.4f} ± {results[name]['fd'][1]:.4f} ({time.perf_counter() - t:.0f} s)")

    floor = evaluate(clf, x_test, x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
                                            [:len(x_test)]])
    base = results["unguided"]["fd"][0]
    print("\n| sampling | FD ↓ | ΔFD | KID ×1e3 ↓ | precision ↑ | recall ↑ | confidence ↑ |")
    print("|---|---|---|---|---|---|---|")
    print(f"| floor (held-out vs train) | {floor['fd']:.4f} | | {floor['kid'] * 1e3:.2f} | {floor['precision']:.3f} | "
          f"{floor['recall']:.3f} | {floor['confidence']:.3f} |")
    for name, r in results.items():
        delta = "" if name == "unguided" else f"{(r['fd'][0] / base - 1) * 100:+.1f}%"
        print(f"| {name} | {r['fd'][0]:.4f} ± {r['fd'][1]:.4f} | {delta} | {r['kid'][0] * 1e3:.2f} ± {r['kid'][1] * 1e3:.2f} | "
              f"{r['precision'][0]:.3f} | {r['recall'][0]:.3f} | {r['confidence'][0]:.3f} |")

    def best_of(arch):
        names = [n for n in results if n.startswith(arch)]
        return min(names, key=lambda n: results[n]["fd"][0])
    best = {arch: best_of(arch) for arch in discs}
    shown = best.get("features") or next(iter(best.values()))
    g = grid([(x_test[:64], "real (held-out)"), (samples_by_config["unguided"][:64], "unguided"),
              (samples_by_config[shown][:64], shown + " (same seeds)")], os.path.join(a.out, "comparison_grid.png"))
    log(f"\ncomparison grid (real | unguided | {shown}): {g}")
    summary = {"benchmark": "quality", "seeds": a.seeds, "samples": a.samples, "sampler": f"{a.sampler}/{a.steps}",
               "floor_fd": round(floor["fd"], 4), "unguided_fd": round(base, 4),
               "unguided_recall": round(results["unguided"]["recall"][0], 4), "minutes": round((time.perf_counter() - t_start) / 60, 1)}
    for arch, name in best.items():
        r = results[name]
        summary[f"{arch}_best"] = name
        summary[f"{arch}_fd"] = round(r["fd"][0], 4)
        summary[f"{arch}_fd_change"] = round(r["fd"][0] / base - 1, 4)
        summary[f"{arch}_recall_change"] = round(r["recall"][0] - results["unguided"]["recall"][0], 4)
    with open(os.path.join(a.out, "quality.json"), "w") as f:
        json.dump({"summary": summary, "results": results, "floor": floor}, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
