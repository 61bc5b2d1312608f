from comfy_api.latest import io

from ..comfy_dg.guidance import guide
from ..comfy_dg.schedules import SCHEDULES
from .types import Discriminator

# The widgets' ranges, enforced at validation too (ComfyUI 0.3.75 does not check a V3 float's min/max).
RANGES = {"weight": (0.0, 20.0), "start_percent": (0.0, 1.0), "end_percent": (0.0, 1.0), "boost": (0.0, 10.0)}


class DiscriminatorGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiscriminatorGuidance",
            display_name="Discriminator Guidance",
            category="model_patches/discriminator_guidance",
            description="Patches the model with Discriminator Guidance (Kim et al., ICML 2023): the denoiser becomes "
                        "D + w·σ²/α·∇ log(d/(1−d)), pulling samples toward what the discriminator takes for real "
                        "data. Works with every sampler and model type; chains with other patches.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to guide."),
                Discriminator.Input("discriminator", tooltip="A discriminator trained for this model "
                                    "(Load Discriminator)."),
                io.Float.Input("weight", default=1.0, min=RANGES["weight"][0], max=RANGES["weight"][1], step=0.05, round=0.01,
                               tooltip="w: the strength of the correction. 1 is the theory (Theorem 1); "
                                       "the paper used 1–2. 0 turns guidance off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where in sampling guidance starts (0 = the first, noisiest step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Where guidance stops (1 = the last step). The official code stops "
                                       "short of the cleanest steps (about 0.85–0.95)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant",
                               tooltip="How the weight varies inside the window: constant; linear_up (0 → w); "
                                       "linear_down (w → 0); cosine (w → 0, smoothly)."),
                io.Float.Input("boost", default=1.0, min=RANGES["boost"][0], max=RANGES["boost"][1], step=0.05,
                               tooltip="Weight multiplier for samples the discriminator judges fake "
                                       "(log r < 0), in the spirit of the official code's boosting. 1 = off."),
                io.Boolean.Input("first_evaluation_only", default=False,
                                 tooltip="Guide only the first model evaluation of each step (the official code "
                                         "does so with Heun). No effect on one-evaluation samplers; for heun, "
                                         "dpm_2, dpmpp_sde, ... it skips their intermediate evaluations."),
                io.Int.Input("class_label", default=-1, min=-1, max=100000,
                             tooltip="For a class-conditional discriminator: the class to guide toward "
                                     "(-1: unconditional).", optional=True),
            ],
            outputs=[io.Model.Output(tooltip="The guided model (a patched clone).")],
        )

    @classmethod
    def validate_inputs(cls, weight=None, start_percent=None, end_percent=None, boost=None, **kwargs):
        given = {"weight": weight, "start_percent": start_percent, "end_percent": end_percent, "boost": boost}
        for name, value in given.items():     # None: linked from another node, checked when it runs
            lo, hi = RANGES[name]
            if value is not None and not lo <= value <= hi:
                return f"{name} is {value}, outside this node's range {lo}..{hi}: set it within {lo}..{hi}."
        if start_percent is not None and end_percent is not None and start_percent > end_percent:
            return (f"start_percent ({start_percent}) is after end_percent ({end_percent}): the window runs from "
                    "start_percent to end_percent; swap them.")
        return True

    @classmethod
    def execute(cls, model, discriminator, weight, start_percent, end_percent, schedule, boost,
                first_evaluation_only, class_label=-1) -> io.NodeOutput:
        return io.NodeOutput(guide(model, discriminator, weight=weight, start_percent=start_percent,
                                   end_percent=end_percent, schedule=schedule, boost=boost,
                                   first_evaluation_only=first_evaluation_only, class_label=class_label))
