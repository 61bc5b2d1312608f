"""ComfyUI runs every prompt under torch.inference_mode(); what that means for tensors that need autograd."""
import contextlib

import torch


def autograd_weights(module: torch.nn.Module):
    """Parameters made or loaded under inference mode cannot take part in a backward pass; replace them, in
    place, by ordinary tensors with the same values (nothing else about the module changes). Cheap when
    there is nothing to replace."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m.named_parameters(recurse=False)):
                if p.is_inference():
                    setattr(m, name, torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))
            for name, b in list(m.named_buffers(recurse=False)):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """ComfyUI's networks keep requires_grad=True on their weights. Under autograd that makes every layer save
    its input for a weight gradient nobody asks for, and records layers that do not depend on x at all (e.g. a
    UNet's decoder, through the time embedding); off for the duration, restored after."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
