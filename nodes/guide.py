from comfy_api.latest import io

from comfy_dg.options import GUIDANCE
from comfy_dg.patch import guide

from .options import widget, widgets
from .types import Discriminator

DESCRIPTION = ("Patches the model with Discriminator Guidance (Kim et al., ICML 2023): the denoiser becomes "
               "D + w·σ²/α·∇ log(d/(1−d)), pulling samples toward what the discriminator takes for real data. Works "
               "with every sampler and model type; chains with other patches.")


def window_problem(start_percent, end_percent):
    """Why this window is refused, or None. Inputs linked from other nodes (None here) are checked when run."""
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        o = GUIDANCE[name]
        if value is not None and not o.min <= value <= o.max:
            return f"{name} is {value}, outside this node's range {o.min}..{o.max}: set it within {o.min}..{o.max}."
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        return (f"start_percent ({start_percent}) is after end_percent ({end_percent}): the window runs from "
                "start_percent to end_percent; swap them.")
    return None


def schema(node_id, display_name, description, options, **extra):
    """The node's schema: the model, the discriminator, then the option widgets."""
    return io.Schema(
        node_id=node_id, display_name=display_name, category="model_patches/discriminator_guidance",
        description=description,
        inputs=[io.Model.Input("model", tooltip="The diffusion model to guide."),
                Discriminator.Input("discriminator", tooltip="A discriminator trained for this model (Load "
                                    "Discriminator)."),
                *options, widget(GUIDANCE["class_label"], optional=True),
                widget(GUIDANCE["class_name"], optional=True)],
        outputs=[io.Model.Output(tooltip="The guided model (a patched clone).")], **extra)


class DiscriminatorGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema("DiscriminatorGuidanceV2", "Discriminator Guidance", DESCRIPTION,
                      widgets(GUIDANCE, "weight", "intermediate_weight", "start_percent", "end_percent", "schedule",
                              "boost"))

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None):
        # Only the inputs named here skip ComfyUI's own range checks.
        return window_problem(start_percent, end_percent) or True

    @classmethod
    def execute(cls, model, discriminator, class_label=-1, **options) -> io.NodeOutput:
        return io.NodeOutput(guide(model, discriminator, class_label=class_label, **options))


class DiscriminatorGuidanceV1(DiscriminatorGuidance):
    """The first version, kept so that workflows saved with it load and run as they did: its boolean
    first_evaluation_only is w₂ = 0 (on) or w₂ = w (off)."""

    @classmethod
    def define_schema(cls):
        first = io.Boolean.Input("first_evaluation_only", default=False,
                                 tooltip="Guide only the first model evaluation of each step (w₂ = 0); off: every "
                                         "evaluation with w.")
        return schema("DiscriminatorGuidance", "Discriminator Guidance (v1, deprecated)",
                      DESCRIPTION + " Deprecated: use Discriminator Guidance, whose intermediate_weight replaces "
                                    "first_evaluation_only.",
                      [*widgets(GUIDANCE, "weight", "start_percent", "end_percent", "schedule", "boost"), first],
                      is_deprecated=True)

    @classmethod
    def execute(cls, model, discriminator, first_evaluation_only, class_label=-1, **options) -> io.NodeOutput:
        w2 = 0.0 if first_evaluation_only else options["weight"]
        return super().execute(model, discriminator, class_label=class_label, intermediate_weight=w2, **options)
