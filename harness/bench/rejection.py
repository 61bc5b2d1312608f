"""DG rejection sampling (DiffRS's scheme) on the digits benchmark: FD and cost vs plain and DG-guided sampling.

    python -m harness.bench.rejection [--quantiles 0.5,0.9] [--max-retries 4] [--weight W]

The quality benchmark's model, metrics and features discriminator (trained with the pack's defaults); samples
through SamplerCustomAdvanced's path (comfy.sample.sample_custom) with the pack's rejection sampler on heun 18
karras, from the same initial noise as the quality benchmark's samples. The quantile is chosen apart, on seed 100
against the selection half of the held-out digits (as the lever benchmark chooses w); the report is seeds 0–2
against all 540 held-out digits, with model and discriminator evaluations per sample. --weight W samples a model
patched by Discriminator Guidance (w = W on each step's first evaluation, the same discriminator) instead of the
plain model: does rejection add to guiding?
"""
import argparse
import json
import os
import statistics
import time

import torch

from .levers import SELECTION_SEED, halves
from .quality import Phase, add_pipeline_arguments, config_key, disc_config, log, prepare, sample, train_discriminator


def main(argv=None):
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui()
    from harness.bench.metrics import evaluate
    from comfy_dg import guide
    from comfy_dg.rejection import Counter, dg_rejection_sampler

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantiles", default="0.5,0.9")
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--weight", type=float, default=0.0, help="DG weight of the sampled model (0: unguided)")
    add_pipeline_arguments(p)
    a = p.parse_args(argv)
    if a.sampler != "heun":
        raise SystemExit("comfy-dg: the rejection benchmark proposes with heun steps; --sampler must be heun")
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    x_train, _, x_test, clf, model, fakes, tag = prepare(a.cache, a.model_steps, a.fakes, "heun", a.steps)
    pick, report = halves(len(x_test))
    cfg = disc_config("features", a.disc_steps)
    key = config_key(cfg, len(fakes))
    disc = train_discriminator(model, x_train, fakes, cfg,
                               os.path.join(a.cache, f"disc_features_{tag}_{key}.safetensors"))

    sampled = guide(model, disc, weight=a.weight, intermediate_weight=0.0) if a.weight else model
    guided = f"_w{a.weight:g}" if a.weight else ""

    def run(q, seed):
        counter = Counter()

        def compute():
            x = sample(sampled, a.samples, seed, dg_rejection_sampler(disc, "heun", q, a.max_retries,
                                                                      counter=counter), a.steps)
            return {"x": x, "cost": torch.tensor([counter.model, counter.discriminator, counter.rejections],
                                                 dtype=torch.float64) / counter.samples}
        name = f"samples_{tag}_rejection{key}{guided}_q{q:g}_r{a.max_retries}_heun{a.steps}_s{seed}_n{a.samples}"
        return Phase(a.cache, name).get(compute)

    quantiles = [float(q) for q in a.quantiles.split(",")]
    selection = {}
    for q in quantiles:
        t = time.perf_counter()
        selection[q] = evaluate(clf, x_test[pick], run(q, SELECTION_SEED)["x"])["fd"]
        log(f"quantile {q:g}: selection FD {selection[q]:.2f} ({time.perf_counter() - t:.0f} s)")
    q = min(quantiles, key=lambda k: selection[k])
    runs = [run(q, s) for s in range(a.seeds)]
    full = [evaluate(clf, x_test, r["x"]) for r in runs]
    half = [evaluate(clf, x_test[report], r["x"]) for r in runs]
    unguided = [evaluate(clf, x_test, Phase(a.cache, f"samples_{tag}_unguided_heun{a.steps}_s{s}_n{a.samples}").get(
        lambda s=s: {"x": sample(model, a.samples, s, "heun", a.steps)})["x"]) for s in range(a.seeds)]
    stat = lambda rs, k: (statistics.mean(r[k] for r in rs), statistics.pstdev(r[k] for r in rs))  # noqa: E731
    cost = torch.stack([r["cost"] for r in runs]).mean(0).tolist()
    base = stat(unguided, "fd")[0]
    chosen = ", ".join(f"{k:g}: {v:.2f}" for k, v in selection.items())
    print(f"\nquantile chosen apart: {q:g} (selection FD {chosen})\n")
    print("| sampling | FD ↓ | ΔFD | FD, report half | precision ↑ | recall ↑ | model evaluations / sample | "
          "discriminator evaluations / sample (the sampler's; guiding adds its own) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| heun {a.steps}, unguided | {base:.2f} ± {stat(unguided, 'fd')[1]:.2f} | | | "
          f"{stat(unguided, 'precision')[0]:.3f} | {stat(unguided, 'recall')[0]:.3f} | {2 * a.steps - 1} | 0 |")
    fd = stat(full, "fd")
    on = f", on a model guided by DG at w = {a.weight:g}" if a.weight else ""
    print(f"| DG rejection (heun, quantile {q:g}, max_retries {a.max_retries}{on}) | {fd[0]:.2f} ± {fd[1]:.2f} | "
          f"{(fd[0] / base - 1) * 100:+.1f}% | {stat(half, 'fd')[0]:.2f} | {stat(full, 'precision')[0]:.3f} | "
          f"{stat(full, 'recall')[0]:.3f} | {cost[0]:.1f} | {cost[1]:.1f} |")
    summary = {"benchmark": "rejection", "weight": a.weight, "quantile": q, "max_retries": a.max_retries, "fd": round(fd[0], 4),
               "fd_std": round(fd[1], 4), "unguided_fd": round(base, 4),
               "recall_change": round(stat(full, "recall")[0] - stat(unguided, "recall")[0], 4),
               "model_evals_per_sample": round(cost[0], 2), "disc_evals_per_sample": round(cost[1], 2),
               "rejections_per_sample": round(cost[2], 2),
               "selection_fd": {str(k): round(v, 4) for k, v in selection.items()},
               "minutes": round((time.perf_counter() - t_start) / 60, 1)}
    with open(os.path.join(a.out, "rejection.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
