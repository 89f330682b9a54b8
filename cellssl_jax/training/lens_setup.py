"""What the loop needs to train a lens (configs/lens.py) besides what every objective needs: the labelled train
images of the lens task, the frozen pretrained ConvAE it starts from, and the statistics that standardise the
classifier's input (objectives/lens.py, ``feature_norm``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from cellssl_jax.models.convae import model_from_config
from cellssl_jax.training.objectives.lens import LensObjective, feature_norm, flat_latent

log = logging.getLogger(__name__)

OBJECTIVES = ("autoencoder", "lens")
NORM_IMAGES = 2048  # images the feature statistics are computed on (a seeded sample of the train split)


@dataclass(frozen=True)
class LensSetup:
    source: Any  # the labelled train split of the lens selection
    classes: tuple[str, ...]
    model: Any
    objective: LensObjective
    model_record: dict  # the checkpoint's 'model' section: the pretrained architecture at this run's image size
    pretrained: Any
    feature_norm: dict


def build_lens_setup(config, source) -> LensSetup:
    """Select the lens task's images (data_pipelines.lens_data), load the pretrained AE, compute the feature norm."""
    from cellssl_jax.training.checkpoint import load_params
    from data_pipelines.lens_data import LabelledSource, select_with_settings
    from data_pipelines.source import load_dataset_manifest

    lens = config.lens
    if not lens.get("pretrained"):
        raise ValueError("config.lens.pretrained is empty; pass --config.lens.pretrained=DIR (a training workdir or "
                         "an imported checkpoint, e.g. runs/demo/train)")
    if not config.get("dataset_dir"):
        raise ValueError("the lens objective reads the dataset's manifest: set --config.dataset_dir")
    # The lens has its own loss (BCE + classifier term) and optimizer (Adam per part, objectives/lens.py): refuse the
    # autoencoder's switches rather than ignore them.
    if config.get("loss", "bce") != "bce":
        raise ValueError(f"config.loss={config.loss!r}: the lens objective's reconstruction term is the authors' BCE; "
                         "config.loss applies to the autoencoder objective only")
    if config.optimizer.get("name", "adam") != "adam":
        raise ValueError(f"config.optimizer.name={config.optimizer.name!r}: the lens trains with Adam (the lens at "
                         "optimizer.lr, the classifier at lens.classifier_lr); other optimizers apply to the "
                         "autoencoder objective only")
    selection = select_with_settings(load_dataset_manifest(config.dataset_dir), lens)
    train = selection.part("train")
    log.info("lens task: %d classes, %d train images (%s)", len(selection.classes), len(train),
             ", ".join(f"{k} {v}" for k, v in selection.table.split.value_counts().items()))
    pretrained, pretrained_cfg = load_params(lens.pretrained)
    model_record = {k: v for k, v in pretrained_cfg.items() if k != "image_size"}
    for key in ("formulation", "dtype", "micro_batch"):  # speed settings: this run's, not the pretrained run's
        if config.model.get(key) is not None:
            model_record[key] = config.model.get(key)
    image_size = int(config.input.size_crops[0])
    model_record["image_size"] = image_size
    model = model_from_config(model_record)
    objective = LensObjective(model, len(selection.classes), coef=float(lens.coef),
                              paper_faithful=bool(lens.paper_faithful))
    labelled = LabelledSource(source, train.source_index.to_numpy(), train.label.to_numpy())
    pick = np.sort(np.random.default_rng(int(config.seed)).choice(len(train), min(len(train), NORM_IMAGES),
                                                                  replace=False))
    sample = LabelledSource(source, train.source_index.to_numpy()[pick], train.label.to_numpy()[pick])
    norm = feature_norm(_pretrained_features(model, pretrained, sample, image_size),
                        enabled=not bool(lens.paper_faithful))
    return LensSetup(source=labelled, classes=selection.classes, model=model, objective=objective,
                     model_record=model_record, pretrained=pretrained, feature_norm=norm)


def _pretrained_features(model, params, source, image_size: int) -> np.ndarray:
    """F(x) of every image of ``source`` (whole images at the training size, no augmentation)."""
    from data_pipelines.input_pipeline import create_eval_dataset

    encode = jax.jit(lambda p, x: flat_latent(model, p, x))
    parts = []
    for batch in create_eval_dataset(source, image_size=image_size, batch_size=64, process_index=0, process_count=1):
        valid = np.asarray(batch["valid"], bool)
        parts.append(np.asarray(encode(params, batch["image"]))[valid])
    return np.concatenate(parts)
