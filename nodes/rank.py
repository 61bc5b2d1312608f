import torch
from comfy_api.latest import io, ui

from comfy_dg.errors import DataError
from comfy_dg.pictures import latent_preview, scored_grid
from comfy_dg.ranking import DEFAULT_SIGMA, keep_best, realism_scores
from .options import judged_class
from .types import Discriminator


class RankByRealism(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGRankByRealism",
            display_name="Rank by Realism (DG)",
            category="model_patches/discriminator_guidance",
            description="Scores a batch of images or latents with a discriminator (log r = log(d/(1−d)) at one low "
                        "noise level σ, averaged over a few noise draws from a fixed seed), sorts them best first "
                        "and keeps the best k. The node shows every image with its score; the kept ones are framed. "
                        "A cheap way to keep the best of an unguided (or lightly guided) batch; on batches guided "
                        "strongly by the same discriminator it measured worse.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the discriminator was trained for."),
                Discriminator.Input("discriminator", tooltip="From Load Discriminator or Train Discriminator (DG)."),
                io.Int.Input("keep", default=4, min=1, max=4096, tooltip="How many to keep (k), best first."),
                io.Float.Input("sigma", default=DEFAULT_SIGMA, min=0.0, max=1000.0, step=0.01, round=0.0001,
                               tooltip="The noise level σ the discriminator judges at (clipped to the model's "
                                       "range). Low σ judges the finished image; on the digits benchmark 0.1 and "
                                       "0.3 both cut the FD of the kept half of unguided samples by 20–24%."),
                io.Int.Input("draws", default=4, min=1, max=64,
                             tooltip="Noise draws averaged per sample (more: steadier scores, slower)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the noise draws: same seed, same scores."),
                io.Latent.Input("latent", optional=True, tooltip="A batch of latents to rank (or connect images)."),
                io.Image.Input("images", optional=True, tooltip="A batch of images to rank (or connect latents)."),
                io.Vae.Input("vae", optional=True, tooltip="The model's VAE: needed to rank images (it encodes "
                             "them); with latents it decodes them for display (without it the node shows the "
                             "latents' first channels)."),
                *judged_class(),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The best k latents, best first."),
                     io.Image.Output(display_name="images", tooltip="The best k images, best first."),
                     io.String.Output(display_name="scores", tooltip="Every sample's log r, best first, with its "
                                                                     "index in the input batch.")],
        )

    @classmethod
    def execute(cls, model, discriminator, keep, sigma, draws, seed, latent=None, images=None, vae=None,
                class_label=-1, class_name="") -> io.NodeOutput:
        if (latent is None) == (images is None):
            raise DataError("comfy-dg: connect exactly one of 'latent' and 'images' to Rank by Realism (DG).")
        if images is not None:
            if vae is None:
                raise DataError("comfy-dg: ranking images needs the model's VAE (to encode them): connect 'vae'.")
            latents = vae.encode(images[:, :, :, :3])
        else:
            latents = latent["samples"]
            images = latent_preview(latents) if vae is None else vae.decode(latents)
            if images.ndim == 5:          # video VAEs return (B, T, H, W, C); show the first frame
                images = images[:, 0]
        scores = realism_scores(model, discriminator, latents, sigma=sigma, draws=draws, seed=seed,
                                class_label=class_label, class_name=class_name)
        order = keep_best(scores, len(scores))
        k = min(keep, len(order))
        best = order[:k]
        out = {"samples": latents[best]}
        report = "\n".join(f"#{r + 1}: sample {int(i)}  log r = {float(scores[i]):+.4f}" + ("  (kept)" if r < k else "")
                           for r, i in enumerate(order))
        grid = torch.from_numpy(scored_grid(images[order], scores[order], k)).float().div(255.0)[None]
        return io.NodeOutput(out, images[best], report, ui=ui.PreviewImage(grid, cls=cls))
