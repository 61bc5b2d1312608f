"""Sampling speed and peak memory of discriminator guidance: guided vs unguided, both discriminator architectures.

    python -m harness.bench.speed [--model sd15|tiny] [--latent 64] [--batch 1] [--cfg 7] [--steps 2]
                                   [--sampler euler] [--repeats N] [--threads N] [--smoke]

Each configuration (unguided, standalone, features) runs in its own subprocess
(`python -m harness.bench.speed --child JSON`), which builds the model, samples once to warm up, then
--repeats times, and prints one JSON line: the median wall time and the process's peak memory (CPU: peak RSS,
from getrusage; CUDA: torch.cuda.max_memory_allocated). The parent collects them and prints a markdown table,
the issue's targets next to the measured values, and a final JSON line.

Models, both real ComfyUI (comfy.model_base.BaseModel, ComfyUI's UNetModel), random weights initialised
reproducibly (timing does not depend on the weights' values):
  sd15  the SD1.5 UNet at full size (860M params; comfy.supported_models.SD15 with the unet config that
        comfy.model_detection gives an SD1.5 checkpoint); fp32 on the CPU, fp16 on CUDA (--dtype auto).
  tiny  the small model of harness.tiny (SD1.5 architecture at a tiny size).
Sampling: the real KSampler node under torch.inference_mode(), same seed, sampler, steps and latents for all
configurations; positive/negative conditioning are random context tensors (1, 77, context_dim). The
discriminators (default sizes), each guiding at weight 1 over the whole σ range, every model evaluation:
  standalone      a StandaloneDiscriminator on the latent.
  features        a FeatureHeadDiscriminator trained under the run's negative prompt: its features come from
                  the sampler's own uncond forward (the UNet tap's fast path, comfy_dg/taps/unet.py), plus one
                  backward pass.
  features_2pass  a prompt-independent FeatureHeadDiscriminator: its features take a second pass through the
                  UNet's input and middle blocks (taps.UNetMiddle), plus the backward pass.
Each run counts the feature tap's own passes, so the table shows which path ran.

--smoke: a quick check of the whole pipeline for CI (tiny model, 8×8 latents, 2 steps, 1 repeat, 1 thread unless
--threads is given; subprocesses as usual).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("unguided", "standalone", "features", "features_2pass")
# The targets (64×64 latents, with CFG): guided ÷ unguided wall time, and peak-memory increase.
TARGETS = {"standalone_ratio": 1.05, "features_ratio": 1.35, "mem_overhead": 0.15}
from .. import REPO
TOKENS = 77


# --- the models ------------------------------------------------------------------------------------------

def sd15_model(seed: int = 0, dtype=torch.float32):
    """The full-size SD1.5 model (harness.fullsize), weights random from `seed`."""
    import comfy.model_management
    from harness.fullsize import unet_model
    m = unet_model("sd15", dtype=dtype, seed=seed)
    m.load_device = comfy.model_management.get_torch_device()
    return m


def build_model(name: str, dtype):
    if name == "sd15":
        return sd15_model(seed=0, dtype=dtype)
    from harness.tiny import tiny_model
    return tiny_model("EPS", seed=0, dtype=dtype)


def random_conditioning(model_patcher):
    context_dim = int(model_patcher.model.model_config.unet_config["context_dim"])
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(1, TOKENS, context_dim, generator=g)
    neg = torch.randn(1, TOKENS, context_dim, generator=g)
    return [[pos, {}]], [[neg, {}]]


def build_discriminator(kind: str, model_patcher, negative=None, latent_shape=None):
    """kind "standalone", "features_2pass" (prompt-independent features of the model's own tap) or "features"
    (a UNet head trained under `negative`, the run's negative prompt, for latents of `latent_shape`). The
    discriminator is made for the model's latent family and channels; a features head computes in the model's
    compute dtype (fp8 weights compute in their manual-cast dtype)."""
    from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator, identity
    from comfy_dg.taps import find_tap
    from comfy_dg.taps.common import compute_dtype
    from comfy_dg.training.conditioning import negative_conditioning
    bm = model_patcher.model
    info = DiscriminatorInfo(identity.latent_channels(bm), identity.family(bm))
    torch.manual_seed(0)
    if kind == "standalone":
        return StandaloneDiscriminator(info)
    tap = find_tap(bm.diffusion_model)
    if tap is None:
        raise ValueError(f"comfy-dg: no feature tap for a {identity.network(bm.diffusion_model)} network")
    head = {"tap": tap.name, "feature_channels": tap.channels(bm)}
    if kind == "features_2pass":
        return FeatureHeadDiscriminator(info, **head)
    context, y = negative_conditioning(model_patcher, negative, latent_shape)
    with torch.inference_mode(False):
        disc = FeatureHeadDiscriminator(info, **head, context_tokens=context.shape[0], context_dim=context.shape[1],
                                        y_dim=0 if y is None else y.numel())
        disc.set_conditioning(context, y)
    return disc.to(compute_dtype(bm))


# --- one configuration, in its own process ------------------------------------------------------------------

def _dtype(name: str, cuda: bool):
    if name == "auto":
        return torch.float16 if cuda else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _rss_mb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        return float("nan")


def _peak_rss_mb() -> float:
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20     # kB on Linux, bytes on macOS


def child(spec: dict) -> dict:
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import nodes as comfy_nodes
    from comfy_dg import guide

    cuda = torch.cuda.is_available() and os.environ.get("COMFY_DG_DEVICE") != "cpu"
    dtype = _dtype(spec["dtype"], cuda)
    t0 = time.perf_counter()
    model = build_model(spec["model"], dtype)
    build_s = time.perf_counter() - t0
    pos, neg = random_conditioning(model)
    latent = {"samples": torch.zeros(spec["batch"], 4, spec["latent"], spec["latent"])}
    run_model = model
    disc_params = 0
    if spec["config"] != "unguided":
        disc = build_discriminator(spec["config"], model, neg, tuple(latent["samples"].shape[1:]))
        disc_params = sum(p.numel() for p in disc.parameters())
        run_model = guide(model, disc, weight=1.0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out = {}

    def go():
        with torch.inference_mode():
            out["samples"] = comfy_nodes.KSampler().sample(
                run_model, spec["seed"], spec["steps"], spec["cfg"], spec["sampler"], spec["scheduler"], pos, neg,
                latent)[0]["samples"]
        sync()

    from comfy_dg.taps import UNetMiddle
    tap_features, second_passes = UNetMiddle.features, []

    def counted(*args, **kwargs):
        second_passes.append(1)
        return tap_features(*args, **kwargs)
    UNetMiddle.features = staticmethod(counted)

    rss_before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(1 + spec["repeats"]):        # the first run is the warm-up
        t = time.perf_counter()
        go()
        if i:
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    result = {
        "config": spec["config"], "model": spec["model"], "device": "cuda" if cuda else "cpu",
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.model.diffusion_model.parameters()), "disc_params": disc_params,
        "build_s": round(build_s, 3), "times": [round(t, 4) for t in times], "seconds": seconds,
        "s_per_step": seconds / spec["steps"],
        "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "finite": bool(torch.isfinite(out["samples"]).all()),
        "second_passes_per_run": len(second_passes) // (1 + spec["repeats"]),
    }
    if cuda:
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    result["peak_mb"] = result["peak_cuda_mb"] if cuda else result["peak_rss_mb"]
    return result


def run_child(spec: dict, verbose: bool) -> dict:
    cmd = [sys.executable, "-m", "harness.bench.speed", "--child", json.dumps(spec)]
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                       text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stdout[-4000:] + (p.stderr or "")[-8000:])
        raise SystemExit(f"comfy-dg speed: the '{spec['config']}' run failed (exit {p.returncode})")
    return json.loads(lines[-1])


# --- the parent: every configuration, the table and the JSON line ----------------------------------------------

def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _verdict(value, target):
    return "met" if value <= target else "not met"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--latent", type=int, default=64, help="latent height and width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default: 1 for sd15, "
                                                               "3 for tiny); the median is reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="model dtype (auto: fp32 on the CPU, fp16 on CUDA)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (unguided is always run)")
    p.add_argument("--smoke", action="store_true", help="quick pipeline check: tiny model, 8x8, 2 steps, 1 repeat")
    p.add_argument("--verbose", action="store_true", help="show the runs' own output (progress bars, logs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child:
        print(json.dumps(child(json.loads(a.child))), flush=True)
        return

    if a.steps < 1 or (a.repeats is not None and a.repeats < 1):
        p.error("--steps and --repeats must be at least 1")
    if a.smoke:
        a.model, a.latent, a.steps, a.repeats = "tiny", 8, 2, 1
        # One thread: on a small shared CPU, every parallel region of a tiny op can wait on a descheduled
        # OpenMP thread (milliseconds each), which swamps tiny-model timings.
        a.threads = a.threads or 1
    if a.repeats is None:
        a.repeats = 1 if a.model == "sd15" else 3
    base_spec = {"model": a.model, "latent": a.latent, "batch": a.batch, "cfg": a.cfg, "steps": a.steps,
                 "sampler": a.sampler, "scheduler": a.scheduler, "seed": a.seed, "repeats": a.repeats,
                 "threads": a.threads, "dtype": a.dtype}
    configs = ["unguided"] + [c for c in CONFIGS[1:] if c in a.configs.split(",")]
    unknown = set(a.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    load_before = _loadavg()
    rows = {}
    for name in configs:
        t = time.perf_counter()
        rows[name] = run_child({**base_spec, "config": name}, a.verbose)
        print(f"{name}: {rows[name]['seconds']:.3f} s ({time.perf_counter() - t:.0f} s with model build and "
              f"warm-up)", file=sys.stderr, flush=True)

    load_after = _loadavg()
    base = rows["unguided"]
    for r in rows.values():
        r["ratio"] = r["seconds"] / base["seconds"]
        r["mem_overhead"] = (r["peak_mb"] - base["peak_mb"]) / base["peak_mb"]
    cuda = base["device"] == "cuda"
    mem_kind = "peak CUDA memory allocated (torch.cuda.max_memory_allocated)" if cuda \
        else "peak RSS of the run's process (getrusage ru_maxrss; includes the model's weights and the runtime)"
    unet_batch = a.batch * (2 if a.cfg != 1.0 else 1)
    threads = f"{base['threads']} thread" + ("s" if base["threads"] != 1 else "")
    print(f"model: {a.model} ({base['params'] / 1e6:.1f}M-param ComfyUI UNetModel, {base['dtype']}, random weights) "
          f"on {base.get('gpu') or 'cpu'}, {threads}; {a.sampler}/{a.scheduler}, {a.steps} steps, cfg {a.cfg:g} "
          f"(UNet batch {unet_batch}), batch {a.batch}, {a.latent}x{a.latent} latents; median of {a.repeats} "
          "after a warm-up, each configuration in its own process")
    sizes = ", ".join(f"{k} {r['disc_params'] / 1e6:.2f}M params" for k, r in rows.items() if k != "unguided")
    print(f"discriminators: {sizes} (the features heads also run the UNet's input and middle blocks, with grads)")
    print(f"memory: {mem_kind}")
    if load_before is not None:
        print(f"machine: {os.cpu_count()} CPUs; 1-minute load average {load_before:.2f} before, {load_after:.2f} "
              "after (other processes' load slows these runs, and multi-threaded small ops most)")
    print()
    print(f"| {'config':<14} | {'s':>9} | {'s/step':>9} | {'× unguided':>10} | {'peak MB':>9} | {'+% memory':>9} "
          f"| {'2nd passes':>10} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 12}|")
    for name, r in rows.items():
        print(f"| {name:<14} | {r['seconds']:9.3f} | {r['s_per_step']:9.3f} | {r['ratio']:10.3f} | "
              f"{r['peak_mb']:9.1f} | {100 * r['mem_overhead']:+8.1f}% | {r['second_passes_per_run']:>10} |")
    print()
    checks = []
    for name, target in (("standalone", "standalone_ratio"), ("features", "features_ratio")):
        if name in rows:
            checks += [(f"{name} time", rows[name]["ratio"], TARGETS[target], "×"),
                       (f"{name} memory", rows[name]["mem_overhead"], TARGETS["mem_overhead"], "%")]
    as_stated = a.latent == 64 and a.cfg != 1.0
    print("targets (the issue's, for 64x64 latents with CFG" +
          ("" if as_stated else f"; this run is {a.latent}x{a.latent}, cfg {a.cfg:g}: indicative only") + "):")
    met = {}
    for label, value, target, unit in checks:
        shown = (f"{value:.3f}×", f"≤ {target:.2f}×") if unit == "×" else (f"{100 * value:+.1f}%",
                                                                          f"≤ {100 * target:.0f}%")
        met[label.replace(" ", "_")] = value <= target
        print(f"  {label:<18} {shown[0]:>8}  target {shown[1]:<7} {_verdict(value, target)}")
    if not all(r["finite"] for r in rows.values()):
        print("note: some samples were not finite (random weights); timings stand, values do not matter here")

    # The pack's own Python work per guided evaluation, before and after it moved to once per run (hotpath.py).
    hook = subprocess.run([sys.executable, "-m", "harness.bench.hotpath", "--networks",
                           "sd15" if a.smoke else "sd15,sdxl", "--repeats", "5" if a.smoke else "50"],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    if hook.returncode != 0:
        raise SystemExit(f"the hook-overhead benchmark failed:\n{hook.stderr[-2000:]}")
    print("\n" + "\n".join(hook.stdout.strip().splitlines()[:-1]))
    overhead = json.loads(hook.stdout.strip().splitlines()[-1])

    result = {
        "benchmark": "speed", "model": a.model, "params": base["params"], "device": base["device"],
        "gpu": base.get("gpu"), "dtype": base["dtype"], "threads": base["threads"], "sampler": a.sampler,
        "scheduler": a.scheduler, "steps": a.steps, "cfg": a.cfg, "batch": a.batch, "latent": a.latent,
        "repeats": a.repeats, "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
        "memory": "cuda_max_allocated" if cuda else "peak_rss",
        **{f"{k}_s": round(r["seconds"], 4) for k, r in rows.items()},
        **{f"{k}_s_per_step": round(r["s_per_step"], 4) for k, r in rows.items()},
        **{f"{k}_peak_mb": r["peak_mb"] for k, r in rows.items()},
        **{f"{k}_rss_before_mb": r["rss_before_mb"] for k, r in rows.items()},
        **{f"{k}_ratio": round(r["ratio"], 4) for k, r in rows.items() if k != "unguided"},
        **{f"{k}_mem_overhead": round(r["mem_overhead"], 4) for k, r in rows.items() if k != "unguided"},
        **{f"{k}_second_passes_per_run": r["second_passes_per_run"] for k, r in rows.items()},
        "targets": TARGETS, "met": met,
        **{f"hook_{k}": v for k, v in overhead.items() if k != "benchmark"},
        "finite": all(r["finite"] for r in rows.values()),
    }
    assert all(math.isfinite(r["ratio"]) for r in rows.values())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
