"""Per-evaluation Python overhead of the guidance hook on full-size networks, before and after the per-run set-up.

    python -m harness.bench.hotpath [--repeats 200]

The pack's own work at each guided model evaluation, apart from the discriminator and the network: measured with
a discriminator that costs nothing (log r = mean of x_in) on full-size SD1.5 and SDXL UNets whose weights live on
the meta device (the Python work of a parameter scan does not depend on where the weights are), and 2×4×16×16
latents (so that the correction's own arithmetic is negligible). "after": the hook as it runs now (its run state made once per sampling run). "before": the same plus
the work the previous version repeated at every evaluation and now does once per run: the two scans over every
parameter of the diffusion network a features discriminator needs (making inference-mode weights usable by
autograd, and freezing their requires_grad around the pass), the σ window (two percent_to_sigma calls, a host sync
on discrete models) and α with its σ·ε check, twice. Prints a table and a final JSON line.
"""
import argparse
import json
import statistics
import time

import torch


class Free(torch.nn.Module):
    def forward(self, x_in, sigma):
        return x_in.flatten(1).mean(1)


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure(name: str, repeats: int) -> dict:
    from comfy_dg import guide, parameterization
    from comfy_dg.patch import RUNS_KEY, Run
    from comfy_dg.tensors import autograd_weights, frozen
    from harness.fullsize import unet_model

    model = unet_model(name, device="meta")
    dm = model.model.diffusion_model
    ms = model.model.model_sampling
    guided = guide(model, Free(), weight=1.0)
    patch = guided.model_options["sampler_post_cfg_function"][0]
    run = Run(patch, model.model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    sigma = torch.full((2,), 3.0)
    args = {"denoised": torch.zeros_like(x), "input": x, "sigma": sigma, "model": model.model,
            "model_options": {"transformer_options": {RUNS_KEY: {patch.key: run}}}}

    def hook():
        with torch.inference_mode():
            patch(args)

    def moved_out():
        autograd_weights(dm)
        with frozen(dm):
            pass
        parameterization.window(ms, 0.0, 1.0)
        for _ in range(2):
            parameterization.check_supported(ms)
            parameterization.alpha(ms, sigma)

    autograd_weights(dm)        # the first call replaces the inference tensors; every later one only scans
    after = _median_ms(hook, repeats)
    removed = _median_ms(moved_out, repeats)
    return {"network": name, "parameters": sum(p.numel() for p in dm.parameters()),
            "tensors": sum(1 for _ in dm.parameters()), "after_ms": after, "before_ms": after + removed}


def main(argv=None):
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui(cpu=True)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--networks", default="sd15,sdxl")
    a = p.parse_args(argv)
    rows = [measure(n, a.repeats) for n in a.networks.split(",")]
    print(f"per-evaluation overhead of the guidance hook (median of {a.repeats}, {torch.get_num_threads()} threads)")
    print("| network | parameters | tensors | before (ms) | after (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['parameters'] / 1e9:.2f}B | {r['tensors']} | {r['before_ms']:.2f} | "
              f"{r['after_ms']:.2f} |")
    print(json.dumps({"benchmark": "hotpath", **{f"{r['network']}_{k}": round(r[k], 3)
                                                 for r in rows for k in ("before_ms", "after_ms")}}))
    return rows


if __name__ == "__main__":
    main()
