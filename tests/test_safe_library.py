"""Safe on a shared server, in process: stopping while data is prepared, the bounded latent cache, the atomic
writer's lock against other containers' process ids, one open per discriminator load, numbered names instead of
overwriting, the trainer's own random generator, pictures of RGBA images, class names. (What comes in through a
prompt is tested through a real server in test_safe_server.py.)"""
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_dg import DiscriminatorInfo, StandaloneDiscriminator, guide, load_discriminator, save_discriminator
from comfy_dg.atomic import remove_stale_temp_files
from comfy_dg.errors import DataError, LocationError, OptionError
from comfy_dg.locations import discriminator_name
from comfy_dg.pictures import tile
from comfy_dg.training import TrainConfig, Trainer
from comfy_dg.training import data as data_module
from comfy_dg.training.data import Interrupted, encode_folder, folder_labels, list_images, sample_fakes
from digits import write_digit_folder
from harness.tiny import empty_conditioning, tiny_model, tiny_vae


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(seed=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("EPS", seed=0, attention=False)


class Polls:
    """A should_stop() that answers True from its `stop_at`-th call on, and counts its calls."""

    def __init__(self, stop_at):
        self.stop_at, self.calls = stop_at, 0

    def __call__(self):
        self.calls += 1
        return self.calls >= self.stop_at


# --- should_stop while preparing data (item 14) and while listing (item 8) --------------------------------------

def count_loads(monkeypatch):
    loaded = []
    real = data_module.load_image
    monkeypatch.setattr(data_module, "load_image", lambda *a, **k: loaded.append(a[0]) or real(*a, **k))
    return loaded


def test_should_stop_is_checked_while_listing_before_any_image_is_read(tmp_path, vae, monkeypatch):
    for i in range(300):                       # a deep folder: listing it alone is real work
        write_digit_folder(str(tmp_path / "set" / f"d{i:03d}"), 1, seed=i)
    loaded = count_loads(monkeypatch)
    stop = Polls(3)
    with torch.inference_mode(), pytest.raises(Interrupted, match="listing"):
        encode_folder(str(tmp_path / "set"), vae, 64, 8, cache_dir=str(tmp_path / "cache"), should_stop=stop)
    assert stop.calls == 3 and loaded == []
    assert not os.path.exists(tmp_path / "cache")


def test_should_stop_is_honoured_while_encoding(tmp_path, vae, monkeypatch):
    folder = write_digit_folder(str(tmp_path / "set"), 12)
    loaded = count_loads(monkeypatch)
    stop = Polls(5)                                 # 1 poll while listing this flat folder, then one per image
    with torch.inference_mode(), pytest.raises(Interrupted, match="encoding"):
        encode_folder(folder, vae, 64, 8, cache_dir=str(tmp_path / "cache"), should_stop=stop)
    assert len(loaded) == 3, loaded                 # stopped before the 4th image, mid-batch
    assert not os.path.exists(tmp_path / "cache")


def test_should_stop_is_honoured_while_sampling(tmp_path, model):
    pos, neg = empty_conditioning(model)
    stop = Polls(4)                                 # before the batch, then at each sampling step
    with torch.inference_mode(), pytest.raises(Interrupted, match="sampling"):
        sample_fakes(model, pos, neg, 4, 4, 0, 20, 3.0, "euler", "normal", 64, 64, cache_dir=str(tmp_path / "c"),
                     should_stop=stop)
    assert stop.calls == 4                          # stopped at the 3rd of 20 steps of the only batch
    assert not os.path.exists(tmp_path / "c")


# --- sizes bounded up front, NaN never cached (item 13) ---------------------------------------------------------

def test_a_set_of_real_latents_too_large_is_refused_before_any_image_is_read(tmp_path, vae, monkeypatch):
    folder = write_digit_folder(str(tmp_path / "set"), 5)
    loaded = count_loads(monkeypatch)
    with torch.inference_mode(), pytest.raises(DataError, match=r"5 real latents of shape \(4, 64, 64\) "
                                                                            r"would take 320.0 KiB.*COMFY_DG_MAX"):
        encode_folder(folder, vae, 512, 8, max_bytes=300 * 1024)
    assert loaded == []


def test_samples_that_come_out_nan_are_refused_and_not_cached(tmp_path, model):
    pos, neg = empty_conditioning(model)
    broken = model.clone()
    broken.set_model_sampler_cfg_function(lambda args: args["cond"] * float("nan"))
    with torch.inference_mode(), pytest.raises(DataError, match="NaN or infinite"):
        sample_fakes(broken, pos, neg, 2, 2, 0, 2, 3.0, "euler", "normal", 64, 64, cache_dir=str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c")
    with torch.inference_mode(), pytest.raises(DataError, match="cfg is nan"):
        sample_fakes(model, pos, neg, 2, 2, 0, 2, float("nan"), "euler", "normal", 64, 64)


# --- the latent cache: bounded, least recently used first (item 10) --------------------------------------------

def test_the_cache_keeps_to_its_bound_dropping_the_least_recently_used(tmp_path, vae):
    cache = str(tmp_path / "cache")
    folders = [write_digit_folder(str(tmp_path / f"set{k}"), 4, seed=k) for k in range(4)]

    def encode(k, bound):
        with torch.inference_mode():
            return encode_folder(folders[k], vae, 64, 8, cache_dir=cache, cache_bytes=bound)

    def entries():
        return sorted(os.listdir(cache))
    encode(0, None)
    names = {0: entries()[0]}
    bound = int(2.5 * os.path.getsize(os.path.join(cache, names[0])))      # room for two entries
    time.sleep(0.05)
    encode(1, bound)
    names[1] = (set(entries()) - {names[0]}).pop()
    time.sleep(0.05)
    encode(2, bound)                                 # a third entry: the oldest (0) goes
    assert names[0] not in entries() and names[1] in entries() and len(entries()) == 2
    names[2] = (set(entries()) - {names[1]}).pop()
    time.sleep(0.05)
    encode(1, bound)                                 # a hit: 1 becomes the most recently used
    time.sleep(0.05)
    encode(3, bound)                                 # so 2 goes, not 1
    assert names[1] in entries() and names[2] not in entries() and len(entries()) == 2
    encode(3, 0)                                     # 0: no cache at all (nothing read or written)
    assert len(entries()) == 2
    # Touching one image makes a new entry, and the old one is dropped when the bound needs the room.
    img = os.path.join(folders[3], sorted(os.listdir(folders[3]))[0])
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    encode(3, bound)
    assert len(entries()) == 2 and sum(os.path.getsize(os.path.join(cache, n)) for n in entries()) <= bound


# --- the atomic writer's stale-folder cleanup (item 11) ---------------------------------------------------------

HOLDER = r"""
import fcntl, os, sys, time
path = sys.argv[1]
os.makedirs(path)
with open(os.path.join(path, "partial"), "wb") as f:
    f.write(b"half a discriminator")
fd = os.open(path, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow      # a subprocess holds the lock
@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_save_in_progress_in_another_pid_namespace_is_not_removed(tmp_path):
    """A writer in another container on the same host: its process id means nothing here (this one belongs to a
    process that has exited), but it holds its folder's lock, so its save in progress stays."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    gone_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    name = f".comfy_dg-{gone_pid}@{host}~other-namespace.tmp"
    writer = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / name)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        assert remove_stale_temp_files(str(tmp_path)) == []
        assert os.path.isfile(tmp_path / name / "partial")
        # A save next to it works and leaves it alone.
        save_discriminator(StandaloneDiscriminator(DiscriminatorInfo(4), width=16, levels=1, emb_dim=16),
                           str(tmp_path / "new.safetensors"))
        assert os.path.isfile(tmp_path / name / "partial")
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    assert remove_stale_temp_files(str(tmp_path)) == [name]      # its writer gone, the lock is free
    assert sorted(os.listdir(tmp_path)) == ["new.safetensors"]


# --- one open per load (item 12) --------------------------------------------------------------------------------

def small_disc(seed):
    torch.manual_seed(seed)
    return StandaloneDiscriminator(DiscriminatorInfo(4, "SD15"), width=16, levels=2, emb_dim=16)


def test_a_file_replaced_while_it_is_loaded_is_loaded_as_it_was_checked(tmp_path, monkeypatch):
    import comfy_dg.files as files
    path, other = str(tmp_path / "d.safetensors"), str(tmp_path / "other.safetensors")
    save_discriminator(small_disc(1), path)
    save_discriminator(small_disc(2), other)
    checked = load_discriminator(path).state_dict()
    real_build, swaps = files.build, []

    def build_and_swap(*a, **k):              # between the header's checks and the tensors' read
        if not swaps:
            swaps.append(os.replace(other, path))
        return real_build(*a, **k)
    monkeypatch.setattr(files, "build", build_and_swap)
    loaded = load_discriminator(path).state_dict()
    assert swaps, "the file was not replaced during the load: the test could not fail"
    assert all(torch.equal(loaded[k], checked[k]) for k in checked)


# --- never overwrite unless asked (item 7) ----------------------------------------------------------------------

def test_saves_that_may_not_overwrite_take_numbered_names_even_when_racing(tmp_path):
    path = str(tmp_path / "same.safetensors")
    first = save_discriminator(small_disc(1), path, overwrite=False)
    before = open(first, "rb").read()
    results, errors = [], []

    def save(seed):
        try:
            results.append(save_discriminator(small_disc(seed), path, overwrite=False))
        except Exception as e:        # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=save, args=(s,)) for s in range(2, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and first == path and open(path, "rb").read() == before
    assert sorted(os.path.basename(r) for r in results) == [f"same_{n:05d}_.safetensors" for n in range(1, 7)]
    assert save_discriminator(small_disc(9), path) == path and open(path, "rb").read() != before   # overwrite=True


@pytest.mark.parametrize("filename, saved", [("UP.SAFETENSORS", "UP.SAFETENSORS"), ("x.Safetensors", "x.Safetensors"),
                                             ("plain", "plain.safetensors"), (" spaced name ", "spaced name.safetensors")])
def test_the_safetensors_suffix_is_recognised_in_any_case(tmp_path, filename, saved):
    assert discriminator_name(filename, str(tmp_path)) == saved


@pytest.mark.parametrize("filename, problem", [("x.train-state", "state files"), ("x.TRAIN-STATE.safetensors", "state"),
                                               ("tab\there", "control characters"), ("nul\0", "control characters"),
                                               ("a" * 250, "too long"), (".safetensors", "plain file name"),
                                               ("\ud800", "cannot be written")])
def test_unusable_names_are_refused(tmp_path, filename, problem):
    with pytest.raises(LocationError, match=problem):
        discriminator_name(filename, str(tmp_path))


# --- the trainer's own generator (item 14) ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["standalone", "features"])
def test_building_a_trainer_leaves_the_global_rng_alone(model, arch):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    config = TrainConfig(architecture=arch, steps=1, batch_size=4, width=16)
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    a = Trainer(model, real, fake, config)
    assert torch.equal(torch.rand(8), expected), "building the trainer reseeded or advanced the global RNG"
    b = Trainer(model, real, fake, config)
    c = Trainer(model, real, fake, TrainConfig(architecture=arch, steps=1, batch_size=4, width=16, seed=1))
    sa, sb, sc = a.disc.state_dict(), b.disc.state_dict(), c.disc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)                 # same seed, same start
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)             # another seed, another start
    # PyTorch's default scale: a Linear's weights within ±1/sqrt(fan_in), its bias too.
    w = a.disc.out.weight.detach()
    assert float(w.abs().max()) <= 1 / w.shape[1] ** 0.5 and float(w.std()) > 0


# --- pictures of RGBA images (item 13) --------------------------------------------------------------------------

def test_rgba_images_are_composited_over_white():
    rgba = torch.zeros(1, 2, 2, 4)
    rgba[..., 3] = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    grid = tile(rgba, pad=0)
    assert grid.shape == (2, 2, 3)
    assert grid[0, 0].tolist() == [0, 0, 0] and grid[0, 1].tolist() == [128, 128, 128]
    assert grid[1, 0].tolist() == [255, 255, 255]
    grey = tile(torch.full((1, 2, 2, 1), 0.2), pad=0)
    assert (grey == 51).all()


# --- class names (item 13) --------------------------------------------------------------------------------------

def test_class_names_are_ordered_without_regard_to_case(tmp_path):
    for name in ("c", "B", "a"):
        write_digit_folder(str(tmp_path / name), 2, seed=ord(name))
    files = list_images(str(tmp_path))
    labels, names = folder_labels(str(tmp_path), files)
    assert names == ["a", "B", "c"]
    assert {os.path.basename(os.path.dirname(f)): int(k) for f, k in zip(files, labels)} == {"a": 0, "B": 1, "c": 2}


def test_class_names_are_stored_and_accepted_by_name(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(12, 4, 8, 8, generator=g), torch.randn(12, 4, 8, 8, generator=g)
    labels = torch.arange(12) % 3
    disc = Trainer(model, real, fake, TrainConfig(architecture="standalone", steps=1, batch_size=4, width=16),
                   real_labels=labels, fake_labels=labels, class_names=["a", "B", "c"]).run()
    path = save_discriminator(disc, str(tmp_path / "named.safetensors"))
    loaded = load_discriminator(path)
    assert loaded.info.class_names == ["a", "B", "c"] and loaded.info.num_classes == 3
    assert loaded.info.class_index("B") == 1 and loaded.info.class_index("b") == 1
    guided = guide(model, loaded, class_name="c")
    (patch,) = [p for p in guided.model_options["sampler_post_cfg_function"] if hasattr(p, "labels")]
    assert patch.options["class_label"] == 2
    with pytest.raises(OptionError, match=r"no class named 'd'.*0 = 'a', 1 = 'B', 2 = 'c'"):
        guide(model, loaded, class_name="d")
    with pytest.raises(OptionError, match="1 = 'B'"):
        guide(model, loaded, class_label=5)
    with pytest.raises(OptionError, match="not both"):
        guide(model, loaded, class_label=1, class_name="c")
    # Ranking and the rejection sampler take the class by name too, as the label it stands for.
    from comfy_dg.ranking import realism_scores
    from comfy_dg.rejection import dg_rejection_sampler
    from builders import custom_advanced_with
    latents = torch.randn(4, 4, 8, 8, generator=g)
    assert torch.equal(realism_scores(model, loaded, latents, class_name="C"),
                       realism_scores(model, loaded, latents, class_label=2))
    assert not torch.equal(realism_scores(model, loaded, latents, class_label=2),
                           realism_scores(model, loaded, latents, class_label=0))
    with pytest.raises(OptionError, match="no class named 'd'"):
        realism_scores(model, loaded, latents, class_name="d")
    by_name = custom_advanced_with(model, dg_rejection_sampler(loaded, quantile=0.5, class_name="c"))
    assert torch.equal(by_name, custom_advanced_with(model, dg_rejection_sampler(loaded, quantile=0.5, class_label=2)))
    with pytest.raises(OptionError, match="not both"):
        custom_advanced_with(model, dg_rejection_sampler(loaded, class_label=1, class_name="c"))
    # An unnamed discriminator's file carries no names (older versions read it as before).
    plain = Trainer(model, real, fake, TrainConfig(architecture="standalone", steps=1, batch_size=4, width=16),
                    real_labels=labels, fake_labels=labels).run()
    assert "class_names" not in plain.info.to_dict()


# --- memory: crop first (item 2), EXIF orientation (item 9) -----------------------------------------------------

def test_crop_then_resize_matches_resize_then_crop(tmp_path):
    """The one-step crop and resize gives what the former resize-then-crop gave on ordinary images."""
    rng = np.random.default_rng(0)
    px = (rng.random((9, 15, 3)) * 255).astype(np.uint8)
    px = np.asarray(Image.fromarray(px).resize((288, 192), Image.Resampling.BICUBIC))      # smooth, like a photo
    Image.fromarray(px).save(tmp_path / "wide.png")
    got = data_module.load_image(str(tmp_path / "wide.png"), 64)
    with Image.open(tmp_path / "wide.png") as im:
        im = im.convert("RGB").resize((96, 64), Image.Resampling.BICUBIC)    # shorter side to 64, then crop
        ref = torch.from_numpy(np.asarray(im.crop((16, 0, 80, 64)), dtype=np.float32) / 255.0)
    assert got.shape == (64, 64, 3)
    assert float((got - ref).abs().mean()) < 0.002 and float((got - ref).abs().max()) < 0.05


# --- the command line checks its output before any work (item 6) -----------------------------------------------

def make_unwritable(folder):
    """Make `folder` unwritable (as root, permissions do not stop writes: the immutable flag does); returns the
    undo function, or None where it cannot be done here."""
    os.chmod(folder, 0o555)
    immutable = os.access(folder, os.W_OK) and subprocess.run(["chattr", "+i", folder],
                                                               capture_output=True).returncode == 0

    def undo():
        if immutable:
            subprocess.run(["chattr", "-i", folder])
        os.chmod(folder, 0o755)
    try:
        open(os.path.join(folder, "probe"), "wb").close()
    except OSError:
        return undo
    os.remove(os.path.join(folder, "probe"))
    undo()
    return None


@pytest.mark.parametrize("case", ["control", "long", "unwritable"])
def test_the_command_line_checks_its_output_before_loading_anything(tmp_path, capsys, case):
    from comfy_dg.training import cli
    folder = tmp_path / "out"
    folder.mkdir()
    name = {"control": "bad\x07name.safetensors", "long": "d" * 240 + ".safetensors"}.get(case, "d.safetensors")
    undo = make_unwritable(str(folder)) if case == "unwritable" else (lambda: None)
    if undo is None:
        pytest.skip("cannot make a folder unwritable here")
    try:
        # The checkpoint does not exist: the output is checked first, before anything is loaded or sampled.
        code = cli.main(["--checkpoint", str(tmp_path / "absent.safetensors"), "--real", str(tmp_path),
                         "--out", str(folder / name)])
    finally:
        undo()
    err = capsys.readouterr().err
    assert code == 2 and {"control": "control characters", "long": "too long",
                          "unwritable": "cannot write in"}[case] in err, err
    assert os.listdir(folder) == []
