"""Feature taps of transformer diffusion models (Flux, SD3/MMDiT) on tiny real ComfyUI models."""
import pytest
import torch

from comfy_dg import DiscriminatorInfo, FeatureHeadDiscriminator, IncompatibleDiscriminator, guide
from comfy_dg.taps import TAPS, FluxDouble, MMDiTMiddle, UNetMiddle, find_tap
from comfy_dg import small_models
from comfy_dg.tensors import autograd_weights
from harness.tiny import empty_conditioning, tiny_flux, tiny_model, tiny_sd3, tiny_vae
from probe import evaluate

ARCHS = ["flux", "sd3"]
FAMILY = {"flux": "Flux", "sd3": "SD3"}
TAP = {"flux": FluxDouble, "sd3": MMDiTMiddle}
HIDDEN = {"flux": 64, "sd3": 192}


def _inference_weights(module):
    """What ComfyUI's loader leaves: parameters and buffers that are inference tensors."""
    with torch.inference_mode():
        for m in module.modules():
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
            for name, b in list(m.named_buffers(recurse=False)):
                m._buffers[name] = b.clone()


def _build(arch):
    with torch.inference_mode():
        model = (tiny_flux if arch == "flux" else tiny_sd3)(seed=0)
        _inference_weights(model.model.diffusion_model)
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    return model


@pytest.fixture(scope="module")
def models():
    return {arch: _build(arch) for arch in ARCHS}


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _head(arch, model, seed=0, family=None, tap=None, channels=None):
    bm = model.model
    tap = tap or TAP[arch]
    torch.manual_seed(seed)
    with torch.inference_mode(False):
        return FeatureHeadDiscriminator(
            DiscriminatorInfo(16, FAMILY[arch] if family is None else family), tap=tap.name,
            feature_channels=tap.channels(bm) if channels is None else channels, width=32, emb_dim=32)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_model_finds_its_own_tap(models, arch):
    dm = models[arch].model.diffusion_model
    assert find_tap(dm) is TAP[arch]
    assert TAP[arch].channels(models[arch].model) == HIDDEN[arch]
    assert [t.name for t in TAPS.values() if t.supports(dm)] == [TAP[arch].name]
    assert set(TAPS) >= {"unet_middle", "flux_double", "mmdit_middle"}


def test_unet_is_not_taken_for_a_transformer():
    dm = tiny_model("EPS").model.diffusion_model
    assert find_tap(dm) is UNetMiddle
    assert not FluxDouble.supports(dm) and not MMDiTMiddle.supports(dm)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (7, 10)], ids=["8x8", "8x12", "7x10-padded"])
def test_features_lie_on_the_patch_grid(models, arch, hw):
    bm = models[arch].model
    with torch.inference_mode(False):
        f = TAP[arch].features(bm, _x((2, 16, *hw)), torch.tensor([0.3, 0.8]))
    assert f.shape == (2, HIDDEN[arch], (hw[0] + 1) // 2, (hw[1] + 1) // 2)
    assert torch.isfinite(f).all()


def _block_output(arch, bm, x, sigma, context, pooled):
    """The tapped block's image tokens as ComfyUI's own apply_model runs the network with this conditioning,
    laid on the patch grid (tokens are row-major over the patch grid)."""
    dm = bm.diffusion_model
    block = dm.double_blocks[-1] if arch == "flux" else dm.joint_blocks[len(dm.joint_blocks) // 2]
    out = {}

    def grab(_module, _inputs, output):
        out["tokens"] = output[0] if arch == "flux" else output[1]     # Flux: (img, txt); MMDiT: (context, x)
    handle = block.register_forward_hook(grab)
    extra = {"guidance": torch.full((x.shape[0],), FluxDouble.GUIDANCE)} if arch == "flux" else {}
    try:
        with torch.inference_mode(False), torch.no_grad():
            bm.apply_model(x, sigma, c_crossattn=context, y=pooled, **extra)
    finally:
        handle.remove()
    t = out["tokens"]
    return t.reshape(x.shape[0], x.shape[2] // 2, x.shape[3] // 2, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_features_are_the_networks_own_with_null_conditioning(models, arch):
    """The tap's features are exactly what the network computes at that block when ComfyUI runs it with an
    all-zero prompt (and zero pooled vector): not some other computation, and not the prompt's."""
    model = models[arch]
    bm = model.model
    x, sigma = _x((2, 16, 8, 12)), torch.tensor([0.35, 0.9])
    [(pos, cond)], _ = empty_conditioning(model)
    pooled = cond["pooled_output"].expand(2, -1)
    with torch.inference_mode(False), torch.no_grad():
        f = TAP[arch].features(bm, bm.model_sampling.calculate_input(sigma, x), sigma)
    null = _block_output(arch, bm, x, sigma, torch.zeros_like(pos).expand(2, -1, -1), torch.zeros_like(pooled))
    prompted = _block_output(arch, bm, x, sigma, pos.expand(2, -1, -1), pooled + 1.0)
    torch.testing.assert_close(f, null)
    assert not torch.allclose(prompted, null, atol=1e-4), "the prompt has no effect at this block: test is vacuous"


@pytest.mark.parametrize("arch", ARCHS)
def test_features_depend_on_input_and_sigma(models, arch):
    bm = models[arch].model
    x = _x((1, 16, 8, 8))
    with torch.inference_mode(False), torch.no_grad():
        f = TAP[arch].features(bm, x, torch.tensor([0.5]))
        assert torch.equal(f, TAP[arch].features(bm, x, torch.tensor([0.5])))
        assert not torch.allclose(f, TAP[arch].features(bm, x + 0.1 * _x((1, 16, 8, 8), seed=1), torch.tensor([0.5])))
        assert not torch.allclose(f, TAP[arch].features(bm, x, torch.tensor([0.8])))


@pytest.mark.parametrize("arch", ARCHS)
def test_head_gradient_flows_back_through_the_tap_once_weights_are_made_usable(arch):
    model = _build(arch)        # fresh: weights still inference tensors, as ComfyUI loads them
    bm = model.model
    d = _head(arch, model)
    sigma = torch.tensor([0.4, 0.7])
    autograd_weights(bm.diffusion_model)        # what the guidance patch does once per run
    with torch.inference_mode(False), torch.enable_grad():
        x = _x((2, 16, 8, 12)).requires_grad_(True)
        (grad,) = torch.autograd.grad(d.bind(bm)(x, sigma).sum(), x)
        # The same gradient from a functionalized forward (in-place updates rewritten out of place by torch):
        # the saved-activation copies that make Flux's in-place blocks differentiable change no value.
        x2 = x.detach().clone().requires_grad_(True)
        logit = torch.func.functionalize(lambda v: d.head(TAP[arch].features(bm, v, sigma), sigma))(x2)
        (reference,) = torch.autograd.grad(logit.sum(), x2)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(grad[i].abs().sum() > 0 for i in range(2))
    torch.testing.assert_close(grad, reference)


def _count_calls(modules):
    calls = {}
    handles = [m.register_forward_hook(lambda mod, _i, _o, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
               for k, m in modules.items()]
    return calls, handles


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_stops_right_after_the_tapped_block(models, arch):
    bm = models[arch].model
    dm = bm.diffusion_model
    if arch == "flux":
        watched = {"tapped": dm.double_blocks[-1], "final": dm.final_layer,
                   **{f"single{i}": b for i, b in enumerate(dm.single_blocks)}}
    else:
        mid = len(dm.joint_blocks) // 2
        assert mid < len(dm.joint_blocks) - 1, "the tiny MMDiT must have a block after the tapped one"
        watched = {"tapped": dm.joint_blocks[mid], "final": dm.final_layer,
                   **{f"later{i}": b for i, b in enumerate(dm.joint_blocks) if i > mid}}
    calls, handles = _count_calls(watched)
    try:
        with torch.inference_mode(False):
            TAP[arch].features(bm, _x((1, 16, 8, 8)), torch.tensor([0.5]))
    finally:
        for h in handles:
            h.remove()
    assert calls == {"tapped": 1}
    assert not dm._forward_hooks and not any(m._forward_hooks for m in dm.modules()), "a hook was left behind"


@pytest.mark.parametrize("arch", ARCHS)
def test_features_discriminator_guides_the_model(arch):
    model = _build(arch)
    d = _head(arch, model)
    g = torch.Generator().manual_seed(3)
    points = [(s, torch.randn(2, 16, 8, 8, generator=g)) for s in (0.9, 0.4)]
    plain = evaluate(model, points)
    guided = evaluate(guide(model, d, weight=2.0), points)
    for (sigma, _, dp), (_, _, dg) in zip(plain, guided):
        assert torch.isfinite(dg).all()
        assert not torch.allclose(dg, dp), f"σ={sigma}: guidance changed nothing"


def test_a_tap_is_refused_on_another_architecture(models):
    flux, sd3 = models["flux"], models["sd3"]
    with pytest.raises(IncompatibleDiscriminator):
        guide(sd3, _head("flux", flux))                      # made for Flux: family and tap both wrong
    with pytest.raises(IncompatibleDiscriminator, match="flux_double"):
        guide(sd3, _head("flux", flux, family="SD3"))        # same latent family: the tap still does not fit
    with pytest.raises(IncompatibleDiscriminator, match="mmdit_middle"):
        guide(flux, _head("sd3", sd3, family="Flux"))
    with pytest.raises(IncompatibleDiscriminator, match="feature channels"):
        guide(flux, _head("flux", flux, channels=128))
    unet_flux_latents = tiny_model("FLOW", family="Flux")
    with pytest.raises(IncompatibleDiscriminator, match="flux_double"):
        guide(unet_flux_latents, _head("flux", flux))


def test_empty_conditioning_fits_each_model(models):
    [(pos, cond)], [(neg, _)] = empty_conditioning(models["flux"])
    assert pos.shape == (1, 1, 32) and cond["pooled_output"].shape == (1, 32) and torch.equal(neg, 0 * pos)
    [(pos, cond)], _ = empty_conditioning(models["sd3"])
    assert pos.shape == (1, 1, 32) and cond["pooled_output"].shape == (1, 32)
    # UNet models: unchanged.
    [(pos, cond)], _ = empty_conditioning(tiny_model("EPS"))
    assert pos.shape == (1, 1, 32) and cond == {}
    assert torch.equal(pos, torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(1)))
    [(pos, cond)], _ = empty_conditioning(tiny_model("EPS", family="SDXL"))
    assert cond["pooled_output"].shape == (1, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_small_model_round_trip(arch, tmp_path):
    model = (tiny_flux if arch == "flux" else tiny_sd3)(seed=5)
    path = tmp_path / f"{arch}.safetensors"
    small_models.save(model, tiny_vae(latent_channels=16), path)
    loaded, vae = small_models.load(path)
    assert type(loaded.model) is type(model.model) and vae.latent_channels == 16
    for (k, a), (k2, b) in zip(model.model.diffusion_model.state_dict().items(),
                               loaded.model.diffusion_model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.small_model_spec == model.small_model_spec and model.small_model_spec["arch"] == arch
