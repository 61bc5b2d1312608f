"""Writing a safetensors file atomically: a crash or a failing write leaves any older file of the same name
intact, and no partial file behind."""
import os
import tempfile

from safetensors.torch import save_file


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None, prefix: str = ".comfy_dg-") -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600; a saved file follows the umask
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
