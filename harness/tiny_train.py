"""Training a small diffusion model (a tiny ComfyUI model, see tiny.py) on latents, reproducibly, so that tests,
the quality benchmark and the demo have a model that is good but imperfect: where DG has something to fix."""
import torch


def train_diffusion(model_patcher, latents, steps=500, batch_size=64, lr=2e-3, seed=0, log_every=0):
    """ε-prediction loss ‖(D(x_σ, σ) − x0)/σ‖² with σ from the model's own schedule, through the model's
    own apply_model (so calculate_input / calculate_denoised are ComfyUI's). Trains in place; returns losses."""
    from harness.tiny import empty_conditioning
    from comfy_dg.training.noise import sample_sigmas, timestep_range

    base = model_patcher.model
    ms = base.model_sampling
    pos, _ = empty_conditioning(model_patcher)
    context = pos[0][0]
    g = torch.Generator().manual_seed(seed)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():
        for p in base.diffusion_model.parameters():
            p.requires_grad_(True)
        x_all = base.process_latent_in(latents.detach().clone().float())
        opt = torch.optim.AdamW(base.diffusion_model.parameters(), lr=lr, weight_decay=1e-4)
        # One-cycle learning rate (warm-up, then annealing); too short a run keeps it constant.
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1) \
            if steps >= 50 else None
        t_range = timestep_range(ms)
        base.diffusion_model.train()
        for step in range(steps):
            idx = torch.randint(len(x_all), (batch_size,), generator=g)
            x0 = x_all[idx]
            sigma = sample_sigmas(ms, t_range, batch_size, g)
            eps = torch.randn(x0.shape, generator=g)
            x = ms.noise_scaling(sigma, eps, x0)
            denoised = base.apply_model(x, sigma, c_crossattn=context.expand(batch_size, -1, -1))
            loss = (((denoised - x0) / sigma.view(-1, 1, 1, 1)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(base.diffusion_model.parameters(), 1.0)
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.4f}")
        base.diffusion_model.eval()
        for p in base.diffusion_model.parameters():
            p.requires_grad_(False)
    return losses
