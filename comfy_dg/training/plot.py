"""The training curves as a picture: held-out accuracy and BCE per σ band over training (matplotlib)."""
import io

import numpy as np


def plot_history(history, title="Discriminator training (held-out)") -> np.ndarray:
    """An RGB uint8 array (H, W, 3)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    steps = [r["step"] for r in history]
    n_bands = len(history[0]["bands"])
    fig, (ax_acc, ax_bce) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    cmap = plt.get_cmap("viridis")
    for b in range(n_bands):
        band = history[0]["bands"][b]
        label = f"σ {band['sigma_lo']:.3g}–{band['sigma_hi']:.3g}"
        color = cmap(b / max(1, n_bands - 1))
        ax_acc.plot(steps, [r["bands"][b]["acc"] for r in history], color=color, label=label, marker=".")
        ax_bce.plot(steps, [r["bands"][b]["bce"] for r in history], color=color, label=label, marker=".")
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_acc.set(xlabel="step", ylabel="accuracy (real and fake)", ylim=(0.0, 1.02), title="held-out accuracy")
    ax_bce.axhline(np.log(2), color="grey", lw=0.8, ls="--")
    ax_bce.set(xlabel="step", ylabel="BCE", title="held-out BCE (dashed: chance)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))
