"""The augmentation × cropping ablation of the companion paper (arXiv 2203.04107): 4 settings of the paper's ConvAE.

    python train.py --config configs/ablation.py:aug_multi   --workdir runs/ablation/aug_multi   --config.dataset_dir=D
    python train.py --config configs/ablation.py:aug_one     --workdir runs/ablation/aug_one     --config.dataset_dir=D
    python train.py --config configs/ablation.py:noaug_multi --workdir runs/ablation/noaug_multi --config.dataset_dir=D
    python train.py --config configs/ablation.py:noaug_one   --workdir runs/ablation/noaug_one   --config.dataset_dir=D

- aug / noaug: horizontal flip (p 0.5) and 3×3 Gaussian blur (p 0.2, σ 0.1–2) on or off. The crops themselves are
  random either way (RandomResizedCrop), as in the authors' MultiCropDataset.
- multi: the paper's 5 crops (1 whole image, 1 of 50–75%, 3 of 50% of the area), 5 updates per batch;
  one: the whole image once, 1 update per batch: 5x cheaper per epoch.
The authors ran their cropping study for 5 epochs on 250,000 images, batch 64, Adam 1e-3, BCE (§2); these settings keep
every other field of configs/paper.py. ``aug_multi`` is the paper config itself. Cost per epoch of N images: N/64
batches of 5 (multi) or 1 (one) crop-steps at ~9.8 GFLOP per crop-step.
"""

from configs.common import base_config, set_crops

SETTINGS = ("aug_multi", "aug_one", "noaug_multi", "noaug_one")


def get_config(arg=None):
    if arg not in SETTINGS:
        raise ValueError(f"configs/ablation.py needs one of {SETTINGS} after a colon, e.g. configs/ablation.py:aug_one")
    augmentation, crops = arg.split("_")
    cfg = base_config()
    cfg.input.augment = augmentation == "aug"
    return set_crops(cfg, crops)
