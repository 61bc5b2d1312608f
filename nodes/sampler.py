from comfy_api.latest import io

from comfy_dg.rejection import BASES, dg_rejection_sampler
from comfy_dg.sampling import sample_dg_heun_boosted
from .options import judged_class
from .types import Discriminator


class DGHeunBoosted(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGSamplerHeunBoosted",
            display_name="DG Heun, official boosting (DG)",
            category="model_patches/discriminator_guidance",
            description="A sampler for SamplerCustomAdvanced: EDM's Heun sampler with the official Discriminator "
                        "Guidance code's boosting. Samples the discriminator judges fake (log r < 0) get fresh noise "
                        "every few steps and a doubled guidance weight every other step. Use it with a model "
                        "patched by Discriminator Guidance (the official setting: weight 1, karras schedule, 18 "
                        "steps). Not the same as the Discriminator Guidance node's boost multiplier.",
            inputs=[io.Float.Input("s_churn", default=4.0, min=0.0, max=100.0, step=0.1,
                                   tooltip="EDM's churn for the samples judged fake: γ = min(s_churn / steps, "
                                           "√2 − 1) (the official code's 4)."),
                    io.Int.Input("churn_every", default=5, min=1, max=1000,
                                 tooltip="Every this many steps, the samples judged fake at the previous step get "
                                         "fresh noise (the official code's 5)."),
                    io.Int.Input("double_every", default=2, min=1, max=1000,
                                 tooltip="Every this many steps, the guidance weight of the samples judged fake is "
                                         "doubled on the step's first evaluation (the official code's 2).")],
            outputs=[io.Sampler.Output(tooltip="The sampler, for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, s_churn, churn_every, double_every) -> io.NodeOutput:
        import comfy.samplers
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_dg_heun_boosted, extra_options={
            "s_churn": s_churn, "churn_every": churn_every, "double_every": double_every}))


class DGRejectionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DGRejectionSampler",
            display_name="DG Rejection Sampler (DG)",
            category="model_patches/discriminator_guidance",
            description="A sampler for SamplerCustomAdvanced that judges every step with the discriminator, in the "
                        "spirit of DiffRS (Na et al., ICML 2024): a step is accepted with probability "
                        "min(1, r(x')/(M·r(x))), and a rejected step is noised back and tried again, so samples "
                        "the discriminator finds unlikely get more work. Costs extra model evaluations.",
            inputs=[
                Discriminator.Input("discriminator", tooltip="A discriminator trained for the model being sampled."),
                io.Combo.Input("base", options=list(BASES), default="heun",
                               tooltip="The step each proposal takes (k-diffusion's heun or euler, no churn)."),
                io.Float.Input("quantile", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="M at each step is this quantile of the batch's first ratios r(x')/r(x): "
                                       "about 1 − quantile of first proposals pass for sure, the others with "
                                       "probability ratio / M. Lower accepts more. It needs a batch: with a "
                                       "batch of 1 nothing is rejected."),
                io.Int.Input("max_retries", default=4, min=0, max=100,
                             tooltip="Rejections of one sample at one step before its proposal is accepted anyway "
                                     "(bounds the cost; 0: no rejection, the plain sampler)."),
                *judged_class(),
            ],
            outputs=[io.Sampler.Output(tooltip="For SamplerCustomAdvanced's sampler input.")],
        )

    @classmethod
    def execute(cls, discriminator, base, quantile, max_retries, class_label=-1, class_name="") -> io.NodeOutput:
        return io.NodeOutput(dg_rejection_sampler(discriminator, base=base, quantile=quantile,
                                                  max_retries=max_retries, class_label=class_label,
                                                  class_name=class_name))
