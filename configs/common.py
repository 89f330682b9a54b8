"""The sections every training config shares, at the paper's values (../shared/docs/original_method.md §2–3).

Configs import ``base_config()`` and change what differs; ``train.py`` reads only the resulting ConfigDict.
"""

from ml_collections import ConfigDict, config_dict

from data_pipelines.input_pipeline import default_input_config, one_crop_config


def base_config() -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0
    cfg.dataset_dir = ""  # a data_pipelines.build output folder
    cfg.objective = "autoencoder"  # or "lens" (configs/lens.py)

    # Multi-crop: 1 whole image + 1 crop of 50–75% + 3 of 50% of the area, 128 px, hflip + blur; batch 64 (GLOBAL).
    cfg.input = default_input_config()

    cfg.model = ConfigDict()
    cfg.model.in_channels = 1
    cfg.model.encoder_widths = (128, 64, 32)
    cfg.model.latent_channels = 4
    cfg.model.decoder_widths = (32, 64, 128)
    # Same function in every formulation; "auto" picks the fastest measured for the backend when the step is traced
    # (CPU: subpixel_vjp in one-image slices; GPU: fused_1ch in bf16/float16, plain in float32; see
    # cellssl_jax/models/convae.py).
    cfg.model.formulation = "auto"
    cfg.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU keeps float32 parameters

    # Adam(lr=1e-3) with MultiStepLR(milestones=[5], gamma=0.3) stepped per epoch; milestones in EPOCHS.
    cfg.optimizer = ConfigDict()
    cfg.optimizer.name = "adam"
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.milestones_epochs = (5,)
    cfg.optimizer.gamma = 0.3

    cfg.loss = "bce"  # nn.BCELoss on the sigmoid output; "mse" also available
    # "per_crop": the authors' loop, one optimizer step per crop-batch (5 updates per batch of the 5-crop input), each
    # on the parameters the previous crop left. "joint": the mean loss of all crops, one update per batch: 5x fewer
    # updates for the same compute, so a different (smoother, slower-moving) optimisation path.
    cfg.crop_steps = "per_crop"
    # per_crop as a lax.scan over one compiled body (faster compile) instead of unrolled; ~8x slower on XLA:CPU
    # (cellssl_jax/training/step.py), untested on accelerators.
    cfg.scan_crops = False

    # Length: num_epochs (passes over the data set) unless total_steps (batches) is set.
    cfg.num_epochs = 5.0
    cfg.total_steps = config_dict.placeholder(int)

    cfg.checkpoint = ConfigDict()
    cfg.checkpoint.every_steps = 2000
    cfg.checkpoint.keep = 3
    cfg.checkpoint["async"] = True

    cfg.log_every = 100  # steps between metrics.jsonl / TensorBoard rows
    cfg.image_every = 2000  # steps between input-vs-reconstruction PNG grids (0: never)

    # Evaluators run on the training parameters on a schedule (big_vision's config.evals): name → settings, off while
    # every_steps is 0. compare: the authors' encoder comparison on the run's dataset (cellssl_jax/compare), logged as
    # eval/compare/<mode>/<figure> in metrics.jsonl; each run costs a pass over ~1,300 images and a probe grid.
    cfg.evals = ConfigDict()
    cfg.evals.compare = ConfigDict({"every_steps": 0, "modes": ("pooled",), "batch_size": 128})

    cfg.debug = ConfigDict()
    cfg.debug.inject_nan_at_step = 0  # >0: put a NaN into that step's batch (tests the non-finite guard)
    cfg.debug.sleep_after_step_s = 0.0  # >0: slow the loop down (lets tests kill a run mid-way)
    return cfg


def set_crops(cfg: ConfigDict, crops: str) -> ConfigDict:
    """'multi' = the paper's 5-crop strategy (1_1_3_1_0.5_0.5_1_0.75_0.5); 'one' = the whole image, once."""
    if crops == "one":
        augment = cfg.input.augment
        cfg.input = one_crop_config(cfg.input)
        cfg.input.augment = augment
    elif crops != "multi":
        raise ValueError(f"crops must be 'one' or 'multi', got {crops!r}")
    return cfg
