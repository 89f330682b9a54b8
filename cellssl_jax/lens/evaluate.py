"""The lens evaluation (../shared/docs/original_method.md §6.4–6.5), done on held-out wells, with the authors'
protocol as an option: ``evaluate_lens(lens_checkpoint, dataset_dir, out_dir)``.

1. The images of the lens task are selected again from the dataset's manifest with the lens run's own settings
   (``data_pipelines.lens_data``: same classes, same split by well), so nothing the lens trained on is scored.
2. One pass over them computes, per image, the frozen encoder's features of the image, ``E(x)`` ("no lens"), and of the
   lens output, ``E(L(x))``, and the probabilities of the classifier trained jointly with the lens; for the test
   images also the authors' altered-morphology map ``|AE(x) − L(x)|^1.5`` and two baselines, scored against the
   signature masks a synthetic plate planted (``importance.score_maps``).
3. Fresh linear probes on each feature set over the authors' grid (lr × batch, 30 epochs; ``probe.probe_grid``), the
   best configuration chosen on the val wells, top-1/top-3 reported on the test wells, per cell line too; the
   comparison over the grid with the authors' one-sided Mann–Whitney U (``probe.compare``).
4. Figures and tables under ``out_dir``; ``summary.json`` holds every number quoted anywhere.

``paper_protocol=True`` adds the authors' own figure of merit on the same features: their probes (raw codes, softmax
twice, batch-averaged metrics) and training-split top-3 at the best training F1, over the configurations with
lr ≤ 0.01 (``comparison_paper_protocol``, ``probe_grid_paper_protocol.csv``). It is reported beside the held-out
numbers, never instead. ``paper_faithful`` (default: as the lens was trained) runs every probe the authors' way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellssl_jax import parallel
from cellssl_jax.arrays import json_default
from cellssl_jax.models.convae import model_from_config
from cellssl_jax.training.checkpoint import find_step_dir, load_config, load_params
from cellssl_jax.training.objectives.lens import LensObjective, feature_norm, flat_latent, standardize

log = logging.getLogger(__name__)

MAP_EXPONENT = 1.5  # the authors' "magic number" (§6.5)


@dataclass(frozen=True)
class LensBundle:
    """A trained lens: the model, its parameter tree {'lens', 'classifier', 'pretrained'} and the run's config."""

    objective: LensObjective
    params: Any
    classes: tuple[str, ...]
    config: dict
    image_size: int
    checkpoint: Path


def load_lens(checkpoint: str | Path) -> LensBundle:
    """A lens training run's latest (or given step's) parameters and config."""
    step_dir = find_step_dir(checkpoint)
    params, model_cfg = load_params(step_dir)
    config = load_config(step_dir)
    if config.get("objective") != "lens" or not config.get("lens_classes") or set(params) != {
            "lens", "classifier", "pretrained", "feature_norm"}:
        raise ValueError(f"{step_dir} is not a lens checkpoint (train one with configs/lens.py); it holds "
                         f"{sorted(params)} for objective {config.get('objective', 'autoencoder')!r}")
    lens_cfg = config.get("lens", {})
    objective = LensObjective(model_from_config(model_cfg), len(config["lens_classes"]),
                              coef=float(lens_cfg.get("coef", 0.0)), paper_faithful=bool(lens_cfg.get("paper_faithful")))
    return LensBundle(objective=objective, params=params, classes=tuple(config["lens_classes"]), config=config,
                      image_size=int(model_cfg.get("image_size", 128)), checkpoint=step_dir)


def lens_selection(bundle: LensBundle, dataset_dir: str | Path):
    """The lens run's images, classes and split, selected again from the dataset (the same pure function of the
    manifest and the run's settings the training used)."""
    from data_pipelines.lens_data import select_with_settings
    from data_pipelines.source import load_dataset_manifest

    return select_with_settings(load_dataset_manifest(dataset_dir), bundle.config["lens"], classes=bundle.classes)


def lens_outputs_function(bundle: LensBundle):
    """``f(params, x) -> dict`` of E(x), E(L(x)), the joint classifier's probabilities, x, AE(x), L(x) (float32)."""
    objective = bundle.objective
    model = objective.model

    def outputs(params, x):
        lens_recon = jax.nn.sigmoid(objective.lens_logits(params, x))
        ae_recon = model.apply({"params": params["pretrained"]}, x)
        feats_lens = flat_latent(model, params["pretrained"], lens_recon)
        logits = objective.classifier.apply({"params": params["classifier"]},
                                            standardize(feats_lens, params["feature_norm"]))
        return {"no_lens": flat_latent(model, params["pretrained"], x), "lens": feats_lens,
                "joint_probs": jax.nn.softmax(logits), "image": x[..., 0].astype(jnp.float32),
                "ae_recon": ae_recon[..., 0].astype(jnp.float32), "lens_recon": lens_recon[..., 0]}

    return outputs


def compute_lens_outputs(bundle: LensBundle, dataset_dir: str | Path, selection, *, batch_size: int = 64,
                         keep_images_of: str = "test", progress: bool = True) -> dict[str, np.ndarray]:
    """Features of every selected image (rows in ``selection.table`` order); images, AE(x) and L(x) only for the rows
    of split ``keep_images_of`` (as uint8, for maps and figures), under the keys ``image_rows`` etc."""
    from data_pipelines.input_pipeline import create_eval_dataset
    from data_pipelines.lens_data import LabelledSource
    from data_pipelines.source import open_source

    table = selection.table
    source = LabelledSource(open_source(dataset_dir), table.source_index.to_numpy(), np.arange(len(table)))
    mesh = parallel.make_data_mesh()
    batch_size += -batch_size % jax.device_count()
    fn = lens_outputs_function(bundle)
    step = jax.jit(fn, in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.batch_sharding(mesh))
    params = parallel.replicate(bundle.params, mesh)
    keep = (table.split == keep_images_of).to_numpy()
    position = {int(r): i for i, r in enumerate(table.row_id)}
    out: dict[str, list] = {}
    kept: dict[str, list] = {"image": [], "ae_recon": [], "lens_recon": []}
    kept_rows: list[int] = []
    bar = tqdm(total=len(table), desc="lens outputs", unit="img", disable=not progress)
    for batch in create_eval_dataset(source, image_size=bundle.image_size, batch_size=batch_size,
                                     process_index=0, process_count=1):
        valid = np.asarray(batch["valid"], bool)
        result = {k: np.asarray(v)[valid] for k, v in step(params, parallel.global_batch(batch["image"], mesh)).items()}
        rows = np.array([position[int(r)] for r in np.asarray(batch["row_id"])[valid]], np.int64)
        for key in ("no_lens", "lens", "joint_probs"):
            out.setdefault(key, []).append(result[key])
        out.setdefault("rows", []).append(rows)
        mine = keep[rows]
        for key in kept:
            kept[key].append(np.round(np.clip(result[key][mine], 0, 1) * 255).astype(np.uint8))
        kept_rows.extend(rows[mine].tolist())
        bar.update(int(valid.sum()))
    bar.close()
    rows = np.concatenate(out.pop("rows"))
    order = np.argsort(rows)
    if not np.array_equal(rows[order], np.arange(len(table))):
        raise RuntimeError(f"lens outputs cover {len(set(rows.tolist()))} of {len(table)} selected images")
    result = {k: np.concatenate(v)[order] for k, v in out.items()}
    kept_order = np.argsort(kept_rows)
    result["image_rows"] = np.asarray(kept_rows, np.int64)[kept_order]
    for key, parts in kept.items():
        result[key] = np.concatenate(parts)[kept_order] if parts else np.zeros((0,), np.uint8)
    return result


def evaluate_lens(lens_checkpoint: str | Path, dataset_dir: str | Path, out_dir: str | Path, *,
                  probe_epochs: int = 30, lrs=(5e-4, 1e-3, 5e-3, 1e-2), batch_sizes=(256, 512, 1024, 2048),
                  seeds=(0,), n_examples: int = 6, paper_faithful: bool | None = None, paper_protocol: bool = False,
                  batch_size: int = 64, progress: bool = True) -> dict:
    """Score a lens run on its held-out wells; write tables, figures and ``summary.json`` under ``out_dir``."""
    from cellssl_jax.lens import importance, probe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_lens(lens_checkpoint)
    if paper_faithful is None:
        paper_faithful = bool(bundle.config["lens"].get("paper_faithful"))
    selection = lens_selection(bundle, dataset_dir)
    table = selection.table
    selection.table.to_csv(out / "selection.csv", index=False)
    arrays = compute_lens_outputs(bundle, dataset_dir, selection, batch_size=batch_size, progress=progress)
    y, split = table.label.to_numpy(), table.split.to_numpy()
    n_classes = len(bundle.classes)
    k3 = min(3, n_classes)  # "top-3" of a task with fewer classes is top-K (1.0), as chance_top3 and the grid count it
    summary: dict[str, Any] = {
        "lens_checkpoint": str(bundle.checkpoint), "dataset": str(dataset_dir), "classes": list(bundle.classes),
        "coef": bundle.objective.coef, "lens_paper_faithful": bundle.objective.paper_faithful,
        "images": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "chance_top1": 1.0 / n_classes, "chance_top3": min(3, n_classes) / n_classes}

    # The classifier trained together with the lens, on the held-out wells.
    test = split == "test"
    joint = arrays["joint_probs"]
    summary["joint_classifier"] = {"top1_test": probe.topk_accuracy(joint[test], y[test], 1),
                                   "top3_test": probe.topk_accuracy(joint[test], y[test], k3)}

    # Fresh probes on E(x) and E(L(x)), each standardised with its own train-split statistics (raw codes when
    # paper_faithful, as the authors; objectives/lens.py feature_norm says why).
    features = {}
    for name in ("no_lens", "lens"):
        norm = feature_norm(arrays[name][split == "train"], enabled=not paper_faithful)
        features[name] = (arrays[name] - norm["mean"]) / norm["scale"]
    grid = probe.probe_grid(features, y, split, lrs=lrs, batch_sizes=batch_sizes, epochs=probe_epochs, seeds=seeds,
                            paper_faithful=paper_faithful, progress=progress)
    grid.to_csv(out / "probe_grid.csv", index=False)
    summary["comparison_test"] = probe.compare(grid, baseline="no_lens", metric="top3_test")
    if paper_faithful:
        summary["comparison_paper_protocol"] = probe.compare(grid, baseline="no_lens", metric="top3_train")
    elif paper_protocol:  # the authors' probes on the raw codes of the same images
        paper_grid = probe.probe_grid({name: arrays[name] for name in ("no_lens", "lens")}, y, split, lrs=lrs,
                                      batch_sizes=batch_sizes, epochs=probe_epochs, seeds=seeds, paper_faithful=True,
                                      progress=progress)
        paper_grid.to_csv(out / "probe_grid_paper_protocol.csv", index=False)
        summary["comparison_paper_protocol"] = probe.compare(paper_grid, baseline="no_lens", metric="top3_train")
    best, probs, scores = {}, {}, {}
    # With 3 classes or fewer every probe's top-3 is 1.0: select on top-1 there.
    metric = f"top{3 if n_classes > 3 else 1}_{'val' if (split == 'val').any() else 'train'}"
    for name, x in features.items():
        row = probe.best_config(grid, name, metric=metric)
        cfg = probe.ProbeConfig(lr=float(row["lr"]), batch_size=int(row["batch_size"]), epochs=probe_epochs,
                                seed=int(seeds[0]))  # the probabilities behind per-cell-line and examples
        params = probe.train_probe(x[split == "train"], y[split == "train"], n_classes, cfg,
                                   paper_faithful=paper_faithful)
        probs[name] = probe.predict_proba(params, x)
        # ranked as probe_grid ranks: on log-probabilities (float32 probabilities underflow to ties at 0), or on the
        # softmax outputs themselves as the authors' metric did
        scores[name] = probs[name] if paper_faithful else probe.predict_log_proba(params, x)
        best[name] = {"lr": cfg.lr, "batch_size": cfg.batch_size, "selected_on": metric,
                      "top1_test": probe.topk_accuracy(scores[name][test], y[test], 1),
                      "top3_test": probe.topk_accuracy(scores[name][test], y[test], k3),
                      "seed_mean_top1_test": float(row["top1_test"]), "seed_mean_top3_test": float(row["top3_test"]),
                      "n_seeds": int(row["n_seeds"])}
    summary["best_probe"] = best
    per_group = {name: probe.per_group_accuracy(p[test], y[test], table.cell_line.to_numpy()[test], ks=(1, k3))
                 .rename(columns={f"top{k3}": "top3"}) for name, p in scores.items()}
    pd.concat([df.assign(features=name) for name, df in per_group.items()]).to_csv(out / "per_cell_line.csv",
                                                                                 index=False)
    figures = [{"path": str(probe.plot_probe_comparison(grid, out / "probe_comparison.png", metric="top3_test")),
                "caption": "top-3 accuracy on held-out wells of fresh linear probes over the lr × batch grid"},
               {"path": str(probe.plot_per_group(per_group, out / "per_cell_line.png")),
                "caption": "top-1 / top-3 on held-out wells per cell line, best probe of each feature set"}]

    # The altered-morphology maps of the test images; scored against the planted signature masks where the data has
    # them (synthetic plates), and examples of the categories of §6.5, but mined among the test images (the authors:
    # the training split, up to 100 each), at most n_examples each, and judged by the best probes on E(x) and
    # E(L(x)) (the authors: their no-lens classifier and the lens's jointly trained one).
    rows = arrays["image_rows"]
    if len(rows):
        x = arrays["image"].astype(np.float32) / 255
        ae = arrays["ae_recon"].astype(np.float32) / 255
        lens_recon = arrays["lens_recon"].astype(np.float32) / 255
        lens_map = importance.importance_map(ae, lens_recon, MAP_EXPONENT)
        masks = None
        if "mask_path" in table.columns and table.mask_path.iloc[rows].notna().all():
            from data_pipelines.lens_data import load_masks

            masks = importance.mask_at(load_masks(table.mask_path.iloc[rows].tolist()), x.shape[-1])
            maps = {"lens |AE(x) − L(x)|^1.5": lens_map,
                    "reconstruction error |AE(x) − x|^1.5": importance.importance_map(ae, x, MAP_EXPONENT),
                    "lens change |x − L(x)|^1.5": importance.importance_map(x, lens_recon, MAP_EXPONENT)}
            scores = importance.score_maps(maps, masks, _signatures(table.iloc[rows]))
            scores.to_csv(out / "map_scores.csv", index=False)
            maps_summary = importance.summarise_scores(scores)
            maps_summary.to_csv(out / "map_summary.csv", index=False)
            summary["maps"] = json.loads(maps_summary.to_json(orient="records"))
            figures.append({"path": str(importance.plot_map_scores(maps_summary, out / "map_scores.png")),
                            "caption": "how well each map points at the cells carrying the planted signature "
                                       "(AUROC; 0.5 = no better than chance)"})
        control_classes = [i for i, c in enumerate(bundle.classes) if c in ("DMSO", "PBS")]
        mined = importance.mine_examples(probs["no_lens"][rows], probs["lens"][rows], y[rows], control_classes,
                                         n=n_examples)
        summary["mined_examples"] = {k: int(len(v)) for k, v in mined.items()}
        if not any(len(v) for v in mined.values()):  # nothing the lens fixed: show where it changed the most
            mined = {"largest_change": np.argsort(-lens_map.mean(axis=(1, 2)))[:n_examples]}
        for category, idx in mined.items():
            if not len(idx):
                continue
            titles = [_example_title(table.iloc[rows[i]], probs["no_lens"][rows[i]], probs["lens"][rows[i]],
                                     bundle.classes) for i in idx]
            path = importance.plot_examples(idx, x, ae, lens_recon, lens_map, masks, titles,
                                            out / f"examples_{category}.png")
            figures.append({"path": str(path), "caption": f"{category}: image | AE(x) | L(x) | map"
                            + (" | planted mask" if masks is not None else "")})
    summary["figures"] = [{**f, "path": str(Path(f["path"]).relative_to(out))} for f in figures]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    return summary


def _example_title(row: pd.Series, p_nolens: np.ndarray, p_lens: np.ndarray, classes: tuple[str, ...]) -> str:
    a, b = int(p_nolens.argmax()), int(p_lens.argmax())
    return (f"{row.class_name} · {row.cell_line} · {row.time_h:g} h\n"
            f"no lens: {classes[a]} ({p_nolens[a]:.2f})\nlens: {classes[b]} ({p_lens[b]:.2f})")


def _signatures(rows: pd.DataFrame) -> np.ndarray:
    """Per image, the planted signature of its drug (catalogue), 'none' for controls and no-effect drugs."""
    from data_pipelines.synthetic.catalogue import DRUGS

    def one(drug: str) -> str:
        d = DRUGS.get(drug)
        return d.signature if d is not None and d.mechanism != "no_effect" else "none"

    return np.array([one(d) for d in rows.class_name])
