"""Discriminator files on disk: round trips, the atomic save, and every kind of file load_discriminator refuses.

All files are real ones written to tmp_path; the bad ones are made from a real discriminator's tensors and
metadata (or, for damage below the metadata level, raw bytes in the safetensors layout: an 8-byte little-endian
header length, the JSON header, then the tensor data)."""
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfy_dg.atomic
import comfy_dg.files
from conftest import REPO
from comfy_dg import (DiscriminatorFileError, DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator,
                      load_discriminator, save_discriminator)

FEATURE_CHANNELS = 64
PROVENANCE = {"real": 100, "fake": 120}
TRAINING = {"steps": 10, "heldout_accuracy": 0.7}
META_KEYS = ("comfy_dg.format", "comfy_dg.architecture", "comfy_dg.config", "comfy_dg.info")


# ---------------------------------------------------------------------------------------------------- helpers

def make_discriminator(architecture, tap="unet_middle"):
    """A small discriminator of either kind, with every parameter set to distinct seeded values."""
    info = DiscriminatorInfo(latent_channels=4, model_family="SD15", sigma_min=0.03, sigma_max=14.6,
                             training=dict(PROVENANCE))
    if architecture == "standalone":
        d = StandaloneDiscriminator(info, width=32, levels=2, emb_dim=32)
    else:
        d = FeatureHeadDiscriminator(info, tap=tap, feature_channels=FEATURE_CHANNELS, width=32, emb_dim=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():   # defaults leave some tensors all-zero or all-one: make equality meaningful
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return d.eval()


def example_input(architecture):
    g = torch.Generator().manual_seed(1)
    shape = (2, 4, 8, 8) if architecture == "standalone" else (2, FEATURE_CHANNELS, 4, 4)
    return torch.randn(shape, generator=g), torch.tensor([0.5, 7.0])


def saved(folder, architecture="standalone", name=None):
    """A file written by save_discriminator."""
    path = os.path.join(str(folder), name or f"{architecture}.safetensors")
    save_discriminator(make_discriminator(architecture), path, training=TRAINING)
    return path


def contents(path):
    """(tensors, metadata) of a safetensors file, to edit and write back."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    return load_file(path), metadata


def write(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def write_raw(path, header: bytes, data: bytes = b"", claimed_length=None):
    n = len(header) if claimed_length is None else claimed_length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header + data)
    return str(path)


def header_length(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def raw_contents(path):
    """(header dict, tensor data bytes) of a safetensors file, to edit below the level safetensors checks."""
    n = header_length(path)
    with open(path, "rb") as f:
        f.seek(8)
        return json.loads(f.read(n)), f.read()


def refusal(path):
    """The DiscriminatorFileError load_discriminator raises for `path`, checked for the parts every one has."""
    with pytest.raises(DiscriminatorFileError) as caught:
        load_discriminator(path)
    err = caught.value
    message = str(err)
    assert os.path.basename(str(path)) in message
    assert err.problem and err.problem in message
    assert err.fix and err.fix in message
    return err


# ---------------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("architecture", ["standalone", "features"])
def test_round_trip(tmp_path, architecture):
    d = make_discriminator(architecture)
    path = str(tmp_path / f"{architecture}.safetensors")
    assert save_discriminator(d, path, training=TRAINING) == path

    loaded = load_discriminator(path)
    assert type(loaded) is type(d)
    assert loaded.config() == d.config()
    assert loaded.info.latent_channels == 4
    assert loaded.info.model_family == "SD15"
    assert loaded.info.sigma_min == 0.03
    assert loaded.info.sigma_max == 14.6
    assert loaded.info.training == {**PROVENANCE, **TRAINING}

    expected, found = d.state_dict(), loaded.state_dict()
    assert set(found) == set(expected)
    for k, v in expected.items():
        assert found[k].dtype == v.dtype and torch.equal(found[k], v), k

    # Loaded discriminators come back frozen; freeze the original too, since PyTorch may pick another kernel for
    # parameters that require grad (even under no_grad), which changes the last bit of the logit.
    d.requires_grad_(False)
    x, sigma = example_input(architecture)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma), d(x, sigma), rtol=0, atol=0)

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert set(META_KEYS) <= set(metadata)
    assert metadata["comfy_dg.format"] == "2"
    assert metadata["comfy_dg.architecture"] == architecture
    assert json.loads(metadata["comfy_dg.config"]) == d.config()
    assert json.loads(metadata["comfy_dg.info"])["training"] == {**PROVENANCE, **TRAINING}


def test_format_1_files_keep_loading(tmp_path):
    """Files written before the pack named networks itself: the shipped demo discriminator (format 1, its
    features head naming ComfyUI's UNetModel class), and a format-1 file of each kind of network."""
    demo = load_discriminator(os.path.join(REPO, "demo", "discriminators", "digits_dg.safetensors"))
    with safe_open(os.path.join(REPO, "demo", "discriminators", "digits_dg.safetensors"), "pt") as f:
        assert f.metadata()["comfy_dg.format"] == "1"
        assert json.loads(f.metadata()["comfy_dg.config"])["diffusion_model"] == "UNetModel"
    assert demo.tap == "unet_middle" and demo.info.model_family == "Digits"
    for tap, network in [("unet_middle", "UNetModel"), ("flux_double", "Flux"), ("mmdit_middle", "MMDiT"),
                         ("mmdit_middle", "OpenAISignatureMMDITWrapper")]:
        d = make_discriminator("features", tap=tap)
        path = str(tmp_path / f"{tap}_{network}.safetensors")
        save_discriminator(d, path)
        _, meta = contents(path)
        meta = {**meta, "comfy_dg.format": "1",
                "comfy_dg.config": json.dumps({**d.config(), "diffusion_model": network})}
        save_file(load_file(path), path, metadata=meta)
        assert load_discriminator(path).tap == tap
    # A format-1 file whose network is not the tap's own is refused as damaged.
    meta["comfy_dg.config"] = json.dumps({**d.config(), "diffusion_model": "Flux"})
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(DiscriminatorFileError, match="does not read a Flux"):
        load_discriminator(path)


def test_save_leaves_the_discriminator_info_alone(tmp_path):
    """`training` goes into the file only: the discriminator keeps its own provenance, so saving it again with
    other training details does not carry the first save's over."""
    d = make_discriminator("standalone")
    save_discriminator(d, tmp_path / "first.safetensors", training=TRAINING)
    assert d.info.training == PROVENANCE
    save_discriminator(d, tmp_path / "second.safetensors", training={"steps": 20})
    assert d.info.training == PROVENANCE
    assert load_discriminator(tmp_path / "first.safetensors").info.training == {**PROVENANCE, **TRAINING}
    assert load_discriminator(tmp_path / "second.safetensors").info.training == {**PROVENANCE, "steps": 20}


def test_save_refuses_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_discriminator(make_discriminator("standalone"), tmp_path / "d.pt")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- atomic save

def test_failed_save_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = saved(tmp_path, name="d.safetensors")
    with open(path, "rb") as f:
        before = f.read()
    written_to = []

    def failing_save_file(tensors, filename, metadata=None):
        written_to.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\x00partial safetensors")
        raise OSError("disk full")

    monkeypatch.setattr(comfy_dg.atomic, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_discriminator(make_discriminator("features"), path, training=TRAINING)

    assert written_to and os.path.abspath(written_to[0]) != os.path.abspath(path)   # it wrote beside, not over
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ["d.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".comfy_dg-")]


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_saved_file_follows_umask(tmp_path, umask, mode):
    """The temporary file is made 0600 by mkstemp; the saved file gets the mode any new file would get."""
    old = os.umask(umask)
    try:
        path = saved(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode


# ---------------------------------------------------------------------------------------------------- refusals

class _WritesMarker:
    """Unpickling this creates a file: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def write_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump(_WritesMarker(str(marker)), f)
    return str(path)


def test_pickle_payload_is_live(tmp_path):
    """Control for the pickle tests below: unpickling the payload does create its marker."""
    marker = tmp_path / "ran"
    with open(write_pickle(tmp_path / "control.pt", marker), "rb") as f:
        pickle.load(f).close()
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".pth", ".bin", ".pkl", ".PT"])
def test_pickle_files_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "ran"
    path = write_pickle(tmp_path / f"evil{suffix}", marker)
    err = refusal(path)
    assert "pickle" in err.problem and ".safetensors" in err.fix
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = write_pickle(tmp_path / "evil.safetensors", marker)
    err = refusal(path)
    assert "header" in err.problem
    assert not marker.exists()


# Each builder writes one bad file into `folder` and returns its path.

def truncated_to_5_bytes(folder):
    path = saved(folder)
    with open(path, "r+b") as f:
        f.truncate(5)
    return path


def truncated_in_tensor_data(folder):
    path = saved(folder)
    data_start = 8 + header_length(path)
    with open(path, "r+b") as f:
        f.truncate(data_start + (os.path.getsize(path) - data_start) // 2)
    return path


def huge_header_length(folder):
    return write_raw(os.path.join(folder, "huge.safetensors"), b"{}" + b"\0" * 64, claimed_length=2 ** 60)


def header_not_json(folder):
    return write_raw(os.path.join(folder, "garbage.safetensors"), b"\xffnot json at all")


def header_not_object(folder):
    return write_raw(os.path.join(folder, "list.safetensors"), b"[1, 2, 3]")


def no_metadata(folder):
    path = os.path.join(folder, "plain.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    return path


def foreign_metadata(folder):
    path = os.path.join(folder, "lora.safetensors")
    save_file({"lora_up.weight": torch.zeros(4, 2)}, path, metadata={"format": "pt", "ss_network_dim": "2"})
    return path


def edited(change_tensors=None, change_metadata=None, architecture="standalone"):
    """A builder: a real file whose tensors and/or metadata are edited, written back with safetensors."""
    def build(folder):
        path = saved(folder, architecture, name="edited.safetensors")
        tensors, metadata = contents(path)
        if change_tensors:
            change_tensors(tensors)
        if change_metadata:
            change_metadata(metadata)
        return write(path, tensors, metadata)
    return build


def set_meta(key, value):
    return lambda metadata: metadata.__setitem__(key, value)


def replace_tensor(name, make):
    def change(tensors):
        tensors[name] = make(tensors[name])
    return change


def add_tensor(tensors):
    tensors["extra.weight"] = torch.zeros(3)


def remove_tensor(tensors):
    del tensors["out.weight"]


def poke(value):
    def change(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return change


def set_config(**fields):
    def change(metadata):
        metadata["comfy_dg.config"] = json.dumps({**json.loads(metadata["comfy_dg.config"]), **fields})
    return change


def set_info(**fields):
    def change(metadata):
        metadata["comfy_dg.info"] = json.dumps({**json.loads(metadata["comfy_dg.info"]), **fields})
    return change


def relabel_as_features(metadata):
    metadata["comfy_dg.architecture"] = "features"
    metadata["comfy_dg.config"] = json.dumps(make_discriminator("features").config())


def raw_edited(change_header=None):
    """A builder: a real file whose JSON header is edited in ways safetensors' own writer would never produce,
    written back byte for byte with the original tensor data. The tensor offsets all stay inside the file."""
    def build(folder):
        path = saved(folder, name="raw.safetensors")
        header, data = raw_contents(path)
        if change_header:
            change_header(header)
        return write_raw(path, json.dumps(header).encode(), data)
    return build


def set_dtype(name, dtype):
    def change(header):
        header[name]["dtype"] = dtype
    return change


def shorten(header):
    """The last tensor's data ends 4 bytes early, leaving 4 bytes of the file that no tensor claims."""
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] -= 4


def share_data(name, other):
    """Tensor `name` points at the same bytes as `other` (same dtype and shape), overlapping it."""
    def change(header):
        assert header[name]["shape"] == header[other]["shape"] and header[name]["dtype"] == header[other]["dtype"]
        header[name]["data_offsets"] = list(header[other]["data_offsets"])
    return change


def set_raw_meta(key, value):
    def change(header):
        header["__metadata__"][key] = value
    return change


def set_field(name, field, value):
    def change(header):
        header[name][field] = value
    return change


def missing_file(folder):
    return os.path.join(folder, "absent.safetensors")


def text_file(folder):
    path = os.path.join(folder, "notes.txt")
    with open(path, "w") as f:
        f.write("not a discriminator\n")
    return path


REFUSED = {
    "truncated-5-bytes": (truncated_to_5_bytes, "shorter than a safetensors header"),
    "truncated-in-data": (truncated_in_tensor_data, "points outside the file"),
    "header-length-2**60": (huge_header_length, f"header claims {2 ** 60} bytes"),
    "header-not-json": (header_not_json, "header is not valid JSON"),
    "header-not-object": (header_not_object, "not a JSON object"),
    "no-metadata": (no_metadata, "no comfy-dg metadata"),
    "other-metadata": (foreign_metadata, "no comfy-dg metadata"),
    "format-version": (edited(change_metadata=set_meta("comfy_dg.format", "3")), "file format '3'"),
    "unknown-architecture": (edited(change_metadata=set_meta("comfy_dg.architecture", "gan")),
                             "architecture 'gan' is unknown"),
    "config-not-json": (edited(change_metadata=set_meta("comfy_dg.config", '{"width": 32,')),
                        "metadata is malformed"),
    "info-not-json": (edited(change_metadata=set_meta("comfy_dg.info", "latent_channels=4")),
                      "metadata is malformed"),
    "config-unknown-key": (edited(change_metadata=set_meta("comfy_dg.config", '{"depth": 3}')),
                           "hyper-parameters are invalid"),
    "config-negative-width": (edited(change_metadata=set_config(width=-1)), "hyper-parameters are invalid"),
    "features-negative-width": (edited(change_metadata=set_config(width=-1), architecture="features"),
                                "hyper-parameters are invalid"),
    "info-sigma_max-string": (edited(change_metadata=set_info(sigma_max="x")), "metadata is malformed"),
    "info-training-number": (edited(change_metadata=set_info(training=5)), "metadata is malformed"),
    "info-latent_channels-string": (edited(change_metadata=set_info(latent_channels="4")), "metadata is malformed"),
    "missing-tensor": (edited(change_tensors=remove_tensor), "missing: ['out.weight']"),
    "extra-tensor": (edited(change_tensors=add_tensor), "unexpected: ['extra.weight']"),
    "wrong-shape": (edited(change_tensors=replace_tensor("out.weight", lambda t: torch.zeros(1, t.shape[1] + 1))),
                    "needs a float tensor of shape [1, 64]"),
    "int64": (edited(change_tensors=replace_tensor("conv_in.weight", lambda t: torch.zeros(t.shape, dtype=torch.int64))),
              "tensor 'conv_in.weight' is I64"),
    "nan-weights": (edited(change_tensors=replace_tensor("conv_in.weight", poke(float("nan")))),
                    "['conv_in.weight'] hold NaN or infinite"),
    "inf-weights": (edited(change_tensors=replace_tensor("out.weight", poke(float("-inf")))),
                    "['out.weight'] hold NaN or infinite"),
    "f64-beyond-float32": (edited(change_tensors=replace_tensor("conv_in.weight", lambda t: t.double() * 1e300)),
                           "['conv_in.weight'] hold NaN or infinite"),
    "dtype-does-not-fit-data": (raw_edited(set_dtype("conv_in.weight", "F16")), "could not read its tensors"),
    "data-shorter-than-shape": (raw_edited(shorten), "could not read its tensors"),
    "overlapping-tensors": (raw_edited(share_data("conv_in.bias", "sigma_mlp.net.0.bias")),
                            "could not read its tensors"),
    "metadata-value-not-string": (raw_edited(set_raw_meta("comfy_dg.note", 5)), "not a table of strings"),
    "architecture-as-list": (raw_edited(set_raw_meta("comfy_dg.architecture", ["standalone"])),
                             "not a table of strings"),
    "shape-null": (raw_edited(set_field("out.weight", "shape", None)), "malformed dtype or shape"),
    "shape-number": (raw_edited(set_field("out.weight", "shape", 32)), "malformed dtype or shape"),
    "shape-bools": (raw_edited(set_field("out.weight", "shape", [True, 64])), "malformed dtype or shape"),
    "dtype-list": (raw_edited(set_field("out.weight", "dtype", ["F32"])), "malformed dtype or shape"),
    "info-sigma_max-bool": (edited(change_metadata=set_info(sigma_max=True)), "metadata is malformed"),
    "info-sigma_min-nan": (edited(change_metadata=set_info(sigma_min=float("nan"))), "metadata is malformed"),
    "info-sigma-range-empty": (edited(change_metadata=set_info(sigma_min=5.0, sigma_max=1.0)),
                               "metadata is malformed"),
    "info-latent_channels-bool": (edited(change_metadata=set_info(latent_channels=True)), "metadata is malformed"),
    "format-version-number": (raw_edited(set_raw_meta("comfy_dg.format", 1)), "not a table of strings"),
    "architecture-lie": (edited(change_metadata=relabel_as_features),
                         "do not match the features architecture"),
    "does-not-exist": (missing_file, "no such file"),
    "txt-suffix": (text_file, "only .safetensors"),
}


@pytest.mark.parametrize("build, expected", REFUSED.values(), ids=REFUSED.keys())
def test_refused_files(tmp_path, build, expected):
    path = build(str(tmp_path))
    err = refusal(path)
    assert expected in err.problem


CONTROLS = {
    "edited-unchanged": edited(),
    "raw-edited-unchanged": raw_edited(),
    "f64-within-float32": edited(change_tensors=replace_tensor("conv_in.weight", lambda t: t.double())),
}


@pytest.mark.parametrize("build", CONTROLS.values(), ids=CONTROLS.keys())
def test_edited_file_is_loadable_before_the_edit(tmp_path, build):
    """Controls for the edited() and raw_edited() cases: re-writing a real file's tensors and metadata (or its
    header bytes) unchanged still loads, and so do float64 weights that float32 can hold."""
    path = build(str(tmp_path))
    assert isinstance(load_discriminator(path), StandaloneDiscriminator)


# ---------------------------------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("architecture", ["standalone", "features"])
def test_loaded_under_inference_mode_still_supports_autograd(tmp_path, architecture):
    path = saved(tmp_path, architecture)
    x, sigma = example_input(architecture)
    with torch.inference_mode():
        d = load_discriminator(path)
        assert not any(p.is_inference() for p in d.parameters())
        assert not any(t.is_inference() for t in d.state_dict().values())
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(d(x, sigma).sum(), x)
    assert grad.shape == x.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
