import os

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from comfy_dg.errors import DataError, DGError
from comfy_dg.files import save_discriminator
from comfy_dg.locations import (CACHE_DEFAULT_GB, CACHE_ENV, LATENT_DEFAULT_GB, LATENT_ENV, gigabytes,
                                image_folder, image_roots, output_file)
from comfy_dg.options import GUIDANCE, SAVING, TRAINING, from_widget
from comfy_dg.training.conditioning import check_negative_architecture, negative_conditioning, prompt_conds
from comfy_dg.training.data import (align_labels, combine_labels, encode_folder, folder_labels, folder_stamp,
                                    list_images, sample_fakes)
from comfy_dg.training.loop import TrainConfig, Trainer
from comfy_dg.training.plot import plot_history, plot_preview
from .load import FOLDER
from .options import widget, widgets
from .types import Discriminator

CATEGORY = "model_patches/discriminator_guidance/training"


def cache_dir():
    return os.path.join(folder_paths.get_user_directory(), "comfy-dg", "cache")


def interrupted():
    comfy.model_management.throw_exception_if_processing_interrupted()


def progress_bar(total):
    bar = comfy.utils.ProgressBar(total)
    return lambda done, of: bar.update_absolute(done, of)


def roots():
    return image_roots(folder_paths.get_input_directory())


def limits():
    """The server's bounds: (largest set of latents, size of the cache), in bytes."""
    return gigabytes(LATENT_ENV, LATENT_DEFAULT_GB), gigabytes(CACHE_ENV, CACHE_DEFAULT_GB)


def labels_of(latents):
    return latents.get("dg_labels"), latents.get("dg_classes")


class EncodeRealImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGEncodeRealImages",
            display_name="Encode Real Images (DG)",
            category=CATEGORY,
            description="Loads every png/jpg/webp image in a folder, resizes and center-crops it to the training "
                        "resolution, and encodes it with the model's VAE in batches: the real data of a "
                        "discriminator. Latents are cached on disk, so re-runs skip the work.",
            inputs=[
                io.String.Input("folder", default="dg_real", tooltip="Folder of real images inside ComfyUI's input "
                                "folder (e.g. dg_real for input/dg_real). Subfolders are included; hidden files are "
                                "skipped, and a file that cannot be read stops the run with its name."),
                io.Vae.Input("vae", tooltip="The VAE of the model the discriminator is for."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Images are resized (shorter side) and center-cropped to this size."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Images encoded at once."),
                io.Boolean.Input("labels_from_subfolders", default=False,
                                 tooltip="Class-conditional training: each image's class is its subfolder "
                                         "(folder/<class>/image.png), classes numbered in name order (ignoring "
                                         "case); the names are stored in the discriminator.",
                                 optional=True),
            ],
            outputs=[io.Latent.Output(display_name="real_latents",
                                      tooltip="The real images as latents, for Train Discriminator (DG).")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder=None, **kwargs):
        """The folder's listing with every image's size and modification time: adding, removing or replacing an
        image runs the node again (ComfyUI would otherwise return its cached latents)."""
        try:
            return folder_stamp(image_folder(folder, roots()), roots())[1]
        except (DGError, OSError) as e:       # reported when the node runs
            return f"unavailable: {e}"

    @classmethod
    def execute(cls, folder, vae, resolution, batch_size, labels_from_subfolders=False) -> io.NodeOutput:
        allowed = roots()
        path = image_folder(folder, allowed)
        max_bytes, cache_bytes = limits()
        latents = encode_folder(path, vae, resolution, batch_size, cache_dir(), progress=progress_bar(1),
                                should_stop=interrupted, roots=allowed, max_bytes=max_bytes, cache_bytes=cache_bytes)
        out = {"samples": latents}
        if labels_from_subfolders:
            out["dg_labels"], out["dg_classes"] = folder_labels(path, list_images(path, allowed))
        return io.NodeOutput(out)


class SampleFakeLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGSampleFakeLatents",
            display_name="Sample Fake Latents (DG)",
            category=CATEGORY,
            description="Generates the model's own samples with your sampler settings, in batches, through "
                        "ComfyUI's sampling: the fake data of a discriminator. Use as many as you have real "
                        "images. Cached on disk by model, prompt and settings.",
            inputs=[
                io.Model.Input("model", tooltip="The model (unguided) whose samples the discriminator learns to spot."),
                io.Conditioning.Input("positive", tooltip="Your usual prompt: the fakes should look like what "
                                      "you generate."),
                io.Conditioning.Input("negative", tooltip="Your usual negative prompt."),
                io.Int.Input("count", default=1000, min=2, max=1_000_000,
                             tooltip="How many samples (about as many as real images)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Samples generated at once."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the first batch; each batch takes the next seed."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps, as you sample."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as you sample."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="Sampler, as you sample."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="Noise schedule, as you sample."),
                io.Int.Input("width", default=512, min=16, max=8192, step=8, tooltip="As the real images' resolution."),
                io.Int.Input("height", default=512, min=16, max=8192, step=8,
                             tooltip="As the real images' resolution."),
                widget(GUIDANCE["class_label"], optional=True,
                       tooltip="Class-conditional training: the class these samples were prompted for "
                               "(-1: unconditional)."),
                widget(GUIDANCE["class_name"], optional=True,
                       tooltip="Class-conditional training: the class these samples were prompted for, by name "
                               "(the real images' subfolder); instead of class_label."),
            ],
            outputs=[io.Latent.Output(display_name="fake_latents",
                                      tooltip="The model's samples, for Train Discriminator (DG)'s fake_latents.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, count, batch_size, seed, steps, cfg, sampler_name, scheduler,
                width, height, class_label=-1, class_name="") -> io.NodeOutput:
        class_name = (class_name or "").strip()
        if class_name and class_label >= 0:
            raise DataError("comfy-dg: give the fakes' class by class_label or by class_name, not both")
        max_bytes, cache_bytes = limits()
        latents = sample_fakes(model, positive, negative, count, batch_size, seed, steps, cfg, sampler_name,
                               scheduler, width, height, cache_dir(), progress=progress_bar(count),
                               should_stop=interrupted, max_bytes=max_bytes, cache_bytes=cache_bytes)
        out = {"samples": latents}
        if class_label >= 0 or class_name:
            out["dg_labels"] = torch.full((len(latents),), max(class_label, 0), dtype=torch.long)
        if class_name:
            out["dg_classes"] = [class_name]
        return io.NodeOutput(out)


class CombineLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGCombineLatents",
            display_name="Combine Latents (DG)",
            category=CATEGORY,
            description="Joins two batches of training latents, keeping their class labels (e.g. fakes sampled "
                        "for different classes). Both must be labelled, or neither.",
            inputs=[io.Latent.Input("latents_a", tooltip="First batch of latents."),
                    io.Latent.Input("latents_b", tooltip="Second batch, of the same shape.")],
            outputs=[io.Latent.Output(display_name="latents", tooltip="Both batches, a first, with their labels.")],
        )

    @classmethod
    def execute(cls, latents_a, latents_b) -> io.NodeOutput:
        a, b = latents_a["samples"], latents_b["samples"]
        if a.shape[1:] != b.shape[1:]:
            raise DataError(f"comfy-dg: cannot combine latents of shapes {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
        out = {"samples": torch.cat([a, b])}
        labels, names = combine_labels(labels_of(latents_a), labels_of(latents_b))
        if labels is not None:
            out["dg_labels"] = labels
        if names is not None:
            out["dg_classes"] = names
        return io.NodeOutput(out)


class TrainDiscriminator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGTrainDiscriminator",
            display_name="Train Discriminator (DG)",
            category=CATEGORY,
            is_output_node=True,
            description="Trains a discriminator for this model on real latents (label 1) and the model's own "
                        "samples (label 0), noised as the model noises them, keeps the checkpoint with the best "
                        "held-out BCE, and saves it in models/discriminators (the old file, if any, stays intact "
                        "until the new one is complete). Outputs it, and a plot of held-out accuracy and BCE per σ "
                        "band, which is also shown live on the node while it trains.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the discriminator is for (kept frozen)."),
                io.Latent.Input("real_latents", tooltip="From Encode Real Images (DG), or VAE Encode."),
                io.Latent.Input("fake_latents", tooltip="From Sample Fake Latents (DG), or KSampler batches."),
                io.String.Input("filename", default="my_discriminator",
                                tooltip="Saved as models/discriminators/<filename>.safetensors; if that file exists "
                                        "(and overwrite is off), as <filename>_00001_.safetensors, ... as ComfyUI's "
                                        "savers number theirs. Checked before training."),
                *widgets(TRAINING, "architecture", "steps", "batch_size", "learning_rate", "weight_decay",
                         "heldout_fraction", "eval_every", "patience", "augment", "seed"),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="features, UNets (SD1.x/SDXL): the negative prompt you sample with. "
                                              "The head then learns the features under it, and guiding with that "
                                              "same negative needs no extra pass through the UNet (faster). "
                                              "Unconnected: prompt-independent features (an extra pass while "
                                              "guiding). Refused with standalone, as the command line "
                                              "refuses it."),
                widget(SAVING["overwrite"], optional=True),
                # The rest of the training options, set less often.
                *widgets(TRAINING, "flip", "translate", "width", "sigma_min", "sigma_max", "sigma_bands",
                         "label_dropout", "sigma_sampling", "objective", optional=True),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="The prompt you sample with. Needed by the reconstruction objective, "
                                              "which compares the model's denoiser under it with the real images."),
            ],
            outputs=[Discriminator.Output(tooltip="The trained discriminator (also saved), for Discriminator "
                                                  "Guidance."),
                     io.Image.Output(display_name="training_plot",
                                     tooltip="Held-out accuracy and BCE per σ band over training (also shown on "
                                             "the node).")],
        )

    @classmethod
    def execute(cls, model, real_latents, fake_latents, filename, negative=None, positive=None, overwrite=False,
                **options) -> io.NodeOutput:
        # Everything that could fail the save is checked now, before the first step.
        path = output_file(filename, folder_paths.get_folder_paths(FOLDER), overwrite)
        config = TrainConfig(**{k: from_widget(TRAINING[k], v) for k, v in options.items()}).validate()
        shape = tuple(real_latents["samples"].shape[1:])
        conditioning = None
        if negative is not None:
            check_negative_architecture(config.architecture)
            conditioning = negative_conditioning(model, negative, shape)
        prompt = prompt_conds(model, positive, shape) if positive is not None and config.objective == "reconstruction" \
            else None
        real_labels, fake_labels, class_names = align_labels(labels_of(real_latents), labels_of(fake_latents))
        trainer = Trainer(model, real_latents["samples"], fake_latents["samples"], config, real_labels=real_labels,
                          fake_labels=fake_labels, conditioning=conditioning, prompt=prompt, class_names=class_names)
        bar = comfy.utils.ProgressBar(config.steps)

        def on_step(step, loss, record):
            # Each held-out evaluation redraws the plot, shown live on the node as its progress preview.
            bar.update_absolute(step, config.steps, plot_preview(trainer.history) if record is not None else None)
        disc = trainer.run(on_step=on_step, should_stop=interrupted)
        saved = save_discriminator(disc, path, overwrite=overwrite)
        title = f"{os.path.basename(saved)}: held-out accuracy and BCE"
        if disc.info.class_names:
            title += "\n" + disc.info.describe_classes()
        plot = torch.from_numpy(plot_history(trainer.history, title=title)).float().div(255.0)[None]
        # The plot shows on the node itself, as a preview does.
        return io.NodeOutput(disc, plot, ui=ui.PreviewImage(plot, cls=cls))
