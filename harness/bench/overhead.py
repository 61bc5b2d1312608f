"""Sampling overhead of discriminator guidance: guided ÷ unguided wall time, same sampler, steps and seeds.

    python -m harness.bench.overhead [--steps 20] [--sampler euler] [--latent 8] [--batch 2] [--repeats 5]

Runs the real KSampler node on a small real ComfyUI model (the SD1.5 UNet architecture at a tiny size) with
each discriminator architecture, under ComfyUI's inference mode; prints a table and a final JSON line.
"""
import argparse
import json
import statistics
import time

import torch


def _time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui()
    import nodes as comfy_nodes
    from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator, guide
    from comfy_dg.taps import UNetMiddle
    from harness.tiny import empty_conditioning, tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--latent", type=int, default=8, help="latent height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    model = tiny_model("EPS", seed=0)
    pos, neg = empty_conditioning(model)
    latent = {"samples": torch.zeros(a.batch, 4, a.latent, a.latent)}
    info = DiscriminatorInfo(4, "SD15")
    torch.manual_seed(0)
    discs = {"standalone": StandaloneDiscriminator(info),
             "features": FeatureHeadDiscriminator(info, feature_channels=UNetMiddle.channels(model.model))}

    def run(m):
        def go():
            with torch.inference_mode():
                comfy_nodes.KSampler().sample(m, 1, a.steps, a.cfg, a.sampler, "normal", pos, neg, latent)
        return go

    base = _time(run(model), a.repeats)
    rows = {"unguided": {"seconds": base, "ratio": 1.0}}
    for name, d in discs.items():
        t = _time(run(guide(model, d, weight=1.0)), a.repeats)
        rows[name] = {"seconds": t, "ratio": t / base}
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"small model: SD1.5 UNet architecture, {params / 1e6:.2f}M params; {a.sampler}, {a.steps} steps, "
          f"cfg {a.cfg}, batch {a.batch}, {a.latent}x{a.latent} latents, median of {a.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"| {'run':<12} | {'seconds':>8} | {'× unguided':>10} |")
    print(f"|{'-' * 14}|{'-' * 10}|{'-' * 12}|")
    for name, r in rows.items():
        print(f"| {name:<12} | {r['seconds']:8.3f} | {r['ratio']:10.2f} |")
    print(json.dumps({"benchmark": "overhead", "model": "tiny-sd15", "sampler": a.sampler, "steps": a.steps,
                      "batch": a.batch, "latent": a.latent,
                      **{f"{k}_s": round(v["seconds"], 4) for k, v in rows.items()},
                      **{f"{k}_ratio": round(v["ratio"], 3) for k, v in rows.items() if k != "unguided"}}))


if __name__ == "__main__":
    main()
