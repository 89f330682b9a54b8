"""The paper's ConvAE pretraining (Dmitrenko et al. 2022; ../shared/docs/original_method.md §2–3).

    python train.py --config configs/paper.py --workdir runs/paper --config.dataset_dir=DATASET

ConvAE 1→128→64→32→4 (189,381 parameters), 128-px 5-crop input (1 whole image, 1 crop of 50–75%, 3 of 50% of the
area) with horizontal flip and blur, batch 64, BCE, Adam 1e-3 with ×0.3 from epoch 6, one optimizer step per
crop-batch, 5 epochs: the authors' evaluated checkpoint is ``autoencoder_at_5`` (their launch ran 15 epochs; add
``--config.num_epochs=15`` for that). On the ~1M-image plate set (``python -m data_pipelines.synthetic_plate --preset
paper``) that is 15,000 batches = 75,000 updates per epoch.

What it should reach: the authors' released model reconstructs its example image at BCE 0.6900 against an entropy
floor of 0.6883 (§3.3); the training loss on phase-contrast crops should approach the data's entropy floor in the same
way (metrics.jsonl logs ``bce_excess`` = loss minus the crops' entropy, the part training can remove). Cost: about 9.8
GFLOP per image per crop-step (platform_notes), ~3.1 TFLOP per batch of 64 × 5 crops, ~2.4e17 FLOP for 5 epochs of
958k images: out of reach of the 2-core CPU (that is what configs/demo.py is for); on an accelerator add
``--config.model.dtype=bfloat16`` (float32 parameters, bfloat16 compute). Not yet run on an accelerator here.
"""

from configs.common import base_config


def get_config(arg=None):
    del arg
    return base_config()
