"""Feature taps: frozen features of the user's own diffusion network, with a graph back to its input.

One module per network family. A tap is a class with:

    name                      stable id stored in discriminator files ("unet_middle", ...)
    network                   the network it reads (identity.network of the diffusion model)
    supports(diffusion_model) whether this model's network is one the tap can read
    channels(base_model)      the feature channels C
    features(base_model, x_in, σ, conditioning=None) -> (B, C, h, w)
                              the features of x_in = calculate_input(σ, x), with a graph back to x_in; the
                              network's weights must be usable by autograd (tensors.autograd_weights)
    prompt_dims(base_model)   (context width, pooled width) of the prompt a head can be trained under, or None
                              when the tap takes prompt-independent features only
    install_fast_path(model_patcher)
                              optional: wrappers that take the features from the sampler's own forward pass
                              for heads trained under the prompt of that pass (see unet.py), or None

Adding a family: one module here (and its entry in identity.NETWORKS) plus its tiny model in harness/tiny.py.
"""
from .flux import FluxDouble
from .mmdit import MMDiTMiddle
from .unet import UNetMiddle

TAPS = {t.name: t for t in (UNetMiddle, FluxDouble, MMDiTMiddle)}

__all__ = ["TAPS", "find_tap", "UNetMiddle", "FluxDouble", "MMDiTMiddle"]


def find_tap(diffusion_model):
    """The tap that reads this network, or None."""
    return next((t for t in TAPS.values() if t.supports(diffusion_model)), None)
