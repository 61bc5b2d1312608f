"""The guidance patch on small real ComfyUI models, through the real KSampler and SamplerCustomAdvanced nodes."""
import logging

import pytest
import torch

import comfy.samplers
from comfy_extras import nodes_custom_sampler as ncs
from comfy_dg import IncompatibleDiscriminator, OptionError, guide, steps
from comfy_dg.steps import CANNOT_TELL
from harness.tiny import empty_conditioning, tiny_model
from builders import custom_advanced, features, ksampler, standalone
from probe import evaluate

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "uni_pc", "lcm"]


@pytest.fixture(scope="module")
def eps_model():
    return tiny_model("EPS")


@pytest.mark.parametrize("run", [ksampler, custom_advanced], ids=["KSampler", "SamplerCustomAdvanced"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_weight_zero_is_identical_and_weight_changes_samples(eps_model, sampler, run):
    d = standalone()
    base = run(eps_model, sampler)
    assert torch.equal(run(guide(eps_model, d, weight=0.0), sampler), base)
    guided = run(guide(eps_model, d, weight=2.0), sampler)
    assert torch.isfinite(guided).all()
    assert not torch.allclose(guided, base), "guidance at w=2 changed nothing"
    # Each of the two batch samples is guided (per-sample correction).
    assert all(not torch.allclose(guided[i], base[i]) for i in range(2))


def test_ksampler_and_custom_advanced_give_the_same_guided_samples(eps_model):
    g = guide(eps_model, standalone(), weight=2.0)
    torch.testing.assert_close(ksampler(g, "euler"), custom_advanced(g, "euler"))


def test_basic_guider_at_cfg_one(eps_model):
    pos, _ = empty_conditioning(eps_model)
    results = []
    for m in (eps_model, guide(eps_model, standalone(), weight=2.0)):
        with torch.inference_mode():
            guider = ncs.BasicGuider.execute(m, pos)[0]
            out = ncs.SamplerCustomAdvanced.execute(
                ncs.RandomNoise.execute(3)[0], guider, ncs.KSamplerSelect.execute("euler")[0],
                ncs.BasicScheduler.execute(m, "normal", 4, 1.0)[0], {"samples": torch.zeros(1, 4, 8, 8)})[0]
        results.append(out["samples"])
    assert not torch.allclose(results[0], results[1])


def _points(model, sigmas, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.model.latent_format.latent_channels
    return [(s, torch.randn(batch, c, 8, 8, generator=g) * max(s, 1.0)) for s in sigmas]


def test_window_is_exact_outside_and_active_inside(eps_model):
    ms = eps_model.model.model_sampling
    start, end = 0.3, 0.7
    s_start, s_end = float(ms.percent_to_sigma(start)), float(ms.percent_to_sigma(end))
    sigmas = [14.0, s_start * 1.01, s_start * 0.99, 1.0, s_end * 1.01, s_end * 0.99, 0.05]
    pts = _points(eps_model, sigmas)
    plain = evaluate(eps_model, pts, cfg=3.0)
    guided = evaluate(guide(eps_model, standalone(), weight=3.0, start_percent=start, end_percent=end), pts, cfg=3.0)
    for (sigma, _, dp), (_, _, dg) in zip(plain, guided):
        if s_end <= sigma <= s_start:
            assert not torch.allclose(dg, dp), f"σ={sigma} inside the window was not guided"
        else:
            assert torch.equal(dg, dp), f"σ={sigma} outside the window was changed"


def test_per_sample_sigma_window(eps_model):
    """A batch whose samples sit at different σ: only the ones inside the window move."""
    ms = eps_model.model.model_sampling
    s_start = float(ms.percent_to_sigma(0.5))
    x = torch.randn(2, 4, 8, 8)
    patch = guide(eps_model, standalone(), weight=3.0, start_percent=0.5).model_options["sampler_post_cfg_function"][0]
    sigma = torch.tensor([s_start * 2, s_start / 2])
    denoised = torch.zeros_like(x)
    with torch.inference_mode():
        out = patch({"denoised": denoised, "input": x, "sigma": sigma, "model": eps_model.model, "model_options": {}})
    assert torch.equal(out[0], denoised[0])
    assert not torch.equal(out[1], denoised[1])


def test_chains_with_other_post_cfg_patches(eps_model):
    pts = _points(eps_model, [5.0, 1.0, 0.2])
    shift = lambda args: args["denoised"] + 0.125  # noqa: E731 - another patch in the list
    before = eps_model.clone()
    before.set_model_sampler_post_cfg_function(shift)
    d = standalone()
    dg_only = evaluate(guide(eps_model, d, weight=2.0), pts)
    chained = evaluate(guide(before, d, weight=2.0), pts)            # shift, then DG
    after = guide(eps_model, d, weight=2.0)
    after.set_model_sampler_post_cfg_function(shift)                  # DG, then shift
    chained_after = evaluate(after, pts)
    for (_, _, a), (_, _, b), (_, _, c) in zip(dg_only, chained, chained_after):
        torch.testing.assert_close(b, a + 0.125)
        torch.testing.assert_close(c, a + 0.125)
    assert len(after.model_options["sampler_post_cfg_function"]) == 2


def test_boost_scales_only_samples_judged_fake(eps_model):
    class Signed(torch.nn.Module):
        def forward(self, x_in, sigma):   # sample 0: log r > 0 (real-looking); sample 1: log r < 0
            return x_in.mean(dim=(1, 2, 3)) + torch.tensor([5.0, -5.0], dtype=x_in.dtype)
    pts = _points(eps_model, [1.0])
    plain = evaluate(eps_model, pts)[0][2]
    one = evaluate(guide(eps_model, Signed(), weight=1.0), pts)[0][2] - plain
    boosted = evaluate(guide(eps_model, Signed(), weight=1.0, boost=3.0), pts)[0][2] - plain
    torch.testing.assert_close(boosted[0], one[0])
    torch.testing.assert_close(boosted[1], 3 * one[1])


@pytest.mark.parametrize("schedule,expected", [("constant", [1, 1, 1]), ("linear_up", [0, 0.5, 1]),
                                               ("linear_down", [1, 0.5, 0]), ("cosine", [1, 0.5, 0])])
def test_schedules(eps_model, schedule, expected):
    ms = eps_model.model.model_sampling
    s_hi, s_lo = float(ms.percent_to_sigma(0.2)), float(ms.percent_to_sigma(0.8))
    mid = (s_hi * s_lo) ** 0.5   # halfway in log σ
    pts = _points(eps_model, [s_hi, mid, s_lo])
    plain = evaluate(eps_model, pts)
    const = evaluate(guide(eps_model, standalone(), weight=1.0, start_percent=0.2, end_percent=0.8), pts)
    sched = evaluate(guide(eps_model, standalone(), weight=1.0, start_percent=0.2, end_percent=0.8,
                           schedule=schedule), pts)
    for (_, _, p), (_, _, c), (_, _, s), e in zip(plain, const, sched, expected):
        torch.testing.assert_close(s - p, e * (c - p), atol=1e-5, rtol=1e-4)


class StepRecorder:
    """Records every model evaluation (a post-CFG hook placed after DG) and every sampler callback."""

    def __init__(self):
        self.events, self.guided = [], []

    def hook(self, args):
        self.events.append(("eval", len(self.evals())))
        return args["denoised"]

    def evals(self):
        return [e for e in self.events if e[0] == "eval"]

    def callback(self, i, denoised, x, total):
        self.events.append(("cb", i))


def _first_evaluation_run(model, sampler, rec, caplog):
    class Marker(torch.nn.Module):   # notes which evaluation DG ran in
        def forward(self, x_in, sigma):
            rec.guided.append(len(rec.evals()))
            return x_in.mean(dim=(1, 2, 3))

    m = guide(model, Marker(), weight=0.5, intermediate_weight=0.0)
    m.set_model_sampler_post_cfg_function(rec.hook)
    pos, neg = empty_conditioning(m)
    sigmas = m.model.model_sampling.sigma(torch.linspace(999, 0, 7)).tolist()[:-1] + [0.0]
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="comfy_dg"):
        sampler_obj = comfy.samplers.sampler_object(sampler)
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(pos, neg)
        guider.set_cfg(2.0)
        guider.sample(torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), sampler_obj, torch.tensor(sigmas),
                      callback=rec.callback, disable_pbar=True, seed=1)
    return sampler_obj.sampler_function.__name__


@pytest.mark.parametrize("sampler", comfy.samplers.SAMPLER_NAMES)
def test_intermediate_weight_zero_skips_exactly_the_intermediate_evaluations(eps_model, sampler, caplog):
    rec = StepRecorder()
    name = _first_evaluation_run(eps_model, sampler, rec, caplog)
    n_evals = len(rec.evals())
    # Ground truth: every sampler calls back right after the first evaluation of each step.
    firsts = [rec.events[k - 1][1] for k, e in enumerate(rec.events) if e[0] == "cb" and k > 0
              and rec.events[k - 1][0] == "eval"]
    if name in CANNOT_TELL:
        assert rec.guided == list(range(n_evals))
        assert "cannot tell" in caplog.text
    else:
        assert rec.guided == firsts, f"{sampler}: guided {rec.guided}, first evaluations {firsts}"
        assert "cannot tell" not in caplog.text
    assert n_evals >= len(firsts) >= 1


@pytest.mark.parametrize("sampler", comfy.samplers.SAMPLER_NAMES)
def test_intermediate_weight_zero_measures_a_sampler_missing_from_the_table(eps_model, sampler, caplog, monkeypatch):
    """Every sampler of this ComfyUI, as if the table did not know it: its evaluations per step are measured
    between callbacks 0 and 1 (all of them guided, since step 0's intermediates cannot be told from step 1's
    first evaluation until callback 1), then only first evaluations are guided; a sampler whose count changes
    from step to step is caught at the change and guided at every evaluation from there, with a warning."""
    monkeypatch.setattr(steps, "INTERMEDIATE_EVALUATIONS", {})
    rec = StepRecorder()
    name = _first_evaluation_run(eps_model, sampler, rec, caplog)
    n_evals = len(rec.evals())
    # Ground truth from the recording: evaluations between consecutive callbacks, and each step's first.
    between, count = [], 0
    for kind, _ in rec.events:
        if kind == "eval":
            count += 1
        else:
            between.append(count)
            count = 0
    firsts = [rec.events[k - 1][1] for k, e in enumerate(rec.events) if e[0] == "cb" and k > 0
              and rec.events[k - 1][0] == "eval"]
    if name in CANNOT_TELL:
        assert rec.guided == list(range(n_evals)) and "cannot tell" in caplog.text
        return
    assert between[0] == 1 and len(between) >= 3, f"{sampler}: callbacks {between}"
    per_step = between[1]
    if all(n == per_step for n in between[2:]):
        learning = list(range(firsts[1] + 1))         # every evaluation up to step 1's first
        assert rec.guided == sorted(set(learning) | set(firsts)), f"{sampler}: guided {rec.guided}"
        assert "cannot tell" not in caplog.text
        assert (f"show {per_step} model evaluations per step" in caplog.text) == (per_step > 1)
    else:
        # Caught at the callback that ends the first interval j with another count: up to interval j as above;
        # in it, the measured count's intermediates are skipped; from there on, every evaluation is guided.
        assert "cannot tell" in caplog.text and "than its step 0 did" in caplog.text, sampler
        j = next(k for k in range(2, len(between)) if between[k] != per_step)
        start = sum(between[:j])
        expected = set(range(firsts[1] + 1)) | {f for f in firsts if f < start} | set(range(start + per_step - 1,
                                                                                           n_evals))
        assert rec.guided == sorted(expected), f"{sampler}: guided {rec.guided}, callbacks {between}"


@pytest.mark.parametrize("model_type", ["EPS", "V_PREDICTION", "EDM", "FLOW"])
@pytest.mark.parametrize("arch", ["standalone", "features"])
def test_model_types_and_architectures(model_type, arch):
    m = tiny_model(model_type)
    d = standalone() if arch == "standalone" else features(m)
    base = ksampler(m, "euler")
    guided = ksampler(guide(m, d, weight=2.0), "euler")
    assert torch.isfinite(guided).all() and not torch.allclose(guided, base)


@pytest.mark.parametrize("family", ["SDXL", "Flux", "SD3"])
@pytest.mark.parametrize("arch", ["standalone", "features"])
def test_latent_families(family, arch):
    m = tiny_model("FLOW" if family in ("Flux", "SD3") else "EPS", family=family)
    c = m.model.latent_format.latent_channels
    d = standalone(family, c) if arch == "standalone" else features(m)
    pts = _points(m, [0.8, 0.3] if family in ("Flux", "SD3") else [5.0, 0.5])
    plain, guided = evaluate(m, pts), evaluate(guide(m, d, weight=2.0), pts)
    for (_, _, p), (_, _, g) in zip(plain, guided):
        assert torch.isfinite(g).all() and not torch.allclose(g, p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    m = tiny_model("EPS", dtype=dtype)
    assert m.model.diffusion_model.input_blocks[0][0].weight.dtype == dtype
    pts = _points(m, [5.0, 0.5])
    for d in (standalone(), features(m)):
        plain, guided = evaluate(m, pts), evaluate(guide(m, d, weight=2.0), pts)
        for (_, _, p), (_, _, g) in zip(plain, guided):
            assert torch.isfinite(g).all() and not torch.equal(g, p)


def test_refuses_discriminators_for_other_models(eps_model):
    flux = tiny_model("FLOW", family="Flux")
    with pytest.raises(IncompatibleDiscriminator, match=r"4-channel.*16-channel.*Flux"):
        guide(flux, standalone())
    sdxl = tiny_model("EPS", family="SDXL")
    with pytest.raises(IncompatibleDiscriminator, match=r"SD15.*SDXL"):
        guide(sdxl, standalone("SD15"))
    wide = tiny_model("EPS", model_channels=64)
    with pytest.raises(IncompatibleDiscriminator, match=r"feature channels"):
        guide(wide, features(eps_model))


@pytest.mark.parametrize("kwargs,match", [({"start_percent": 0.8, "end_percent": 0.2}, "swap"),
                                          ({"weight": float("nan")}, "weight must be a finite number"),
                                          ({"intermediate_weight": -1.0}, r"intermediate_weight is -1.0, outside"),
                                          ({"schedule": "zigzag"}, "schedule is 'zigzag'; choose one of"),
                                          ({"end_percent": 1.5}, r"end_percent is 1.5, outside its range 0.0..1.0"),
                                          ({"class_label": 1.5}, "class_label must be a whole number")])
def test_bad_options_are_refused(eps_model, kwargs, match):
    with pytest.raises(OptionError, match=match):
        guide(eps_model, standalone(), **kwargs)


def test_non_finite_logits_leave_those_samples_alone(eps_model, caplog):
    class HalfBroken(torch.nn.Module):
        def forward(self, x_in, sigma):
            return x_in.mean(dim=(1, 2, 3)) * torch.tensor([float("nan"), 1.0], dtype=x_in.dtype)
    pts = _points(eps_model, [1.0])
    plain = evaluate(eps_model, pts)[0][2]
    with caplog.at_level(logging.WARNING, logger="comfy_dg"):
        guided = evaluate(guide(eps_model, HalfBroken(), weight=2.0), pts)[0][2]
    assert torch.equal(guided[0], plain[0]) and not torch.equal(guided[1], plain[1])
    assert "non-finite" in caplog.text
