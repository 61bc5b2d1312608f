"""comfy-dg: Discriminator Guidance for ComfyUI. ComfyUI's entry point, nothing else."""
import importlib.util
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _library():
    """The library, imported once per process under its own name `comfy_dg` (the nodes, the tests and users' own
    code all import that one module, so its classes and state are never doubled)."""
    folder = os.path.join(HERE, "comfy_dg")
    lib = sys.modules.get("comfy_dg")
    if lib is None:
        spec = importlib.util.spec_from_file_location("comfy_dg", os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        lib = importlib.util.module_from_spec(spec)
        sys.modules["comfy_dg"] = lib
        try:
            spec.loader.exec_module(lib)
        except BaseException:
            del sys.modules["comfy_dg"]
            raise
    elif os.path.dirname(os.path.realpath(lib.__file__)) != os.path.realpath(folder):
        logging.getLogger("comfy_dg").warning("comfy-dg: another copy of the library (%s) is already loaded; the "
                                              "pack in %s uses it. Install the pack once.", lib.__file__, HERE)
    return lib


_library()

import folder_paths  # noqa: E402

from .nodes import DiscriminatorGuidanceExtension  # noqa: E402

# web/docs/<node id>.md: each node's help page, which the frontend fetches from /extensions/<pack folder>/docs/.
WEB_DIRECTORY = "./web"

# models/discriminators, also reachable from extra_model_paths.yaml as `discriminators:`. Pickle suffixes are
# listed so that choosing one gives the loader's explanation instead of a silently missing file.
folder_paths.add_model_folder_path("discriminators", os.path.join(folder_paths.models_dir, "discriminators"),
                                   is_default=True)
# The embedded demo's discriminator, so that the demo workflow runs in any ComfyUI with the pack.
folder_paths.add_model_folder_path("discriminators", os.path.join(HERE, "demo", "discriminators"))
folder_paths.folder_names_and_paths["discriminators"] = (
    folder_paths.folder_names_and_paths["discriminators"][0], {".safetensors", ".pt", ".pth", ".ckpt", ".bin"})


async def comfy_entrypoint() -> DiscriminatorGuidanceExtension:
    return DiscriminatorGuidanceExtension()
