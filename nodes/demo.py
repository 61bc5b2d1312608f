import os

from comfy_api.latest import io

from comfy_dg import small_models
from comfy_dg.errors import DGError

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")
DEMO_MODEL = os.path.join(DEMO, "models", "digits_model.safetensors")
CATEGORY = "model_patches/discriminator_guidance/demo"


class LoadDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGLoadDemoModel",
            display_name="Load Demo Model (DG)",
            category=CATEGORY,
            description="The pack's embedded demo: a small real ComfyUI diffusion model (SD1.5 UNet architecture, "
                        "0.55M parameters) trained on sklearn's 8×8 handwritten digits, in pixel space. Runs on "
                        "any CPU in seconds. Its discriminator is digits_dg.safetensors in Load Discriminator.",
            inputs=[],
            outputs=[io.Model.Output(tooltip="The demo diffusion model (EPS, 1-channel 8×8 pixel-space latents: "
                                             "use an Empty Latent Image of 64×64)."),
                     io.Conditioning.Output(display_name="positive", tooltip="Its (empty) conditioning: the model "
                                            "is unconditional."),
                     io.Conditioning.Output(display_name="negative", tooltip="The same empty conditioning.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        if not os.path.isfile(DEMO_MODEL):
            raise DGError(f"comfy-dg: the demo model {DEMO_MODEL} is missing; re-clone the pack or run "
                          "`python -m harness.bench.quality --export-demo` to rebuild it.")
        model, _ = small_models.load(DEMO_MODEL)
        return io.NodeOutput(model, *small_models.null_conditioning(model))


class DecodeDigits(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGDecodeDigits",
            display_name="Decode Digits (DG)",
            category=CATEGORY,
            description="Turns the demo model's pixel-space latents (1×8×8 in [-1, 1]) into images, enlarged.",
            inputs=[io.Latent.Input("samples", tooltip="Latents sampled from Load Demo Model (DG)."),
                    io.Int.Input("scale", default=8, min=1, max=64, tooltip="Enlargement: each pixel becomes "
                                 "scale × scale pixels.")],
            outputs=[io.Image.Output(tooltip="The digits as images, gray on RGB.")],
        )

    @classmethod
    def execute(cls, samples, scale) -> io.NodeOutput:
        x = samples["samples"].float()
        if x.ndim != 4 or x.shape[1] != 1:
            raise DGError(f"comfy-dg: Decode Digits takes the demo model's 1-channel latents; got {tuple(x.shape)}")
        img = ((x.clamp(-1, 1) + 1) / 2).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        return io.NodeOutput(img.movedim(1, -1).expand(-1, -1, -1, 3).contiguous())
