"""Writing a safetensors file atomically: a crash or a failing write leaves any older file of the same name
intact, and no partial file behind; with overwrite=False an existing file is never replaced, even by a writer
that finishes at the same moment.

The data goes to a hidden temporary folder beside the target (safetensors writes its own temporary file in the
folder it writes to); the finished file is renamed (or, without overwriting, hard-linked) onto the target, and
the folder removed. The writer holds an exclusive lock (flock) on its folder while it works. A writer killed
mid-write (SIGKILL, power loss) cannot remove its folder, but the kernel drops its lock: the next save into the
same place removes folders whose lock it can take. Process ids are not trusted for this, since processes in
other containers sharing the folder have ids from another namespace. Where a lock proves nothing (no flock, or
a folder written from another host, whose locks a network file system may not show), a folder is presumed
abandoned only after STALE_SECONDS."""
import errno
import os
import re
import shutil
import socket
import tempfile
import time

from safetensors.torch import save_file

try:
    import fcntl
except ImportError:          # Windows: no flock; the age rule alone applies
    fcntl = None

_TEMP = re.compile(r"^\.comfy_dg-(?:[a-z]+-)?(\d+)@(.+?)~.*\.tmp$")
STALE_SECONDS = 24 * 3600


def _host():
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _try_lock(path):
    """(fd holding an exclusive lock on `path`, or None; True when another open file holds it)."""
    if fcntl is None:
        return None, False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, False
    except OSError as e:
        os.close(fd)
        return None, e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove the temporary folders (or files) left in `folder` by writers that are gone; returns their names."""
    host, removed, now = _host(), [], time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        m = _TEMP.match(name)
        if m is None:
            continue
        path = os.path.join(folder, name)
        try:
            old = now - os.lstat(path).st_mtime > STALE_SECONDS
        except OSError:
            continue
        fd, held = _try_lock(path)
        try:
            if held or not (old or (fd is not None and m.group(2) == host)):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _locked_temp_folder(folder, prefix):
    """A new temporary folder in `folder` and the descriptor holding its lock (None where flock is missing)."""
    while True:
        tmp_dir = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}@{_host()}~", suffix=".tmp", dir=folder)
        if fcntl is None:
            return tmp_dir, None
        try:
            fd = os.open(tmp_dir, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:        # a cleaner took it in the instant before the lock: make another
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:                  # a file system without locks
            return tmp_dir, fd
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp_dir)):
                return tmp_dir, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _link_new(src, dst):
    """Put `src` at `dst` only if nothing is there (FileExistsError otherwise), atomically where the file
    system has hard links."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(dst):         # no hard links here: check, then rename (a narrow race remains)
            raise FileExistsError(errno.EEXIST, "File exists", dst) from None
        os.replace(src, dst)


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None, prefix: str = ".comfy_dg-",
                     overwrite: bool = True) -> str:
    """Write `tensors` to `path`; with overwrite=False, FileExistsError when a file is there (the new one is then
    not written)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    tmp_dir, lock = _locked_temp_folder(folder, prefix)
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
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    return path
