from comfy_api.latest import io

from comfy_dg.sampling import sample_dg_heun_boosted


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
