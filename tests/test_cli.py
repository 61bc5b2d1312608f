"""The command-line trainer (`python -m comfy_dg.train`): end to end on a tiny checkpoint file, caches,
exact resume after an interruption, two-process DDP against one process, and refusals of bad inputs."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import COMFYUI, REPO

from comfy_dg import load_discriminator
from comfy_dg.training import cli
from comfy_dg.training.data import write_cache
from comfy_dg.training.loop import Trainer

pytestmark = pytest.mark.slow   # a server, browser, subprocess or training run

# Data-parallel and one-process training of the same global batches agree to float rounding: the gradient
# of the global mean is the all-reduced mean of the two halves' gradients, summed in another order. Measured
# on the digits latents after 10 steps, standalone: max |Δw| = 2.5e-5 with augment (3.2e-5 without), on weights
# of magnitude up to ~1 that Adam (lr 3e-4) moves by up to ~3e-3 in those steps.
DDP_TOLERANCE = 1e-4


def env():
    e = dict(os.environ, COMFYUI_PATH=COMFYUI, COMFY_DG_DEVICE="cpu", OMP_NUM_THREADS="1")
    e.pop("PYTHONPATH", None)
    return e


def run_cli(args, *, module=("-m", "comfy_dg.train"), launcher=(), timeout=300):
    return subprocess.run([sys.executable, *launcher, *module, *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from comfy_dg import small_models
    from harness.tiny import tiny_model, tiny_vae
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    small_models.save(tiny_model("EPS"), tiny_vae(), path)
    return str(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """40 real 64×64 RGB images: sklearn's 8×8 digits, upscaled nearest-neighbour."""
    from sklearn.datasets import load_digits
    folder = tmp_path_factory.mktemp("digits")
    for i, im in enumerate(load_digits().images[:40]):
        a = (im / 16 * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(np.stack([a, a, a], -1)).save(folder / f"{i:03d}.png")
    return str(folder)


def latents_file(path, latents):
    write_cache(str(path), latents, {"kind": "test"})      # the cache format: a safetensors 'latents' tensor
    return str(path)


@pytest.fixture(scope="module")
def latents(tiny_ckpt, digits, tmp_path_factory):
    """(real, fake) latent files, 40 each (4, 8, 8): the digits encoded by the tiny VAE, and the tiny model's
    samples, prepared in-process with data.py as the CLI would."""
    from comfy_dg import small_models
    from comfy_dg.training.data import encode_folder, sample_fakes
    folder = tmp_path_factory.mktemp("latents")
    model, vae = small_models.load(tiny_ckpt)
    with torch.inference_mode():
        real = encode_folder(digits, vae, 64, 8)
        fake = sample_fakes(model, *small_models.null_conditioning(model), 40, 8, 0, 4, 3.0, "euler", "normal", 64,
                            64)
    return latents_file(folder / "real.safetensors", real), latents_file(folder / "fake.safetensors", fake)


def state_facts(path):
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["comfy_dg.facts"])


def assert_same_discriminator(a, b, atol=0.0):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if atol == 0.0:
            assert torch.equal(ta[k], tb[k]), k
        else:
            assert torch.allclose(ta[k], tb[k], rtol=0.0, atol=atol), (k, float((ta[k] - tb[k]).abs().max()))


def metadata(path):
    # Compared parsed: safetensors writes the metadata table in hash-map order, which varies between writes.
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# --- a. end to end ---------------------------------------------------------------------------------------
def test_end_to_end_on_a_tiny_checkpoint_and_cache_reuse(tiny_ckpt, digits, tmp_path):
    out = tmp_path / "models" / "digits_dg.safetensors"
    args = ["--checkpoint", tiny_ckpt, "--real", digits, "--out", str(out), "--resolution", "64",
            "--steps", "30", "--eval-every", "10", "--batch-size", "16", "--fakes", "40", "--fake-batch", "8",
            "--sample-steps", "4", "--cfg", "3", "--threads", "1"]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step     10" in first.stdout and "held-out acc" in first.stdout
    assert "wall time" in first.stdout and "saved " in first.stdout

    disc = load_discriminator(str(out))
    t = disc.info.training
    assert disc.architecture == "features"
    assert t["steps"] == 30 and t["trained_by"] == "comfy_dg.train" and t["checkpoint"] == "tiny.safetensors"
    assert 0.0 <= t["heldout_accuracy"] <= 1.0 and len(t["heldout_bands"]) == 4
    assert t["real_train"] + t["real_heldout"] == 40 and t["fake_train"] + t["fake_heldout"] == 40
    assert t["fake"]["sampled"] == 40 and t["real"]["resolution"] == 64
    assert t["heldout_bce"] < 0.6931    # it learned something

    cache = tmp_path / "models" / "digits_dg.cache"
    caches = sorted(glob.glob(str(cache / "real-*.safetensors"))) + sorted(glob.glob(str(cache / "fake-*.safetensors")))
    assert len(caches) == 2, os.listdir(cache)
    assert not os.path.exists(cli.state_path(str(out)))      # deleted after the final save
    stamps = {p: os.stat(p).st_mtime_ns for p in caches}
    first_copy = tmp_path / "first.safetensors"
    first_copy.write_bytes(out.read_bytes())

    second = run_cli(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("(from the cache)") == 2
    assert {p: os.stat(p).st_mtime_ns for p in caches} == stamps        # read, not rewritten
    assert_same_discriminator(first_copy, out)                          # the same run gives the same result
    assert metadata(first_copy) == metadata(out)


# --- b. resume -------------------------------------------------------------------------------------------
def interrupt_after(monkeypatch, k):
    """Trainer.train_step raises KeyboardInterrupt (as Ctrl-C would) once k steps are done."""
    original = Trainer.train_step

    def step(self):
        if self.step == k:
            raise KeyboardInterrupt
        return original(self)
    monkeypatch.setattr(Trainer, "train_step", step)


def test_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tiny_ckpt, latents, tmp_path, monkeypatch,
                                                                     capsys):
    real, fake = latents

    def argv(out, *extra):
        return ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
                "--steps", "20", "--eval-every", "5", "--batch-size", "16", "--threads", "1", *extra]

    whole = tmp_path / "whole.safetensors"
    assert cli.main(argv(whole)) == 0          # features architecture, augment on: the defaults

    out = tmp_path / "resumed.safetensors"
    out.write_bytes(b"an older discriminator")
    state = cli.state_path(str(out))
    with monkeypatch.context() as m:
        interrupt_after(m, 13)
        assert cli.main(argv(out)) == 130
    err = capsys.readouterr().err
    assert "state at step 10" in err and "resume" in err
    assert out.read_bytes() == b"an older discriminator"       # nothing written to --out
    assert state_facts(state)["step"] == 10                    # the last evaluation's state
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    # Other settings do not resume it (nor overwrite it).
    assert cli.main(argv(out, "--lr", "1e-3")) == 2
    err = capsys.readouterr().err
    assert "--restart" in err and "learning_rate" in err
    assert state_facts(state)["step"] == 10 and out.read_bytes() == b"an older discriminator"

    assert cli.main(argv(out)) == 0
    assert "resuming from step 10" in capsys.readouterr().out
    assert not os.path.exists(state)
    assert_same_discriminator(whole, out)          # torch.equal on every tensor
    assert metadata(whole) == metadata(out)          # the training record too (steps, history of the best)


def test_restart_discards_a_saved_state(tiny_ckpt, latents, tmp_path, monkeypatch, capsys):
    real, fake = latents
    out = tmp_path / "d.safetensors"
    argv = ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
            "--architecture", "standalone", "--steps", "6", "--eval-every", "2", "--batch-size", "8",
            "--threads", "1"]
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        assert cli.main(argv) == 130
    assert state_facts(cli.state_path(str(out)))["step"] == 2
    assert cli.main(argv + ["--lr", "1e-3", "--restart"]) == 0
    captured = capsys.readouterr().out
    assert "discarded" in captured and "resuming" not in captured
    assert not os.path.exists(cli.state_path(str(out)))
    assert load_discriminator(str(out)).info.training["config"]["learning_rate"] == 1e-3


def test_a_crash_while_saving_finishes_on_rerun_without_training(tiny_ckpt, latents, tmp_path, monkeypatch,
                                                                 capsys):
    real, fake = latents

    def argv(out):
        return ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
                "--architecture", "standalone", "--steps", "6", "--eval-every", "3", "--batch-size", "8",
                "--threads", "1"]

    whole, out = tmp_path / "whole.safetensors", tmp_path / "d.safetensors"
    assert cli.main(argv(whole)) == 0

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr("comfy_dg.files.save_discriminator", crash)
        assert cli.main(argv(out)) == 130
    assert state_facts(cli.state_path(str(out)))["step"] == 6 and not out.exists()
    capsys.readouterr()
    assert cli.main(argv(out)) == 0
    printed = capsys.readouterr().out
    assert "resuming from step 6" in printed and "step      0" not in printed and "loss" not in printed
    assert_same_discriminator(whole, out)
    assert metadata(whole) == metadata(out)


def test_a_damaged_state_file_is_refused_and_restart_replaces_it(tiny_ckpt, latents, tmp_path, capsys):
    real, fake = latents
    out = tmp_path / "d.safetensors"
    state = cli.state_path(str(out))
    with open(state, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    argv = ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
            "--architecture", "standalone", "--steps", "2", "--eval-every", "2", "--batch-size", "8", "--threads", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read the saved training state" in err and "--restart" in err and "Traceback" not in err
    assert os.path.exists(state) and not out.exists()
    assert cli.main(argv + ["--restart"]) == 0
    assert out.exists() and not os.path.exists(state)


# --- c. DDP ----------------------------------------------------------------------------------------------
def test_two_processes_match_one(tiny_ckpt, latents, tmp_path):
    real, fake = latents

    def argv(out):
        return ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
                "--architecture", "standalone", "--steps", "10", "--eval-every", "5", "--batch-size", "16",
                "--threads", "1"]

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    ddp = run_cli(argv(two), launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert ddp.returncode == 0, (ddp.stdout[-2000:], ddp.stderr[-4000:])
    assert "on 2 processes" in ddp.stdout
    assert ddp.stdout.count("saved ") == 1                    # rank 0 alone reports and writes
    assert cli.main(argv(one)) == 0
    t1, t2 = load_discriminator(str(one)).info.training, load_discriminator(str(two)).info.training
    assert t2["processes"] == 2 and t1["processes"] == 1
    assert t2["best_step"] == t1["best_step"] and t2["heldout_bce"] < 0.5
    assert abs(t2["heldout_bce"] - t1["heldout_bce"]) < 1e-3
    assert_same_discriminator(one, two, atol=DDP_TOLERANCE)
    assert sorted(os.listdir(tmp_path)) == ["one.safetensors", "two.safetensors"]     # no state, no temp files


def test_torchrun_with_one_process_runs_the_distributed_path(tiny_ckpt, latents, tmp_path):
    """`torchrun --nproc_per_node=1` starts the process group and wraps the discriminator in DDP (what checks
    nccl on a one-GPU machine); with one process that changes nothing in the result."""
    real, fake = latents

    def argv(out):
        return ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
                "--architecture", "standalone", "--steps", "4", "--eval-every", "2", "--batch-size", "8",
                "--threads", "1"]

    plain, launched = tmp_path / "plain.safetensors", tmp_path / "launched.safetensors"
    run = run_cli(argv(launched), launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"))
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    assert "on 1 process (gloo)" in run.stdout
    assert cli.main(argv(plain)) == 0
    assert load_discriminator(str(launched)).info.training["processes"] == 1
    assert_same_discriminator(plain, launched)


# --- d. bad inputs ---------------------------------------------------------------------------------------
def bad_case(name, tmp_path, tiny_ckpt, digits):
    """argv and the expected part of the message for each bad input."""
    empty = tmp_path / "empty"
    empty.mkdir()
    if name == "empty folder":
        return ["--real", str(empty)], "holds no png"
    if name == "unreadable image":
        folder = tmp_path / "imgs"
        folder.mkdir()
        for f in sorted(os.listdir(digits))[:4]:
            (folder / f).write_bytes(open(os.path.join(digits, f), "rb").read())
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        return ["--real", str(folder), "--resolution", "64"], "cannot read image"
    g = torch.Generator().manual_seed(0)
    if name == "mismatched shapes":
        return ["--real-latents", latents_file(tmp_path / "r.safetensors", torch.randn(8, 4, 8, 8, generator=g)),
                "--fake-latents", latents_file(tmp_path / "f.safetensors", torch.randn(8, 4, 6, 6, generator=g))], \
            "real latents are (4, 8, 8) but fake latents are (4, 6, 6)"
    if name == "wrong channels":
        return ["--real-latents", latents_file(tmp_path / "r.safetensors", torch.randn(8, 3, 8, 8, generator=g)),
                "--fake-latents", latents_file(tmp_path / "f.safetensors", torch.randn(8, 3, 8, 8, generator=g))], \
            "3 channels but the model's latent space has 4"
    if name == "no latents tensor":
        from safetensors.torch import save_file
        save_file({"samples": torch.zeros(8, 4, 8, 8)}, str(tmp_path / "r.safetensors"))
        return ["--real-latents", str(tmp_path / "r.safetensors")], "has no 'latents' tensor"
    if name == "pickle checkpoint":
        (tmp_path / "model.ckpt").write_bytes(b"not opened")
        return ["--checkpoint", str(tmp_path / "model.ckpt"), "--real", digits], "pickle"
    raise AssertionError(name)


BAD = ["empty folder", "unreadable image", "mismatched shapes", "wrong channels", "no latents tensor",
       "pickle checkpoint"]


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_are_refused_clearly(name, tiny_ckpt, digits, tmp_path, capsys):
    extra, message = bad_case(name, tmp_path, tiny_ckpt, digits)
    out = tmp_path / "out" / "d.safetensors"
    argv = ["--checkpoint", tiny_ckpt, "--out", str(out), "--steps", "4", "--eval-every", "2", "--batch-size", "8",
            "--sample-steps", "2", "--threads", "1", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().startswith("comfy-dg:")
    assert not out.exists() and not os.path.exists(cli.state_path(str(out)))


def test_bad_input_exit_code_from_the_command_line(tiny_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "d.safetensors"
    r = run_cli(["--checkpoint", tiny_ckpt, "--real", str(tmp_path / "empty"), "--out", str(out)])
    assert r.returncode == 2 and "holds no png" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_under_negative_stores_the_negative_and_refuses_standalone(tiny_ckpt, latents, tmp_path, capsys):
    real, fake = latents
    out = tmp_path / "d.safetensors"
    argv = ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
            "--steps", "2", "--eval-every", "1", "--batch-size", "8", "--threads", "1", "--under-negative"]
    assert cli.main(argv) == 0
    disc = load_discriminator(str(out))
    context, y = disc.conditioning
    assert context.shape[0] >= 1 and y is None
    assert cli.main(argv[:-1] + ["--architecture", "standalone", "--under-negative"]) == 2
    assert "--under-negative is for --architecture features" in capsys.readouterr().err


def test_training_levers_from_the_command_line(tiny_ckpt, latents, tmp_path, capsys):
    """--sigma-sampling and --objective come from the TRAINING table; the reconstruction objective takes the
    denoiser under --prompt (a small checkpoint: its null prompt) and stops on its held-out error."""
    real, fake = latents
    out = tmp_path / "d.safetensors"
    argv = ["--checkpoint", tiny_ckpt, "--real-latents", real, "--fake-latents", fake, "--out", str(out),
            "--steps", "2", "--eval-every", "1", "--batch-size", "8", "--threads", "1",
            "--sigma-sampling", "vp_importance", "--objective", "reconstruction", "--architecture", "standalone"]
    assert cli.main(argv) == 0
    training = load_discriminator(str(out)).info.training
    assert training["config"]["sigma_sampling"] == "vp_importance"
    assert training["config"]["objective"] == "reconstruction"
    assert "heldout_recon_gain" in training
    with pytest.raises(SystemExit) as refused:         # argparse's own refusal of a value outside the choices
        cli.main(argv[:-6] + ["--objective", "hinge"])
    assert refused.value.code == 2 and "invalid choice: 'hinge'" in capsys.readouterr().err
