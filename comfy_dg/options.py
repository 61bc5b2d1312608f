"""The options users set, in one table each: guidance (the Discriminator Guidance node and guide()), training
(the Train Discriminator node, the command line and TrainConfig) and saving (the Train Discriminator node). Node
inputs, command-line flags, defaults and validation are all derived from these tables (nodes/options.py,
training/cli.py, check()).
"""
import math
from dataclasses import dataclass

from .errors import OptionError


@dataclass(frozen=True)
class Option:
    name: str
    kind: type                          # float, int, bool or str
    default: object
    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None           # the widget's step
    choices: tuple | None = None        # str options: the allowed values (None: any text)
    none_is: object = None              # an optional setting (default None): this widget/flag value stands for None
    flag: str | None = None             # command-line flag, if not --name-with-dashes
    cli: bool = True                    # on the command line (training options)
    node: bool = True                   # an input of the node


def _table(*options: Option) -> dict:
    return {o.name: o for o in options}


GUIDANCE = _table(
    Option("weight", float, 1.0, min=0.0, max=20.0, step=0.05,
           help="w: the strength of the correction on each step's first model evaluation. 1 is the theory "
                "(Theorem 1); the paper used 1–2. 0 turns guidance off."),
    Option("start_percent", float, 0.0, min=0.0, max=1.0, step=0.001,
           help="Where in sampling guidance starts (0 = the first, noisiest step)."),
    Option("end_percent", float, 1.0, min=0.0, max=1.0, step=0.001,
           help="Where guidance stops (1 = the last step). The official code stops short of the cleanest steps "
                "(about 0.85–0.95)."),
    Option("schedule", str, "constant", choices=("constant", "linear_up", "linear_down", "cosine"),
           help="How the weight varies inside the window: constant; linear_up (0 → w); linear_down (w → 0); "
                "cosine (w → 0, smoothly)."),
    Option("boost", float, 1.0, min=0.0, max=10.0, step=0.05,
           help="Weight multiplier for samples the discriminator judges fake (log r < 0); 1 = off. For the "
                "official code's boosting (extra noise and a doubled weight for such samples) use the sampler "
                "DG Heun (official boosting)."),
    Option("intermediate_weight", float, 0.0, min=0.0, max=20.0, step=0.05,
           help="w₂: the weight on each step's intermediate evaluations (Heun's correction, dpmpp_sde's midpoint, "
                "...; one-evaluation samplers have none). The official code's default is 0: guide only the first "
                "evaluation of each step."),
    Option("class_label", int, -1, min=-1, max=100000,
           help="For a class-conditional discriminator: the class to guide toward (-1: unconditional)."),
    Option("class_name", str, "",
           help="For a class-conditional discriminator: the class to guide toward by the name stored in the file "
                "(its training folder's subfolder; case is ignored when the name is unique), instead of "
                "class_label. Empty: use class_label."),
)

TRAINING = _table(
    Option("architecture", str, "features", choices=("features", "standalone"),
           help="features: a small head on the model's own frozen network features (the paper's design; "
                "recommended). standalone: a small conv net on latents (any model)."),
    Option("steps", int, 2000, min=1, max=1_000_000, help="Optimizer steps at most."),
    Option("batch_size", int, 64, min=2, max=4096, step=2, help="Global batch: half real, half fake."),
    Option("learning_rate", float, 3e-4, min=1e-6, max=1e-1, step=1e-5, flag="--lr",
           help="Adam's learning rate (the paper's 3e-4)."),
    Option("weight_decay", float, 1e-7, min=0.0, max=1.0, step=1e-7, help="Adam's weight decay (the paper's 1e-7)."),
    Option("heldout_fraction", float, 0.1, min=0.01, max=0.5, step=0.01,
           help="Share of real and of fake latents held out for evaluation and early stopping."),
    Option("eval_every", int, 100, min=1, max=100000,
           help="Steps between held-out evaluations (and, on the command line, saved training states)."),
    Option("patience", int, 5, min=0, max=1000,
           help="Stop after this many evaluations without a better held-out score (BCE; the reconstruction error for "
                "that objective) (0: never)."),
    Option("augment", bool, True, help="Random flips and small shifts (kornia), alike for real and fake."),
    Option("flip", bool, True, help="Augmentation: random horizontal flips (off for data with a handedness, such "
                                    "as text or digits)."),
    Option("translate", float, 0.0625, min=0.0, max=0.5, step=0.0125,
           help="Augmentation: random shifts, as a fraction of the size."),
    Option("width", int, None, none_is=0, min=0, max=4096,
           help="Network width (0: the architecture's own: 128 for features, 64 for standalone)."),
    Option("sigma_min", float, None, none_is=0.0, min=0.0, max=1e4, step=0.001,
           help="Lowest σ trained (0: the model's own)."),
    Option("sigma_max", float, None, none_is=0.0, min=0.0, max=1e4, step=0.001,
           help="Highest σ trained (0: the model's own)."),
    Option("sigma_sampling", str, "model", choices=("model", "vp_importance"),
           help="How training draws noise levels. model: t uniform over the model's own timesteps (log-uniform σ for "
                "EDM models). vp_importance: the paper's VP importance sampling, log-uniform in σ/α between 0.001 "
                "and 152, mapped onto the model by signal-to-noise ratio and clipped to its σ range."),
    Option("objective", str, "bce", choices=("bce", "reconstruction"),
           help="bce: the paper's cross-entropy, real vs fake. reconstruction: log r is trained so that the guided "
                "denoiser (w = 1) reconstructs the real latents (after Verine et al., arXiv 2503.16117); needs the "
                "prompt you sample with, ignores the fakes, about twice as slow per step."),
    Option("sigma_bands", int, 4, min=1, max=32, help="σ bands of the held-out report and plot."),
    Option("label_dropout", float, 0.1, min=0.0, max=1.0, step=0.01,
           help="Class-conditional only: share of labels replaced by 'no label', so that the discriminator also "
                "works unconditionally."),
    Option("seed", int, 0, min=0, max=0xffffffffffffffff,
           help="Seed of the split, initialisation, batches and noise: same seed, same result."),
)


# How the trained discriminator is saved (the node; the command line writes its --out as given).
SAVING = _table(
    Option("overwrite", bool, False, cli=False,
           help="Replace an existing file of the same name. Off: the next free numbered name "
                "(<filename>_00001_.safetensors, ...) is taken instead, and no file is ever replaced."),
)


def from_widget(option: Option, value):
    """A widget's or flag's value as the setting (none_is → None)."""
    return None if option.none_is is not None and value == option.none_is else value


def check(table: dict, values: dict) -> dict:
    """The values, each checked against its option's type, range and choices; unknown names are refused. Raises
    OptionError naming the option, the value and what is allowed."""
    out = {}
    for name, value in values.items():
        o = table.get(name)
        if o is None:
            raise OptionError(f"comfy-dg: unknown option {name!r}; known: {', '.join(table)}")
        out[name] = _checked(o, value)
    return out


def _checked(o: Option, value):
    if value is None and o.default is None:
        return None
    if o.kind is bool:
        if not isinstance(value, bool):
            raise OptionError(f"comfy-dg: {o.name} must be true or false, got {value!r}")
        return value
    if o.kind is str:
        if o.choices is None:
            if not isinstance(value, str):
                raise OptionError(f"comfy-dg: {o.name} must be text, got {value!r}")
            return value
        if value not in o.choices:
            raise OptionError(f"comfy-dg: {o.name} is {value!r}; choose one of {', '.join(o.choices)}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if o.kind is int and not (number and float(value).is_integer()):
        raise OptionError(f"comfy-dg: {o.name} must be a whole number, got {value!r}")
    if not number or not math.isfinite(value):
        raise OptionError(f"comfy-dg: {o.name} must be a finite number, got {value!r}")
    if (o.min is not None and value < o.min) or (o.max is not None and value > o.max):
        raise OptionError(f"comfy-dg: {o.name} is {value}, outside its range {o.min}..{o.max}: set it within "
                          f"{o.min}..{o.max}.")
    return o.kind(value)
