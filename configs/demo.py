"""The demo: the paper's ConvAE and 5-crop recipe, shrunk to run in minutes on a 2-core CPU (big_vision's runlocal).

    python -m data_pipelines.synthetic_plate --preset demo --out runs/demo/plate
    python -m data_pipelines.build --manifest runs/demo/plate/manifest.csv --out runs/demo/dataset
    python train.py --config configs/demo.py --workdir runs/demo/train

Same model (189,381 parameters), loss, optimizer, 5-crop input and per-crop steps as configs/paper.py; what shrinks:
crops of 64 px instead of 128 (4x fewer FLOPs per crop; the latent is 4x16x16 = 1,024 features), batch 16, and 40
batches (200 optimizer updates, 640 of the plate's 8,736 images) instead of 5 epochs; the lr decay at epoch 5 is
never reached.

Measured inside ``make demo`` on fresh checkouts of the quiet 2-core machine (2026-11-26, BENCHMARKS.md "Demo
training"): an 18–22 s first step (compilation), then 8.9–10.1 images/s (each image is 5 crops), ~100 s for the 40
steps. An earlier run (load average ~4: 4.4 images/s): loss 0.69334 → 0.69220 (bce_excess 0.00262 → 0.00170, mse
0.00130 → 0.00084). At this budget the reconstructions carry the illumination and coarse density of the field, not
yet single cells (images/reconstruction_*.png); raise --config.total_steps for more.
"""

from configs.common import base_config


def get_config(arg=None):
    del arg
    cfg = base_config()
    cfg.dataset_dir = "runs/demo/dataset"
    cfg.input.batch_size = 16
    cfg.input.size_crops = (64, 64, 64)
    cfg.total_steps = 40
    cfg.checkpoint.every_steps = 20
    cfg.log_every = 5
    cfg.image_every = 20
    return cfg
