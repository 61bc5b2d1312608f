"""The pack's shared workflows (workflows/*.json), described as graphs and built in the real ComfyUI frontend.

`scripts/make_workflows.py` builds each graph with the frontend's own LiteGraph (create nodes, connect, set
widgets, serialize), so the files are exactly what the frontend saves, and writes a thumbnail of the same name
(.jpg: the name the templates browser asks custom node packs for).
"""
import os
import uuid
from dataclasses import dataclass, field

from . import REPO

FOLDER = os.path.join(REPO, "workflows")
GUIDE = "https://github.com/comfy-dg/comfy-dg#train-a-discriminator-for-your-model"

SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
               "v1-5-pruned-emaonly-fp16.safetensors?download=true"}
SDXL = {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
               "sd_xl_base_1.0.safetensors?download=true"}
FLUX = {"name": "flux1-dev.safetensors", "directory": "diffusion_models",
        "url": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"}
CLIP_L = {"name": "clip_l.safetensors", "directory": "text_encoders",
          "url": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"}
T5XXL = {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
         "url": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"}
FLUX_VAE = {"name": "ae.safetensors", "directory": "vae",
            "url": "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/"
                   "ae.safetensors"}


def discriminator(name):
    # No trained discriminator for a real checkpoint is published: the link is the training guide.
    return {"name": name, "directory": "discriminators", "url": GUIDE}


@dataclass
class Node:
    key: str
    type: str
    column: int
    widgets: dict = field(default_factory=dict)
    title: str | None = None
    models: list = field(default_factory=list)
    width: int | None = None
    height: int | None = None


@dataclass
class Workflow:
    name: str
    summary: str
    nodes: list
    links: list   # (from key, output name or index, to key, input name)
    focus: list = field(default_factory=lambda: ["dg", "plain", "guided"])   # what the thumbnail shows

    def node(self, key):
        return next(n for n in self.nodes if n.key == key)


POSITIVE = "a photograph of a red fox in a snowy forest, morning light, detailed fur"
NEGATIVE = "blurry, low quality, watermark, text"


def note(text, column=0):
    return Node("note", "MarkdownNote", column, {"text": text}, title="About this workflow", width=400, height=250)


def text_to_image(name, summary, ckpt, disc, size, steps, cfg, text):
    return Workflow(name, summary, [
        note(text),
        Node("ckpt", "CheckpointLoaderSimple", 0, {"ckpt_name": ckpt["name"]}, models=[ckpt]),
        Node("disc", "LoadDiscriminator", 0, {"discriminator_name": disc}, models=[discriminator(disc)]),
        Node("pos", "CLIPTextEncode", 1, {"text": POSITIVE}, title="Positive prompt"),
        Node("neg", "CLIPTextEncode", 1, {"text": NEGATIVE}, title="Negative prompt"),
        Node("dg", "DiscriminatorGuidanceV2", 2, {"weight": 1.5}),
        Node("latent", "EmptyLatentImage", 2, {"width": size, "height": size, "batch_size": 1}),
        Node("sampler", "KSampler", 3, {"seed": 42, "control_after_generate": "fixed", "steps": steps, "cfg": cfg,
                                         "sampler_name": "dpmpp_2m", "scheduler": "karras"}),
        Node("decode", "VAEDecode", 4),
        Node("save", "SaveImage", 4, {"filename_prefix": f"dg_{name.split('_')[1]}"}, width=420),
    ], [
        ("ckpt", "MODEL", "dg", "model"), ("disc", 0, "dg", "discriminator"),
        ("ckpt", "CLIP", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"),
        ("dg", 0, "sampler", "model"), ("pos", 0, "sampler", "positive"), ("neg", 0, "sampler", "negative"),
        ("latent", 0, "sampler", "latent_image"), ("sampler", 0, "decode", "samples"), ("ckpt", "VAE", "decode", "vae"),
        ("decode", 0, "save", "images"),
    ], focus=["dg", "latent", "sampler"])


WORKFLOWS = [
    text_to_image(
        "1_sd15_text_to_image_dg", "SD1.5 text to image with Discriminator Guidance (KSampler, dpmpp_2m / karras)",
        SD15, "sd15_dg.safetensors", 512, 25, 7.0,
        "## SD1.5 text to image with Discriminator Guidance\n\n"
        "Load Discriminator → **Discriminator Guidance** patches the model; KSampler samples as usual "
        "(any sampler).\n\nNeeds `models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors` and a discriminator "
        "trained for that checkpoint, `models/discriminators/sd15_dg.safetensors` "
        "(train one with the workflow **5_train_discriminator**).\n\n"
        "weight: 1 is the theory, 1–2 is usual; 0 turns guidance off."),
    text_to_image(
        "2_sdxl_text_to_image_dg", "SDXL text to image with Discriminator Guidance",
        SDXL, "sdxl_dg.safetensors", 1024, 30, 6.0,
        "## SDXL text to image with Discriminator Guidance\n\n"
        "Needs `models/checkpoints/sd_xl_base_1.0.safetensors` and a discriminator trained for it, "
        "`models/discriminators/sdxl_dg.safetensors` (workflow **5_train_discriminator** with this checkpoint "
        "at 1024).\n\nThe features discriminator uses SDXL's own UNet middle block."),
    Workflow("3_flux_dg_sampler_custom_advanced",
             "Flux (16-channel flow model) with Discriminator Guidance through SamplerCustomAdvanced", [
        note("## Flux with Discriminator Guidance (SamplerCustomAdvanced)\n\n"
             "DG is a model patch, so it works with any guider: here BasicGuider with Flux guidance 3.5. For flow "
             "models the correction is scaled by σ²/(1 − σ).\n\nNeeds `diffusion_models/flux1-dev.safetensors`, "
             "`text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors`, `vae/ae.safetensors`, and a "
             "discriminator trained for Flux, `models/discriminators/flux_dg.safetensors`."),
        Node("unet", "UNETLoader", 0, {"unet_name": FLUX["name"]}, models=[FLUX]),
        Node("clip", "DualCLIPLoader", 0, {"clip_name1": CLIP_L["name"], "clip_name2": T5XXL["name"],
                                            "type": "flux"}, models=[CLIP_L, T5XXL]),
        Node("disc", "LoadDiscriminator", 0, {"discriminator_name": "flux_dg.safetensors"},
             models=[discriminator("flux_dg.safetensors")]),
        Node("vae", "VAELoader", 0, {"vae_name": FLUX_VAE["name"]}, models=[FLUX_VAE]),
        Node("pos", "CLIPTextEncode", 1, {"text": POSITIVE}, title="Prompt"),
        Node("fluxg", "FluxGuidance", 1, {"guidance": 3.5}),
        Node("dg", "DiscriminatorGuidanceV2", 2, {"weight": 1.0}),
        Node("guider", "BasicGuider", 2),
        Node("noise", "RandomNoise", 3, {"noise_seed": 42, "control_after_generate": "fixed"}),
        Node("ksel", "KSamplerSelect", 3, {"sampler_name": "euler"}),
        Node("sched", "BasicScheduler", 3, {"scheduler": "simple", "steps": 20, "denoise": 1.0}),
        Node("latent", "EmptySD3LatentImage", 3, {"width": 1024, "height": 1024, "batch_size": 1}),
        Node("sampler", "SamplerCustomAdvanced", 4, width=260),
        Node("decode", "VAEDecode", 4),
        Node("save", "SaveImage", 5, {"filename_prefix": "dg_flux"}, width=420),
    ], [
        ("unet", 0, "dg", "model"), ("disc", 0, "dg", "discriminator"), ("clip", 0, "pos", "clip"),
        ("pos", 0, "fluxg", "conditioning"), ("dg", 0, "guider", "model"), ("fluxg", 0, "guider", "conditioning"),
        ("unet", 0, "sched", "model"),
        ("noise", 0, "sampler", "noise"), ("guider", 0, "sampler", "guider"), ("ksel", 0, "sampler", "sampler"),
        ("sched", 0, "sampler", "sigmas"), ("latent", 0, "sampler", "latent_image"),
        ("sampler", 0, "decode", "samples"), ("vae", 0, "decode", "vae"), ("decode", 0, "save", "images"),
    ], focus=["dg", "guider", "noise", "sched", "latent", "sampler"]),
    Workflow("4_ab_same_seed_with_and_without_dg", "A/B: the same seed without and with DG, side by side", [
        note("## A/B: the same seeds without and with DG\n\n"
             "One seed (the Int node) drives both KSamplers; the lower one samples the guided model. "
             "**Comparison Grid (DG)** lays both batches side by side in one image, shown on the node and saved.\n\n"
             "Needs `checkpoints/v1-5-pruned-emaonly-fp16.safetensors` and `discriminators/sd15_dg.safetensors`."),
        Node("ckpt", "CheckpointLoaderSimple", 0, {"ckpt_name": SD15["name"]}, models=[SD15]),
        Node("disc", "LoadDiscriminator", 0, {"discriminator_name": "sd15_dg.safetensors"},
             models=[discriminator("sd15_dg.safetensors")]),
        Node("seed", "PrimitiveInt", 0, {"value": 42, "control_after_generate": "fixed"}, title="Seed (both)"),
        Node("pos", "CLIPTextEncode", 1, {"text": POSITIVE}, title="Positive prompt"),
        Node("neg", "CLIPTextEncode", 1, {"text": NEGATIVE}, title="Negative prompt"),
        Node("dg", "DiscriminatorGuidanceV2", 2, {"weight": 1.5}),
        Node("latent", "EmptyLatentImage", 2, {"width": 512, "height": 512, "batch_size": 4}),
        Node("plain", "KSampler", 3, {"control_after_generate": "fixed", "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
             title="KSampler (without DG)"),
        Node("guided", "KSampler", 3, {"control_after_generate": "fixed", "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
             title="KSampler (with DG)"),
        Node("dec_a", "VAEDecode", 4), Node("dec_b", "VAEDecode", 4),
        Node("grid", "DGComparisonGrid", 5, {"label_a": "without DG", "label_b": "with DG", "columns": 2}),
        Node("save", "SaveImage", 6, {"filename_prefix": "dg_ab"}, width=420),
    ], [
        ("ckpt", "MODEL", "dg", "model"), ("disc", 0, "dg", "discriminator"),
        ("ckpt", "CLIP", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"),
        ("ckpt", "MODEL", "plain", "model"), ("dg", 0, "guided", "model"),
        ("seed", 0, "plain", "seed"), ("seed", 0, "guided", "seed"),
        ("pos", 0, "plain", "positive"), ("neg", 0, "plain", "negative"), ("latent", 0, "plain", "latent_image"),
        ("pos", 0, "guided", "positive"), ("neg", 0, "guided", "negative"), ("latent", 0, "guided", "latent_image"),
        ("plain", 0, "dec_a", "samples"), ("guided", 0, "dec_b", "samples"),
        ("ckpt", "VAE", "dec_a", "vae"), ("ckpt", "VAE", "dec_b", "vae"),
        ("dec_a", 0, "grid", "images_a"), ("dec_b", 0, "grid", "images_b"), ("grid", 0, "save", "images"),
    ]),
    Workflow("5_train_discriminator", "Train a discriminator for the loaded checkpoint", [
        note("## Train a discriminator for your checkpoint\n\n"
             "1. Put a few hundred to a few thousand real images in `ComfyUI/input/dg_real/`.\n"
             "2. **Encode Real Images (DG)** encodes them with the checkpoint's VAE; **Sample Fake Latents (DG)** "
             "samples the checkpoint itself in KSampler batches (about as many as real images, same resolution).\n"
             "3. **Train Discriminator (DG)** saves `models/discriminators/sd15_dg.safetensors` and shows held-out "
             "accuracy and BCE per σ band. Its `negative` input takes the negative prompt you will sample with: "
             "guiding with that same negative then costs no extra pass through the UNet.\n\nBoth data sets are cached on disk: re-runs skip them. "
             "Needs `checkpoints/v1-5-pruned-emaonly-fp16.safetensors` (or your own checkpoint)."),
        Node("ckpt", "CheckpointLoaderSimple", 0, {"ckpt_name": SD15["name"]}, models=[SD15]),
        Node("pos", "CLIPTextEncode", 1, {"text": POSITIVE}, title="Your usual prompt"),
        Node("neg", "CLIPTextEncode", 1, {"text": NEGATIVE}, title="Negative prompt"),
        Node("real", "DGEncodeRealImages", 2, {"folder": "dg_real", "resolution": 512, "batch_size": 8}),
        Node("fake", "DGSampleFakeLatents", 2, {"count": 1000, "batch_size": 4, "seed": 0, "steps": 25, "cfg": 7.0,
                                               "sampler_name": "dpmpp_2m", "scheduler": "karras", "width": 512,
                                               "height": 512}),
        Node("train", "DGTrainDiscriminator", 3, {"filename": "sd15_dg", "architecture": "features"}),
        Node("plot", "PreviewImage", 4, title="Held-out accuracy and BCE per σ band", width=520),
    ], [
        ("ckpt", "VAE", "real", "vae"), ("ckpt", "CLIP", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"),
        ("ckpt", "MODEL", "fake", "model"), ("pos", 0, "fake", "positive"), ("neg", 0, "fake", "negative"),
        ("ckpt", "MODEL", "train", "model"), ("real", 0, "train", "real_latents"), ("fake", 0, "train", "fake_latents"),
        ("train", 1, "plot", "images"), ("neg", 0, "train", "negative"),
    ], focus=["real", "fake", "train"]),
    Workflow("6_cpu_demo_digits", "The CPU demo: the pack's embedded digits model without and with DG", [
        note("## The CPU demo (nothing to download)\n\n"
             "The pack's embedded digits model (a real ComfyUI model, 0.55M parameters) and its features "
             "discriminator `digits_dg.safetensors`: 64 digits without and with DG (w = 4, heun 18 steps, DG on "
             "each step's first evaluation), same seeds. Runs in seconds on any CPU.\n\n"
             "On the benchmark this setting cut the Fréchet distance to real digits by 28%."),
        Node("model", "DGLoadDemoModel", 0),
        Node("disc", "LoadDiscriminator", 0, {"discriminator_name": "digits_dg.safetensors"}),
        Node("dg", "DiscriminatorGuidanceV2", 1, {"weight": 4.0, "intermediate_weight": 0.0}),
        Node("latent", "EmptyLatentImage", 1, {"width": 64, "height": 64, "batch_size": 64}),
        Node("plain", "KSampler", 2, {"seed": 0, "control_after_generate": "fixed", "steps": 18, "cfg": 1.0,
                                      "sampler_name": "heun", "scheduler": "karras"}, title="KSampler (without DG)"),
        Node("guided", "KSampler", 2, {"seed": 0, "control_after_generate": "fixed", "steps": 18, "cfg": 1.0,
                                       "sampler_name": "heun", "scheduler": "karras"}, title="KSampler (with DG)"),
        Node("dec_a", "DGDecodeDigits", 3, {"scale": 8}), Node("dec_b", "DGDecodeDigits", 3, {"scale": 8}),
        Node("grid", "DGComparisonGrid", 4, {"label_a": "without DG", "label_b": "DG w=4", "columns": 8}),
        Node("save", "SaveImage", 5, {"filename_prefix": "dg_demo"}, width=420),
    ], [
        ("model", 0, "dg", "model"), ("disc", 0, "dg", "discriminator"),
        ("model", 0, "plain", "model"), ("model", "positive", "plain", "positive"),
        ("model", "negative", "plain", "negative"), ("latent", 0, "plain", "latent_image"),
        ("dg", 0, "guided", "model"), ("model", "positive", "guided", "positive"),
        ("model", "negative", "guided", "negative"), ("latent", 0, "guided", "latent_image"),
        ("plain", 0, "dec_a", "samples"), ("guided", 0, "dec_b", "samples"),
        ("dec_a", 0, "grid", "images_a"), ("dec_b", 0, "grid", "images_b"), ("grid", 0, "save", "images"),
    ]),
    Workflow("7_cpu_demo_rejection_sampler", "The CPU demo with the DG Rejection Sampler on top of guidance", [
        note("## DG Rejection Sampler on a guided model (CPU, nothing to download)\n\n"
             "The demo's digits model guided by Discriminator Guidance (w = 2), sampled twice from the same noise: "
             "with KSampler's heun, and with the **DG Rejection Sampler** through SamplerCustomAdvanced (heun "
             "proposals judged by the same discriminator; rejected steps are noised back and tried again).\n\n"
             "On the benchmark: FD 17.10 with guidance alone, 13.91 with rejection on top, for about 1.2× the model "
             "evaluations (and some recall)."),
        Node("model", "DGLoadDemoModel", 0),
        Node("disc", "LoadDiscriminator", 0, {"discriminator_name": "digits_dg.safetensors"}),
        Node("dg", "DiscriminatorGuidanceV2", 1, {"weight": 2.0, "intermediate_weight": 0.0}),
        Node("latent", "EmptyLatentImage", 1, {"width": 64, "height": 64, "batch_size": 64}),
        Node("plain", "KSampler", 2, {"seed": 0, "control_after_generate": "fixed", "steps": 18, "cfg": 1.0,
                                      "sampler_name": "heun", "scheduler": "karras"}, title="KSampler (DG, heun)"),
        Node("guider", "CFGGuider", 2, {"cfg": 1.0}),
        Node("rej", "DGRejectionSampler", 2, {"base": "heun", "quantile": 0.9, "max_retries": 4}),
        Node("sched", "BasicScheduler", 2, {"scheduler": "karras", "steps": 18, "denoise": 1.0}),
        Node("noise", "RandomNoise", 2, {"noise_seed": 0, "control_after_generate": "fixed"}),
        Node("sampler", "SamplerCustomAdvanced", 3, width=260),
        Node("dec_a", "DGDecodeDigits", 4, {"scale": 8}), Node("dec_b", "DGDecodeDigits", 4, {"scale": 8}),
        Node("grid", "DGComparisonGrid", 5, {"label_a": "DG w=2", "label_b": "DG w=2 + rejection", "columns": 8}),
        Node("save", "SaveImage", 6, {"filename_prefix": "dg_rejection"}, width=420),
    ], [
        ("model", 0, "dg", "model"), ("disc", 0, "dg", "discriminator"), ("disc", 0, "rej", "discriminator"),
        ("dg", 0, "plain", "model"), ("model", "positive", "plain", "positive"),
        ("model", "negative", "plain", "negative"), ("latent", 0, "plain", "latent_image"),
        ("dg", 0, "guider", "model"), ("model", "positive", "guider", "positive"),
        ("model", "negative", "guider", "negative"), ("dg", 0, "sched", "model"),
        ("noise", 0, "sampler", "noise"), ("guider", 0, "sampler", "guider"), ("rej", 0, "sampler", "sampler"),
        ("sched", 0, "sampler", "sigmas"), ("latent", 0, "sampler", "latent_image"),
        ("plain", 0, "dec_a", "samples"), ("sampler", 0, "dec_b", "samples"),
        ("dec_a", 0, "grid", "images_a"), ("dec_b", 0, "grid", "images_b"), ("grid", 0, "save", "images"),
    ], focus=["dg", "rej", "guider", "sampler"]),
]

# Builds one graph with the frontend's LiteGraph, in the open page.
BUILD_JS = """(spec) => {
    const graph = app.graph;
    graph.clear();
    const made = {};
    const fail = (msg) => { throw new Error('comfy-dg workflow ' + spec.name + ': ' + msg); };
    for (const s of spec.nodes) {
        const n = LiteGraph.createNode(s.type);
        if (!n) fail('unknown node type ' + s.type);
        if (s.title) n.title = s.title;
        graph.add(n);
        for (const [name, value] of Object.entries(s.widgets)) {
            const w = (n.widgets || []).find(w => w.name === name);
            if (!w) fail(s.type + ' has no widget ' + name);
            w.value = value;
            if (w.callback && w.type !== 'combo') w.callback(value);
        }
        if (s.models.length) n.properties.models = s.models;
        const size = n.computeSize();
        n.size = [Math.max(size[0], s.width || 0, n.size[0]), Math.max(size[1], s.height || 0, n.size[1])];
        made[s.key] = n;
    }
    for (const [from, out, to, input] of spec.links) {
        const a = made[from], b = made[to];
        const o = typeof out === 'number' ? out : a.findOutputSlot(out);
        const i = b.findInputSlot(input);
        if (o < 0 || i < 0) fail('no slot for link ' + [from, out, to, input].join(' '));
        if (!a.connect(o, b, i)) fail('link refused ' + [from, out, to, input].join(' '));
    }
    // Columns left to right, nodes stacked in each.
    let x = 0;
    const columns = Math.max(...spec.nodes.map(s => s.column)) + 1;
    for (let c = 0; c < columns; c++) {
        const here = spec.nodes.filter(s => s.column === c).map(s => made[s.key]);
        let y = 0, width = 0;
        for (const n of here) {
            n.pos = [x, y];
            y += n.size[1] + 60;
            width = Math.max(width, n.size[0]);
        }
        x += width + 50;
    }
    graph.setDirtyCanvas(true, true);
    // The same id on every rebuild, so regenerated files differ only where the graph does.
    graph.id = spec.id;
    return Object.fromEntries(Object.entries(made).map(([key, n]) => [key, n.id]));
}"""


def spec(wf: Workflow) -> dict:
    return {"name": wf.name, "links": wf.links, "id": str(uuid.uuid5(uuid.NAMESPACE_URL, GUIDE + "/" + wf.name)),
            "nodes": [{"key": n.key, "type": n.type, "column": n.column, "widgets": n.widgets, "title": n.title,
                       "models": n.models, "height": n.height, "width": n.width or (340 if "Load" in n.type else None)}
                      for n in wf.nodes]}


def declared_models(workflow: dict) -> list:
    """The model files a UI-format workflow names (its nodes' `models` properties and a top-level list)."""
    found = list(workflow.get("models", []))
    for node in workflow["nodes"]:
        found += node.get("properties", {}).get("models", [])
    return found
