"""Command-line trainer for big runs: `python -m comfy_dg.train` (one process) or, data-parallel,
`torchrun --nproc_per_node=N -m comfy_dg.train` with the same options.

    python -m comfy_dg.train --checkpoint sd15.safetensors --real photos/ --out my_dg.safetensors \\
        --prompt "a photo" --resolution 512 --steps 4000

Real images are encoded with the checkpoint's VAE and fakes are sampled from the checkpoint itself, both cached
in '<out stem>.cache/' (or --cache), so a re-run skips that work; --real-latents / --fake-latents take latents
prepared elsewhere (a safetensors file with one 'latents' tensor (N, C, h, w), as the caches are written).

Every evaluation the training state is written to '<out stem>.train-state.safetensors' (tensors, with the
facts as JSON in the safetensors metadata; nothing is ever pickled). Running the same command again resumes
from it and ends with exactly the discriminator an uninterrupted run gives; --restart discards it. The
discriminator is written to --out only at the end (atomically: an interrupted run leaves an old file intact),
then the state file is deleted.

Under torchrun, rank 0 alone prepares the data (and writes every file); the others receive the latents from
it, and each process trains on its own rows of every global batch (DistributedDataParallel: nccl on GPUs,
gloo on the CPU).
"""
import argparse
import dataclasses
import datetime
import json
import os
import struct
import sys
import time

import torch

from ..errors import DGError
from ..options import TRAINING, from_widget

STATE_FORMAT = "1"


class CLIError(DGError):
    pass


class PeerFailed(CLIError):
    """Raised on ranks > 0 when rank 0 failed (rank 0 reports the reason)."""


# --- options -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m comfy_dg.train",
        description="Train a Discriminator Guidance discriminator for a ComfyUI checkpoint (resumable; "
                    "multi-process under torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and output")
    g.add_argument("--checkpoint", required=True, help="ComfyUI checkpoint (.safetensors) with model, CLIP and VAE")
    g.add_argument("--out", required=True, help="the discriminator file to write (.safetensors)")
    g.add_argument("--cache", default=None, help="folder for cached latents (default: '<out stem>.cache' next to "
                                                 "--out)")
    g.add_argument("--restart", action="store_true", help="ignore (and delete) a saved training state instead "
                                                          "of resuming from it")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    g.add_argument("--dist-timeout", type=float, default=24 * 60, metavar="MINUTES",
                   help="under torchrun: how long processes wait for each other (rank 0 prepares the data alone)")

    g = p.add_argument_group("real data")
    g.add_argument("--real", metavar="FOLDER", help="folder of real images (png, jpg, webp; subfolders included)")
    g.add_argument("--real-latents", metavar="FILE", help="real latents instead of --real: a .safetensors file "
                                                          "with a 'latents' tensor (N, C, h, w)")
    g.add_argument("--resolution", type=int, default=None,
                   help="images are resized and center-cropped to this size; fakes are sampled at it "
                        "(default 512, or the size of --real-latents)")
    g.add_argument("--encode-batch", type=int, default=8, help="images encoded at once")

    g = p.add_argument_group("fake data (the checkpoint's own samples)")
    g.add_argument("--fake-latents", metavar="FILE", help="fake latents instead of sampling them (as --real-latents)")
    g.add_argument("--fakes", type=int, default=None, help="how many fakes to sample (default: as many as reals)")
    g.add_argument("--fake-batch", type=int, default=4, help="fakes sampled at once")
    g.add_argument("--prompt", default="", help="positive prompt for the fakes (and the prompt --objective "
                                                         "reconstruction takes the denoiser under)")
    g.add_argument("--negative", default="", help="negative prompt for the fakes")
    g.add_argument("--under-negative", action="store_true",
                   help="features only (UNets): take the features under --negative, as the sampler's uncond pass "
                        "does; guiding with that same negative prompt then needs no second pass (faster)")
    g.add_argument("--sampler", default="euler")
    g.add_argument("--scheduler", default="normal")
    g.add_argument("--sample-steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=7.0)

    add_options(p.add_argument_group("training"), TRAINING)
    return p


def add_options(group, table):
    """One flag per option of the table, with its default, range and help."""
    for o in table.values():
        if not o.cli:
            continue
        flag = o.flag or "--" + o.name.replace("_", "-")
        if o.kind is bool:
            group.add_argument(flag, dest=o.name, action=argparse.BooleanOptionalAction, default=o.default,
                               help=o.help)
            continue
        default = o.none_is if o.default is None else o.default
        extra = {"choices": o.choices} if o.choices else {}
        span = f" [{o.min:g}..{o.max:g}]" if o.min is not None else ""
        group.add_argument(flag, dest=o.name, type=o.kind, default=default, help=o.help + span, **extra)


def train_config(a):
    from .loop import TrainConfig
    return TrainConfig(**{o.name: from_widget(o, getattr(a, o.name)) for o in TRAINING.values() if o.cli})


def out_stem(out: str) -> str:
    return out[:-len(".safetensors")]


def state_path(out: str) -> str:
    return out_stem(out) + ".train-state.safetensors"


def check_args(a, world=1):
    """Everything that can be checked before loading the checkpoint."""
    import comfy.samplers
    if not a.out.endswith(".safetensors"):
        raise CLIError(f"comfy-dg: --out must be a .safetensors file; got '{a.out}'")
    if os.path.isdir(a.out):
        raise CLIError(f"comfy-dg: --out '{a.out}' is a folder; give a file name ending in .safetensors")
    from ..locations import check_output_path
    check_output_path(a.out, ".train-state.safetensors")   # before hours of work, not at the end (a DGError)
    from ..files import PICKLE_SUFFIXES
    if a.checkpoint.lower().endswith(PICKLE_SUFFIXES):
        raise CLIError(f"comfy-dg: '{a.checkpoint}' is a pickle-based file, and unpickling can run any code hidden "
                       "in it, so comfy-dg does not open it. Use the .safetensors version of the checkpoint.")
    if not os.path.isfile(a.checkpoint):
        raise CLIError(f"comfy-dg: no checkpoint file '{a.checkpoint}'")
    if a.under_negative and a.architecture != "features":
        raise CLIError("comfy-dg: --under-negative is for --architecture features")
    if (a.real is None) == (a.real_latents is None):
        raise CLIError("comfy-dg: give the real data as exactly one of --real FOLDER or --real-latents FILE")
    if a.fake_latents is not None and a.fakes is not None:
        raise CLIError("comfy-dg: --fakes sets how many fakes to sample; with --fake-latents nothing is sampled")
    for name in ("real_latents", "fake_latents"):
        path = getattr(a, name)
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"comfy-dg: no such file '{path}' (--{name.replace('_', '-')})")
    for name in ("encode_batch", "fake_batch", "sample_steps"):
        if getattr(a, name) < 1:
            raise CLIError(f"comfy-dg: --{name.replace('_', '-')} must be ≥ 1")
    if a.fakes is not None and a.fakes < 2:
        raise CLIError("comfy-dg: --fakes must be ≥ 2")
    if a.resolution is not None and (a.resolution < 8 or a.resolution % 8):
        raise CLIError(f"comfy-dg: --resolution must be a positive multiple of 8; got {a.resolution}")
    if a.fake_latents is None:
        if a.sampler not in comfy.samplers.SAMPLER_NAMES:
            raise CLIError(f"comfy-dg: unknown --sampler '{a.sampler}'; one of: {', '.join(comfy.samplers.SAMPLER_NAMES)}")
        if a.scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise CLIError(f"comfy-dg: unknown --scheduler '{a.scheduler}'; one of: "
                           f"{', '.join(comfy.samplers.SCHEDULER_NAMES)}")
    if a.real is not None:
        from .data import list_images
        list_images(a.real)           # a missing or empty folder fails now, before the checkpoint is loaded
    train_config(a).validate()
    if a.batch_size % (2 * world):
        raise CLIError(f"comfy-dg: --batch-size {a.batch_size} must split evenly into real and fake halves across "
                       f"{world} process(es): make it a multiple of {2 * world}")


# --- processes -----------------------------------------------------------------------------------------
class Processes:
    """One process, or one rank of a torchrun job (RANK / WORLD_SIZE / LOCAL_RANK in the environment)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Under torchrun the process group is started even for one process, so that `--nproc_per_node=1` runs
        # the same code (nccl or gloo, DistributedDataParallel) as a larger job, e.g. to check it on one GPU.
        self.distributed = self.world > 1 or ("MASTER_ADDR" in os.environ and "RANK" in os.environ)
        self.backend = None
        self.started = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, timeout_minutes: float):
        self.cpu_group = None
        if self.distributed:
            import torch.distributed as dist
            timeout = datetime.timedelta(minutes=timeout_minutes)
            # The Trainer works on the model's load device: gradients are all-reduced by nccl on GPUs, gloo on
            # the CPU; the data itself is shared from rank 0 as CPU bytes, over a gloo group.
            if torch.cuda.is_available() and os.environ.get("COMFY_DG_DEVICE") != "cpu":
                torch.cuda.set_device(self.local_rank)
                dist.init_process_group("nccl", timeout=timeout)
                self.cpu_group = dist.new_group(backend="gloo", timeout=timeout)
            else:
                dist.init_process_group("gloo", timeout=timeout)
            self.backend = dist.get_backend()
            self.started = True

    def stop(self):
        if self.started:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.started = False

    def share(self, payload: bytes | None) -> bytes:
        """Rank 0's bytes, on every rank (raw bytes: nothing is pickled)."""
        if self.world == 1:
            return payload
        import torch.distributed as dist
        n = torch.tensor([len(payload) if self.main else 0], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.cpu_group)
        if int(n) == 0:
            return b""
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.main \
            else torch.empty(int(n), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.cpu_group)
        return payload if self.main else buf.numpy().tobytes()


def pack(tensors: dict, meta: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)


def unpack(blob: bytes):
    """(tensors, metadata) of a safetensors blob."""
    from safetensors.torch import load
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8:8 + n]).get("__metadata__") or {}
    return load(blob), meta


# --- model and data ------------------------------------------------------------------------------------
def load_model(path):
    """(model, clip or None, vae, small): a ComfyUI checkpoint, or a small model (comfy_dg.small_models)."""
    from .. import small_models
    if small_models.is_small_model(path):
        model, vae = small_models.load(path)
        return model, None, vae, True
    import comfy.sd
    try:
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                    embedding_directory=None)
    except Exception as e:
        raise CLIError(f"comfy-dg: cannot load checkpoint '{path}' ({e}). Give a ComfyUI checkpoint with model, "
                       "CLIP and VAE.") from None
    model, clip, vae = out[:3]
    if model is None:
        raise CLIError(f"comfy-dg: '{path}' holds no diffusion model ComfyUI recognises")
    return model, clip, vae, False


def read_latents(path, what):
    from safetensors.torch import load_file
    if not path.endswith(".safetensors"):
        raise CLIError(f"comfy-dg: {what} latents must be a .safetensors file with a 'latents' tensor; got '{path}'")
    try:
        latents = load_file(path)
    except Exception as e:
        raise CLIError(f"comfy-dg: cannot read {what} latents '{path}' ({e})") from None
    if "latents" not in latents:
        raise CLIError(f"comfy-dg: '{path}' has no 'latents' tensor (it has: {sorted(latents)[:5]})")
    latents = latents["latents"]
    if latents.ndim != 4:
        raise CLIError(f"comfy-dg: {what} latents in '{path}' must be a batch (N, C, h, w); got shape "
                       f"{tuple(latents.shape)}")
    return latents.float()


class Bars:
    """The progress bar of one data phase (rank 0 alone prepares data); `used` tells work from a cache hit."""

    def __init__(self):
        self.bar, self.used = None, False

    def callback(self, desc, unit):
        def progress(done, total):
            self.used = True
            from tqdm import tqdm
            if self.bar is None:
                self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
            self.bar.update(done - self.bar.n)
        return progress

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def say(*parts):
    from tqdm import tqdm
    tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
    sys.stdout.flush()


def under_negative(a, model, clip, small, latent_shape):
    """--under-negative: the (context, y) the network gets for --negative, or None."""
    if not a.under_negative:
        return None
    from .conditioning import negative_conditioning
    if small:
        from ..small_models import null_conditioning
        negative = null_conditioning(model)[1]      # small models have no text encoder: their fakes' negative
    elif clip is None:
        raise CLIError(f"comfy-dg: '{a.checkpoint}' has no text encoder to encode --negative for --under-negative")
    else:
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(a.negative))
    return negative_conditioning(model, negative, latent_shape)


def sampling_prompt(a, model, clip, small, latent_shape):
    """--objective reconstruction: the model's inputs for --prompt (conditioning.prompt_conds), or None."""
    if a.objective != "reconstruction":
        return None
    from .conditioning import prompt_conds
    if small:
        from ..small_models import null_conditioning
        positive = null_conditioning(model)[0]      # small models have no text encoder: their fakes' positive
    elif clip is None:
        raise CLIError(f"comfy-dg: '{a.checkpoint}' has no text encoder to encode --prompt for the reconstruction "
                       "objective")
    else:
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(a.prompt))
    return prompt_conds(model, positive, latent_shape)


def prepare_data(a, model, clip, vae, small, cache):
    """(real, fake, provenance) on rank 0: encoded or read, sampled or read; caches in `cache`."""
    from .data import encode_folder, list_images, sample_fakes
    provenance = {}
    if a.real is not None:
        resolution = a.resolution or 512
        count = len(list_images(a.real))
        bars = Bars()
        try:
            real = encode_folder(a.real, vae, resolution, a.encode_batch, cache,
                                 progress=bars.callback("encoding real images", "img"))
        finally:
            bars.close()
        say(f"real: {len(real)} images of {a.real} at {resolution}px -> latents {tuple(real.shape[1:])}"
            f"{'' if bars.used else ' (from the cache)'}")
        assert len(real) == count
        width = height = resolution
        provenance["real"] = {"folder": os.path.basename(os.path.normpath(a.real)), "resolution": resolution}
    else:
        real = read_latents(a.real_latents, "real")
        say(f"real: {len(real)} latents {tuple(real.shape[1:])} from {a.real_latents}")
        height, width = real.shape[2] * 8, real.shape[3] * 8
        if a.resolution is not None and (a.resolution, a.resolution) != (height, width):
            raise CLIError(f"comfy-dg: --resolution {a.resolution} does not fit the real latents "
                           f"{tuple(real.shape[1:])} ({width}×{height} images)")
        provenance["real"] = {"latents": os.path.basename(a.real_latents)}
    if a.fake_latents is not None:
        fake = read_latents(a.fake_latents, "fake")
        say(f"fake: {len(fake)} latents {tuple(fake.shape[1:])} from {a.fake_latents}")
        provenance["fake"] = {"latents": os.path.basename(a.fake_latents)}
        return real, fake, provenance
    channels = model.model.latent_format.latent_channels
    if real.shape[1] != channels:
        raise CLIError(f"comfy-dg: the real latents have {real.shape[1]} channels but the model's latent space has "
                       f"{channels}: encode them with this model's VAE.")
    count = a.fakes or len(real)
    if count < 2:
        raise CLIError("comfy-dg: need at least 2 fakes (and so at least 2 real images)")
    if small:
        from ..small_models import null_conditioning
        positive, negative = null_conditioning(model)      # small models have no text encoder: prompts unused
    else:
        if clip is None:
            raise CLIError(f"comfy-dg: '{a.checkpoint}' has no text encoder to encode the prompts for the fakes; "
                           "give --fake-latents instead.")
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(a.prompt))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(a.negative))
    bars = Bars()
    try:
        fake = sample_fakes(model, positive, negative, count, a.fake_batch, a.seed, a.sample_steps, a.cfg,
                            a.sampler, a.scheduler, width, height, cache,
                            progress=bars.callback("sampling fakes", "img"))
    finally:
        bars.close()
    say(f"fake: {len(fake)} samples ({a.sampler}/{a.scheduler}, {a.sample_steps} steps, cfg {a.cfg}, seed {a.seed})"
        f"{'' if bars.used else ' (from the cache)'}")
    provenance["fake"] = {"sampled": count, "sampler": a.sampler, "scheduler": a.scheduler,
                          "steps": a.sample_steps, "cfg": a.cfg, "seed": a.seed,
                          **({} if small else {"prompt": a.prompt, "negative": a.negative})}
    return real, fake, provenance


def shared_data(procs, a, model, clip, vae, small, cache):
    """Rank 0 prepares the data; every rank gets the same tensors (or rank 0's failure)."""
    if procs.world == 1:
        with torch.inference_mode():
            return prepare_data(a, model, clip, vae, small, cache)
    blob = None
    if procs.main:
        try:
            with torch.inference_mode():
                real, fake, provenance = prepare_data(a, model, clip, vae, small, cache)
            blob = pack({"real": real, "fake": fake}, {"comfy_dg.provenance": json.dumps(provenance)})
        except BaseException as e:
            procs.share(pack({}, {"comfy_dg.error": str(e) or type(e).__name__}))
            raise
    tensors, meta = unpack(procs.share(blob))
    if "comfy_dg.error" in meta:
        raise PeerFailed(f"comfy-dg: rank 0 failed to prepare the data: {meta['comfy_dg.error']}")
    return tensors["real"], tensors["fake"], json.loads(meta["comfy_dg.provenance"])


# --- resumable state -----------------------------------------------------------------------------------
def write_state(path, trainer, identity):
    """Trainer.state() as safetensors, atomically (temp file + os.replace)."""
    from ..atomic import save_safetensors
    tensors, facts = trainer.state()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {"comfy_dg.train_state": STATE_FORMAT, "comfy_dg.run": json.dumps(identity, sort_keys=True),
            "comfy_dg.facts": json.dumps(facts)}
    save_safetensors(tensors, path, meta, prefix=".comfy_dg-state-")


def resume(procs, a, trainer, identity, path):
    """Load the saved state into `trainer` when there is one for this very run; returns its step or None."""
    blob = None
    if procs.main:
        if a.restart and os.path.exists(path):
            os.remove(path)
            say(f"--restart: discarded the saved training state {path}")
        blob = b""
        if os.path.isfile(path):
            with open(path, "rb") as f:
                blob = f.read()
    blob = procs.share(blob)
    if not blob:
        return None
    fix = "Delete it, or pass --restart to start over."
    try:
        tensors, meta = unpack(blob)
        if meta.get("comfy_dg.train_state") != STATE_FORMAT:
            raise CLIError(f"format {meta.get('comfy_dg.train_state')!r}, expected {STATE_FORMAT!r}")
        saved = json.loads(meta["comfy_dg.run"])
        facts = json.loads(meta["comfy_dg.facts"])
    except Exception as e:
        raise CLIError(f"comfy-dg: cannot read the saved training state '{path}' ({type(e).__name__}: {e}). "
                       f"{fix}") from None
    if saved != identity:
        what = [k for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
        detail = ""
        if "config" in what:
            diff = [k for k in identity["config"] if saved.get("config", {}).get(k) != identity["config"][k]]
            detail = f" (training settings that differ: {', '.join(diff)})"
        raise CLIError(f"comfy-dg: '{path}' holds the state of a run with another {' and '.join(what)}{detail}. "
                       f"Run with the same settings to resume it, or pass --restart to discard it.")
    try:
        trainer.load_state(tensors, facts)
    except DGError:
        raise
    except Exception as e:      # tensors that do not fit this discriminator: a damaged or hand-edited file
        raise CLIError(f"comfy-dg: cannot resume from '{path}' ({type(e).__name__}: {e}). {fix}") from None
    return trainer.step


# --- reporting -----------------------------------------------------------------------------------------
def band_line(record):
    bands = " | ".join(f"σ {b['sigma_lo']:.3g}–{b['sigma_hi']:.3g}: {b['acc']:.3f}" for b in record["bands"])
    return f"held-out acc {record['acc']:.3f} bce {record['bce']:.4f} | {bands}"


def summary(disc, wall):
    t = disc.info.training
    lines = [f"best held-out BCE {t['heldout_bce']:.4f} at step {t['best_step']} of {t['steps']}; "
             "held-out accuracy per σ band:"]
    for b in t["heldout_bands"]:
        lines.append(f"  σ {b['sigma_lo']:>9.4g} – {b['sigma_hi']:<9.4g} acc {b['acc']:.3f}  "
                     f"(real {b['acc_real']:.3f}, fake {b['acc_fake']:.3f})  bce {b['bce']:.4f}")
    lines.append(f"  all                     acc {t['heldout_accuracy']:.3f}")
    lines.append(f"wall time {wall:.1f} s")
    from .loop import untrained_warning
    note = untrained_warning(t)
    return "\n".join(lines + ([note] if note else []))


# --- the run -------------------------------------------------------------------------------------------
class Run:
    def __init__(self):
        self.saved_step = None      # step of the last state written (or resumed)
        self.state_path = None


def train(a, procs, run):
    from ..files import save_discriminator
    from .data import _digest, model_fingerprint
    from .loop import Trainer
    t0 = time.perf_counter()
    if a.cache is None:
        a.cache = out_stem(a.out) + ".cache"
    run.state_path = path = state_path(a.out)
    model, clip, vae, small = load_model(a.checkpoint)
    real, fake, provenance = shared_data(procs, a, model, clip, vae, small, a.cache)
    config = train_config(a)
    trainer = Trainer(model, real, fake, config, rank=procs.rank, world_size=procs.world,
                      conditioning=under_negative(a, model, clip, small, tuple(real.shape[1:])),
                      prompt=sampling_prompt(a, model, clip, small, tuple(real.shape[1:])))
    identity = {"config": dataclasses.asdict(config), "data": _digest(real, fake),
                "model": model_fingerprint(model), "under_negative": a.negative if a.under_negative else None,
                **({"prompt": a.prompt} if a.objective == "reconstruction" else {})}
    run.saved_step = resume(procs, a, trainer, identity, path)
    if procs.main:
        say(f"training a {config.architecture} discriminator on {len(trainer.real)} real / {len(trainer.fake)} fake "
            f"latents (held out: {len(trainer.real_val)} / {len(trainer.fake_val)}), {config.steps} steps of "
            f"{config.batch_size}" + (f" on {procs.world} process{'es' if procs.world > 1 else ''} ({procs.backend})"
                                      if procs.started else ""))
        if run.saved_step is not None:
            say(f"resuming from step {run.saved_step} (saved in {path})")
    if not trainer.history:
        record = trainer.evaluate()
        if procs.main:
            say(f"step {0:>6}  {band_line(record)}")

    bar = None
    if procs.main:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=trainer.step, desc="training", unit="step", dynamic_ncols=True)

    def on_step(step, loss, record):
        if bar is None:
            return
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if record is not None:
            say(f"step {step:>6}  loss {loss:.4f}  {band_line(record)}")
            write_state(path, trainer, identity)
            run.saved_step = step

    finished = trainer.step >= config.steps or (config.patience and trainer.evals_since_best >= config.patience)
    try:
        disc = trainer.best_discriminator() if finished else trainer.run(on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    if procs.main:
        save_discriminator(disc, a.out, training={"trained_by": "comfy_dg.train",
                                                 "checkpoint": os.path.basename(a.checkpoint), **provenance})
        if os.path.exists(path):
            os.remove(path)
        say(f"saved {a.out}")
        say(summary(disc, time.perf_counter() - t0))
    return disc


def main(argv=None) -> int:
    from ..comfy_env import ensure_comfyui
    ensure_comfyui()
    a = build_parser().parse_args(argv)
    procs, run = Processes(), Run()
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        check_args(a, procs.world)
        procs.start(a.dist_timeout)
        train(a, procs, run)
        return 0
    except DGError as e:
        if procs.main or not isinstance(e, PeerFailed):
            prefix = f"[rank {procs.rank}] " if procs.world > 1 else ""
            print(f"{prefix}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if procs.main:
            if run.saved_step is None:
                print("\ncomfy-dg: interrupted before the first evaluation; nothing was saved.", file=sys.stderr)
            else:
                print(f"\ncomfy-dg: interrupted; the training state at step {run.saved_step} is in "
                      f"{run.state_path}: run the same command again to resume (--restart to start over).",
                      file=sys.stderr)
        return 130
    finally:
        procs.stop()
        torch.set_num_threads(threads)
