"""Where the pack may read and write, checked before any work: image folders inside ComfyUI's input folder (or a
folder the server's administrator allows), discriminator names that are plain, visible, shadow no other file,
fit the file system and go to a writable folder, and a numbered name instead of overwriting an existing file.

Server-side settings (environment variables of the ComfyUI process; never prompt inputs):
    COMFY_DG_IMAGE_ROOTS     folders besides input/ that Encode Real Images (DG) may read, os.pathsep-separated
                             (default: none)
    COMFY_DG_CACHE_GB        size bound of the latent cache in user/comfy-dg/cache (default 10; 0: no cache)
    COMFY_DG_MAX_LATENT_GB   largest set of real or fake latents the nodes build at once (default 4)
"""
import os
import re
import stat
import sys
import tempfile

from .errors import LocationError

IMAGE_ROOTS_ENV = "COMFY_DG_IMAGE_ROOTS"
CACHE_ENV, CACHE_DEFAULT_GB = "COMFY_DG_CACHE_GB", 10.0
LATENT_ENV, LATENT_DEFAULT_GB = "COMFY_DG_MAX_LATENT_GB", 4.0
SUFFIX = ".safetensors"
STATE_SUFFIX = ".train-state"       # the training CLI's state files, hidden from Load Discriminator's list
COUNTER = "_{:05d}_"                # as ComfyUI's savers number their files
_NUMBERED = re.compile(r"^(.*)_(\d{5,})_$")


def gigabytes(name: str, default: float) -> int:
    """A size setting in bytes, from the environment variable `name` (in GiB)."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise LocationError(f"comfy-dg: the server setting {name}={raw!r} is not a number of gigabytes") from None
    if not value >= 0:
        raise LocationError(f"comfy-dg: the server setting {name}={raw!r} must be 0 or more")
    return int(value * 2 ** 30)


def within(root: str, path: str) -> bool:
    """Whether `path` resolves (symbolic links followed) inside `root`: ComfyUI's own check where it has one."""
    try:
        import folder_paths
        check = getattr(folder_paths, "is_within_directory", None)
    except ImportError:
        check = None
    if check is not None:
        return check(root, path)
    try:
        root, path = os.path.realpath(root), os.path.realpath(path)
        return os.path.commonpath((root, path)) == root
    except ValueError:          # a NUL in the path; other drives on Windows
        return False


def image_roots(input_dir: str) -> list[str]:
    """ComfyUI's input folder and the folders the server's administrator allows in COMFY_DG_IMAGE_ROOTS."""
    extra = [p for p in os.environ.get(IMAGE_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [input_dir] + [os.path.abspath(os.path.expanduser(p.strip())) for p in extra]


def image_folder(name: str, roots: list[str]) -> str:
    """The folder `name` (relative to roots[0], ComfyUI's input folder, or an absolute path inside one of the
    roots), refused when it resolves outside all of them."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise LocationError("comfy-dg: give the name of a folder of images inside ComfyUI's input folder "
                            "(e.g. dg_real for input/dg_real).")
    path = os.path.abspath(os.path.join(roots[0], name))
    if any(within(root, path) for root in roots):
        return path
    raise LocationError(f"comfy-dg: the image folder {name!r} is outside ComfyUI's input folder, and the pack "
                        "reads only there. Put the images in a folder inside input/ (e.g. input/dg_real) and give "
                        f"its name. Large datasets elsewhere: use the command line (python -m comfy_dg.train), or "
                        f"ask the server's administrator to allow the folder with the {IMAGE_ROOTS_ENV} "
                        "environment variable.")


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _control_characters(name: str) -> str:
    """The control characters in `name`, as 'U+0009, U+000A' (empty: none)."""
    return ", ".join(sorted({f"U+{ord(c):04X}" for c in name if ord(c) < 32 or ord(c) == 127}))


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):
        return 255


def discriminator_name(filename: str, folder: str) -> str:
    """The file name a discriminator called `filename` is saved under in `folder` (…​.safetensors, any case of
    the suffix kept), or LocationError naming what is wrong with it."""
    where = "models/discriminators"
    name = filename.strip() if isinstance(filename, str) else ""
    if not name or "/" in name or "\\" in name or name.startswith(".") or os.path.isabs(name) or name in ("..",):
        raise LocationError(f"comfy-dg: {filename!r} is not a plain file name; give a name such as 'my_model_dg' "
                            f"(it is saved in {where}).")
    bad = _control_characters(name)
    if bad:
        raise LocationError(f"comfy-dg: the file name {filename!r} holds control characters ({bad}); "
                            "use letters, digits, spaces, '-' and '_'.")
    if not name.lower().endswith(SUFFIX):
        name += SUFFIX
    stem = name[:-len(SUFFIX)]
    if not stem.strip() or stem.endswith("."):
        raise LocationError(f"comfy-dg: {filename!r} is not a usable file name; give a name such as 'my_model_dg'.")
    if stem.lower().endswith(STATE_SUFFIX):
        raise LocationError(f"comfy-dg: names ending in '{STATE_SUFFIX}' are the training command line's state "
                            f"files, which Load Discriminator does not list; choose another name than {filename!r}.")
    try:
        longest = len((stem + COUNTER.format(0) + SUFFIX).encode(sys.getfilesystemencoding(), "surrogateescape"))
    except UnicodeEncodeError:
        raise LocationError(f"comfy-dg: the file name {filename!r} cannot be written on this file system; use "
                            "plain letters and digits.") from None
    limit = _name_max(folder if os.path.isdir(folder) else os.path.dirname(folder) or ".")
    if longest > limit:
        raise LocationError(f"comfy-dg: the file name {filename!r} is too long: with a counter suffix it takes "
                            f"{longest} bytes and the file system allows {limit}; choose a shorter name.")
    return name


def check_output_path(path: str, longest_suffix: str = SUFFIX):
    """For the command line's --out: no control characters, short enough for the file system with the longest
    suffix the run writes beside it, and a writable folder."""
    base = os.path.basename(path)
    bad = _control_characters(base)
    if bad:
        raise LocationError(f"comfy-dg: the file name {base!r} holds control characters ({bad})")
    folder = os.path.dirname(os.path.abspath(path))
    longest = len(os.fsencode(base[:-len(SUFFIX)] + longest_suffix))
    limit = _name_max(folder if os.path.isdir(folder) else ".")
    if longest > limit:
        raise LocationError(f"comfy-dg: the file name {base!r} is too long: the run writes '{longest_suffix}' "
                            f"files beside it, which take {longest} bytes, and the file system allows {limit}")
    check_writable(folder, f"'{folder}'")


def check_writable(folder: str, label: str):
    """Create `folder` if needed and write (and remove) a small file in it, so that a save at the end of a long
    run cannot fail for want of permission."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".comfy_dg-probe-", dir=folder)
        try:
            os.write(fd, b"comfy-dg")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise LocationError(f"comfy-dg: cannot write in {label} ({e.strerror or e}); nothing was trained. Make the "
                            "folder writable for the ComfyUI process, or save elsewhere.") from None


def shadowing(name: str, other_folders: list[str]) -> str | None:
    """The folder among `other_folders` that already holds a file `name` (compared without case, as some file
    systems and the list of Load Discriminator do), or None."""
    want = name.casefold()
    for folder in other_folders:
        try:
            if any(n.casefold() == want for n in os.listdir(folder)):
                return folder
        except OSError:
            continue
    return None


def numbered_names(name: str, folders: list[str]):
    """`name`, then `stem_00001_.safetensors`, ... from one past the highest number already used in `folders`."""
    stem, suffix = name[:-len(SUFFIX)], name[-len(SUFFIX):]
    yield name
    highest = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for n in names:
            if n.lower().endswith(SUFFIX):
                m = _NUMBERED.match(n[:-len(SUFFIX)])
                if m and m.group(1).casefold() == stem.casefold():
                    highest = max(highest, int(m.group(2)))
    n = highest + 1
    while True:
        yield stem + COUNTER.format(n) + suffix
        n += 1


def output_file(filename: str, folders: list[str], overwrite: bool) -> str:
    """Check, before any training, where a discriminator called `filename` goes: folders[0] (models/
    discriminators), a valid name that shadows no file of another discriminator folder (the shipped demo's, those
    of extra_model_paths.yaml), a writable folder. Returns the path to save to; without `overwrite` the save
    takes the next numbered name if a file is there by then (save_discriminator(..., overwrite=False))."""
    folder = folders[0]
    name = discriminator_name(filename, folder)
    other = shadowing(name, [f for f in folders[1:] if os.path.abspath(f) != os.path.abspath(folder)])
    if other is not None:
        raise LocationError(f"comfy-dg: a discriminator named '{name}' already exists in another discriminators "
                            "folder (shipped with the pack or shared through extra_model_paths.yaml); saving one "
                            "with that name would hide it in Load Discriminator's list. Choose another name.")
    target = os.path.join(folder, name)
    if os.path.isdir(target):
        raise LocationError(f"comfy-dg: '{name}' is a folder in models/discriminators; choose another name.")
    check_writable(folder, "models/discriminators")
    return target
