"""What the pack raises on purpose. Every such error is a DGError whose message starts with "comfy-dg:", names the
problem and says how to fix it; anything else reaching the user is a bug."""


class DGError(ValueError):
    """Base of the pack's deliberate errors (a ValueError: each is about a value the user gave or a file they
    chose)."""


class OptionError(DGError):
    """An option (a node input, a command-line flag, an argument of guide()) is out of its range or inconsistent."""


class IncompatibleDiscriminator(DGError):
    """The discriminator was trained for another kind of model than the one it is applied to."""


class UnsupportedModel(DGError):
    """The model cannot be guided or tapped: its sampling does not add noise as σ·ε, or its network has no tap."""


class TrainingError(DGError):
    """Training cannot start or continue with these data and settings."""


class DataError(DGError):
    """Real images or latents that cannot be used."""


class LocationError(DGError):
    """A folder or file name the pack may not read or write: outside ComfyUI's folders, unusable on the file
    system, or clashing with another file."""
