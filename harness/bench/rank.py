"""Rank by realism on the digits benchmark: FD of the samples a discriminator keeps vs the same number unranked.

    python -m harness.bench.rank [--pool 2000] [--keep 1000] [--sigmas 0.03,0.1,0.3,1] [--weight 0]

The quality benchmark's model, metrics and features discriminator (trained with the pack's defaults). For each
seed, a pool of samples (heun 18; `--weight w` guides them with DG on the first evaluation of each step) is
scored by comfy_dg.ranking.realism_scores (log r at σ, 4 noise draws) and the best `keep` are kept; the
baseline is the pool's first `keep` samples (the same sampler and seed, unranked). σ is chosen apart, as the
lever benchmark chooses w: on a pool of its own seed (100) against the selection half of the held-out digits;
the report is seeds 0–2 against all 540 held-out digits and against the other half alone.
"""
import argparse
import json
import os
import statistics
import time

from .levers import SELECTION_SEED, halves
from .quality import Phase, add_pipeline_arguments, config_key, disc_config, log, prepare, sample, train_discriminator


def main(argv=None):
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui()
    from comfy_dg import guide
    from harness.bench.metrics import evaluate
    from comfy_dg.ranking import keep_best, realism_scores

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--keep", type=int, default=1000)
    p.add_argument("--sigmas", default="0.03,0.1,0.3,1")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--weight", type=float, default=0.0, help="DG weight of the pool's sampling (0: unguided)")
    add_pipeline_arguments(p)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    x_train, _, x_test, clf, model, fakes, tag = prepare(a.cache, a.model_steps, a.fakes, a.sampler, a.steps)
    pick, report = halves(len(x_test))
    cfg = disc_config("features", a.disc_steps)
    key = config_key(cfg, len(fakes))
    disc = train_discriminator(model, x_train, fakes, cfg, os.path.join(a.cache, f"disc_features_{tag}_{key}.safetensors"))
    sampler_model = model if a.weight == 0 else guide(model, disc, weight=a.weight, intermediate_weight=0.0)
    pool_key = f"{tag}_unguided" if a.weight == 0 else f"{tag}_features{key}_w{a.weight:g}_0.0000_1.0000"
    sigmas = [float(s) for s in a.sigmas.split(",")]

    def pool(seed):
        return Phase(a.cache, f"samples_{pool_key}_{a.sampler}{a.steps}_s{seed}_n{a.pool}").get(
            lambda: {"x": sample(sampler_model, a.pool, seed, a.sampler, a.steps)})["x"]

    def ranked(x, sigma):
        scores = realism_scores(model, disc, x, sigma=sigma, draws=a.draws, seed=0)
        return x[keep_best(scores, a.keep)]

    t = time.perf_counter()
    selection = {s: evaluate(clf, x_test[pick], ranked(pool(SELECTION_SEED), s))["fd"] for s in sigmas}
    sigma = min(sigmas, key=lambda s: selection[s])
    log(f"σ chosen on the selection half: {sigma:g} ({ {k: round(v, 2) for k, v in selection.items()} }; "
        f"{time.perf_counter() - t:.0f} s)")

    rows = {"unranked": [], f"ranked σ={sigma:g}": []}
    for seed in range(a.seeds):
        x = pool(seed)
        for name, kept in (("unranked", x[:a.keep]), (f"ranked σ={sigma:g}", ranked(x, sigma))):
            rows[name].append((evaluate(clf, x_test, kept), evaluate(clf, x_test[report], kept)))

    def stat(runs, k, part=0):
        return statistics.mean(r[part][k] for r in runs), statistics.pstdev(r[part][k] for r in runs)
    base = stat(rows["unranked"], "fd")[0]
    print(f"\npool {a.pool} per seed ({'unguided' if a.weight == 0 else f'DG w={a.weight:g}'}), keep {a.keep}, "
          f"{a.draws} draws; mean ± std over {a.seeds} seeds\n")
    print("| samples | FD ↓ | ΔFD | FD, report half | precision ↑ | recall ↑ |")
    print("|---|---|---|---|---|---|")
    summary = {"benchmark": "rank", "pool": a.pool, "keep": a.keep, "weight": a.weight, "sigma": sigma,
               "selection_fd": {str(k): round(v, 4) for k, v in selection.items()}}
    for name, runs in rows.items():
        fd = stat(runs, "fd")
        print(f"| {name} | {fd[0]:.2f} ± {fd[1]:.2f} | {(fd[0] / base - 1) * 100:+.1f}% | "
              f"{stat(runs, 'fd', 1)[0]:.2f} | {stat(runs, 'precision')[0]:.3f} | {stat(runs, 'recall')[0]:.3f} |")
        summary[name] = {"fd": round(fd[0], 4), "fd_std": round(fd[1], 4),
                         "recall": round(stat(runs, "recall")[0], 4), "precision": round(stat(runs, "precision")[0], 4)}
    summary["minutes"] = round((time.perf_counter() - t_start) / 60, 1)
    with open(os.path.join(a.out, f"rank_w{a.weight:g}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
