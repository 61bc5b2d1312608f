"""Discriminator training on the small model: held-out accuracy per σ band and wall time, both architectures.

    python -m harness.bench.training [--images 1000] [--model-steps 800] [--steps 600]

A tiny ComfyUI model (SD1.5 UNet architecture, 1M params) and a tiny VAE; the model is trained on the digits'
latents so its samples are plausible but imperfect; fakes are its samples (euler, 20 steps); each architecture
is trained with the pack's Trainer. Prints a table per architecture and a final JSON line.
"""
import argparse
import json
import tempfile
import time

import torch


def main(argv=None):
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui()
    from harness.digits import write_digit_folder
    from harness.tiny import empty_conditioning, tiny_model, tiny_vae
    from harness.tiny_train import train_diffusion
    from comfy_dg.training import TrainConfig, Trainer
    from comfy_dg.training.data import encode_folder, sample_fakes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--model-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)

    model, vae = tiny_model("EPS", seed=0), tiny_vae(seed=0)
    pos, neg = empty_conditioning(model)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        real = encode_folder(write_digit_folder(tmp, a.images), vae, 64, 64)
    t = time.perf_counter()
    train_diffusion(model, real, steps=a.model_steps, batch_size=64, lr=2e-3)
    model_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        fake = sample_fakes(model, pos, neg, a.images, 100, 0, 20, 1.0, "euler", "normal", 64, 64)
    fake_s = time.perf_counter() - t
    print(f"small model trained {a.model_steps} steps on {a.images} digit latents in {model_s:.1f} s; "
          f"{a.images} fakes (euler, 20 steps) in {fake_s:.1f} s; {torch.get_num_threads()} threads")
    result = {"benchmark": "training", "images": a.images, "steps": a.steps}
    for arch in ("standalone", "features"):
        t = time.perf_counter()
        trainer = Trainer(model, real, fake, TrainConfig(architecture=arch, steps=a.steps, batch_size=a.batch_size,
                                                         eval_every=100, patience=0))
        disc = trainer.run()
        seconds = time.perf_counter() - t
        tr = disc.info.training
        print(f"\n{arch}: {seconds:.1f} s for {tr['steps']} steps (batch {a.batch_size}); best held-out BCE at "
              f"step {tr['best_step']}; held-out {tr['real_heldout']} real + {tr['fake_heldout']} fake")
        print("| σ band | acc real | acc fake | acc | BCE |")
        print("|---|---|---|---|---|")
        for b in tr["heldout_bands"]:
            print(f"| {b['sigma_lo']:.3f}–{b['sigma_hi']:.3f} | {b['acc_real']:.2f} | {b['acc_fake']:.2f} | "
                  f"{b['acc']:.3f} | {b['bce']:.3f} |")
        result[arch] = {"seconds": round(seconds, 1), "acc_by_band": [round(b["acc"], 3) for b in tr["heldout_bands"]]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
