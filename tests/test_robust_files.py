"""Hostile discriminator files through the Load Discriminator node, in process (as ComfyUI loads the pack):
a seeded fuzz of several hundred damaged files, each refused with an error that names the file and its damage;
nothing is ever unpickled; loading a file never allocates memory from a size its header claims; and names that
climb out of models/discriminators, or training file names that would, are refused.

The same files go through the real server in test_robust_server.py."""
import collections
import os
import pickle
import re
import sys

import pytest
import torch

import folder_paths
from comfy_dg import DiscriminatorFileError, FeatureHeadDiscriminator, StandaloneDiscriminator
from conftest import comfy_folders
from robust_fuzz import CATEGORIES, controls, generate

MEMORY_LIMIT_MB = 50


def is_file_error(e):
    """A DiscriminatorFileError: the nodes and this test share one comfy_dg, so its own class (with the fields every
    such error has)."""
    return isinstance(e, DiscriminatorFileError) and all(isinstance(getattr(e, a, None), str)
                                                         for a in ("path", "problem", "fix"))


def rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_growth_mb(fn):
    """(result or exception, peak RSS growth in MB while fn() ran): the kernel's high-water mark, reset first."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")        # resets VmHWM to the current RSS
    before = rss_kb("VmRSS")
    try:
        result = fn()
    except Exception as e:   # noqa: BLE001 - returned to the caller, which checks it
        result = e
    return result, (rss_kb("VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("discriminators")
    marker = tmp_path_factory.mktemp("pickle") / "unpickled"
    cases = generate(folder, marker)
    return {"folder": str(folder), "marker": marker, "cases": cases, "controls": controls(folder)}


@pytest.fixture
def discriminator_folder(fuzz):
    with comfy_folders(discriminators=fuzz["folder"]):
        yield fuzz["folder"]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way Python code in this process could unpickle fails the test (and is recorded)."""
    calls = []

    def refuse(name):
        def refused(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called while loading a discriminator")
        return refused
    for module, names in ((pickle, ("load", "loads", "Unpickler")), (torch, ("load",)),
                          (torch.serialization, ("load",))):
        for name in names:
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    import _pickle
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(_pickle, name, refuse(f"_pickle.{name}"))
    return calls


def test_the_fuzz_covers_every_category_with_several_variants(fuzz):
    counts = collections.Counter(c.category for c in fuzz["cases"])
    print(f"\nfuzz: {len(fuzz['cases'])} files in {len(counts)} categories: {dict(counts)}")
    assert len(fuzz["cases"]) >= 200
    assert set(counts) == set(CATEGORIES)
    assert min(counts.values()) >= 10
    assert len({c.name for c in fuzz["cases"]}) == len(fuzz["cases"])
    # Seeded: the same files every run.
    again = os.path.join(fuzz["folder"], "again")
    os.makedirs(again)
    repeat = generate(again, fuzz["marker"])
    assert [c.name for c in repeat] == [c.name for c in fuzz["cases"]]
    for a, b in zip(fuzz["cases"][::25], repeat[::25]):
        with open(a.path, "rb") as f, open(b.path, "rb") as g:
            assert f.read() == g.read(), a


def test_the_pickle_payload_is_live(fuzz, tmp_path):
    """Control: the payload inside the pickle cases does run code when unpickled (so the test below could fail)."""
    case = next(c for c in fuzz["cases"] if c.category == "pickle")
    marker = str(fuzz["marker"])
    with open(case.path, "rb") as f:
        blob = f.read()
    try:
        pickle.loads(blob)
        assert os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.remove(marker)


def test_controls_load_through_the_node(pack, discriminator_folder, fuzz, no_unpickling):
    """The unedited files load: each case below is refused for its damage alone."""
    node = pack["LoadDiscriminator"]
    for path in fuzz["controls"]:
        d = node.execute(os.path.basename(path)).args[0]
        assert isinstance(d, (StandaloneDiscriminator, FeatureHeadDiscriminator)) and d.info.latent_channels == 4


def test_every_hostile_file_gets_a_clear_error_and_nothing_is_unpickled(pack, discriminator_folder, fuzz,
                                                                        no_unpickling):
    node = pack["LoadDiscriminator"]
    failures, peaks = [], {}
    for case in fuzz["cases"]:
        error, growth = peak_growth_mb(lambda: node.execute(case.name))
        peaks[case.name] = growth
        if not is_file_error(error):
            failures.append(f"{case}: {type(error).__name__}: {error}")
            continue
        message = str(error)
        if not (case.name in message and re.search(case.expected, error.problem) and error.fix in message
                and error.fix.strip()):
            failures.append(f"{case}: expected /{case.expected}/, got: {message}")
    assert not failures, f"{len(failures)} of {len(fuzz['cases'])} files:\n" + "\n".join(failures[:20])
    assert not no_unpickling
    assert not os.path.exists(fuzz["marker"]), "a pickle payload ran"
    worst = max(peaks, key=peaks.get)
    print(f"\nfuzz: {len(fuzz['cases'])} files refused; peak RSS growth per load: max {peaks[worst]:.1f} MB "
          f"({worst}), mean {sum(peaks.values()) / len(peaks):.2f} MB")
    assert peaks[worst] < MEMORY_LIMIT_MB, f"{worst}: RSS grew by {peaks[worst]:.1f} MB"


def test_huge_claims_allocate_nothing(pack, discriminator_folder, fuzz):
    """Files whose header, shapes or block counts claim sizes from gigabytes to exabytes: each load's peak RSS
    growth stays small. Control: the same measurement sees a real 100 MB allocation."""
    node = pack["LoadDiscriminator"]
    huge = [c for c in fuzz["cases"] if c.category == "header-length" or "1099511627776" in c.expected
            or "levels=1000000000" in c.expected]
    assert len(huge) >= 10
    for case in huge:
        error, growth = peak_growth_mb(lambda: node.execute(case.name))
        assert is_file_error(error), (case, error)
        assert growth < MEMORY_LIMIT_MB, f"{case}: RSS grew by {growth:.1f} MB"
    _, control = peak_growth_mb(lambda: torch.ones(25 * 1024 * 1024).sum())
    assert control >= 90, f"the RSS measurement missed a 100 MB allocation ({control:.1f} MB)"
    print(f"\n{len(huge)} files with huge claims: RSS growth ≤ {MEMORY_LIMIT_MB} MB; control 100 MB → "
          f"{control:.0f} MB")


# --- paths ----------------------------------------------------------------------------------------------------

ESCAPING = ["../escape.safetensors", "../../etc/passwd", "sub/../../x.safetensors", "..\\x.safetensors",
            "sub\\..\\..\\x.safetensors", "/etc/passwd", "/tmp/x.safetensors", "//host/share/x.safetensors", ".."]


@pytest.mark.parametrize("name", ESCAPING)
def test_names_that_climb_out_are_refused(pack, discriminator_folder, name, tmp_path):
    # A real file where the name would lead, so that only the refusal stops it.
    outside = os.path.join(os.path.dirname(discriminator_folder), "escape.safetensors")
    with open(os.path.join(discriminator_folder, "control-standalone.safetensors"), "rb") as f, \
            open(outside, "wb") as g:
        g.write(f.read())
    with pytest.raises(ValueError, match=r"points outside models/discriminators|is not in models/discriminators"):
        pack["LoadDiscriminator"].execute(name)


@pytest.mark.parametrize("name", ["nul\0.safetensors", "missing.safetensors", "", " "])
def test_odd_names_give_the_folder_error(pack, discriminator_folder, name):
    with pytest.raises(ValueError, match="models/discriminators"):
        pack["LoadDiscriminator"].execute(name)


class WriteAudit:
    """Every file this process creates, replaces or renames, recorded by a Python audit hook (the safetensors
    writer itself is native code, but the pack's atomic writer creates its temporary file and renames it into
    place through Python)."""

    hooks_installed = False
    active = None

    @classmethod
    def install(cls):
        if not cls.hooks_installed:
            def hook(event, args):
                if cls.active is None:
                    return
                if event == "open" and args[0] is not None and not isinstance(args[0], int):
                    mode, flags = args[1], args[2]
                    if (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                        cls.active.append(os.path.abspath(os.fsdecode(args[0])))
                elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
                    cls.active.append(os.path.abspath(os.fsdecode(args[1])))
            sys.addaudithook(hook)
            cls.hooks_installed = True

    def __enter__(self):
        self.install()
        self.paths = []
        WriteAudit.active = self.paths
        return self

    def __exit__(self, *exc):
        WriteAudit.active = None


@pytest.fixture(scope="module")
def small_training_data():
    from harness.tiny import tiny_model
    import matplotlib.pyplot  # noqa: F401 - its first import sets up its own config folders: not the node's writing
    g = torch.Generator().manual_seed(0)
    return tiny_model("EPS", seed=0), torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)


@pytest.mark.parametrize("filename", ["../escape", "..", "...", "a/../../b", "..\\b", "/tmp/abs", "sub/dir",
                                      " ../x ", ".hidden", "", "ok_name"])
def test_training_node_writes_only_inside_the_discriminators_folder(pack, small_training_data, tmp_path,
                                                                    filename):
    model, real, fake = small_training_data
    folder = tmp_path / "models" / "discriminators"
    folder.mkdir(parents=True)
    with comfy_folders(discriminators=folder), WriteAudit() as audit:
        try:
            with torch.inference_mode():
                pack["DGTrainDiscriminator"].execute(
                    model=model, real_latents={"samples": real}, fake_latents={"samples": fake}, filename=filename,
                    architecture="standalone", steps=2, batch_size=4, heldout_fraction=0.25, eval_every=1,
                    patience=0, augment=False, seed=0)
            refused = None
        except ValueError as e:
            refused = e
    # Allowed: the discriminators folder, and ComfyUI's output and temp (preview image) folders.
    allowed = [str(folder), os.path.abspath(folder_paths.get_output_directory()),
               os.path.abspath(folder_paths.get_temp_directory())]
    outside = [p for p in audit.paths if not any(os.path.commonpath([p, a]) == a for a in allowed)]
    assert outside == [], f"{filename!r}: wrote outside models/discriminators and the output folders: {outside}"
    if filename == "ok_name":
        assert refused is None and os.listdir(folder) == ["ok_name.safetensors"]
        assert any(p.endswith("ok_name.safetensors") for p in audit.paths)    # the audit does see the save
    else:
        assert refused is not None and "plain file name" in str(refused), filename
        assert os.listdir(folder) == []
