"""Small figures that the run stages write and the report embeds."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_multicrop_grid(batch: dict, path: str | Path, *, max_images: int = 8, crop_labels=None) -> Path:
    """Rows = images of a training batch, columns = their crops (global view first), as the model sees them."""
    crops = batch["crops"]
    n = min(max_images, crops[0].shape[0])
    fig, axes = plt.subplots(n, len(crops), figsize=(1.6 * len(crops), 1.6 * n), squeeze=False)
    for i in range(n):
        for j, c in enumerate(crops):
            ax = axes[i, j]
            img = np.asarray(c[i])
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(crop_labels[j] if crop_labels else f"crop {j}", fontsize=8)
        if "row_id" in batch:
            axes[i, 0].set_ylabel(f"row {int(batch['row_id'][i])}", fontsize=7)
    fig.suptitle("multi-crop training batch (augmented)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_loss_curve(metrics_jsonl: str | Path, path: str | Path) -> Path | None:
    """Training loss against step from a run's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
