import os

import folder_paths
from comfy_api.latest import io

from comfy_dg.errors import DGError
from comfy_dg.files import file_digest, load_discriminator
from .types import Discriminator

FOLDER = "discriminators"


def safe_path(name: str) -> str:
    """The full path of a listed discriminator; names that climb out of the folder are refused. An entry ComfyUI
    lists but does not resolve (a FIFO, a broken link) is returned too, for the loader to say what it is."""
    if not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise DGError(f"comfy-dg: discriminator name '{name}' points outside models/{FOLDER}; choose a file "
                         "from the list.")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None and "\0" not in name and name.strip():
        path = next((p for p in (os.path.join(f, name) for f in folder_paths.get_folder_paths(FOLDER))
                     if os.path.lexists(p)), None)
    if path is None:
        raise DGError(f"comfy-dg: discriminator '{name}' is not in models/{FOLDER} "
                         f"(folders searched: {folder_paths.get_folder_paths(FOLDER)}). Put the file there and "
                         "press R in the UI to refresh the list.")
    return path


def listed():
    """Discriminator files, less the training CLI's working files if it was pointed at this folder."""
    return [n for n in folder_paths.get_filename_list(FOLDER)
            if not n.endswith(".train-state.safetensors") and not any(p.endswith(".cache") for p in n.split("/")[:-1])]


class LoadDiscriminator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadDiscriminator",
            display_name="Load Discriminator",
            category="model_patches/discriminator_guidance",
            description="Loads a discriminator (.safetensors made by comfy-dg) from models/discriminators, for "
                        "Discriminator Guidance. Pickle files (.pt/.ckpt) are refused: they can run code.",
            inputs=[
                io.Combo.Input("discriminator_name", options=listed(),
                               tooltip="A file in models/discriminators."),
            ],
            outputs=[Discriminator.Output(tooltip="The discriminator d(x, σ), for Discriminator Guidance.")],
        )

    @classmethod
    def fingerprint_inputs(cls, discriminator_name=None, **kwargs):
        """The file's SHA-256, as core's Load Image does: a file replaced under the same name is loaded again."""
        try:
            return file_digest(safe_path(discriminator_name))
        except (DGError, OSError) as e:       # reported when the node runs
            return f"unavailable: {e}"

    @classmethod
    def execute(cls, discriminator_name) -> io.NodeOutput:
        return io.NodeOutput(load_discriminator(safe_path(discriminator_name)))
