"""The lens objective (../shared/docs/original_method.md §6): an image-to-image ConvAE L, a frozen pretrained encoder F
and a linear classifier C over the classes (DMSO, PBS, drugs), trained together in one step.

Parameters are one tree ``{'lens', 'classifier', 'pretrained', 'feature_norm'}``; the optimizer (``lens_optimizer``)
gives the lens Adam(``optimizer.lr``, 5e-4 in the paper's setting), the classifier Adam(``lens.classifier_lr``, 1e-3),
and the pretrained AE and the classifier's input standardisation (``feature_norm``) no update at all. One loss gives
each part exactly its own gradient (N = the frozen standardisation):

    loss = BCE(L(x), x) − coef · CE(C_sg(N(F(L(x)))), y)   → gradient to the lens only (C's parameters stopped)
         + CE(C(sg(N(F(L(x))))), y)                          → gradient to the classifier only (its input stopped)

``coef`` keeps the authors' sign (their ``l_loss = BCE − coef · c_loss``): negative = a *regularized* lens that makes
the drugs easier to tell apart (their ``reg_lens`` is −60), positive = an *adversarial* one (``adv_lens``, +60).
The authors update the classifier first and the lens after it with the loss they had before that update; here both
update from the same forward pass (one step, one program): the lens sees the classifier as it was one update ago.

``paper_faithful=True`` reproduces what their code did rather than what it meant: the classifier term reaches the
lens as a Python float (``c_loss.item()``), so the lens gets no gradient from it and is the pretrained AE fine-tuned
on reconstruction alone; and the classifier's Softmax output goes into CrossEntropyLoss (softmax twice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cellssl_jax.models.classifier import LinearClassifier
from cellssl_jax.training.objectives import ObjectiveSetup
from cellssl_jax.training.objectives.autoencoder import bce_with_logits

log = logging.getLogger(__name__)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, paper_faithful: bool = False) -> jax.Array:
    """Mean cross-entropy; ``paper_faithful``: of softmax(logits) taken as logits again (the authors' double softmax:
    its loss cannot fall below log(e + K − 1) − 1, 2.547 for 33 classes, and its gradients are weaker)."""
    if paper_faithful:
        logits = jax.nn.softmax(logits)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def flat_latent(model, params, images: jax.Array) -> jax.Array:
    """F(x): the encoder's latent flattened channel-major (``ConvAE.encode_flat``), the classifier's input."""
    return model.apply({"params": params}, images, method="encode_flat")


def standardize(features: jax.Array, norm) -> jax.Array:
    """(F(x) − mean) / scale with the frozen statistics of ``params['feature_norm']`` (``feature_norm``)."""
    return (features - norm["mean"]) / norm["scale"]


def feature_norm(features, *, enabled: bool = True) -> dict:
    """Frozen per-feature statistics of the pretrained encoder's features on the lens's training images.

    Why: a linear classifier on raw codes sees features whose spread over images is tiny next to their offsets (the
    demo ConvAE's flattened latent: per-feature sd ~0.003 across images, values up to 0.23), and Adam, moving each
    weight by about lr per update, needs thousands of updates to reach weights that large: in 70 steps of the demo
    lens the joint classifier stayed at chance (CE ln 10). Standardising is an affine map of the input, so the
    classifier's family of functions is the same linear one; only its conditioning changes. ``scale`` = sd + 1% of
    the mean sd, so near-constant features are not blown up into noise. ``enabled=False`` (paper_faithful): raw
    codes, mean 0 and scale 1, as the authors.
    """
    features = np.asarray(features, np.float64)
    if not enabled:
        return {"mean": np.zeros(features.shape[1], np.float32), "scale": np.ones(features.shape[1], np.float32)}
    sd = features.std(axis=0)
    return {"mean": features.mean(axis=0).astype(np.float32), "scale": (sd + 0.01 * sd.mean() + 1e-12).astype(np.float32)}


def topk_hits(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Fraction of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[-1])
    return jnp.mean(jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32))


@dataclass(frozen=True)
class LensObjective:
    model: Any  # the ConvAE architecture, shared by the lens and the pretrained AE
    num_classes: int
    coef: float = -60.0
    paper_faithful: bool = False
    batch_keys: tuple[str, ...] = ("label",)
    needs_rng: bool = False

    @property
    def classifier(self) -> LinearClassifier:
        return LinearClassifier(self.num_classes)

    def lens_logits(self, params, image: jax.Array) -> jax.Array:
        return self.model.apply({"params": params["lens"]}, image, method=lambda m, x: m.decode_logits(m.encode(x)))

    def loss(self, params, inputs: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng
        image, labels = inputs["image"], inputs["label"]
        logits = self.lens_logits(params, image)
        bce = bce_with_logits(logits, image.astype(jnp.float32))
        frozen = jax.lax.stop_gradient({"pretrained": params["pretrained"], "norm": params["feature_norm"]})
        features = standardize(flat_latent(self.model, frozen["pretrained"], jax.nn.sigmoid(logits)), frozen["norm"])
        class_logits = self.classifier.apply({"params": params["classifier"]}, jax.lax.stop_gradient(features))
        ce = cross_entropy(class_logits, labels, paper_faithful=self.paper_faithful)
        total = bce + ce
        if not self.paper_faithful and self.coef != 0.0:
            seen_by_lens = self.classifier.apply({"params": jax.lax.stop_gradient(params["classifier"])}, features)
            total = total - self.coef * cross_entropy(seen_by_lens, labels)
        aux = {"bce": bce, "ce": ce, "top1": topk_hits(class_logits, labels, 1),
               "top3": topk_hits(class_logits, labels, 3)}
        return total, jax.lax.stop_gradient(aux)

    def preview(self, params, image: jax.Array) -> jax.Array:
        """L(x) in [0, 1], for the input-vs-lens grid."""
        return jax.nn.sigmoid(self.lens_logits(params, image))

    def init_params(self, pretrained, norm: dict, key: jax.Array, image_size: int, *,
                    init_lens_from_pretrained: bool = True):
        """{'lens': a copy of the pretrained AE (the authors' ``initialize_lens=True``) or fresh, 'classifier': fresh,
        'pretrained': the frozen AE, 'feature_norm': the frozen ``feature_norm`` statistics}."""
        lens_key, classifier_key = jax.random.split(key)
        if init_lens_from_pretrained:
            lens = jax.tree_util.tree_map(jnp.array, pretrained)
        else:
            dummy = jnp.zeros((1, image_size, image_size, self.model.in_channels), jnp.float32)
            lens = self.model.init(lens_key, dummy)["params"]
        n_features = self.model.latent_channels * (image_size // 4) ** 2
        classifier = self.classifier.init(classifier_key, jnp.zeros((1, n_features), jnp.float32))["params"]
        return {"lens": lens, "classifier": classifier, "pretrained": pretrained, "feature_norm": norm}


def lens_optimizer(lens_lr_schedule, classifier_lr: float) -> optax.GradientTransformation:
    """Adam per part (PyTorch's defaults), none for the frozen parts (no optimizer state kept for them)."""
    def labels(params):
        return {part: jax.tree_util.tree_map(lambda _: part, tree) for part, tree in params.items()}

    return optax.multi_transform({"lens": optax.adam(lens_lr_schedule), "classifier": optax.adam(classifier_lr),
                                  "pretrained": optax.set_to_zero(), "feature_norm": optax.set_to_zero()}, labels)


# What the loop needs to train a lens besides the objective (configs/lens.py): the labelled train images of the lens
# task, the frozen pretrained ConvAE it starts from, and the statistics that standardise the classifier's input.
NORM_IMAGES = 2048  # images the feature statistics are computed on (a seeded sample of the train split)


def setup(config, source) -> ObjectiveSetup:
    """Select the lens task's images (data_pipelines.lens_data), load the pretrained AE, compute the feature norm on a
    seeded sample of the train images, and give the lens ``config.optimizer``'s schedule and the classifier
    ``lens.classifier_lr`` (``lens_optimizer``)."""
    from cellssl_jax.models.convae import model_from_config
    from cellssl_jax.training.checkpoint import load_params
    from cellssl_jax.training.optimizer import learning_rate_schedule
    from data_pipelines.lens_data import LabelledSource, select_with_settings
    from data_pipelines.source import load_dataset_manifest

    lens = config.lens
    if not lens.get("pretrained"):
        raise ValueError("config.lens.pretrained is empty; pass --config.lens.pretrained=DIR (a training workdir or "
                         "an imported checkpoint, e.g. runs/demo/train)")
    if not config.get("dataset_dir"):
        raise ValueError("the lens objective reads the dataset's manifest: set --config.dataset_dir")
    # The lens has its own loss (BCE + classifier term) and optimizer (Adam per part): refuse the autoencoder's
    # switches rather than ignore them.
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
    params = objective.init_params(pretrained, norm, jax.random.key(int(config.seed)), image_size,
                                   init_lens_from_pretrained=bool(lens.init_from_pretrained))

    def optimizer(updates_per_epoch: int) -> optax.GradientTransformation:
        schedule = learning_rate_schedule(config.optimizer, updates_per_epoch=updates_per_epoch)
        return lens_optimizer(schedule, float(lens.classifier_lr))

    return ObjectiveSetup(source=labelled, model=model, objective=objective, model_record=model_record,
                          make_optimizer=optimizer, initial_params=params,
                          record={"lens_classes": list(selection.classes)})


def _pretrained_features(model, params, source, image_size: int) -> np.ndarray:
    """F(x) of every image of ``source`` (whole images at the training size, no augmentation)."""
    from data_pipelines.input_pipeline import create_eval_dataset

    encode = jax.jit(lambda p, x: flat_latent(model, p, x))
    parts = []
    for batch in create_eval_dataset(source, image_size=image_size, batch_size=64, process_index=0, process_count=1):
        valid = np.asarray(batch["valid"], bool)
        parts.append(np.asarray(encode(params, batch["image"]))[valid])
    return np.concatenate(parts)
