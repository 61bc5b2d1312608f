"""Evaluate a ComfyUI model at chosen (x, σ) points through ComfyUI's own sampling path:
CFGGuider.sample → KSAMPLER → KSamplerX0Inpaint → sampling_function → post-CFG hooks."""
import torch

import comfy.samplers


def probe_sampler(points, record):
    """A KSAMPLER whose sampler function evaluates the model at fixed points and records what it returns."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for sigma, xs in points:
            s = torch.full((xs.shape[0],), sigma, dtype=xs.dtype, device=xs.device)
            record.append((sigma, xs, model(xs, s, **extra_args)))
        return x
    return comfy.samplers.KSAMPLER(sample)


def evaluate(model_patcher, points, cfg=1.0):
    """[(σ, x, denoised)] for points [(σ, x)], x of shape (B, C, H, W), under ComfyUI's inference mode."""
    from harness.tiny import empty_conditioning
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(*empty_conditioning(model_patcher))
    guider.set_cfg(cfg)
    record = []
    x = points[0][1]
    with torch.inference_mode():
        guider.sample(torch.zeros_like(x), torch.zeros_like(x), probe_sampler(points, record),
                      torch.tensor([1.0, 0.0], dtype=x.dtype), disable_pbar=True, seed=0)
    return record
