"""comfy-dg: Discriminator Guidance for ComfyUI. ComfyUI's entry point, nothing else."""
import os

import folder_paths

from .nodes import DiscriminatorGuidanceExtension

# models/discriminators, also reachable from extra_model_paths.yaml as `discriminators:`. Pickle suffixes are
# listed so that choosing one gives the loader's explanation instead of a silently missing file.
folder_paths.add_model_folder_path("discriminators", os.path.join(folder_paths.models_dir, "discriminators"),
                                   is_default=True)
# The embedded demo's discriminator, so that the demo workflow runs in any ComfyUI with the pack.
folder_paths.add_model_folder_path("discriminators", os.path.join(os.path.dirname(__file__), "demo", "discriminators"))
folder_paths.folder_names_and_paths["discriminators"] = (
    folder_paths.folder_names_and_paths["discriminators"][0], {".safetensors", ".pt", ".pth", ".ckpt", ".bin"})


async def comfy_entrypoint() -> DiscriminatorGuidanceExtension:
    return DiscriminatorGuidanceExtension()
