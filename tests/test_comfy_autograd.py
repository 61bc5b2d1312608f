"""What a backward pass through ComfyUI's network needs, on whichever ComfyUI runs the suite: Flux features
guidance (its forward, and its gradient against finite differences), ComfyUI's process-wide training flag set
only around the tap's own pass, and the refusal of dynamic-VRAM patchers."""
import pytest
import torch

import comfy.model_management as mm
import comfy.model_patcher
import nodes as comfy_nodes
from comfy_dg import guide
from comfy_dg.errors import UnsupportedModel
from comfy_dg.taps.common import differentiable_forward, is_dynamic
from comfy_dg.taps.flux import FluxDouble
from builders import features
from harness.tiny import empty_conditioning, tiny_flux, tiny_model
from probe import evaluate

HAS_FLAG = hasattr(mm, "in_training")


def flag():
    return getattr(mm, "in_training", None)


def flux_head(model, seed=0, dtype=torch.float32):
    d = features(model, seed)
    assert d.tap_class is FluxDouble
    with torch.inference_mode(False):
        return d.to(dtype)


def test_flux_features_gradient_matches_finite_differences():
    """d/dε log r(x + ε·v) at ε = 0, by autograd through the Flux tap and by central differences, in float64
    (Flux's RoPE tables are float32, so the difference quotient is good to about 1e-6 relative)."""
    model = tiny_flux(dtype=torch.float64)
    d = flux_head(model, dtype=torch.float64)
    logit = d.bind(model.model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 12, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.4, 0.8], dtype=torch.float64)
    with torch.inference_mode(False):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(logit(xg, sigma).sum(), xg)
        eps = 1e-3
        with torch.no_grad():
            fd = (logit(x + eps * v, sigma) - logit(x - eps * v, sigma)) / (2 * eps)
    directional = (grad * v).flatten(1).sum(1)
    assert fd.abs().min() > 1e-4, "the logit barely depends on x: the check would be vacuous"
    torch.testing.assert_close(directional, fd, rtol=1e-4, atol=0)


def test_flux_features_guidance_runs_through_comfyuis_sampler():
    model = tiny_flux()
    pos, _ = empty_conditioning(model)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with torch.inference_mode():
        (plain,) = comfy_nodes.KSampler().sample(model, 3, 3, 1.0, "euler", "simple", pos, pos, latent)
        (guided,) = comfy_nodes.KSampler().sample(guide(model, flux_head(model), weight=2.0), 3, 3, 1.0, "euler",
                                                  "simple", pos, pos, latent)
    assert torch.isfinite(guided["samples"]).all()
    assert not torch.allclose(guided["samples"], plain["samples"])


def test_the_training_flag_is_set_only_for_the_taps_own_pass_and_restored():
    """ComfyUI's `in_training` is process-wide. During a guided Flux run it is on only inside the feature tap's
    own pass: the sampler's forwards (which run the final layer; the tap stops after the double blocks), another
    node's post-CFG patch and everything after the run see it as it was. A ComfyUI without the flag gets none."""
    model = tiny_flux()
    dm = model.model.diffusion_model
    seen = {"sampler": [], "first_block": [], "other_patch": []}
    hooks = [dm.final_layer.register_forward_hook(lambda *_: seen["sampler"].append(flag())),
             dm.double_blocks[0].register_forward_hook(lambda *_: seen["first_block"].append(flag()))]

    def other_patch(args):          # another node's patch in the same list
        seen["other_patch"].append(flag())
        return args["denoised"]
    try:
        m = guide(model, flux_head(model), weight=2.0)
        m.set_model_sampler_post_cfg_function(other_patch)
        g = torch.Generator().manual_seed(0)
        evaluate(m, [(s, torch.randn(1, 16, 8, 8, generator=g)) for s in (0.9, 0.5, 0.2)])
    finally:
        for h in hooks:
            h.remove()
    before = False if HAS_FLAG else None
    assert len(seen["sampler"]) == 3 and set(seen["sampler"]) == {before}
    assert len(seen["other_patch"]) == 3 and set(seen["other_patch"]) == {before}
    taps = len(seen["first_block"]) - len(seen["sampler"])
    assert taps == 3, seen
    assert seen["first_block"].count(True) == (3 if HAS_FLAG else 0)
    assert flag() is before and hasattr(mm, "in_training") == HAS_FLAG


def test_the_training_flag_is_restored_when_the_taps_pass_fails():
    model = tiny_flux()
    dm = model.model.diffusion_model

    def fail(*_):
        raise RuntimeError("interrupted inside the tap")
    handle = dm.double_blocks[0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="interrupted inside the tap"):
            with torch.inference_mode(False):
                FluxDouble.features(model.model, torch.randn(1, 16, 8, 8), torch.tensor([0.5]))
    finally:
        handle.remove()
    assert flag() is (False if HAS_FLAG else None)


@pytest.mark.skipif(not HAS_FLAG, reason="this ComfyUI has no training flag")
def test_differentiable_forward_keeps_a_flag_that_was_already_on():
    mm.in_training = True
    try:
        with differentiable_forward():
            assert mm.in_training is True
        assert mm.in_training is True
    finally:
        mm.in_training = False


def test_guidance_leaves_the_model_as_it_found_it():
    """Nothing process-wide stays changed after guided sampling: grad and inference modes, every weight's value
    and requires_grad, hooks, the input ModelPatcher's options."""
    model = tiny_flux()
    dm = model.model.diffusion_model
    weights = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    requires = [p.requires_grad for p in dm.parameters()]
    options = repr(model.model_options)
    pos, _ = empty_conditioning(model)
    with torch.inference_mode():
        comfy_nodes.KSampler().sample(guide(model, flux_head(model), weight=2.0), 3, 2, 1.0, "heun", "simple", pos,
                                      pos, {"samples": torch.zeros(1, 16, 8, 8)})
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert flag() is (False if HAS_FLAG else None)
    assert [p.requires_grad for p in dm.parameters()] == requires
    after = dm.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], w) for k, w in weights.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in dm.modules())
    assert repr(model.model_options) == options


def _dynamic_patcher(plain):
    """A real ModelPatcherDynamic object carrying a plain patcher's state. ComfyUI builds one only for a CUDA
    load device once comfy-aimdo is initialised (it reroutes CPU models to the plain patcher), so on this machine
    it can be created but never loaded: enough for guide(), which must refuse it before anything else."""
    cls = comfy.model_patcher.ModelPatcherDynamic
    patcher = cls.__new__(cls, plain.model, load_device=torch.device("cuda", 0))
    assert type(patcher) is cls
    patcher.__dict__.update(plain.__dict__)
    return patcher


def test_comfyuis_cpu_models_use_the_plain_patcher():
    model = tiny_model("EPS")
    assert not is_dynamic(model)
    dynamic = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if dynamic is not None:     # ComfyUI's own rule: a CPU load device gets the plain patcher
        rerouted = dynamic(model.model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        assert type(rerouted) is comfy.model_patcher.ModelPatcher and not is_dynamic(rerouted)


@pytest.mark.skipif(not hasattr(comfy.model_patcher, "ModelPatcherDynamic"),
                    reason="this ComfyUI has no dynamic-VRAM patcher")
def test_features_guidance_refuses_a_dynamic_vram_model_and_names_the_option():
    plain = tiny_flux()
    dynamic = _dynamic_patcher(plain)
    assert is_dynamic(dynamic)
    with pytest.raises(UnsupportedModel, match="--disable-dynamic-vram"):
        guide(dynamic, flux_head(plain), weight=1.0)
    # The same discriminator on the same network loaded by the plain patcher is accepted.
    assert guide(plain, flux_head(plain), weight=1.0) is not None
