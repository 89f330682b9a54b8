"""The augmentation × cropping ablation of the companion paper (arXiv 2203.04107), on this paper's ConvAE and crops.

    python train.py --config configs/ablation.py:aug_multi   --workdir runs/ablation/aug_multi   --config.dataset_dir=D
    python train.py --config configs/ablation.py:aug_one     --workdir runs/ablation/aug_one     --config.dataset_dir=D
    python train.py --config configs/ablation.py:noaug_multi --workdir runs/ablation/noaug_multi --config.dataset_dir=D
    python train.py --config configs/ablation.py:noaug_one   --workdir runs/ablation/noaug_one   --config.dataset_dir=D

- aug / noaug: horizontal flip (p 0.5) and 3×3 Gaussian blur (p 0.2, σ 0.1–2) on or off. The crops themselves are
  random either way (RandomResizedCrop), as in the authors' MultiCropDataset.
- multi: the paper's 5 crops (1 whole image, 1 of 50–75%, 3 of 50% of the area), 5 updates per batch;
  one: the whole image once, 1 update per batch: 5x cheaper per epoch.
The authors ran their cropping study for 5 epochs on 250,000 images, batch 64, Adam 1e-3, BCE (§2); these settings keep
every other field of configs/paper.py. What is ablated is the design (augmentation on/off × multi-crop/one crop) on this
paper's model and crops: the companion's own runs differ (original_method.md §7.2-7.3: its 83,225-parameter AE, 64 px
crops, multi-crops of 1/2/2 crops at 100 / 50-75 / 25-50 % of the area, batch 256, Adam 1e-4, 50 epochs). ``aug_multi``
is the paper config itself. Cost per epoch of N images: N/64 batches of 5 (multi) or 1 (one) crop-steps at ~9.8 GFLOP
per image per crop-step (~0.63 TFLOP per crop-step of 64).

``,demo`` after the setting (e.g. ``configs/ablation.py:noaug_one,demo``) shrinks it like configs/demo.py (crops of
64 px, batch 16, 40 batches, the demo plate's dataset): the four settings on a 2-core CPU in minutes each, then

    python evaluate.py compare --data runs/demo/dataset --out runs/ablation/compare \
        --encoder aug_multi=runs/ablation/aug_multi --encoder aug_one=runs/ablation/aug_one \
        --encoder noaug_multi=runs/ablation/noaug_multi --encoder noaug_one=runs/ablation/noaug_one --encoder init=random

scores them on the authors' tasks (cellssl_jax/compare); ``--config.evals.compare.every_steps=N`` scores each run
while it trains (metrics.jsonl, ``eval/compare/...``).
"""

from configs.common import base_config, set_crops

SETTINGS = ("aug_multi", "aug_one", "noaug_multi", "noaug_one")


def get_config(arg=None):
    setting, _, size = (arg or "").partition(",")
    if setting not in SETTINGS or size not in ("", "demo"):
        raise ValueError(f"configs/ablation.py needs one of {SETTINGS} after a colon, optionally ',demo', e.g. "
                         f"configs/ablation.py:aug_one or configs/ablation.py:aug_one,demo; got {arg!r}")
    augmentation, crops = setting.split("_")
    cfg = base_config()
    cfg.input.augment = augmentation == "aug"
    cfg = set_crops(cfg, crops)
    if size == "demo":
        from configs import demo

        small = demo.get_config()
        for key in ("dataset_dir", "total_steps", "log_every", "image_every"):
            cfg[key] = small[key]
        cfg.checkpoint.every_steps = small.checkpoint.every_steps
        cfg.input.batch_size = small.input.batch_size
        cfg.input.size_crops = tuple(small.input.size_crops[0] for _ in cfg.input.size_crops)
    return cfg
