"""Safe on a shared server: what a stranger's (or a careless user's) prompt can make the pack read, write, allocate
or reuse, through a real ComfyUI server. Folders outside input/ are refused; odd files fail with their name
instead of hanging the queue; memory stays bounded; fakes are reused only for the very same configuration;
changed folders and files are read again; bad or clashing names are caught before training and nothing is
overwritten unless asked."""
import json
import os
import shutil
import stat
import struct
import subprocess
import time
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_dg import DiscriminatorInfo, StandaloneDiscriminator, load_discriminator, save_discriminator
from comfy_dg.locations import IMAGE_ROOTS_ENV
from conftest import COMFYUI, REPO
from digits import write_digit_folder
from harness.comfy_server import ComfyServer

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run

QUICK = 60      # seconds: every refusal here comes long before this


def png_header_only(path, width, height):
    """A PNG whose header claims width × height pixels, with no image data: Pillow reads the size at open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def upright_and_rotated(folder):
    """a.png: an asymmetric picture; b.png: the same picture stored rotated, with EXIF orientation 6 (as a phone
    held upright writes it), which shows it upright."""
    os.makedirs(folder)
    px = torch.zeros(48, 64, 3)
    px[:, :, 0] = torch.linspace(0, 1, 64)
    px[4:20, 6:30, 1] = 1.0
    a = Image.fromarray((px.numpy() * 255).astype("uint8"))
    a.save(os.path.join(folder, "a.png"))
    exif = Image.Exif()
    exif[0x0112] = 6
    a.transpose(Image.Transpose.ROTATE_90).save(os.path.join(folder, "b.png"), exif=exif.tobytes())


def tiny_lora(path):
    """A LoRA for the tiny model's time embedding, in the generic 'diffusion_model.<layer>' format."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(5)
    save_file({"diffusion_model.time_embed.0.lora_up.weight": torch.randn(128, 4, generator=g),
               "diffusion_model.time_embed.0.lora_down.weight": torch.randn(4, 32, generator=g)}, path)


def small_disc(seed):
    torch.manual_seed(seed)
    return StandaloneDiscriminator(DiscriminatorInfo(4, "SD15"), width=16, levels=2, emb_dim=16)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy"))
    srv = ComfyServer(COMFYUI, base, [os.path.join(REPO, "tests", "comfy_nodes", "dg_test_nodes")])
    inp = os.path.join(base, "input")
    for name, n in (("digits", 6), ("grow", 3)):
        write_digit_folder(os.path.join(inp, name), n)
    outside = write_digit_folder(os.path.join(base, "outside_images"), 3)
    write_digit_folder(os.path.join(base, "allowed", "set"), 4)
    os.symlink(outside, os.path.join(inp, "link_out"))
    write_digit_folder(os.path.join(inp, "file_link"), 2)
    os.symlink(os.path.join(outside, sorted(os.listdir(outside))[0]), os.path.join(inp, "file_link", "z.png"))
    for name in ("fifo_set", "dangling_set", "hidden_set"):
        write_digit_folder(os.path.join(inp, name), 2)
    os.mkfifo(os.path.join(inp, "fifo_set", "x.png"))
    os.symlink(os.path.join(base, "nowhere.png"), os.path.join(inp, "dangling_set", "y.png"))
    with open(os.path.join(inp, "hidden_set", "._0.png"), "wb") as f:       # macOS AppleDouble: not an image
        f.write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    os.makedirs(os.path.join(inp, "hidden_set", ".thumbnails"))
    Image.new("RGB", (1, 1000), (200, 30, 30)).save(os.path.join(inp, "thin.png"))
    os.makedirs(os.path.join(inp, "thin"))
    shutil.move(os.path.join(inp, "thin.png"), os.path.join(inp, "thin", "thin.png"))
    write_digit_folder(os.path.join(inp, "square"), 1)
    os.makedirs(os.path.join(inp, "bomb"))
    png_header_only(os.path.join(inp, "bomb", "huge.png"), 20000, 20000)
    upright_and_rotated(os.path.join(inp, "exif"))
    for name in ("c", "B", "a"):
        write_digit_folder(os.path.join(inp, "classes", name), 2, seed=ord(name))
    discs = os.path.join(base, "models", "discriminators")
    save_discriminator(small_disc(1), os.path.join(discs, "swap.safetensors"))
    os.mkfifo(os.path.join(discs, "pipe.safetensors"))
    os.symlink(os.path.join(base, "nowhere.safetensors"), os.path.join(discs, "gone.safetensors"))
    os.makedirs(os.path.join(base, "models", "loras"))
    tiny_lora(os.path.join(base, "models", "loras", "tiny_lora.safetensors"))
    srv.start(env={IMAGE_ROOTS_ENV: os.path.join(base, "allowed")})
    yield srv
    srv.stop()


def run(server, prompt, timeout=QUICK):
    """The history entry of `prompt`; on a timeout the prompt is interrupted (and, for a reader stuck on a FIFO,
    the FIFO is opened so that its read returns) before the test fails."""
    try:
        return server.run(prompt, timeout=timeout)
    except TimeoutError:
        server.interrupt()
        fifo = os.path.join(server.base, "input", "fifo_set", "x.png")
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        raise


def error_of(hist):
    assert hist["status"]["status_str"] == "error", hist["status"]
    return " ".join(str(m[1].get("exception_message", "")) for m in hist["status"]["messages"]
                    if m[0] == "execution_error")


def saved_latent(server, hist, node):
    out = hist["outputs"][node]["latents"][0]
    return load_file(os.path.join(server.base, "output", out["subfolder"], out["filename"]))["latent_tensor"]


_prefix = iter(range(10 ** 6))


def encode_graph(folder, resolution=64, labels=False):
    return {"1": {"class_type": "DGTestTinyVAE", "inputs": {"seed": 0}},
            "2": {"class_type": "DGEncodeRealImages",
                  "inputs": {"folder": folder, "vae": ["1", 0], "resolution": resolution, "batch_size": 4,
                             "labels_from_subfolders": labels}},
            "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": f"e{next(_prefix)}"}}}


def cache_files(server):
    folder = os.path.join(server.base, "user", "comfy-dg", "cache")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


# --- item 1: only ComfyUI's input folder (and folders the administrator allows) ---------------------------------

@pytest.mark.parametrize("folder", ["/etc", "../outside_images", "{base}/outside_images", "link_out", "/"])
def test_folders_outside_the_input_folder_are_refused(server, folder):
    before = cache_files(server)
    msg = error_of(run(server, encode_graph(folder.format(base=server.base))))
    assert "outside ComfyUI's input folder" in msg and "COMFY_DG_IMAGE_ROOTS" in msg
    assert os.path.join(server.base, "input") not in msg      # no server path beyond what was given
    assert cache_files(server) == before


def test_a_file_linked_from_outside_is_refused(server):
    msg = error_of(run(server, encode_graph("file_link")))
    assert "'z.png'" in msg and "outside ComfyUI's input folder" in msg


def test_a_folder_the_administrator_allows_is_read(server):
    before = cache_files(server)
    hist = run(server, encode_graph(os.path.join(server.base, "allowed", "set")))
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert saved_latent(server, hist, "3").shape == (4, 4, 8, 8)
    # The cache entry records the folder's name, not where it is on the server.
    (entry,) = cache_files(server) - before
    from safetensors import safe_open
    with safe_open(os.path.join(server.base, "user", "comfy-dg", "cache", entry), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["comfy_dg.cache"])["folder"] == "set" and server.base not in json.dumps(meta)


# --- item 8: regular files only, one policy for unreadable ones --------------------------------------------------

def test_a_fifo_named_like_an_image_fails_at_once_naming_it(server):
    msg = error_of(run(server, encode_graph("fifo_set")))
    assert "'x.png'" in msg and "FIFO" in msg


def test_a_dangling_link_fails_before_any_image_is_encoded_naming_it(server):
    msg = error_of(run(server, encode_graph("dangling_set")))
    assert "'y.png'" in msg and "symbolic link to a file that does not exist" in msg


def test_hidden_files_and_folders_are_not_data(server):
    hist = run(server, encode_graph("hidden_set"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert saved_latent(server, hist, "3").shape[0] == 2


# --- item 2: memory of the order of the image, not of its aspect ratio -------------------------------------------

def peak_growth_mb(server, folder, nonce):
    """Peak RSS growth of the server while it encodes `folder` at 512 px (MiB)."""
    reset = run(server, {"1": {"class_type": "DGTestMemoryReport",
                               "inputs": {"nonce": nonce, "trim": True, "reset_peak": True}}})
    before = json.loads(reset["outputs"]["1"]["report"][0])
    g = encode_graph(folder, resolution=512)
    g["9"] = {"class_type": "DGTestMemoryReport", "inputs": {"nonce": nonce + 1, "trim": False, "after": ["2", 0]}}
    hist = run(server, g)
    assert hist["status"]["status_str"] == "success", hist["status"]
    after = json.loads(hist["outputs"]["9"]["report"][0])
    return (after["hwm_kb"] - before["rss_kb"]) / 1024


def test_a_thin_image_costs_no_more_memory_than_a_square_one(server):
    """A 1×1000 PNG of a few hundred bytes, resized shorter side first, was 512×512000 pixels (0.8 GB) before
    its crop."""
    square = peak_growth_mb(server, "square", 10)
    thin = peak_growth_mb(server, "thin", 20)
    print(f"\npeak growth encoding at 512 px: square image {square:.0f} MiB, 1×1000 image {thin:.0f} MiB")
    assert thin < square + 150


def test_an_image_too_large_to_decode_fails_naming_it(server):
    msg = error_of(run(server, encode_graph("bomb")))
    assert "'huge.png'" in msg and "decompression bomb" in msg.lower()


# --- item 9: EXIF orientation ------------------------------------------------------------------------------------

def test_exif_orientation_is_applied_as_load_image_does(server):
    hist = run(server, encode_graph("exif"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    latents = saved_latent(server, hist, "3")
    assert not torch.allclose(latents[0], latents[0].flip(-1), atol=1e-3)       # the picture is asymmetric
    torch.testing.assert_close(latents[1], latents[0], atol=1e-5, rtol=1e-5)


# --- item 5: changed folders and files are read again ------------------------------------------------------------

def test_adding_an_image_encodes_the_folder_again(server):
    first = saved_latent(server, run(server, encode_graph("grow") | {"3": {
        "class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "grow"}}}), "3")
    write_digit_folder(os.path.join(server.base, "input", "grow"), 4, seed=9)   # 4 more (one may repeat a name)
    again = run(server, encode_graph("grow") | {"3": {
        "class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "grow"}}})
    n = len([f for f in os.listdir(os.path.join(server.base, "input", "grow"))])
    assert first.shape[0] == 3 and saved_latent(server, again, "3").shape[0] == n > 3


def guided_graph(disc, prefix):
    return {"1": {"class_type": "DGTestFastModel", "inputs": {"seed": 0}},
            "2": {"class_type": "LoadDiscriminator", "inputs": {"discriminator_name": disc}},
            "3": {"class_type": "DiscriminatorGuidanceV2",
                  "inputs": {"model": ["1", 0], "discriminator": ["2", 0], "weight": 3.0, "intermediate_weight": 0.0,
                             "start_percent": 0.0, "end_percent": 1.0, "schedule": "constant", "boost": 1.0}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler",
                  "inputs": {"model": ["3", 0], "seed": 3, "steps": 3, "cfg": 3.0, "sampler_name": "euler",
                             "scheduler": "normal", "positive": ["1", 1], "negative": ["1", 2],
                             "latent_image": ["4", 0], "denoise": 1.0}},
            "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}}


def test_a_replaced_discriminator_file_is_loaded_again(server):
    path = os.path.join(server.base, "models", "discriminators", "swap.safetensors")
    first = saved_latent(server, run(server, guided_graph("swap.safetensors", "swap")), "6")
    save_discriminator(small_disc(2), path)
    second = saved_latent(server, run(server, guided_graph("swap.safetensors", "swap")), "6")
    assert not torch.allclose(first, second, atol=1e-4), "the old discriminator's result came back"


# --- item 4: fakes are reused only for the very configuration that made them -------------------------------------

def fakes_graph(change=None, nonce=0, batch_size=2):
    g = {"1": {"class_type": "DGTestTinyModel", "inputs": {"seed": 0, "model_type": "EPS", "family": "SD15",
                                                           "nonce": nonce}},
         "9": {"class_type": "DGSampleFakeLatents",
               "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2], "count": 2,
                          "batch_size": batch_size, "seed": 0, "steps": 2, "cfg": 3.0, "sampler_name": "euler",
                          "scheduler": "normal", "width": 64, "height": 64}},
         "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "fakes"}}}
    model = {"vpred": ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}),
             "shift3": ("ModelSamplingSD3", {"shift": 3.0}), "shift2": ("ModelSamplingSD3", {"shift": 2.0}),
             "rescale7": ("RescaleCFG", {"multiplier": 0.7}), "rescale5": ("RescaleCFG", {"multiplier": 0.5}),
             "lora": ("LoraLoaderModelOnly", {"lora_name": "tiny_lora.safetensors", "strength_model": 1.0}),
             "lora_half": ("LoraLoaderModelOnly", {"lora_name": "tiny_lora.safetensors", "strength_model": 0.5})}
    cond = {"timestep": ("ConditioningSetTimestepRange", {"start": 0.0, "end": 0.5}),
            "area": ("ConditioningSetArea", {"width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}),
            "flux_guidance": ("FluxGuidance", {"guidance": 3.5}),
            "sdxl_width": ("DGTestSetCondValue", {"key": "width", "value": 2048})}
    if change in model:
        kind, inputs = model[change]
        g["2"] = {"class_type": kind, "inputs": {"model": ["1", 0], **inputs}}
        g["9"]["inputs"]["model"] = ["2", 0]
    elif change in cond:
        kind, inputs = cond[change]
        g["2"] = {"class_type": kind, "inputs": {"conditioning": ["1", 1], **inputs}}
        g["9"]["inputs"]["positive"] = ["2", 0]
    elif change == "mask":
        g["3"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
        g["2"] = {"class_type": "ConditioningSetMask", "inputs": {"conditioning": ["1", 1], "mask": ["3", 0],
                                                                   "strength": 1.0, "set_cond_area": "default"}}
        g["9"]["inputs"]["positive"] = ["2", 0]
    elif change in ("controlnet", "controlnet_weak"):
        g["3"] = {"class_type": "DGTestTinyControlNet", "inputs": {"seed": 0}}
        g["4"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}}
        g["2"] = {"class_type": "ControlNetApplyAdvanced",
                  "inputs": {"positive": ["1", 1], "negative": ["1", 2], "control_net": ["3", 0], "image": ["4", 0],
                             "strength": 0.8 if change == "controlnet" else 0.5, "start_percent": 0.0,
                             "end_percent": 1.0}}
        g["9"]["inputs"]["positive"], g["9"]["inputs"]["negative"] = ["2", 0], ["2", 1]
    else:
        assert change is None, change
    return g


CHANGES = ["vpred", "shift3", "shift2", "timestep", "area", "mask", "controlnet", "controlnet_weak",
           "flux_guidance", "sdxl_width", "rescale7", "rescale5", "lora", "lora_half"]


def test_each_setting_that_changes_the_samples_gets_fresh_fakes_and_an_unchanged_graph_hits(server):
    nonce = iter(range(1, 10 ** 6))

    def new_files(graph):
        before = cache_files(server)
        hist = run(server, graph)
        assert hist["status"]["status_str"] == "success", hist["status"]
        return cache_files(server) - before, saved_latent(server, hist, "10")
    made, base = new_files(fakes_graph())
    assert len(made) == 1
    seen = set(made)
    # The same model rebuilt as new objects (ComfyUI runs the node again): the cache answers.
    again, latents = new_files(fakes_graph(nonce=next(nonce)))
    assert again == set() and torch.equal(latents, base)
    for change in CHANGES + ["batch_size"]:
        graph = fakes_graph(None, batch_size=1) if change == "batch_size" else fakes_graph(change)
        made, _ = new_files(graph)
        assert len(made) == 1 and not made & seen, f"{change}: the fakes of another configuration were reused"
        seen |= made
    for change in ("lora", "controlnet", "vpred", "area"):     # unchanged graphs, objects rebuilt: hits
        graph = fakes_graph(change, nonce=next(nonce))
        made, _ = new_files(graph)
        assert made == set(), f"{change}: the same configuration sampled again (its key is not by content)"


# --- item 13: cfg NaN, an up-front size bound, odd entries in models/discriminators, RGBA pictures --------------

def refusal(server, prompt):
    """The message of a prompt refused at validation or failing when it runs."""
    status, body = server.post_prompt(prompt)
    if status != 200:
        return json.dumps(body)
    return error_of(server.wait(body["prompt_id"], QUICK))


def test_cfg_nan_is_refused_and_nothing_cached(server):
    before = cache_files(server)
    g = fakes_graph()
    g["9"]["inputs"]["cfg"] = float("nan")
    assert "cfg" in refusal(server, g)
    assert cache_files(server) == before


def test_a_set_of_fakes_too_large_is_refused_up_front_with_its_size(server):
    g = fakes_graph()
    g["9"]["inputs"].update(count=1_000_000, width=8192, height=8192)
    try:
        msg = refusal(server, g)
    except TimeoutError:
        server.interrupt()
        raise
    assert f"{1_000_000 * 4 * 1024 * 1024 * 4 / 2 ** 40:.1f} TiB" in msg and "COMFY_DG_MAX_LATENT_GB" in msg


@pytest.mark.parametrize("name, problem", [("pipe.safetensors", "FIFO"),
                                           ("gone.safetensors", "symbolic link to a file that does not exist")])
def test_odd_entries_of_the_discriminators_folder_are_named_for_what_they_are(server, name, problem):
    msg = refusal(server, guided_graph(name, "odd"))
    assert problem in msg and "not in models/discriminators" not in msg


def test_the_comparison_grid_takes_rgba_images(server):
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0}},
         "2": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 32, "height": 32}},
         "3": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["2", 0]}},
         "4": {"class_type": "DGComparisonGrid", "inputs": {"images_a": ["3", 0], "images_b": ["1", 0],
                                                            "label_a": "rgba", "label_b": "rgb", "columns": 0}},
         "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    hist = run(server, g)
    assert hist["status"]["status_str"] == "success", hist["status"]
    shown = hist["outputs"]["5"]["images"][0]
    grid = Image.open(os.path.join(server.base, "temp", shown["subfolder"], shown["filename"])).convert("RGB")
    assert grid.getpixel((2 + 16, 18 + 2 + 16)) in ((127,) * 3, (128,) * 3)     # black at alpha 0.5 over white


# --- items 6, 7, 14: the trainer's name and inputs, checked before step 1 ----------------------------------------

def train_graph(filename, steps=2, seed=0, overwrite=None, architecture="standalone", negative=False):
    g = {"1": {"class_type": "DGTestFastModel", "inputs": {"seed": 0}},
         "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 8}},
         "5": {"class_type": "DGTrainDiscriminator",
               "inputs": {"model": ["1", 0], "real_latents": ["2", 0], "fake_latents": ["2", 0], "filename": filename,
                          "architecture": architecture, "steps": steps, "batch_size": 4, "learning_rate": 3e-4,
                          "weight_decay": 1e-7, "heldout_fraction": 0.25, "eval_every": 1, "patience": 0,
                          "augment": False, "seed": seed}}}
    if overwrite is not None:
        g["5"]["inputs"]["overwrite"] = overwrite
    if negative:
        g["5"]["inputs"]["negative"] = ["1", 2]
    return g


def discriminators(server):
    return sorted(n for n in os.listdir(os.path.join(server.base, "models", "discriminators")) if n.startswith("same"))


@pytest.mark.parametrize("filename, problem", [("bad\x01name", "control characters"),
                                               ("nul\x00name", "control characters"),
                                               ("a" * 300, "too long"),
                                               ("x.train-state", "state files"),
                                               ("digits_dg", "another discriminators folder")])
def test_a_bad_or_clashing_name_is_refused_before_training(server, filename, problem):
    """A million steps: had training started, this would not finish in time."""
    msg = error_of(run(server, train_graph(filename, steps=1_000_000)))
    assert problem in msg


@pytest.fixture
def read_only_folder(server):
    folder = os.path.join(server.base, "models", "discriminators")
    os.chmod(folder, 0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):                   # root: permissions do not stop it; the immutable flag does
            immutable = subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0
        probe = os.path.join(folder, "probe")
        try:
            open(probe, "wb").close()
            os.remove(probe)
            pytest.skip("cannot make a folder unwritable here (root without chattr)")
        except OSError:
            pass
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", folder])
        os.chmod(folder, 0o755)


def test_an_unwritable_folder_is_found_before_training(server, read_only_folder):
    msg = error_of(run(server, train_graph("fine_name", steps=1_000_000)))
    assert "cannot write in models/discriminators" in msg


def test_nothing_is_overwritten_unless_asked(server):
    folder = os.path.join(server.base, "models", "discriminators")
    assert run(server, train_graph("same", seed=0))["status"]["status_str"] == "success"
    first = open(os.path.join(folder, "same.safetensors"), "rb").read()
    assert run(server, train_graph("same", seed=1))["status"]["status_str"] == "success"
    assert discriminators(server) == ["same.safetensors", "same_00001_.safetensors"]
    assert open(os.path.join(folder, "same.safetensors"), "rb").read() == first
    assert run(server, train_graph("same", seed=2, overwrite=True))["status"]["status_str"] == "success"
    assert discriminators(server) == ["same.safetensors", "same_00001_.safetensors"]
    assert open(os.path.join(folder, "same.safetensors"), "rb").read() != first
    assert run(server, train_graph("UP.SAFETENSORS"))["status"]["status_str"] == "success"
    names = os.listdir(folder)
    assert "UP.SAFETENSORS" in names and not any(n.startswith("UP.SAFETENSORS.") for n in names)


def test_a_negative_prompt_with_a_standalone_discriminator_is_refused_as_the_cli_does(server):
    msg = error_of(run(server, train_graph("standalone_negative", architecture="standalone", negative=True)))
    assert "negative prompt" in msg and "features architecture" in msg
    assert not os.path.exists(os.path.join(server.base, "models", "discriminators", "standalone_negative.safetensors"))


# --- item 13: class names from subfolders: ordered without case, stored, shown, accepted by name -----------------

def test_class_names_travel_from_the_folders_to_the_file_and_guide_by_name(server):
    def fakes(node, name, seed):
        return {"class_type": "DGSampleFakeLatents",
                "inputs": {"model": ["1", 0], "positive": ["1", 1], "negative": ["1", 2], "count": 2,
                           "batch_size": 2, "seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler",
                           "scheduler": "normal", "width": 64, "height": 64, "class_name": name}}
    g = {"1": {"class_type": "DGTestFastModel", "inputs": {"seed": 0}},
         "2": {"class_type": "DGTestTinyVAE", "inputs": {"seed": 0}},
         "3": {"class_type": "DGEncodeRealImages", "inputs": {"folder": "classes", "vae": ["2", 0], "resolution": 64,
                                                             "batch_size": 4, "labels_from_subfolders": True}},
         "4": fakes("4", "B", 0), "5": fakes("5", "a", 1),
         "6": {"class_type": "DGCombineLatents", "inputs": {"latents_a": ["4", 0], "latents_b": ["5", 0]}},
         "7": {"class_type": "DGTrainDiscriminator",
               "inputs": {"model": ["1", 0], "real_latents": ["3", 0], "fake_latents": ["6", 0], "filename": "named",
                          "architecture": "standalone", "steps": 2, "batch_size": 4, "learning_rate": 3e-4,
                          "weight_decay": 1e-7, "heldout_fraction": 0.25, "eval_every": 1, "patience": 0,
                          "augment": False, "seed": 0}}}
    hist = run(server, g, timeout=180)
    assert hist["status"]["status_str"] == "success", hist["status"]
    disc = load_discriminator(os.path.join(server.base, "models", "discriminators", "named.safetensors"))
    assert disc.info.class_names == ["a", "B", "c"] and disc.info.num_classes == 3
    guided = guided_graph("named.safetensors", "named")
    guided["3"]["inputs"]["class_name"] = "b"
    assert run(server, guided)["status"]["status_str"] == "success"
    guided["3"]["inputs"]["class_name"] = "dog"
    msg = error_of(run(server, guided))
    assert "no class named 'dog'" in msg and "0 = 'a', 1 = 'B', 2 = 'c'" in msg
