"""What a GPU user of the pack will feel, in one command: sampling speed and VRAM, training speed, the training CLI
under torchrun, the memory of making inference-mode weights usable by autograd, and correctness on the device.

    python -m harness.bench.gpu [--smoke] [--comfyui DIR [DIR ...]] [--sections LIST] [--families LIST]
                                 [--dtypes LIST] [--budget SECONDS] [--steps N] [--repeats N]

Every measurement runs in a child process (`--child JSON`) that imports one ComfyUI (COMFYUI_PATH = one of
--comfyui) and starts it as ComfyUI's main.py does on that machine, so each version runs under its own default
model patcher: ModelPatcher, or ModelPatcherDynamic (comfy-aimdo, weights streamed at op time) where the version
has it and the device is NVIDIA. Versions are told apart by what they have, never by their version string.

Sections (each row of the table is one configuration; a configuration that cannot run says why, an error is
recorded as an error, and a child that dies or runs out of time costs only its own rows):
  correctness  tests/test_device_correctness.py under pytest on ComfyUI's device: Theorem 1 and the official EDM
               Heun + DG sampler in float32/float64, fp16/bf16 models sampling finite guided latents.
  sampling     full-size networks with random weights (harness.fullsize: ComfyUI's own config and model classes, no
               downloads): SD1.5 UNet
               at 64×64 latents, SDXL UNet at 128×128, Flux.1-dev at 128×128 (16 channels); fp16, bf16 and fp8
               weights (where ComfyUI supports fp8 on the device: unet_manual_cast decides the compute dtype);
               euler, cfg 7 (batch 1, so the network runs on 2 rows), seconds per step (median of --repeats after a
               warm-up that loads the weights) and peak VRAM (torch.cuda.max_memory_allocated) for: unguided;
               standalone; features from the sampler's own forward (the UNet tap's fast path, for a head trained
               under the run's negative prompt); features by a second pass (prompt-independent head, any tap).
               Discriminators in float32, as files load. The model starts on ComfyUI's offload device and ComfyUI
               loads it, as after a checkpoint load.
  training     the pack's Trainer: steps/s and peak VRAM at batch 64 (half real, half fake) for the features head
               and the standalone network, SD1.5 (64×64) and SDXL (128×128) fp16, after 2 warm-up steps.
  cli          `torchrun --standalone --nproc_per_node=1 -m comfy_dg.train` (nccl on a GPU) for 10 steps of a features
               head on a full-size random-weight SD1.5 checkpoint written to disk first (UNet weights only, fp16),
               with random real and fake latents.
  autograd     the memory that comfy_dg.tensors.autograd_weights takes to replace the inference-mode weights ComfyUI
               loaded by ordinary tensors: the SD1.5 UNet (fp16 on a GPU, fp32 on the CPU), peak and kept memory
               against the weights' size (CUDA: max_memory_allocated; CPU: VmHWM/VmRSS after resetting the peak).

Targets (ratios within one run, SDXL at 128×128 with cfg 7): standalone ≤ 1.05× and features from the shared forward
≤ 1.35× the unguided s/step; peak VRAM ≤ +20%; the features head trains at ≥ 5 steps/s on SD1.5 at batch 64.

The table is printed last but one, then one JSON line. With $OUT set (or --out), gpu_bench.json, gpu_bench.md and
gpu_bench.log (the children's own output) are written there, the JSON after every child, so a run cut short keeps
what it measured. --budget bounds the whole run: configurations not started in time are marked "skipped".

--smoke: the same code path on tiny models (8×8 latents) on the CPU, in minutes: 1 step, 1 timed run,
batch 8 for training, the CLI on a tiny checkpoint over gloo, a subset of the correctness tests.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from .. import REPO

SECTIONS = ("correctness", "sampling", "training", "cli", "autograd")
FAMILIES = ("sd15", "sdxl", "flux")
DTYPES = ("fp16", "bf16", "fp8")
CONFIGS = ("unguided", "standalone", "features", "features_2pass")
TRAIN_FAMILIES = ("sd15", "sdxl")
ARCHITECTURES = ("features", "standalone")
TARGETS = {"standalone_ratio": 1.05, "features_ratio": 1.35, "vram_overhead": 0.20, "train_steps_per_s": 5.0}
LATENT = {"sd15": 64, "sdxl": 128, "flux": 128}
CFG = 7.0
ROW = "@@ROW "
# A child starts here: with the dynamic-VRAM patcher, comfy-aimdo is loaded before anything imports torch (as
# ComfyUI's main.py does), and only then the pack (whose package imports torch).
BOOT = """import json, sys
spec = json.loads(sys.argv[1])
if spec.get("patcher") == "dynamic":
    try:
        import comfy_aimdo.control
        comfy_aimdo.control.init()
    except Exception:
        pass
from harness.bench.gpu import child
child(spec)
"""
STATUSES = ("ok", "refused", "error", "skipped")
# The smoke run's correctness subset: one case of each check.
SMOKE_TESTS = ("theorem1_on_the_device and EPS-float64 or official_sampler_on_the_device and heun-2.0-0.0-float64 "
               "or half_precision and bf16-SD15")


# --- the models (child side) ---------------------------------------------------------------------------------

def family_spec(family: str, full: bool) -> dict:
    """The network's config (full size: harness.fullsize's, what comfy.model_detection gives the real checkpoint;
    smoke: the same architecture, tiny), the prompt's shape and the latent."""
    from harness.fullsize import network_config
    from harness.tiny import tiny_flux_config, tiny_unet_config
    latent = LATENT[family] if full else 8
    if family == "sd15":
        net = network_config(family) if full else tiny_unet_config(context_dim=64)
        return {"network": net, "tokens": 77, "context": net["context_dim"], "pooled": None, "channels": 4,
                "latent": latent}
    if family == "sdxl":
        # SDXL sets 64-channel heads; the model adds its size embeddings to the pooled CLIP-G vector (1280).
        net = network_config(family) if full else tiny_unet_config(model_channels=64, context_dim=64,
                                                                   adm_in_channels=2816)
        return {"network": net, "tokens": 77, "context": net["context_dim"], "pooled": 1280, "channels": 4,
                "latent": latent}
    if family == "flux":
        net = network_config(family) if full else tiny_flux_config()
        return {"network": net, "tokens": 256 if full else 4, "context": net["context_in_dim"],
                "pooled": net["vec_in_dim"], "channels": 16, "latent": latent, "guidance": 3.5}
    raise ValueError(family)


def _weight_dtype(name):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "fp8": getattr(torch, "float8_e4m3fn", None)}[name]


def build_model(family: str, dtype_name: str, full: bool, patcher_class, seed: int = 0):
    """(ModelPatcher, spec): harness.fullsize's model (ComfyUI's own config class and get_model), the weights' dtype
    as a checkpoint loader sets it (with ComfyUI's manual-cast choice for the device), random weights drawn on the
    GPU when there is one, then put on ComfyUI's offload device, where a loaded checkpoint waits."""
    import torch
    import comfy.model_management as mm
    from harness.fullsize import base_model, config_class
    spec = family_spec(family, full)
    load, offload = mm.get_torch_device(), mm.unet_offload_device()
    weight_dtype = _weight_dtype(dtype_name)
    manual_cast = mm.unet_manual_cast(weight_dtype, load, config_class(family).supported_inference_dtypes)
    init_device = load if load.type == "cuda" else torch.device("cpu")
    model = base_model(family, weight_dtype, init_device, seed=seed, manual_cast=manual_cast, network=spec["network"])
    with torch.inference_mode(False):
        model.diffusion_model.to(offload)
    if init_device.type == "cuda":
        torch.cuda.empty_cache()
    spec["manual_cast"] = None if manual_cast is None else str(manual_cast).replace("torch.", "")
    return patcher_class(model, load_device=load, offload_device=offload), spec


def conditioning(spec, seed: int = 1):
    """Random positive and negative prompts of the network's shapes (text context, pooled vector, Flux guidance)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        extra = {}
        if spec["pooled"]:
            extra["pooled_output"] = torch.randn(1, spec["pooled"], generator=g)
        if "guidance" in spec:
            extra["guidance"] = spec["guidance"]
        out.append([[torch.randn(1, spec["tokens"], spec["context"], generator=g), extra]])
    return out[0], out[1]


def discriminator(kind: str, patcher, negative, latent_shape):
    """The speed benchmark's discriminators, in float32 (as discriminator files load), or a refusal."""
    from comfy_dg import identity
    from comfy_dg.taps import find_tap
    from harness.bench.speed import build_discriminator
    dm = patcher.model.diffusion_model
    tap = find_tap(dm)
    if kind != "standalone" and tap is None:
        raise Refused(f"no feature tap for a {identity.network(dm)} network")
    if kind == "features" and tap.install_fast_path is None:
        raise Refused(f"features from the sampler's own forward exist for UNets only (the taps with a fast path); "
                      f"a {identity.network(dm)} network takes the second pass (features_2pass)")
    return build_discriminator(kind, patcher, negative, latent_shape).float()


class Refused(Exception):
    """A configuration that does not exist for this model or device (the row says why)."""


# --- the child process ---------------------------------------------------------------------------------------

def emit(row: dict):
    print(ROW + json.dumps(row), flush=True)


def _start_comfyui(spec):
    """Import ComfyUI as its main.py starts on this machine: the device, and where the version has dynamic VRAM
    (ModelPatcherDynamic) and the device is NVIDIA, comfy-aimdo brought up before torch and the patcher made the
    default. Returns facts about the environment."""
    facts = {}
    dynamic = spec.get("patcher") == "dynamic"
    if dynamic:
        try:        # loaded already by BOOT, before torch; init() then only reports that it is
            import comfy_aimdo.control as aimdo
            facts["aimdo_loaded"] = bool(aimdo.init())
        except Exception as e:      # noqa: BLE001 - reported in the rows
            facts["aimdo_error"] = f"{type(e).__name__}: {e}"
    import torch
    from comfy_dg.comfy_env import ensure_comfyui
    ensure_comfyui(cpu=spec["device"] == "cpu")
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    facts["has_dynamic_patcher"] = hasattr(mp, "ModelPatcherDynamic")
    if dynamic:
        import comfy.memory_management
        import comfy_aimdo.control as aimdo
        if not facts.get("aimdo_loaded"):
            raise Refused(f"comfy-aimdo did not load ({facts.get('aimdo_error', 'init returned False')})")
        try:
            devices = [(d.index, 0) for d in mm.get_all_torch_devices()]
            try:
                ok = aimdo.init_devices(devices)
            except TypeError:       # older comfy-aimdo protocol
                ok = aimdo.init_devices(d for d, _ in devices)
        except Exception as e:      # noqa: BLE001
            raise Refused(f"comfy-aimdo could not start on this device ({type(e).__name__}: {e})") from None
        if not ok:
            raise Refused("comfy-aimdo found no device it supports")
        mp.CoreModelPatcher = mp.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    facts["patcher_class"] = "ModelPatcher" if spec.get("patcher") == "plain" else \
        getattr(mp, "CoreModelPatcher", mp.ModelPatcher).__name__
    facts["device"] = str(mm.get_torch_device())
    return facts


def _patcher_class(spec):
    import comfy.model_patcher as mp
    if spec.get("patcher") == "plain":
        return mp.ModelPatcher
    return getattr(mp, "CoreModelPatcher", mp.ModelPatcher)


def _cuda():
    import torch
    import comfy.model_management as mm
    return mm.get_torch_device().type == "cuda" and torch.cuda.is_available()


def _sync():
    import torch
    if _cuda():
        torch.cuda.synchronize()


def _mib(n):
    return round(n / 2 ** 20, 1)


def _free():
    import gc
    import torch
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _error(e: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def _reset_peak():
    import torch
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def _peak_mb():
    import torch
    if _cuda():
        return _mib(torch.cuda.max_memory_allocated())
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _count_tap_passes():
    """Counts the feature taps' own passes through the network (the second pass of a features head; the UNet tap's
    fast path reads the sampler's own forward and takes none)."""
    from comfy_dg.taps import TAPS
    counter = []
    for tap in TAPS.values():
        original = tap.features

        def counted(*args, _original=original, **kwargs):
            counter.append(1)
            return _original(*args, **kwargs)
        tap.features = staticmethod(counted)
    return counter


def sample_once(patcher, positive, negative, latent, steps, seed=0):
    """One KSampler run: what ComfyUI's KSampler node does (comfy.sample.prepare_noise + comfy.sample.sample),
    euler / normal, under inference mode as the executor runs it."""
    import torch
    import comfy.sample
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patcher, noise, steps, CFG, "euler", "normal", positive, negative, latent,
                                  seed=seed, disable_pbar=True)
    _sync()
    return out


def job_sampling(spec, base, deadline):
    import torch
    from comfy_dg import DGError, guide
    family, full = spec["family"], not spec["smoke"]
    passes = _count_tap_passes()
    for dtype_name in spec["dtypes"]:
        rows = {c: dict(base, dtype=dtype_name, config=c) for c in CONFIGS}
        if _weight_dtype(dtype_name) is None:
            for r in rows.values():
                emit(dict(r, status="refused", reason="this torch has no float8_e4m3fn"))
            continue
        if time.time() > deadline:
            for r in rows.values():
                emit(dict(r, status="skipped", reason="time budget"))
            continue
        patcher = None
        try:
            t = time.perf_counter()
            patcher, fam = build_model(family, dtype_name, full, _patcher_class(spec))
            build_s = time.perf_counter() - t
        except Exception as e:      # noqa: BLE001
            message = _error(e)
            for r in rows.values():
                emit(dict(r, status="error", reason=f"building the model: {message}"))
            _free()
            continue
        positive, negative = conditioning(fam)
        latent = torch.zeros(1, fam["channels"], fam["latent"], fam["latent"])
        params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
        unguided = None
        for config in CONFIGS:
            row = dict(rows[config], params=params, latent=fam["latent"], steps=spec["steps"],
                       manual_cast=fam["manual_cast"], build_s=round(build_s, 2),
                       patcher_class=type(patcher).__name__)
            if time.time() > deadline:
                emit(dict(row, status="skipped", reason="time budget"))
                continue
            model = disc = out = None
            try:
                model, disc_params = patcher, 0
                if config != "unguided":
                    disc = discriminator(config, patcher, negative, tuple(latent.shape[1:]))
                    disc_params = sum(p.numel() for p in disc.parameters())
                    model = guide(patcher, disc, weight=1.0)
                t = time.perf_counter()
                out = sample_once(model, positive, negative, latent, spec["steps"])       # warm-up: loads weights
                warm_s = time.perf_counter() - t
                del passes[:]
                _reset_peak()
                times = []
                for _ in range(spec["repeats"]):
                    t = time.perf_counter()
                    out = sample_once(model, positive, negative, latent, spec["steps"])
                    times.append(time.perf_counter() - t)
                seconds = statistics.median(times)
                row.update(status="ok", s_per_step=seconds / spec["steps"], times=[round(x, 4) for x in times],
                           warmup_s=round(warm_s, 3), peak_mb=_peak_mb(), disc_params=disc_params,
                           finite=bool(torch.isfinite(out).all()), second_passes=len(passes) // spec["repeats"])
                if _cuda():
                    free, total = torch.cuda.mem_get_info()
                    row.update(reserved_mb=_mib(torch.cuda.max_memory_reserved()), device_used_mb=_mib(total - free))
                if config == "unguided":
                    unguided = row
                elif unguided is not None:
                    row["ratio"] = row["s_per_step"] / unguided["s_per_step"]
                    row["vram_overhead"] = (row["peak_mb"] - unguided["peak_mb"]) / unguided["peak_mb"]
                emit(row)
            except (Refused, DGError) as e:     # the pack's own refusals (DGError) state their reason and fix
                emit(dict(row, status="refused", reason=str(e)))
            except Exception as e:      # noqa: BLE001 - an error is a result here
                emit(dict(row, status="error", reason=_error(e)))
                if _cuda():
                    torch.cuda.empty_cache()
            model = disc = out = None
        patcher = model = None
        _free()


def job_training(spec, base, deadline):
    import torch
    from comfy_dg.training.loop import Trainer, TrainConfig
    batch = 8 if spec["smoke"] else 64
    timed = 2 if spec["smoke"] else 10
    for family in spec["families"]:
        rows = [dict(base, family=family, dtype=spec["dtype"], config=a, batch=batch) for a in ARCHITECTURES]
        if time.time() > deadline:
            for r in rows:
                emit(dict(r, status="skipped", reason="time budget"))
            continue
        patcher = None
        try:
            patcher, fam = build_model(family, spec["dtype"], not spec["smoke"], _patcher_class(spec))
        except Exception as e:      # noqa: BLE001
            message = _error(e)
            for r in rows:
                emit(dict(r, status="error", reason=f"building the model: {message}"))
            _free()
            continue
        g = torch.Generator().manual_seed(0)
        shape = (4 * batch, fam["channels"], fam["latent"], fam["latent"])
        real, fake = torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.9
        for row in rows:
            if time.time() > deadline:
                emit(dict(row, status="skipped", reason="time budget"))
                continue
            try:
                # The steps are timed one by one (train_step); steps and eval_every only have to pass validation.
                config = TrainConfig(architecture=row["config"], steps=1000, batch_size=batch, eval_every=1000, seed=0)
                trainer = Trainer(patcher, real, fake, config)
                for _ in range(2):      # warm-up (kernels, the first augmentation, the model's load)
                    trainer.train_step()
                _sync()
                _reset_peak()
                t, done, losses = time.perf_counter(), 0, []
                while done < timed and time.time() < deadline:
                    losses.append(trainer.train_step())
                    done += 1
                _sync()
                dt = time.perf_counter() - t
                row.update(status="ok", steps_per_s=done / dt, s_per_step=dt / done, timed_steps=done,
                           peak_mb=_peak_mb(), latent=fam["latent"], device=str(trainer.device),
                           disc_params=sum(p.numel() for p in trainer.disc.parameters()),
                           finite=all(map(lambda v: v == v and abs(v) < float("inf"), losses)))
                emit(row)
                del trainer
            except Exception as e:      # noqa: BLE001
                emit(dict(row, status="error", reason=_error(e)))
            if _cuda():
                torch.cuda.empty_cache()
        del patcher
        _free()


def _proc_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return None


def job_autograd(spec, base, deadline):
    """The transient and kept memory of comfy_dg.tensors.autograd_weights on ComfyUI-loaded weights (what a
    features head's guidance does once per sampling run, in GuidancePatch.ready, and the Trainer once)."""
    import torch
    from comfy_dg.tensors import autograd_weights
    row = dict(base, family="sd15", dtype=spec["dtype"], config="autograd_weights")
    full = not spec["smoke"]
    try:
        patcher, fam = build_model("sd15", spec["dtype"], full, _patcher_class(spec))
        positive, negative = conditioning(fam)
        latent = torch.zeros(1, fam["channels"], fam["latent"], fam["latent"])
        sample_once(patcher, positive, negative, latent, 1)      # ComfyUI loads the weights under inference mode
        dm = patcher.model.diffusion_model
        params = list(dm.parameters())
        how = "loaded by ComfyUI under inference mode"
        if not any(p.is_inference() for p in params):
            # On the CPU nothing is moved, so nothing became an inference tensor: make them so, as a model built
            # or loaded inside a node is.
            how = "made under inference mode (a model built inside a node)"
            with torch.inference_mode():
                for m in dm.modules():
                    for name, p in list(m.named_parameters(recurse=False)):
                        setattr(m, name, torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))
            params = list(dm.parameters())
        weights_mb = _mib(sum(p.numel() * p.element_size() for p in params))
        inference = sum(p.is_inference() for p in params)
        on_device = {str(d) for d in {p.device for p in params}}
        n_params = len(params)
        del params      # a reference held here would keep every old weight alive: a "full copy" of our own making
        import gc
        gc.collect()
        if _cuda():
            _sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t = time.perf_counter()
            autograd_weights(dm)
            _sync()
            seconds = time.perf_counter() - t
            peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            memory = "cuda max_memory_allocated"
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")        # restart the peak-RSS count
            before = _proc_kb("VmRSS") * 1024
            t = time.perf_counter()
            autograd_weights(dm)
            seconds = time.perf_counter() - t
            peak, after = _proc_kb("VmHWM") * 1024, _proc_kb("VmRSS") * 1024
            memory = "process RSS (VmHWM after resetting it)"
        left = sum(p.is_inference() for p in dm.parameters())
        row.update(status="ok", weights_mb=weights_mb, inference_params=inference, params=n_params,
                   weights_on=sorted(on_device), how=how, transient_mb=_mib(peak - before),
                   kept_mb=_mib(after - before), copy_fraction=(peak - before) / max(1, weights_mb * 2 ** 20),
                   seconds=round(seconds, 3), inference_left=left, memory=memory,
                   patcher_class=type(patcher).__name__)
        emit(row)
        del patcher, dm
        _free()
    except Exception as e:      # noqa: BLE001
        emit(dict(row, status="error", reason=_error(e)))


def job_cli(spec, base, deadline):
    """The training CLI under torchrun with one process (nccl on a GPU, gloo on the CPU) for 10 steps."""
    import torch
    from comfy_dg.training.data import write_cache
    row = dict(base, family="sd15", dtype=spec["dtype"], config="torchrun_nproc1")
    folder = tempfile.mkdtemp(prefix="comfy_dg_gpu_cli_")
    try:
        t = time.perf_counter()
        ckpt = os.path.join(folder, "model.safetensors")
        if spec["smoke"]:
            from comfy_dg import small_models
            from harness.tiny import tiny_model
            small_models.save(tiny_model("EPS"), None, ckpt)
            side, batch, steps = 8, 8, 2
        else:
            from safetensors.torch import save_file
            patcher, _ = build_model("sd15", "fp16", True, _patcher_class(spec))
            sd = {f"model.diffusion_model.{k}": v.detach().to(torch.float16).cpu().contiguous()
                  for k, v in patcher.model.diffusion_model.state_dict().items()}
            save_file(sd, ckpt)
            del sd, patcher
            _free()
            side, batch, steps = 64, 64, 10
        g = torch.Generator().manual_seed(0)
        for name in ("real", "fake"):
            write_cache(os.path.join(folder, f"{name}.safetensors"), torch.randn(4 * batch, 4, side, side, generator=g),
                        {"kind": "gpu-bench"})
        prepare_s = time.perf_counter() - t
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "comfy_dg.train", "--checkpoint", ckpt, "--real-latents", os.path.join(folder, "real.safetensors"),
               "--fake-latents", os.path.join(folder, "fake.safetensors"), "--out", os.path.join(folder, "dg.safetensors"),
               "--architecture", "features", "--steps", str(steps), "--eval-every", str(steps),
               "--batch-size", str(batch)]
        env = dict(os.environ)
        if spec["device"] == "cpu":
            env["COMFY_DG_DEVICE"] = "cpu"
        t = time.perf_counter()
        timeout = max(30.0, deadline - time.time() + 60)
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        backend = next((b for b in ("nccl", "gloo") if f"({b})" in p.stdout), None)
        ok = p.returncode == 0 and "saved " in p.stdout
        row.update(status="ok" if ok else "error", wall_s=round(wall, 2), prepare_s=round(prepare_s, 2),
                   backend=backend, steps=steps, batch=batch, returncode=p.returncode)
        if not ok:
            tail = (p.stderr.strip() or p.stdout.strip()).splitlines()
            row["reason"] = f"exit {p.returncode}: {tail[-1][:300] if tail else 'no output'}"
        emit(row)
    except Exception as e:      # noqa: BLE001
        emit(dict(row, status="error", reason=_error(e)))
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def job_env(spec, base, deadline):
    import torch
    facts = dict(base, config="env", status="ok", torch=torch.__version__, python=sys.version.split()[0])
    try:
        import comfyui_version
        facts["comfyui_version"] = comfyui_version.__version__      # shown only; nothing depends on it
    except Exception:       # noqa: BLE001
        facts["comfyui_version"] = None
    import comfy.model_management as mm
    facts["cuda"] = torch.version.cuda
    if _cuda():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["vram_mb"] = _mib(torch.cuda.get_device_properties(0).total_memory)
    fp8 = _weight_dtype("fp8")
    facts["fp8_weights"] = fp8 is not None
    if fp8 is not None:
        cast = mm.unet_manual_cast(fp8, mm.get_torch_device())
        facts["fp8_compute_dtype"] = None if cast is None else str(cast).replace("torch.", "")
        facts["fp8_compute"] = bool(getattr(mm, "supports_fp8_compute", lambda *_: False)(mm.get_torch_device()))
    try:
        import comfy_kitchen
        registry = getattr(comfy_kitchen, "registry", None)
        facts["comfy_kitchen"] = {b: bool(registry.is_available(b)) for b in ("cuda", "triton", "eager")} \
            if registry is not None and hasattr(registry, "is_available") else "imported"
    except ImportError:
        facts["comfy_kitchen"] = None
    emit(facts)


JOBS = {"sampling": job_sampling, "training": job_training, "autograd": job_autograd, "cli": job_cli,
        "env": job_env}


def child(spec):
    base = {"section": spec["job"], "comfyui": spec["label"], "patcher": spec.get("patcher", "default"),
            "family": spec.get("family")}
    try:
        facts = _start_comfyui(spec)
    except Refused as e:
        emit(dict(base, status="refused", reason=str(e), config="start"))
        return
    base["patcher_class"] = facts["patcher_class"]
    if spec["job"] == "env":
        base.update({k: v for k, v in facts.items() if k != "patcher_class"})
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    JOBS[spec["job"]](spec, base, spec["deadline"])


# --- the parent: jobs, rows, the table and the JSON line -------------------------------------------------------

class Run:
    def __init__(self, a, out_dir):
        self.a, self.out_dir = a, out_dir
        self.rows, self.env = [], {}
        self.start = time.time()
        self.deadline = self.start + a.budget
        self.log = open(os.path.join(out_dir, "gpu_bench.log"), "a") if out_dir else None

    def say(self, text):
        print(text, file=sys.stderr, flush=True)

    def child(self, spec, expected):
        """Run one child; its rows, with `expected` rows it did not produce recorded as errors."""
        label = f"{spec['job']} {spec.get('family') or ''} {spec['label']} {spec.get('patcher', '')}".replace("  ", " ")
        if time.time() > self.deadline - 5:
            rows = [dict(r, status="skipped", reason="time budget") for r in expected]
            self.rows += rows
            return rows
        spec = dict(spec, deadline=self.deadline, device=self.a.device, smoke=self.a.smoke, threads=self.a.threads)
        env = dict(os.environ, COMFYUI_PATH=spec["comfyui"], PYTHONUNBUFFERED="1")
        if self.a.device == "cpu":
            env["COMFY_DG_DEVICE"] = "cpu"
        cmd = [sys.executable, "-c", BOOT, json.dumps(spec)]
        t = time.perf_counter()
        rows, err = [], None
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=max(20.0, self.deadline - time.time() + 90))
            out, errout, code = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            errout = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            code, err = None, "killed: ran past the time budget"
        if self.log:
            self.log.write(f"=== {label} ({time.perf_counter() - t:.0f} s, exit {code})\n{out}\n{errout}\n")
            self.log.flush()
        for line in out.splitlines():
            if line.startswith(ROW):
                rows.append(json.loads(line[len(ROW):]))
        if err is None and code != 0:
            last = [ln for ln in errout.strip().splitlines() if ln.strip()]
            err = f"the process ended with exit {code}: {last[-1][:300] if last else 'no output'}"
        key = lambda r: (r.get("family"), r.get("dtype"), r.get("config"))     # noqa: E731
        got = {key(r) for r in rows}
        if not rows and err:
            self.say(f"  {label}: {err}")
        start_refusal = next((r for r in rows if r.get("config") == "start"), None)
        for r in expected:
            if key(r) not in got:
                if start_refusal is not None:
                    rows.append(dict(r, status="refused", reason=start_refusal["reason"]))
                else:
                    rows.append(dict(r, status="error", reason=err or "the process did not report this row"))
        rows = [r for r in rows if r.get("config") != "start"]
        self.say(f"  {label}: {len(rows)} rows in {time.perf_counter() - t:.0f} s")
        self.rows += rows
        self.save()
        return rows

    def save(self, final=None):
        if not self.out_dir:
            return
        with open(os.path.join(self.out_dir, "gpu_bench.json"), "w") as f:
            json.dump(final or {"benchmark": "gpu", "partial": True, "rows": self.rows, "env": self.env}, f)


def _expected(base, families, dtypes, configs):
    return [dict(base, family=f, dtype=d, config=c) for f in families for d in dtypes for c in configs]


def plan_and_run(run: Run, versions, labels):
    a = run.a
    smoke = a.smoke
    sections = a.sections
    # 1. Each version's environment: what it has decides its patchers and whether fp8 runs.
    for v in versions:
        base = {"section": "env", "comfyui": labels[v], "patcher": "default", "family": None}
        rows = run.child({"job": "env", "comfyui": v, "label": labels[v]}, [dict(base, config="env")])
        run.env[labels[v]] = rows[0] if rows else {}
    patchers = {}
    for v in versions:
        env = run.env[labels[v]]
        dynamic = env.get("has_dynamic_patcher") and a.device == "cuda"
        patchers[v] = ["dynamic", "plain"] if dynamic else ["default"]

    def dtypes_for(v, family):
        names = [d for d in a.dtypes if d != "fp8" or run.env[labels[v]].get("fp8_weights")]
        if family == "flux" and not smoke:
            names.sort(key=lambda d: {"bf16": 0, "fp8": 1, "fp16": 2}[d])   # Flux's own dtype first
        return names

    # 2. Correctness (pytest on the device).
    if "correctness" in sections:
        for v in versions:
            correctness(run, v, labels[v])
    jobs = []
    fams = [f for f in a.families]
    # 3. In order of what matters most: the SDXL targets, training, SD1.5, the autograd copy, the CLI, Flux, and
    #    last the plain patcher where the default is the dynamic one.
    if "sampling" in sections and "sdxl" in fams:
        jobs += [("sampling", v, patchers[v][0], "sdxl") for v in versions]
    if "training" in sections:
        jobs += [("training", v, patchers[v][0], None) for v in versions]
    if "sampling" in sections and "sd15" in fams:
        jobs += [("sampling", v, patchers[v][0], "sd15") for v in versions]
    if "autograd" in sections:
        jobs += [("autograd", v, p, None) for v in versions for p in patchers[v]]
    if "cli" in sections:
        jobs += [("cli", v, patchers[v][0], None) for v in versions]
    if "sampling" in sections and "flux" in fams:
        jobs += [("sampling", v, patchers[v][0], "flux") for v in versions]
    if "sampling" in sections:
        jobs += [("sampling", v, "plain", f) for v in versions if len(patchers[v]) > 1
                 for f in ("sdxl",) if f in fams]
    for job, v, patcher, family in jobs:
        base = {"section": job, "comfyui": labels[v], "patcher": patcher, "family": family}
        spec = {"job": job, "comfyui": v, "label": labels[v], "patcher": patcher, "family": family,
                "steps": a.steps, "repeats": a.repeats}
        if job == "sampling":
            dts = dtypes_for(v, family)
            if patcher == "plain" and not smoke:
                dts = dts[:1]
            spec["dtypes"] = dts
            expected = _expected(base, [family], dts, CONFIGS)
        elif job == "training":
            spec.update(families=[f for f in TRAIN_FAMILIES if f in fams], dtype="fp16")
            expected = _expected(base, spec["families"], ["fp16"], ARCHITECTURES)
        elif job == "autograd":
            spec["dtype"] = "fp32" if a.device == "cpu" and not smoke else "fp16"
            expected = [dict(base, family="sd15", dtype=spec["dtype"], config="autograd_weights")]
        else:
            spec["dtype"] = "fp16"
            expected = [dict(base, family="sd15", dtype="fp16", config="torchrun_nproc1")]
        run.child(spec, expected)


def correctness(run: Run, version, label):
    """tests/test_device_correctness.py under pytest on ComfyUI's device; one row per test."""
    import xml.etree.ElementTree as ET
    base = {"section": "correctness", "comfyui": label, "patcher": "ModelPatcher", "family": None, "dtype": None}
    if time.time() > run.deadline - 5:
        run.rows.append(dict(base, config="tests/test_device_correctness.py", status="skipped", reason="time budget"))
        return
    xml = os.path.join(tempfile.mkdtemp(prefix="comfy_dg_gpu_tests_"), "junit.xml")
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device_correctness.py",
           f"--junitxml={xml}"]
    if run.a.smoke:
        cmd += ["-k", SMOKE_TESTS]
    env = dict(os.environ, COMFYUI_PATH=version, COMFY_DG_TEST_DEVICE=run.a.device)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=max(20.0, run.deadline - time.time() + 60))
        if run.log:
            run.log.write(f"=== correctness {label}\n{p.stdout[-20000:]}\n{p.stderr[-5000:]}\n")
        cases = ET.parse(xml).getroot().iter("testcase") if os.path.exists(xml) else []
        n = 0
        for case in cases:
            n += 1
            problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            status = "ok" if problem is None else ("skipped" if problem.tag == "skipped" else "error")
            row = dict(base, config=case.get("name"), status=status, seconds=round(float(case.get("time", 0)), 2))
            if problem is not None:
                row["reason"] = (problem.get("message") or problem.tag).strip().splitlines()[0][:300]
            run.rows.append(row)
        if n == 0:
            tail = (p.stdout.strip() or p.stderr.strip()).splitlines()
            run.rows.append(dict(base, config="tests/test_device_correctness.py", status="error",
                                 reason=f"pytest exit {p.returncode}: {tail[-1][:300] if tail else 'no output'}"))
    except subprocess.TimeoutExpired:
        run.rows.append(dict(base, config="tests/test_device_correctness.py", status="error",
                             reason="killed: ran past the time budget"))
    run.say(f"  correctness {label}: {time.perf_counter() - t:.0f} s")
    run.save()


# --- the report --------------------------------------------------------------------------------------------------

def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _note(r):
    if r["status"] == "ok":
        return "" if r.get("finite", True) else "non-finite output (random weights)"
    return f"{r['status']}: {r.get('reason', '')}"


def verdicts(rows):
    """One verdict per target, per ComfyUI version and patcher (and dtype for sampling)."""
    out = []
    ok = [r for r in rows if r.get("status") == "ok"]
    groups = sorted({(r["comfyui"], r["patcher"], r["dtype"]) for r in rows
                     if r["section"] == "sampling" and r["family"] == "sdxl"}, key=str)
    for comfyui, patcher, dtype in groups:
        got = {r["config"]: r for r in ok if r["section"] == "sampling" and r["family"] == "sdxl"
               and (r["comfyui"], r["patcher"], r["dtype"]) == (comfyui, patcher, dtype)}
        for config, key, limit in (("standalone", "ratio", TARGETS["standalone_ratio"]),
                                   ("features", "ratio", TARGETS["features_ratio"]),
                                   ("standalone", "vram_overhead", TARGETS["vram_overhead"]),
                                   ("features", "vram_overhead", TARGETS["vram_overhead"])):
            value = got.get(config, {}).get(key)
            out.append({"target": f"sdxl {config} {'s/step' if key == 'ratio' else 'VRAM'}", "comfyui": comfyui,
                        "patcher": patcher, "dtype": dtype, "value": value, "limit": limit,
                        "verdict": "not measured" if value is None else ("met" if value <= limit else "not met")})
    for comfyui, patcher in sorted({(r["comfyui"], r["patcher"]) for r in rows if r["section"] == "training"}):
        r = next((r for r in ok if r["section"] == "training" and r["family"] == "sd15" and r["config"] == "features"
                  and (r["comfyui"], r["patcher"]) == (comfyui, patcher)), None)
        value = None if r is None else r["steps_per_s"]
        out.append({"target": "sd15 features training steps/s", "comfyui": comfyui, "patcher": patcher,
                    "dtype": "fp16", "value": value, "limit": TARGETS["train_steps_per_s"],
                    "verdict": "not measured" if value is None else
                    ("met" if value >= TARGETS["train_steps_per_s"] else "not met")})
    return out


def report(run: Run, smoke: bool):
    rows = run.rows
    lines = []
    w = lines.append
    envs = [r for r in rows if r["section"] == "env"]
    w("## Environment")
    for e in envs:
        w(f"- ComfyUI {e['comfyui']}: {e.get('gpu') or 'cpu'}, torch {e.get('torch')} (CUDA {e.get('cuda')}), "
          f"Python {e.get('python')}; dynamic-VRAM patcher: {'yes' if e.get('has_dynamic_patcher') else 'no'}; "
          f"fp8 weights: {e.get('fp8_weights')} (compute {e.get('fp8_compute_dtype')}); comfy_kitchen: "
          f"{e.get('comfy_kitchen')}" if e["status"] == "ok" else f"- ComfyUI {e['comfyui']}: {_note(e)}")
    w("")
    w("## Sampling (euler, cfg 7, batch 1; s/step median after a warm-up; peak VRAM = max_memory_allocated)")
    w("")
    w("| ComfyUI | patcher | model | dtype | config | s/step | × unguided | peak MiB | +% VRAM | 2nd passes | note |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["section"] == "sampling"):
        w(f"| {r['comfyui']} | {r.get('patcher_class') or r['patcher']} | {r['family']} | {r['dtype']} | {r['config']} | "
          f"{_fmt(r.get('s_per_step'), '.4f')} | {_fmt(r.get('ratio'), '.3f')} | {_fmt(r.get('peak_mb'), '.0f')} | "
          f"{'' if r.get('vram_overhead') is None else format(100 * r['vram_overhead'], '+.1f') + '%'} | "
          f"{_fmt(r.get('second_passes'), 'd')} | {_note(r)} |")
    w("")
    w("## Training (the pack's Trainer; batch half real, half fake)")
    w("")
    w("| ComfyUI | patcher | model | architecture | batch | steps/s | peak MiB | note |")
    w("|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["section"] == "training"):
        w(f"| {r['comfyui']} | {r.get('patcher_class') or r['patcher']} | {r['family']} | {r['config']} | "
          f"{r.get('batch', '')} | {_fmt(r.get('steps_per_s'), '.2f')} | {_fmt(r.get('peak_mb'), '.0f')} | {_note(r)} |")
    w("")
    w("## Training CLI under torchrun --nproc_per_node=1")
    w("")
    w("| ComfyUI | backend | steps | batch | wall s (with start and load) | note |")
    w("|---|---|---|---|---|---|")
    for r in (r for r in rows if r["section"] == "cli"):
        w(f"| {r['comfyui']} | {r.get('backend') or ''} | {r.get('steps', '')} | {r.get('batch', '')} | "
          f"{_fmt(r.get('wall_s'), '.1f')} | {_note(r)} |")
    w("")
    w("## autograd_weights: replacing inference-mode weights for autograd")
    w("")
    w("| ComfyUI | patcher | weights MiB | transient MiB | × weights | kept MiB | s | weights were | note |")
    w("|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["section"] == "autograd"):
        w(f"| {r['comfyui']} | {r.get('patcher_class') or r['patcher']} | {_fmt(r.get('weights_mb'), '.0f')} | "
          f"{_fmt(r.get('transient_mb'), '.0f')} | {_fmt(r.get('copy_fraction'), '.3f')} | "
          f"{_fmt(r.get('kept_mb'), '.0f')} | {_fmt(r.get('seconds'), '.3f')} | {r.get('how', '')} | {_note(r)} |")
    w("")
    w("## Correctness on the device (tests/test_device_correctness.py)")
    w("")
    w("| ComfyUI | test | result |")
    w("|---|---|---|")
    for r in (r for r in rows if r["section"] == "correctness"):
        w(f"| {r['comfyui']} | {r['config']} | {'passed' if r['status'] == 'ok' else _note(r)} |")
    w("")
    w("## Targets" + (" (smoke run: tiny models on the CPU, not the targets' setting)" if smoke else ""))
    w("")
    vs = verdicts(rows)
    for v in vs:
        if v["value"] is None:
            shown = "—"
        elif "VRAM" in v["target"]:
            shown = f"{100 * v['value']:+.1f}% (≤ +{100 * v['limit']:.0f}%)"
        elif "training" in v["target"]:
            shown = f"{v['value']:.2f} (≥ {v['limit']:g})"
        else:
            shown = f"{v['value']:.3f}× (≤ {v['limit']:.2f}×)"
        w(f"- {v['target']}, ComfyUI {v['comfyui']}, {v['patcher']}, {v['dtype']}: {shown}: {v['verdict']}")
    return "\n".join(lines), vs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, fast: the same code path, for CI")
    p.add_argument("--comfyui", nargs="+", default=None, help="ComfyUI folders to measure, one child each "
                   "(default: COMFYUI_PATH or the repo's .comfyui)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 330; smoke 1500)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per run (default 3; smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the children (0: torch's default)")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu_bench.json/.md/.log "
                   "(default: $OUT when set)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return 0

    a.sections = [s for s in a.sections.split(",") if s]
    a.families = [f for f in a.families.split(",") if f]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    for name, given, known in (("sections", a.sections, SECTIONS), ("families", a.families, FAMILIES),
                               ("dtypes", a.dtypes, DTYPES)):
        if set(given) - set(known):
            p.error(f"unknown {name} {sorted(set(given) - set(known))}; choose from {', '.join(known)}")
    a.budget = a.budget or (1500.0 if a.smoke else 330.0)
    a.steps = a.steps or (1 if a.smoke else 3)
    a.repeats = a.repeats or (1 if a.smoke else 2)
    if a.smoke:
        a.threads = a.threads or 1
    # The children decide the device as ComfyUI would; --smoke and COMFY_DG_DEVICE=cpu force the CPU.
    a.device = "cpu" if a.smoke or os.environ.get("COMFY_DG_DEVICE") == "cpu" else _cuda_available()
    from comfy_dg.comfy_env import comfyui_path
    versions = [os.path.abspath(v) for v in (a.comfyui or [comfyui_path()])]
    labels = {}
    for v in versions:
        labels[v] = _version_label(v, labels.values())
    out_dir = a.out
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    run = Run(a, out_dir)
    run.say(f"comfy-dg gpu benchmark: {', '.join(labels.values())} on {a.device}; budget {a.budget:.0f} s")
    plan_and_run(run, versions, labels)
    table, vs = report(run, a.smoke)
    wall = time.time() - run.start
    print(table)
    print()
    counts = {s: sum(r["status"] == s for r in run.rows) for s in STATUSES}
    print(f"{len(run.rows)} rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; wall {wall:.0f} s")
    result = {"benchmark": "gpu", "smoke": a.smoke, "device": a.device, "budget_s": a.budget, "wall_s": round(wall, 1),
              "steps": a.steps, "repeats": a.repeats, "cfg": CFG, "versions": list(labels.values()),
              "env": run.env, "counts": counts, "targets": TARGETS, "verdicts": vs, "rows": run.rows}
    run.save(result)
    if out_dir:
        with open(os.path.join(out_dir, "gpu_bench.md"), "w") as f:
            f.write(table + "\n")
    print(json.dumps(result), flush=True)
    return 0


def _cuda_available():
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _version_label(path, taken):
    """The version ComfyUI names itself (shown only), or the folder's name."""
    label = os.path.basename(os.path.normpath(path))
    try:
        text = open(os.path.join(path, "comfyui_version.py")).read()
        label = text.split("__version__")[1].split("=")[1].strip().split()[0].strip("\"'")
    except (OSError, IndexError):
        pass
    while label in taken:
        label += "'"
    return label


if __name__ == "__main__":
    sys.exit(main())
