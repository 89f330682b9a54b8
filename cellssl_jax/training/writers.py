"""What a run leaves for people to read: metrics.jsonl, TensorBoard events, PNG grids of input vs reconstruction.

Only process 0 writes (``enabled=False`` elsewhere). On resume from step ``s`` the rows and events of steps after ``s``
(written by the killed run after its last checkpoint) are dropped, so every file tells one consistent history.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        _truncate_after(self.path, resume_step)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR),
                                     purge_step=resume_step if resume_step > 0 else None)
        except ImportError:  # TensorBoard is a convenience; metrics.jsonl is the record
            self._tb = None

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def write_image(self, step: int, name: str, grid: np.ndarray) -> Path | None:
        """Save ``grid`` (uint8 [H, W] or [H, W, 3]) as ``images/<name>_<step>.png`` and to TensorBoard."""
        if not self.enabled:
            return None
        folder = self.workdir / IMAGES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_{step:07d}.png"
        Image.fromarray(grid).save(path)
        if self._tb is not None:
            self._tb.add_image(f"train/{name}", grid if grid.ndim == 3 else grid[..., None], step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def reconstruction_grid(inputs: np.ndarray, outputs: np.ndarray, *, max_images: int = 8, gap: int = 2,
                        stretch: bool = True) -> np.ndarray:
    """Inputs on the top row, reconstructions below, as uint8. [N, H, W, C] in [0, 1]; C = 3 shows colour, any other
    C shows the first channel.

    ``stretch``: phase-contrast crops span a few percent of the range around mid-grey, which prints as flat grey; each
    column is mapped through ITS INPUT's 1st–99th percentile, the same mapping for input and reconstruction, so what
    the model reproduces (or misses) is visible and the two stay comparable.
    """
    n = min(max_images, len(inputs))
    inputs = np.asarray(inputs[:n], np.float32)
    outputs = np.asarray(outputs[:n], np.float32)
    if inputs.shape[-1] != 3:
        inputs, outputs = inputs[..., :1], outputs[..., :1]
    if stretch:
        low = np.percentile(inputs, 1, axis=(1, 2, 3), keepdims=True)
        high = np.percentile(inputs, 99, axis=(1, 2, 3), keepdims=True)
        scale = 1.0 / np.maximum(high - low, 1e-3)
        inputs, outputs = (inputs - low) * scale, (outputs - low) * scale
    rows = []
    for block in (inputs, outputs):
        block = np.clip(block, 0.0, 1.0)
        tiles = [np.pad(tile, ((gap, gap), (gap, gap), (0, 0)), constant_values=1.0) for tile in block]
        rows.append(np.concatenate(tiles, axis=1))
    grid = (np.concatenate(rows, axis=0) * 255.0 + 0.5).astype(np.uint8)
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _plain(value):
    value = np.asarray(value)
    if value.dtype == bool:
        return bool(value)
    if np.issubdtype(value.dtype, np.integer):
        return int(value)
    return float(value)
