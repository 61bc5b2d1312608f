"""Training faults: interrupts at random steps and during the write, a disk that fills up (a real failing write:
the file-size limit of a child process), a writer killed mid-save, and damaged latent caches. Whatever happens,
there is never a partial file, an older file stays intact, and a damaged cache is rebuilt, never trusted."""
import errno
import json
import logging
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import comfy.model_management
import folder_paths
from comfy_dg import load_discriminator, save_discriminator
import comfy_dg.atomic
from comfy_dg.atomic import remove_stale_temp_files
from harness.tiny import empty_conditioning, tiny_model, tiny_vae
from comfy_dg.training import TrainConfig, Trainer
from comfy_dg.training.data import encode_folder, read_cache, sample_fakes
from conftest import COMFYUI, REPO
from digits import write_digit_folder
from robust_fuzz import _WritesMarker, join, split

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run

SEED = 7


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


@pytest.fixture(scope="module")
def data():
    model = tiny_model("EPS", seed=0, attention=False)
    g = torch.Generator().manual_seed(SEED)
    return {"model": model, "real": torch.randn(24, 4, 8, 8, generator=g) + 0.5,
            "fake": torch.randn(24, 4, 8, 8, generator=g)}


@pytest.fixture
def folder(discriminator_folder):
    return discriminator_folder


def old_file(folder, data):
    path = os.path.join(folder, "kept.safetensors")
    old = Trainer(data["model"], data["real"], data["fake"],
                  TrainConfig(architecture="standalone", steps=1, batch_size=8, width=16)).run()
    save_discriminator(old, path)
    with open(path, "rb") as f:
        return path, f.read()


def train_node(pack, data, steps, arch="standalone"):
    with torch.inference_mode():
        return pack["DGTrainDiscriminator"].execute(
            model=data["model"], real_latents={"samples": data["real"]}, fake_latents={"samples": data["fake"]},
            filename="kept", architecture=arch, steps=steps, batch_size=8, heldout_fraction=0.25, eval_every=5,
            patience=0, augment=True, seed=0)


STOPS = sorted(random.Random(SEED).sample(range(1, 40), 4))


@pytest.mark.parametrize("stop_at", STOPS)
def test_interrupt_at_a_random_step_leaves_the_old_file_intact(pack, data, folder, stop_at,
                                                              every_progress_update):
    path, before = old_file(folder, data)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == stop_at:
            comfy.model_management.interrupt_current_processing(True)
    import comfy.utils
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train_node(pack, data, steps=40, arch="features" if stop_at % 2 else "standalone")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert max(seen) == stop_at
    with open(path, "rb") as f:
        assert f.read() == before
    assert leftovers(folder) == []


@pytest.mark.parametrize("fault", ["disk-full", "interrupt", "keyboard"])
def test_a_failing_or_interrupted_write_leaves_the_old_file_intact(pack, data, folder, monkeypatch, fault):
    """The training node finishes training, then its write fails half-way: ENOSPC, ComfyUI's interrupt, or
    Ctrl-C. The error reaches the caller; the old file is as it was, and no partial file is left."""
    path, before = old_file(folder, data)
    written = []

    def failing_save_file(tensors, filename, metadata=None):
        written.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
        if fault == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device")
        if fault == "interrupt":
            raise comfy.model_management.InterruptProcessingException()
        raise KeyboardInterrupt
    monkeypatch.setattr(comfy_dg.atomic, "save_file", failing_save_file)
    expected = {"disk-full": OSError, "interrupt": comfy.model_management.InterruptProcessingException,
                "keyboard": KeyboardInterrupt}[fault]
    with pytest.raises(expected):
        train_node(pack, data, steps=3)
    assert written and all(os.path.dirname(os.path.dirname(w)) == folder for w in written)
    with open(path, "rb") as f:
        assert f.read() == before
    assert leftovers(folder) == []


DISK_FULL_CHILD = r"""
import json, os, resource, signal, sys
sys.path[:0] = [sys.argv[1]]
sys.path.append(sys.argv[2])
import torch
from comfy_dg import DiscriminatorInfo, StandaloneDiscriminator, save_discriminator
from comfy_dg.training.data import write_cache
from comfy_dg.atomic import save_safetensors
folder = sys.argv[3]
torch.manual_seed(0)
disc = StandaloneDiscriminator(DiscriminatorInfo(4, "SD15"), width=64, levels=2, emb_dim=64)
writers = {
    "discriminator.safetensors": lambda p: save_discriminator(disc, p),
    "cache.safetensors": lambda p: write_cache(p, torch.randn(64, 4, 16, 16), {"kind": "real"}),
    "run.train-state.safetensors": lambda p: save_safetensors({"disc.w": torch.randn(100000)}, p,
                                                              {"comfy_dg.train_state": "1"}, prefix=".comfy_dg-state-"),
}
for name in writers:                       # the old files, written while the disk has room
    with open(os.path.join(folder, name), "wb") as f:
        f.write(b"old contents of " + name.encode())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # the disk is full after `limit` bytes of any file
results = {}
for name, write in writers.items():
    try:
        write(os.path.join(folder, name))
        results[name] = "written"
    except OSError as e:
        results[name] = f"OSError {e}"
    except Exception as e:
        results[name] = f"{type(e).__name__}: {e}"
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
@pytest.mark.parametrize("limit", [0, 4096, 60000])
def test_a_full_disk_fails_every_writer_cleanly(tmp_path, limit):
    """A real failing write: the child's file-size limit makes safetensors' own (native) writer fail part-way,
    as a full disk does. Every writer of the pack raises OSError, keeps the old file and leaves no partial file."""
    out = subprocess.run([sys.executable, "-P", "-c", DISK_FULL_CHILD, REPO, COMFYUI, str(tmp_path), str(limit)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == {"discriminator.safetensors", "cache.safetensors", "run.train-state.safetensors"}
    for name, result in results.items():
        assert result.startswith("OSError comfy-dg: could not write") and "File too large" in result \
            and "older file of that name is unchanged" in result, (name, result)
        with open(tmp_path / name, "rb") as f:
            assert f.read() == b"old contents of " + name.encode(), name
    assert leftovers(tmp_path) == []


KILL_CHILD = r"""
import os, sys
sys.path[:0] = [sys.argv[1]]
import torch
from comfy_dg import DiscriminatorInfo, StandaloneDiscriminator, save_discriminator
path = sys.argv[2]
discs = []
for seed in (1, 2):
    torch.manual_seed(seed)
    discs.append(StandaloneDiscriminator(DiscriminatorInfo(4, "SD15"), width=160, levels=3, emb_dim=128))
print("ready", flush=True)
i = 0
while True:
    save_discriminator(discs[i % 2], path)
    i += 1
"""


def test_a_writer_killed_mid_save_leaves_a_whole_file_and_its_leftovers_are_cleaned(tmp_path):
    """SIGKILL at random moments while a process saves two discriminators in turn (files of ~10 MB) to one path:
    the path always holds one of the two, whole; a temporary file of the killed writer cannot be removed by it,
    is never listed as a discriminator, and the next save removes it."""
    torch.manual_seed(1)
    from comfy_dg import DiscriminatorInfo, StandaloneDiscriminator
    expected = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected.append(StandaloneDiscriminator(DiscriminatorInfo(4, "SD15"), width=160, levels=3, emb_dim=128))
    path = str(tmp_path / "d.safetensors")
    rng = random.Random(SEED)
    temp_seen = 0
    for attempt in range(5):
        child = subprocess.Popen([sys.executable, "-P", "-c", KILL_CHILD, REPO, path], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        deadline = time.time() + 30
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 1.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        loaded = load_discriminator(path)
        assert same_state(loaded, expected[0]) or same_state(loaded, expected[1]), f"attempt {attempt}"
        temp = leftovers(tmp_path)
        temp_seen += len(temp)
        assert all(n.startswith(".comfy_dg-") and n.endswith(".tmp") for n in temp), temp
        assert remove_stale_temp_files(str(tmp_path)) == temp     # the killed writer's, and only those
        assert leftovers(tmp_path) == []
    print(f"\nkilled 5 writers; {temp_seen} temporary files left by them, all removed")


LOCK_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_running_writers_temporary_file_is_not_removed(tmp_path):
    """Only writers that are gone lose their temporary folders. A writer holds its folder's lock while it works
    (this process, a live child: kept whatever their process ids say); a free lock on this host means the writer
    is gone; another host's folder, whose lock a network file system may not show, goes only once it is old."""
    import fcntl
    import socket
    import re
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine, childs = f".comfy_dg-{os.getpid()}@{host}~abc.tmp", f".comfy_dg-state-{dead}@{host}~abc.tmp"
    young_other, old_other = ".comfy_dg-1@other-host~abc.tmp", ".comfy_dg-2@other-host~abc.tmp"
    gone = f".comfy_dg-{os.getpid()}@{host}~gone.tmp"          # a live process id, but nobody holds the lock
    for name in (mine, childs, young_other, old_other, gone):
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial").write_bytes(b"x")
    for name in ("notes.tmp", ".comfy_dg-junk.tmp"):
        (tmp_path / name).write_bytes(b"x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / old_other, (two_days_ago, two_days_ago))
    fd = os.open(tmp_path / mine, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    child = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / childs)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert remove_stale_temp_files(str(tmp_path)) == sorted([old_other, gone])
        assert sorted(os.listdir(tmp_path)) == sorted([mine, childs, young_other, "notes.tmp", ".comfy_dg-junk.tmp"])
    finally:
        os.close(fd)
        child.kill()
        child.wait()
        child.stdout.close()
    assert remove_stale_temp_files(str(tmp_path)) == sorted([mine, childs])     # their writers are gone now


# --- damaged caches ---------------------------------------------------------------------------------------------

N_IMAGES = 8


@pytest.fixture(scope="module")
def cache_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    folder = write_digit_folder(str(root / "real"), N_IMAGES)
    vae = tiny_vae(seed=0)
    model = tiny_model("EPS", seed=0, attention=False)
    pos, neg = empty_conditioning(model)
    cache = str(root / "cache")
    with torch.inference_mode():
        real = encode_folder(folder, vae, 64, 8, cache_dir=cache)
        fake = sample_fakes(model, pos, neg, 4, 4, 0, 2, 3.0, "euler", "normal", 64, 64, cache_dir=cache)
    files = {f.split("-")[0]: os.path.join(cache, f) for f in os.listdir(cache)}
    blobs = {k: open(p, "rb").read() for k, p in files.items()}
    return {"folder": folder, "vae": vae, "model": model, "pos": pos, "neg": neg, "cache": cache, "real": real,
            "fake": fake, "files": files, "blobs": blobs, "marker": str(root / "unpickled")}


def flip_data_bit(blob):
    b = bytearray(blob)
    n = struct.unpack("<Q", blob[:8])[0]
    i = 8 + n + (len(blob) - 8 - n) // 3
    b[i] ^= 0x04
    return bytes(b)


def retensor(change):
    """A cache whose tensors are edited and written back with safetensors and its original metadata."""
    def edit(blob, marker=None):
        from safetensors.torch import load, save
        header, _ = split(blob)
        tensors = load(blob)
        change(tensors)
        return save(tensors, metadata=header.get("__metadata__"))
    return edit


def remeta(change):
    def edit(blob, marker=None):
        header, data = split(blob)
        change(header["__metadata__"])
        return join(header, data)
    return edit


def set_fact(key, value):
    def change(meta):
        facts = json.loads(meta["comfy_dg.cache"])
        facts[key] = value
        meta["comfy_dg.cache"] = json.dumps(facts)
    return change


CACHE_DAMAGE = {
    "empty": lambda b, m: b"",
    "truncated-in-header": lambda b, m: b[:20],
    "truncated-in-data": lambda b, m: b[:len(b) - 100],
    "header-length-2**40": lambda b, m: struct.pack("<Q", 2 ** 40) + b[8:],
    "header-not-json": lambda b, m: b[:8] + b"\xff" * struct.unpack("<Q", b[:8])[0] + b[8 + struct.unpack("<Q", b[:8])[0]:],
    "pickle": lambda b, m: pickle.dumps({"latents": _WritesMarker(m)}),
    "one-bit-flipped-in-data": lambda b, m: flip_data_bit(b),
    "nan-latents": retensor(lambda t: t["latents"].view(-1).__setitem__(3, float("nan"))),
    "fewer-latents": retensor(lambda t: t.__setitem__("latents", t["latents"][:-1].clone())),
    "3d-latents": retensor(lambda t: t.__setitem__("latents", t["latents"][0].clone())),
    "int-latents": retensor(lambda t: t.__setitem__("latents", t["latents"].to(torch.int32))),
    "renamed-tensor": retensor(lambda t: t.__setitem__("other", t.pop("latents"))),
    "extra-tensor": retensor(lambda t: t.__setitem__("extra", torch.zeros(2))),
    "no-metadata": remeta(lambda meta: meta.clear()),
    "checksum-edited": remeta(set_fact("sha256", "0" * 64)),
    "facts-not-json": remeta(lambda meta: meta.__setitem__("comfy_dg.cache", "[[[")),
}


@pytest.fixture
def no_unpickling(monkeypatch):
    calls = []

    def refused(*a, **k):
        calls.append(1)
        raise AssertionError("unpickling was attempted")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refused)
    monkeypatch.setattr(torch, "load", refused)
    return calls


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_damaged_real_cache_is_rebuilt_never_trusted(cache_data, damage, monkeypatch, no_unpickling, caplog):
    path, good = cache_data["files"]["real"], cache_data["blobs"]["real"]
    with open(path, "wb") as f:
        f.write(CACHE_DAMAGE[damage](good, cache_data["marker"]))
    encoded = []
    real_encode = cache_data["vae"].encode
    monkeypatch.setattr(cache_data["vae"], "encode", lambda px: encoded.append(len(px)) or real_encode(px))
    try:
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="comfy_dg"):
            rebuilt = encode_folder(cache_data["folder"], cache_data["vae"], 64, 8, cache_dir=cache_data["cache"])
        assert sum(encoded) == N_IMAGES, f"{damage}: the damaged cache was used"
        assert torch.equal(rebuilt, cache_data["real"])
        assert "ignoring damaged cache" in caplog.text
        assert torch.equal(read_cache(path, N_IMAGES), cache_data["real"])     # rewritten whole
        assert not no_unpickling and not os.path.exists(cache_data["marker"])
    finally:
        with open(path, "wb") as f:
            f.write(good)


def test_an_intact_cache_is_used(cache_data, monkeypatch):
    """Control: the same cache, undamaged, is read instead of encoding again."""
    monkeypatch.setattr(cache_data["vae"], "encode", lambda px: pytest.fail("encoded again"))
    with torch.inference_mode():
        assert torch.equal(encode_folder(cache_data["folder"], cache_data["vae"], 64, 8,
                                         cache_dir=cache_data["cache"]), cache_data["real"])


@pytest.mark.parametrize("damage", ["truncated-in-data", "one-bit-flipped-in-data", "fewer-latents"])
def test_a_damaged_fake_cache_is_resampled(cache_data, damage, monkeypatch):
    import comfy.sample
    path, good = cache_data["files"]["fake"], cache_data["blobs"]["fake"]
    with open(path, "wb") as f:
        f.write(CACHE_DAMAGE[damage](good, cache_data["marker"]))
    calls = []
    real_sample = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
    try:
        with torch.inference_mode():
            fake = sample_fakes(cache_data["model"], cache_data["pos"], cache_data["neg"], 4, 4, 0, 2, 3.0, "euler",
                                "normal", 64, 64, cache_dir=cache_data["cache"])
        assert calls, f"{damage}: the damaged cache was used"
        assert torch.equal(fake, cache_data["fake"])
    finally:
        with open(path, "wb") as f:
            f.write(good)


def test_a_file_being_written_is_never_listed_as_a_discriminator(folder, monkeypatch):
    """While a save is under way (its data written, not yet renamed into place), the discriminator list that
    Load Discriminator shows holds only the finished files."""
    import comfy_dg.atomic
    from comfy_dg import DiscriminatorInfo, StandaloneDiscriminator
    torch.manual_seed(0)
    disc = StandaloneDiscriminator(DiscriminatorInfo(4, "SD15"), width=16, levels=2, emb_dim=32)
    save_discriminator(disc, os.path.join(folder, "done.safetensors"))
    seen = []
    real_save_file = comfy_dg.atomic.save_file

    def save_and_look(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        files, _ = folder_paths.recursive_search(folder, excluded_dir_names=[".git"])
        seen.append(folder_paths.filter_files_extensions(files, folder_paths.folder_names_and_paths[
            "discriminators"][1]))
    monkeypatch.setattr(comfy_dg.atomic, "save_file", save_and_look)
    save_discriminator(disc, os.path.join(folder, "new.safetensors"))
    assert seen == [["done.safetensors"]]
    assert sorted(os.listdir(folder)) == ["done.safetensors", "new.safetensors"]
