"""A standalone PyTorch definition of the ConvAE that loads our exports (needs torch; nothing else from this project
is required to *use* it: copy this file next to an export and call :func:`load_exported`).

It is the authors' ``Autoencoder`` (pheno-ml ``convae/feature_extractor.py``) with the widths and channels made
parameters; the ``nn.Sequential`` indices, hence the state_dict keys, are theirs, and the defaults give their exact
model. Features as they used them: ``model.encoder(x).reshape(len(x), -1)`` on x/255 resized to the input size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


class Autoencoder(nn.Module):
    def __init__(self, in_channels: int = 1, encoder_widths: Sequence[int] = (128, 64, 32), latent_channels: int = 4,
                 decoder_widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        e, d = list(encoder_widths), list(decoder_widths)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, e[0], 3, stride=1, padding=1), nn.ReLU(True), nn.MaxPool2d(2),  # 0 1 2
            nn.Conv2d(e[0], e[1], 3, stride=1, padding=1), nn.ReLU(True), nn.MaxPool2d(2),  # 3 4 5
            nn.Conv2d(e[1], e[2], 3, stride=1, padding=1), nn.ReLU(True),  # 6 7
            nn.Conv2d(e[2], latent_channels, 3, stride=1, padding=1),  # 8: linear latent
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, d[0], 3, stride=1, padding=1), nn.ReLU(True),
            nn.Upsample(scale_factor=2),  # 0 1 2
            nn.ConvTranspose2d(d[0], d[1], 3, stride=1, padding=1), nn.ReLU(True), nn.Upsample(scale_factor=2),  # 3 4 5
            nn.ConvTranspose2d(d[1], d[2], 3, stride=1, padding=1), nn.ReLU(True),  # 6 7
            nn.ConvTranspose2d(d[2], in_channels, 3, stride=1, padding=1), nn.Sigmoid(),  # 8 9
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def load_exported(path: str | Path, config_path: str | Path | None = None) -> Autoencoder:
    """An ``Autoencoder`` in eval mode from a ``.pt`` or ``.safetensors`` export and its JSON config (``<stem>.json``).

    Without a config the shapes of the weights decide the widths, which is all the architecture needs.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    config_path = Path(config_path) if config_path else path.with_suffix(".json")
    if config_path.is_file():
        cfg = json.loads(config_path.read_text())
        kwargs = {k: cfg[k] for k in ("in_channels", "encoder_widths", "latent_channels", "decoder_widths")}
    else:
        w = {k: tuple(v.shape) for k, v in state_dict.items()}
        kwargs = {"in_channels": w["encoder.0.weight"][1],
                  "encoder_widths": [w[f"encoder.{i}.weight"][0] for i in (0, 3, 6)],
                  "latent_channels": w["encoder.8.weight"][0],
                  "decoder_widths": [w[f"decoder.{i}.weight"][1] for i in (0, 3, 6)]}
    model = Autoencoder(**kwargs)
    model.load_state_dict(state_dict)
    return model.eval()
