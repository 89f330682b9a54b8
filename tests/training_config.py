"""A tiny training config for tests/test_training.py: the real loop and model at 32/16 px and widths of 8.

    python train.py --config tests/training_config.py:per_crop --workdir W --config.dataset_dir=D
"""

from configs.common import base_config


def get_config(arg=None):
    cfg = base_config()
    cfg.input.batch_size = 8
    cfg.input.size_crops = (32, 16)
    cfg.input.nmb_crops = (1, 2)
    cfg.input.min_scale_crops = (1.0, 0.3)
    cfg.input.max_scale_crops = (1.0, 0.5)
    cfg.model.encoder_widths = (8, 8, 8)
    cfg.model.decoder_widths = (8, 8, 8)
    cfg.crop_steps = arg or "per_crop"
    cfg.total_steps = 12
    cfg.optimizer.milestones_epochs = (1,)  # the decay falls inside the run, so resuming must restore it right
    cfg.checkpoint.every_steps = 3
    cfg.checkpoint.keep = 2
    cfg.log_every = 1
    cfg.image_every = 6
    return cfg
