"""The lens (../shared/docs/original_method.md §6): a ConvAE L initialised from a pretrained one, trained with the
frozen pretrained encoder F and a linear classifier over DMSO, PBS and the drugs, on the last images of each class's
highest-concentration wells.

    python train.py --config configs/lens.py --workdir runs/lens --config.dataset_dir=DATASET \
        --config.lens.pretrained=runs/paper
    python train.py --config configs/lens.py:demo --workdir runs/demo/lens
    python evaluate.py lens --lens runs/demo/lens --data runs/demo/dataset --out runs/demo/lens_eval

The paper's setting (§6.3): whole images at 128 px, no augmentation, batch 64, lens Adam 5e-4, classifier Adam 1e-3, 5
epochs, coefficient −60 (the regularized lens: BCE + 60·CE). The authors ran the coefficients −1, −20, −40, −60 in
sequence on the same objects (20 epochs for their −60 lens) and, through a detached loss, with no classifier gradient
into the lens at all; ``--config.lens.paper_faithful=True`` reproduces that (and the image-level split and double
softmax). Since their coefficient never reached a gradient, their sequence is one lens fine-tuned on BCE for 20 epochs:
``--config.lens.paper_faithful=True --config.num_epochs=20`` is their −60 lens as coded (data order aside). Here the
classifier term is live and the split is by well. On the paper's 21 cell lines × 33 classes × 4 wells × 30 images (≤
83,160 images; half of them train with the default split) one epoch is ~650 steps of batch 64; not yet run on an
accelerator.

``demo`` shrinks it for the 2-core CPU: the demo plate's 10 classes × 2 cell lines, the last 10 frames (60–96 h, where
the planted effects are strongest; 380 train, 180 val, 200 test images), batch 16, 3 epochs (69 steps), started from
the authors' ConvAE as the paper's lens was (imported by ``make demo``; 128 px). In ``make demo`` (fresh checkout of
fd28c65, 2-core machine) the lens stage, training and evaluation, took 235 s; the joint classifier fits the train
images (top-1 1.0 after 40 steps) but reaches 0.115 / 0.42 top-1 / top-3 on the held-out wells (chance 0.1 / 0.3);
README "Lens" has the evaluation. (An earlier 4-epoch run, 2026-11-26 on a machine shared with other jobs: 290 s.)
"""

from ml_collections import ConfigDict

from configs.common import base_config
from data_pipelines.input_pipeline import one_crop_config


def get_config(arg=None):
    if arg not in (None, "", "demo"):
        raise ValueError(f"configs/lens.py takes no argument or 'demo', got {arg!r}")
    cfg = base_config()
    cfg.objective = "lens"
    cfg.input = one_crop_config(cfg.input)
    cfg.input.augment = False  # the authors' "no" transform: the whole image, resized to 128
    cfg.optimizer.lr = 5e-4  # the lens (initialised from the pretrained AE: the authors' lr / 2)
    cfg.optimizer.milestones_epochs = ()
    cfg.crop_steps = "joint"  # one crop: the same thing as per_crop
    cfg.num_epochs = 5.0

    cfg.lens = ConfigDict()
    cfg.lens.pretrained = ""  # the pretrained ConvAE: a training workdir or an imported checkpoint
    cfg.lens.coef = -60.0  # authors' sign: lens loss = BCE − coef·CE (−60 regularized, +60 adversarial)
    cfg.lens.classifier_lr = 1e-3
    cfg.lens.init_from_pretrained = True
    cfg.lens.paper_faithful = False  # True: no classifier gradient into the lens, double softmax, image-level split
    cfg.lens.last_n = 30  # images per well, the last ones
    cfg.lens.max_wells = 4  # per (cell line, class), at the class's highest concentration
    cfg.lens.test_fraction = 0.25  # of each (cell line, class)'s wells; val likewise; the rest trains
    cfg.lens.val_fraction = 0.25
    cfg.lens.split_seed = 0

    cfg.checkpoint.every_steps = 500
    cfg.log_every = 20
    cfg.image_every = 500
    if arg == "demo":
        cfg.dataset_dir = "runs/demo/dataset"
        cfg.lens.pretrained = "runs/demo/authors"  # the authors' ConvAE, imported by make demo's interop stage
        cfg.lens.last_n = 10
        cfg.input.batch_size = 16
        cfg.num_epochs = 3.0
        cfg.checkpoint.every_steps = 100
        cfg.log_every = 10
        cfg.image_every = 0
    return cfg
