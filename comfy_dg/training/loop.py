"""The training loop: BCE between noised real latents (label 1) and noised model samples (label 0), or the
reconstruction objective on the real latents alone (objectives.py).

x0 = process_latent_in(latent); σ from the model's own schedule; x_σ = noise_scaling(σ, ε, x0); the
discriminator sees calculate_input(σ, x_σ), exactly what it will see while guiding. For the features
architecture the diffusion network is frozen and its features are computed without gradients.

Every random draw of step k comes from a generator seeded by (seed, k), so a resumed run repeats an
uninterrupted one, and every rank of a distributed run draws the same global batch and takes its own rows.
"""
import copy
import dataclasses
import logging
import math

import torch

from .. import identity
from ..discriminators import DiscriminatorInfo, FeatureHeadDiscriminator, StandaloneDiscriminator
from ..dg import LOGIT_MAX
from ..discriminators.layers import init_weights
from ..errors import TrainingError
from ..options import TRAINING, check
from ..taps import find_tap
from ..tensors import frozen
from . import noise, objectives
from .augment import LatentAugment
from .conditioning import check_negative_architecture

log = logging.getLogger("comfy_dg")


def _validate(config):
    check(TRAINING, dataclasses.asdict(config))
    return config


# The training settings: one field per option of options.TRAINING, with its default.
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(o.name, o.kind if o.default is not None else o.kind | None, dataclasses.field(default=o.default))
                    for o in TRAINING.values()], namespace={"validate": _validate, "__module__": __name__})


def _seed(seed, step, salt):
    return (seed * 1_000_003 + step * 7919 + salt) % (2 ** 63)


def _gen(seed, step, salt=0):
    return torch.Generator().manual_seed(_seed(seed, step, salt))


def _check_latents(name, latents, channels):
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise TrainingError(f"comfy-dg: {name} latents must be a batch (N, C, H, W); got "
                            f"{getattr(latents, 'shape', type(latents).__name__)}")
    if latents.shape[0] < 2:
        raise TrainingError(f"comfy-dg: need at least 2 {name} latents to train and hold some out; got "
                            f"{latents.shape[0]}")
    if latents.shape[1] != channels:
        raise TrainingError(f"comfy-dg: the {name} latents have {latents.shape[1]} channels but the model's latent "
                            f"space has {channels}: encode them with this model's VAE (or sample them with this model).")
    if not torch.isfinite(latents).all():
        raise TrainingError(f"comfy-dg: the {name} latents contain NaN or infinite values")


def _check_labels(real, fake, real_labels, fake_labels):
    """The number of classes (0: unconditional)."""
    if real_labels is None and fake_labels is None:
        return 0
    if real_labels is None or fake_labels is None:
        raise TrainingError("comfy-dg: class labels were given for only one of real and fake latents; a "
                            "class-conditional discriminator needs labels for both (or for neither).")
    for name, lat, lab in (("real", real, real_labels), ("fake", fake, fake_labels)):
        if lab.shape != (len(lat),) or lab.dtype.is_floating_point or (lab < 0).any():
            raise TrainingError(f"comfy-dg: the {name} class labels must be {len(lat)} non-negative integers, "
                                f"one per latent; got shape {tuple(lab.shape)}")
    return int(max(int(real_labels.max()), int(fake_labels.max()))) + 1


def _split(n, fraction, generator):
    perm = torch.randperm(n, generator=generator)
    k = max(1, min(n - 1, round(n * fraction)))
    return perm[k:], perm[:k]


class Trainer:
    """Trains one discriminator for `model_patcher` on real and fake latents (N, C, H, W), as the VAE or the
    sampler returns them (the model's process_latent_in is applied here). With class labels (N,) for both,
    the discriminator is class-conditional. The reconstruction objective needs `prompt`: the model's inputs for
    the prompt it samples with (conditioning.prompt_conds), under which its denoiser is taken."""

    def __init__(self, model_patcher, real, fake, config: TrainConfig, rank: int = 0, world_size: int = 1,
                 real_labels=None, fake_labels=None, device=None, conditioning=None, prompt=None,
                 class_names=None):
        self.config = config.validate()
        self.model = model_patcher.model
        if config.objective == "reconstruction" and prompt is None:
            raise TrainingError("comfy-dg: the reconstruction objective compares the guided denoiser with real data "
                                "under the prompt you sample with: give that prompt (the trainer's 'positive' "
                                "input, or --prompt), or use the bce objective.")
        self.prompt = prompt
        # features only: (context, y) to take the features under (conditioning.negative_conditioning); None:
        # prompt-independent features.
        self.conditioning = conditioning
        if conditioning is not None:
            check_negative_architecture(config.architecture)
        self.rank, self.world = rank, world_size
        channels = identity.latent_channels(self.model)
        _check_latents("real", real, channels)
        _check_latents("fake", fake, channels)
        if real.shape[1:] != fake.shape[1:]:
            raise TrainingError(f"comfy-dg: real latents are {tuple(real.shape[1:])} but fake latents are "
                                f"{tuple(fake.shape[1:])}: generate the fakes at the resolution the real images "
                                "were encoded at.")
        if config.batch_size % (2 * world_size):
            raise TrainingError(f"comfy-dg: batch_size {config.batch_size} must split evenly into real/fake halves "
                                f"across {world_size} process(es)")
        real_labels, fake_labels = (None if v is None else torch.as_tensor(v) for v in (real_labels, fake_labels))
        self.num_classes = _check_labels(real, fake, real_labels, fake_labels)
        self.class_names = [str(n) for n in (class_names or [])]
        if self.class_names:
            if not self.num_classes or self.num_classes > len(self.class_names):
                raise TrainingError(f"comfy-dg: {len(self.class_names)} class names were given for labels up to "
                                    f"{self.num_classes - 1}; give one name per class (or none).")
            self.num_classes = len(self.class_names)
        self.ms = self.model.model_sampling
        # Data stays on the CPU; each batch, the discriminator and (features) the frozen model use `device`.
        self.device = torch.device(device) if device is not None else torch.device(model_patcher.load_device)
        with torch.inference_mode(False):
            real = self.model.process_latent_in(real.detach().clone().float())
            fake = self.model.process_latent_in(fake.detach().clone().float())
        g = _gen(config.seed, -1)
        r_train, r_val = _split(len(real), config.heldout_fraction, g)
        f_train, f_val = _split(len(fake), config.heldout_fraction, g)
        self.real, self.fake = real[r_train], fake[f_train]
        self.real_val, self.fake_val = real[r_val], fake[f_val]
        if self.num_classes:
            rl, fl = real_labels.long(), fake_labels.long()
            self.labels = torch.cat([rl[r_train], fl[f_train]])         # indexed like cat(real, fake)
            self.labels_val = torch.cat([rl[r_val], fl[f_val]])
        self.t_range = noise.timestep_range(self.ms, config.sigma_min, config.sigma_max)
        self.edges = noise.band_edges(self.ms, self.t_range, config.sigma_bands)
        self.augment = LatentAugment(config.flip, config.translate) if config.augment else None
        with torch.inference_mode(False):
            self.disc = self._build().to(self.device)
        self.tap = find_tap(self.model.diffusion_model) if config.architecture == "features" else None
        if self.tap is not None and self.device.type != "cpu":
            import comfy.model_management
            comfy.model_management.load_models_gpu([model_patcher])
        self.net = self.disc
        # The reconstruction objective's second-order backward goes around DDP; its gradients are averaged by hand.
        if config.objective == "bce" and (world_size > 1 or (torch.distributed.is_available()
                                                             and torch.distributed.is_initialized())):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.disc, device_ids=ids)
        with torch.inference_mode(False):
            self.opt = torch.optim.Adam(self.disc.parameters(), lr=config.learning_rate,
                                        weight_decay=config.weight_decay)
        self.step = 0
        self.history = []
        self.best = None            # (held-out BCE, step, state_dict)
        self.evals_since_best = 0

    # --- set-up --------------------------------------------------------------------------------------
    def _build(self):
        c = self.config
        sig_lo, sig_hi = float(self.ms.sigma(torch.tensor(self.t_range[0]))), float(self.ms.sigma(torch.tensor(self.t_range[1])))
        info = DiscriminatorInfo(identity.latent_channels(self.model), identity.family(self.model), sig_lo, sig_hi,
                                 num_classes=self.num_classes, class_names=self.class_names)
        kwargs = {} if c.width is None else {"width": c.width}
        # Built without memory, then initialised from the run's own generator: the process-global RNG, which a
        # server shares with everything else it runs, is neither reseeded nor advanced.
        generator = _gen(c.seed, -2)
        with torch.inference_mode(False):
            if c.architecture == "standalone":
                with torch.device("meta"):
                    disc = StandaloneDiscriminator(info, **kwargs)
                return init_weights(disc.to_empty(device="cpu"), generator)
            tap = find_tap(self.model.diffusion_model)
            if tap is None:
                raise TrainingError(
                    f"comfy-dg: the features architecture has no feature tap for a "
                    f"{identity.network(self.model.diffusion_model)} network yet (it has taps for UNets — SD1.x, SD2, SDXL — "
                    "Flux and SD3); train a standalone discriminator for this model.")
            if self.conditioning is not None:
                context, y = self.conditioning
                kwargs.update(context_tokens=context.shape[0], context_dim=context.shape[1],
                              y_dim=0 if y is None else y.numel())
            channels = tap.channels(self.model)
            try:
                with torch.device("meta"):
                    disc = FeatureHeadDiscriminator(info, tap=tap.name, feature_channels=channels, **kwargs)
            except ValueError as e:
                raise TrainingError(str(e)) from None
            disc = init_weights(disc.to_empty(device="cpu"), generator)
            if self.conditioning is not None:
                disc.set_conditioning(*self.conditioning)
            return disc

    # --- one batch -----------------------------------------------------------------------------------
    def _inputs(self, x0, sigma, eps):
        """What the trainable network takes: x_in itself, or the frozen model's features of it."""
        _, x_in = noise.noised_input(self.ms, x0, sigma, eps)
        if self.tap is None:
            return x_in
        with torch.no_grad():
            return self.tap.features(self.model, x_in, sigma, self.disc.conditioning).float()

    def _batch(self, step):
        c = self.config
        half = c.batch_size // 2
        g = _gen(c.seed, step)
        ir = torch.randint(len(self.real), (half,), generator=g)
        i_f = torch.randint(len(self.fake), (half,), generator=g)
        x0 = torch.cat([self.real[ir], self.fake[i_f]])
        labels = torch.cat([torch.ones(half), torch.zeros(half)])
        if self.augment is not None:
            x0 = self.augment(x0, _seed(c.seed, step, 1))
        sigma = noise.sample_sigmas(self.ms, self.t_range, c.batch_size, g, c.sigma_sampling)
        eps = torch.randn(x0.shape, generator=g)
        classes = None
        if self.num_classes:
            classes = torch.cat([self.labels[ir], self.labels[len(self.real) + i_f]])
            drop = torch.rand(c.batch_size, generator=g) < c.label_dropout
            classes = torch.where(drop, torch.full_like(classes, self.num_classes), classes)
        rows = slice(self.rank, None, self.world)       # this process's share of the global batch
        d = self.device
        return (x0[rows].to(d), sigma[rows].to(d), eps[rows].to(d), labels[rows].to(d),
                None if classes is None else classes[rows].to(d))

    def _log_ratio(self, sigma, classes):
        """x (sampler space) -> logit, differentiable in x: through calculate_input and, for the features
        architecture, the frozen network's tap."""
        def log_ratio(x):
            x_in = self.ms.calculate_input(sigma, x)
            if self.tap is None:
                return self.net(x_in, sigma, classes)
            with frozen(self.model.diffusion_model):
                features = self.tap.features(self.model, x_in, sigma, self.disc.conditioning).float()
            return self.net(features, sigma, classes)
        return log_ratio

    def _denoised(self, x, sigma):
        """The model's own denoiser D(x, σ) under the prompt it samples with (cfg 1)."""
        import comfy.utils
        kwargs = {k: comfy.utils.repeat_to_batch_size(v, len(x)).to(x.device) for k, v in self.prompt.items()}
        with frozen(self.model.diffusion_model):
            return self.model.apply_model(x, sigma, **kwargs)

    def _reconstruction(self, x0, sigma, eps, classes, create_graph):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        # The fused attention kernels have no second derivative; the math one has.
        with sdpa_kernel(SDPBackend.MATH):
            return objectives.reconstruction_errors(self.ms, x0, sigma, eps, self._log_ratio(sigma, classes),
                                                    self._denoised, LOGIT_MAX, create_graph)

    def train_step(self):
        with torch.inference_mode(False), torch.enable_grad():
            x0, sigma, eps, labels, classes = self._batch(self.step)
            self.disc.train()
            if self.config.objective == "reconstruction":
                real = labels > 0.5          # fakes play no part in this objective
                guided, _ = self._reconstruction(x0[real], sigma[real], eps[real],
                                                 None if classes is None else classes[real], create_graph=True)
                loss = guided.mean()
            else:
                logit = self.net(self._inputs(x0, sigma, eps), sigma, classes)
                loss = objectives.bce(logit, labels)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.net is self.disc and torch.distributed.is_available() and torch.distributed.is_initialized():
                self._average_gradients()
            self.opt.step()
        self.step += 1
        return float(loss.detach())

    def _average_gradients(self):
        import torch.distributed as dist
        for p in self.disc.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()

    # --- held-out evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self):
        """Held-out accuracy and BCE per σ band (balanced between real and fake), on fixed noise (the same
        every evaluation)."""
        c = self.config
        self.disc.eval()
        bands = []
        x0 = torch.cat([self.real_val, self.fake_val])
        labels = torch.cat([torch.ones(len(self.real_val)), torch.zeros(len(self.fake_val))])
        n_t = self.t_range[1] - self.t_range[0]
        for b in range(c.sigma_bands):
            g = _gen(c.seed, -3, b)
            t = self.t_range[0] + n_t * (b + torch.rand(len(x0), generator=g)) / c.sigma_bands
            sigma = self.ms.sigma(t).float()
            eps = torch.randn(x0.shape, generator=g)
            classes = self.labels_val.to(self.device) if self.num_classes else None
            d = self.device
            logits = torch.cat([self.disc(self._inputs(x0[i:i + 256].to(d), sigma[i:i + 256].to(d),
                                                       eps[i:i + 256].to(d)),
                                          sigma[i:i + 256].to(d), None if classes is None else classes[i:i + 256])
                                for i in range(0, len(x0), 256)]).float().cpu()
            correct = ((logits > 0).float() == labels).float()
            bce = objectives.bce(logits, labels, reduction="none")
            nr = len(self.real_val)
            # Balanced: real and fake count alike, however many of each are held out (training batches are
            # balanced too, so this is the quantity the discriminator is trained on).
            acc_real, acc_fake = float(correct[:nr].mean()), float(correct[nr:].mean())
            band = {"sigma_lo": self.edges[b], "sigma_hi": self.edges[b + 1], "acc_real": acc_real,
                    "acc_fake": acc_fake, "acc": (acc_real + acc_fake) / 2,
                    "bce": float((bce[:nr].mean() + bce[nr:].mean()) / 2)}
            if c.objective == "reconstruction":
                band.update(self._heldout_reconstruction(x0[:nr], sigma[:nr], eps[:nr]))
            bands.append(band)
        mean = lambda key: sum(b[key] for b in bands) / len(bands)  # noqa: E731
        record = {"step": self.step, "bands": bands, "bce": mean("bce"), "acc": mean("acc")}
        if c.objective == "reconstruction":
            record.update(recon=mean("recon"), recon_gain=mean("recon_gain"))
        # Early stopping follows the objective trained: held-out BCE, or held-out reconstruction error.
        record["criterion"] = record["recon"] if c.objective == "reconstruction" else record["bce"]
        self.history.append(record)
        if self.best is None or record["criterion"] < self.best[0]:
            self.best = (record["criterion"], self.step, copy.deepcopy(self.disc.state_dict()))
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        return record

    def _heldout_reconstruction(self, x0, sigma, eps):
        """Held-out reconstruction error of the guided denoiser (w = 1) on real latents, and its gain over the
        model's own error (> 0: the correction brings the model closer to the held-out data)."""
        d = self.device
        classes = self.labels_val[:len(x0)] if self.num_classes else None
        guided, base = [], []
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(0, len(x0), 256):
                g, b0 = self._reconstruction(x0[i:i + 256].to(d), sigma[i:i + 256].to(d), eps[i:i + 256].to(d),
                                             None if classes is None else classes[i:i + 256].to(d), create_graph=False)
                guided.append(g.detach().cpu())
                base.append(b0.cpu())
        guided, base = torch.cat(guided).mean(), torch.cat(base).mean()
        return {"recon": float(guided), "recon_gain": float(base - guided)}

    # --- the run ------------------------------------------------------------------------------------
    def run(self, on_step=None, should_stop=None):
        """Train until `steps` or early stopping; returns the best discriminator (by held-out BCE, or held-out
        reconstruction error for that objective).

        on_step(step, loss, record_or_None) reports progress; should_stop() is polled every step and may raise
        (ComfyUI's interrupt does), which ends training before anything is written."""
        with torch.inference_mode(False):   # ComfyUI runs nodes under inference mode; training needs autograd
            return self._run(on_step, should_stop)

    def _run(self, on_step, should_stop):
        c = self.config
        if not self.history:
            self.evaluate()
        while self.step < c.steps:
            if should_stop is not None and should_stop():
                break
            loss = self.train_step()
            record = None
            if self.step % c.eval_every == 0 or self.step == c.steps:
                record = self.evaluate()
            if on_step is not None:
                on_step(self.step, loss, record)
            if record is not None and c.patience and self.evals_since_best >= c.patience:
                break
        return self.best_discriminator()

    def best_discriminator(self):
        _, best_step, state = self.best
        disc = copy.deepcopy(self.disc).cpu()
        disc.load_state_dict(state)
        disc.eval().requires_grad_(False)
        best = next(r for r in self.history if r["step"] == best_step)
        disc.info = dataclasses.replace(disc.info, training={
            "real_train": len(self.real), "real_heldout": len(self.real_val),
            "fake_train": len(self.fake), "fake_heldout": len(self.fake_val),
            "steps": self.step, "best_step": best_step, "heldout_bce": round(best["bce"], 5),
            **({"heldout_recon_gain": round(best["recon_gain"], 6)} if "recon_gain" in best else {}),
            "heldout_accuracy": round(best["acc"], 4),
            "heldout_bands": [{k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
                               for k, v in b.items()} for b in best["bands"]],
            "config": dataclasses.asdict(self.config), "processes": self.world, "num_classes": self.num_classes})
        note = untrained_warning(disc.info.training)
        if note:
            log.warning(note)
        return disc

    # --- resumable state ----------------------------------------------------------------------------
    def state(self):
        """Tensors and JSON-able facts that let a later run continue exactly where this one is."""
        tensors = {f"disc.{k}": v.cpu() for k, v in self.disc.state_dict().items()}
        if self.best is not None:
            tensors.update({f"best.{k}": v.cpu() for k, v in self.best[2].items()})
        opt = self.opt.state_dict()
        for idx, s in opt["state"].items():
            for name, v in s.items():
                tensors[f"opt.{idx}.{name}"] = v.cpu() if isinstance(v, torch.Tensor) else torch.tensor(v)
        facts = {"step": self.step, "history": self.history, "param_groups": opt["param_groups"],
                 "best": None if self.best is None else [self.best[0], self.best[1]],
                 "evals_since_best": self.evals_since_best, "config": dataclasses.asdict(self.config)}
        return tensors, facts

    def load_state(self, tensors, facts):
        if facts["config"] != dataclasses.asdict(self.config):
            raise TrainingError("comfy-dg: the checkpoint was made with other training settings; resume with the "
                                "same settings, or start a new run under another name.")
        with torch.inference_mode(False):
            self.disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
            tensors = {k: v.to(self.device) if k.startswith("best.") else v for k, v in tensors.items()}
            state = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, idx, name = k.split(".", 2)
                    state.setdefault(int(idx), {})[name] = v
            self.opt.load_state_dict({"state": state, "param_groups": facts["param_groups"]})
        self.step, self.history = facts["step"], facts["history"]
        self.evals_since_best = facts["evals_since_best"]
        if facts["best"] is not None:
            self.best = (facts["best"][0], facts["best"][1],
                         {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")})


def untrained_warning(training):
    """What to tell the user when no evaluation after step 0 beat the untrained discriminator (None otherwise):
    early stopping then keeps the untrained one, whose log r is nearly flat, and guiding with it changes little."""
    if training["best_step"] != 0 or training["steps"] == 0:
        return None
    return (f"comfy-dg: training never improved the held-out score over the untrained discriminator (best at step "
            f"0 of {training['steps']}), so the saved discriminator is the untrained one and guiding with it changes "
            "little. Try more real images, more steps or another learning rate; with objective reconstruction, try "
            "bce (on the digits benchmark the reconstruction objective never improved on step 0).")
