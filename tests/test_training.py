"""Training a discriminator for a small real ComfyUI model on real data (sklearn's digits)."""
import os

import numpy as np
import pytest
import torch

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_dg import OptionError, guide, load_discriminator, save_discriminator
from comfy_dg.training import TrainConfig, Trainer, TrainingError
from comfy_dg.training.data import DataError, encode_folder, folder_labels, list_images, read_cache, sample_fakes
from comfy_dg.training.plot import plot_history
from harness.tiny import empty_conditioning, tiny_model, tiny_vae
from conftest import comfy_folders
from digits import write_digit_folder

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run

N = 160


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    folder = write_digit_folder(str(root / "real"), N)
    model, vae = tiny_model("EPS", seed=0), tiny_vae(seed=0)
    pos, neg = empty_conditioning(model)
    with torch.inference_mode():
        real = encode_folder(folder, vae, 64, 32, cache_dir=str(root / "cache"))
        fake = sample_fakes(model, pos, neg, N, 40, 0, 6, 3.0, "euler", "normal", 64, 64,
                            cache_dir=str(root / "cache"))
    return {"root": root, "folder": folder, "model": model, "vae": vae, "real": real, "fake": fake}


def small_config(**kw):
    return TrainConfig(**{"steps": 60, "batch_size": 32, "eval_every": 20, "patience": 0, "width": 32, **kw})


@pytest.mark.parametrize("arch", ["standalone", "features"])
def test_each_architecture_beats_chance_at_low_sigma(data, arch):
    trainer = Trainer(data["model"], data["real"], data["fake"], small_config(architecture=arch, steps=120))
    disc = trainer.run()
    low = disc.info.training["heldout_bands"][0]
    first = trainer.history[0]["bands"][0]["acc"]
    # Measured at 120 steps: 1.00 (standalone) and 1.00 (features) in the lowest σ band; the features head
    # needs ~120 steps (0.84 at 60). The untrained tiny model's samples are easy to spot.
    assert low["acc"] >= 0.9, low
    assert first <= 0.75, "the untrained discriminator already separated the data: the test could not fail"
    assert disc.info.training["real_heldout"] == 16 and disc.info.training["fake_heldout"] == 16
    assert disc.info.sigma_min < disc.info.sigma_max


def test_early_stopping_keeps_the_best_checkpoint(data):
    trainer = Trainer(data["model"], data["real"], data["fake"], small_config(architecture="standalone",
                                                                              steps=200, eval_every=10, patience=2,
                                                                              learning_rate=3e-3))
    disc = trainer.run()
    best = min(trainer.history, key=lambda r: r["bce"])
    assert disc.info.training["best_step"] == best["step"]
    assert trainer.step < 200 or trainer.evals_since_best < 2
    # The returned weights are the best evaluation's, not the last step's.
    state = trainer.best[2]
    assert all(torch.equal(v, disc.state_dict()[k]) for k, v in state.items())


def test_a_run_that_never_beat_step_0_says_so(data, caplog):
    """Early stopping keeps step 0's (untrained) discriminator when no later evaluation beat it: the log and the
    CLI's summary say so, naming what to try; a run whose best is later says nothing."""
    from comfy_dg.training.cli import summary
    from comfy_dg.training.loop import untrained_warning
    trainer = Trainer(data["model"], data["real"], data["fake"], small_config(architecture="standalone"))
    trainer.evaluate()                      # step 0, the untrained discriminator: the best so far
    for _ in range(3):
        trainer.train_step()                # trained, never evaluated again
    with caplog.at_level("WARNING"):
        disc = trainer.best_discriminator()
    assert disc.info.training["best_step"] == 0 and disc.info.training["steps"] == 3
    assert "never improved" in caplog.text and "best at step 0 of 3" in caplog.text
    assert "never improved" in summary(disc, 1.0)
    later = dict(disc.info.training, best_step=3)
    assert untrained_warning(later) is None and untrained_warning(dict(later, best_step=0, steps=0)) is None


def test_resume_repeats_an_uninterrupted_run(data):
    cfg = small_config(architecture="features", steps=30, eval_every=10)
    whole = Trainer(data["model"], data["real"], data["fake"], cfg)
    whole.run()
    first = Trainer(data["model"], data["real"], data["fake"], cfg)
    stop_at = iter(range(10 ** 6))
    first.run(should_stop=lambda: next(stop_at) >= 17)           # stops after 17 steps
    assert first.step == 17
    tensors, facts = first.state()
    resumed = Trainer(data["model"], data["real"], data["fake"], cfg)
    resumed.load_state({k: v.clone() for k, v in tensors.items()}, facts)
    resumed.run()
    for k, v in whole.disc.state_dict().items():
        assert torch.equal(v, resumed.disc.state_dict()[k]), k
    assert [r["bce"] for r in whole.history] == [r["bce"] for r in resumed.history]


def test_bad_latents_are_refused(data):
    real, fake = data["real"], data["fake"]
    with pytest.raises(TrainingError, match=r"real latents are \(4, 8, 8\) but fake latents are \(4, 4, 4\)"):
        Trainer(data["model"], real, fake[:, :, :4, :4], small_config())
    with pytest.raises(TrainingError, match="16 channels but the model's latent space has 4"):
        Trainer(data["model"], real.repeat(1, 4, 1, 1), fake, small_config())
    with pytest.raises(TrainingError, match="NaN"):
        Trainer(data["model"], real * float("nan"), fake, small_config())
    with pytest.raises(OptionError, match="architecture is 'gan'; choose one of features, standalone"):
        Trainer(data["model"], real, fake, small_config(architecture="gan"))
    with pytest.raises(OptionError, match=r"heldout_fraction is 0.9, outside its range 0.01..0.5"):
        Trainer(data["model"], real, fake, small_config(heldout_fraction=0.9))


def test_bad_image_folders_are_refused(data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        encode_folder(str(tmp_path / "nope"), data["vae"], 64, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no png, jpg or webp"):
        encode_folder(str(tmp_path / "empty"), data["vae"], 64, 4)
    bad = tmp_path / "bad"
    write_digit_folder(str(bad), 3)
    (bad / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.png"):
        encode_folder(str(bad), data["vae"], 64, 4)


def test_any_image_size_is_resized_and_center_cropped(tmp_path, data):
    from PIL import Image
    Image.new("RGB", (300, 120), (255, 0, 0)).save(tmp_path / "wide.jpg")
    Image.new("RGB", (50, 90), (0, 0, 255)).save(tmp_path / "tall.webp")
    with torch.inference_mode():
        lat = encode_folder(str(tmp_path), data["vae"], 64, 4)
    assert lat.shape == (2, 4, 8, 8)


def test_caches_are_reused_and_damaged_ones_rebuilt(data, monkeypatch):
    cache = str(data["root"] / "cache")
    files = sorted(os.listdir(cache))
    assert any(f.startswith("real-") for f in files) and any(f.startswith("fake-") for f in files)
    calls = []
    monkeypatch.setattr(data["vae"], "encode", lambda px: calls.append(len(px)) or torch.zeros(len(px), 4, 8, 8))
    with torch.inference_mode():
        again = encode_folder(data["folder"], data["vae"], 64, 32, cache_dir=cache)
    assert calls == [] and torch.equal(again, data["real"])
    real_cache = os.path.join(cache, next(f for f in files if f.startswith("real-")))
    with open(real_cache, "r+b") as f:
        f.seek(40)
        f.write(b"garbage!")
    assert read_cache(real_cache) is None
    with torch.inference_mode():
        rebuilt = encode_folder(data["folder"], data["vae"], 64, 32, cache_dir=cache)
    assert sum(calls) == N and torch.equal(rebuilt, torch.zeros(N, 4, 8, 8))


def test_class_conditional_training_and_guidance(data, tmp_path):
    folder = write_digit_folder(str(tmp_path / "by_class"), N, by_class=True)
    labels, names = folder_labels(folder, list_images(folder))
    assert names == [str(d) for d in range(10)] and len(labels) == N
    with torch.inference_mode():
        real = encode_folder(folder, data["vae"], 64, 32)
    fake_labels = torch.randint(10, (N,), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(data["model"], real, data["fake"], small_config(architecture="standalone", steps=80),
                      real_labels=labels, fake_labels=fake_labels)
    disc = trainer.run()
    assert disc.info.num_classes == 10 and disc.label_embed.num_embeddings == 11
    assert disc.info.training["heldout_bands"][0]["acc"] >= 0.9
    path = str(tmp_path / "cond.safetensors")
    save_discriminator(disc, path)
    loaded = load_discriminator(path)
    from probe import evaluate
    pts = [(1.0, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)))]
    outs = [evaluate(guide(data["model"], loaded, weight=2.0, class_label=k), pts)[0][2] for k in (-1, 3, 5)]
    assert not torch.equal(outs[1], outs[2]) and not torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="classes 0..9"):
        guide(data["model"], loaded, class_label=10)
    unconditional = Trainer(data["model"], real, data["fake"], small_config(architecture="standalone", steps=1)).run()
    with pytest.raises(ValueError, match="not class-conditional"):
        guide(data["model"], unconditional, class_label=2)


def test_bad_class_labels_are_refused(data):
    real, fake = data["real"], data["fake"]
    labels = torch.zeros(N, dtype=torch.long)
    with pytest.raises(TrainingError, match="only one of real and fake"):
        Trainer(data["model"], real, fake, small_config(), real_labels=labels)
    with pytest.raises(TrainingError, match=f"must be {N} non-negative integers"):
        Trainer(data["model"], real, fake, small_config(), real_labels=labels[:5], fake_labels=labels)
    with pytest.raises(TrainingError, match="non-negative integers"):
        Trainer(data["model"], real, fake, small_config(), real_labels=labels.float(), fake_labels=labels)
    with pytest.raises(DataError, match="top level"):
        folder_labels(data["folder"], list_images(data["folder"]))


def test_plot_is_a_picture(data):
    trainer = Trainer(data["model"], data["real"], data["fake"], small_config(architecture="standalone", steps=20,
                                                                              eval_every=10))
    trainer.run()
    img = plot_history(trainer.history)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 200
    assert img.std() > 10   # not blank


# --- the training node, in process, as ComfyUI loads it -----------------------------------------------

@pytest.fixture(scope="module")
def pack_nodes(pack, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("discriminators"))
    with comfy_folders(discriminators=folder, user=tmp_path_factory.mktemp("user"), extensions={".safetensors"}):
        yield pack, folder


def train_node(pack_nodes, data, name, steps=30):
    cls = pack_nodes[0]["DGTrainDiscriminator"]
    with torch.inference_mode():
        return cls.execute(model=data["model"], real_latents={"samples": data["real"]},
                           fake_latents={"samples": data["fake"]}, filename=name, architecture="features",
                           steps=steps, batch_size=32, eval_every=10, patience=0, augment=True, seed=0)


def test_training_node_saves_a_loadable_file_and_a_plot(pack_nodes, data):
    out = train_node(pack_nodes, data, "node_made")
    disc, plot = out.args
    path = os.path.join(pack_nodes[1], "node_made.safetensors")
    loaded = load_discriminator(path)
    assert loaded.info.training["steps"] == 30 and disc.architecture == "features"
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    assert "node_made.safetensors" in folder_paths.get_filename_list("discriminators")


def test_training_node_under_the_negative_prompt(pack_nodes, data):
    cls = pack_nodes[0]["DGTrainDiscriminator"]
    negative = [[torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3)), {}]]
    with torch.inference_mode():
        cls.execute(model=data["model"], real_latents={"samples": data["real"]}, fake_latents={"samples": data["fake"]},
                    filename="under_negative", architecture="features", steps=4, batch_size=32, eval_every=2,
                    patience=0, augment=True, seed=0, negative=negative)
    loaded = load_discriminator(os.path.join(pack_nodes[1], "under_negative.safetensors"))
    context, y = loaded.conditioning
    torch.testing.assert_close(context, negative[0][0][0])
    assert y is None


@pytest.mark.parametrize("stop_at", [1, 7, 23])
def test_interrupt_stops_within_a_step_and_leaves_the_old_file_intact(pack_nodes, data, stop_at, every_progress_update):
    path = os.path.join(pack_nodes[1], "kept.safetensors")
    torch.manual_seed(0)
    old = Trainer(data["model"], data["real"], data["fake"], small_config(steps=1)).run()
    save_discriminator(old, path)
    before = open(path, "rb").read()
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == stop_at:
            comfy.model_management.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train_node(pack_nodes, data, "kept")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert max(seen) == stop_at                     # no step ran after the interrupt
    assert open(path, "rb").read() == before
    assert [f for f in os.listdir(pack_nodes[1]) if f.startswith(".")] == []


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "sub/dir", ".hidden", ""])
def test_training_node_refuses_paths_as_names(pack_nodes, data, name):
    with pytest.raises(ValueError, match="plain file name"):
        train_node(pack_nodes, data, name, steps=1)
