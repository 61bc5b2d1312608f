"""Writing a safetensors file atomically: a crash or a failing write leaves any older file of the same name
intact, and no partial file behind.

The data goes to a hidden temporary folder beside the target (safetensors writes its own temporary file in the
folder it writes to); the finished file is renamed over the target, and the folder removed. A writer killed
mid-write (SIGKILL, power loss) cannot remove its folder; the folder's name records the writer's process id and
host, and the next save into the same place removes those whose writer is gone."""
import os
import re
import shutil
import socket
import tempfile

from safetensors.torch import save_file

_TEMP = re.compile(r"^\.comfy_dg-(?:[a-z]+-)?(\d+)@(.+?)~.*\.tmp$")


def _host():
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, but another user's (EPERM)
        return True
    return True


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove the temporary folders (or files) left in `folder` by writers on this host that no longer run;
    returns their names."""
    host, removed = _host(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        m = _TEMP.match(name)
        if m is None or m.group(2) != host or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
        except OSError:
            pass
    return removed


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None, prefix: str = ".comfy_dg-") -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    tmp_dir = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}@{_host()}~", suffix=".tmp", dir=folder)
    tmp = os.path.join(tmp_dir, "partial")     # no .safetensors suffix: never listed as a model while written
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as e:   # safetensors reports a failing write (a full disk) as SafetensorError
            if isinstance(e, OSError) or "I/O error" not in str(e):
                raise
            raise OSError(f"comfy-dg: could not write '{path}' ({e}); any older file of that name is "
                          "unchanged") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # a saved file follows the umask, as any new file would
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
