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
    recon = "recon_gain" in history[0]["bands"][0]      # the reconstruction objective: its held-out gain too
    fig, axes = plt.subplots(1, 3 if recon else 2, figsize=(15 if recon else 10, 4), dpi=100)
    ax_acc, ax_bce = axes[0], axes[1]
    cmap = plt.get_cmap("viridis")
    for b in range(n_bands):
        band = history[0]["bands"][b]
        label = f"σ {band['sigma_lo']:.3g}–{band['sigma_hi']:.3g}"
        color = cmap(b / max(1, n_bands - 1))
        ax_acc.plot(steps, [r["bands"][b]["acc"] for r in history], color=color, label=label, marker=".")
        ax_bce.plot(steps, [r["bands"][b]["bce"] for r in history], color=color, label=label, marker=".")
        if recon:
            axes[2].plot(steps, [r["bands"][b]["recon_gain"] for r in history], color=color, label=label, marker=".")
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_acc.set(xlabel="step", ylabel="accuracy (real and fake)", ylim=(0.0, 1.02), title="held-out accuracy")
    ax_bce.axhline(np.log(2), color="grey", lw=0.8, ls="--")
    ax_bce.set(xlabel="step", ylabel="BCE", title="held-out BCE (dashed: chance)")
    if recon:
        axes[2].axhline(0.0, color="grey", lw=0.8, ls="--")
        axes[2].set(xlabel="step", ylabel="error of D − error of D'", title="held-out reconstruction gain (w = 1)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))


def plot_preview(history, max_size=768):
    """The plot as ComfyUI's progress preview: ("PNG", PIL image, max size), what ProgressBar.update_absolute
    takes as `preview` (ComfyUI 0.3.75 and later)."""
    from PIL import Image
    return "PNG", Image.fromarray(plot_history(history)), max_size
