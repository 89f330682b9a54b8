"""The lens's "altered morphology" maps (paper §6.5), and how well they point at the cells the drug changed.

The authors' map is M = |AE_pretrained(x) − L(x)|^1.5: where the lens L, trained to make drugs easier to tell apart
through the frozen encoder, redraws the image differently from the plain autoencoder. The paper shows such maps but
never measures them, having no ground truth. Our synthetic plate has one: for every image a 0/255 mask of the cells
that carry the drug's morphological signature (data_pipelines/synthetic/appearance.py). This module scores a map
against that mask, per image, with three numbers that need no threshold on the map:

- ``auroc``: the probability that a random signature pixel has a higher map value than a random non-signature pixel
  (ties count half). A map that points at random gives 0.5; 1 means every signature pixel outranks every other.
- ``enrichment``: mean map on the mask / mean map over the image. Random gives 1; a map that is zero off the mask
  gives 1 / mask_fraction.
- ``precision_at_mask_area``: of the |mask| highest-map pixels, the fraction on the mask. Random gives
  ``mask_fraction`` (its chance level differs per image, hence AUROC as the headline).

Images without signature pixels (controls, drugs without a signature, early frames) have no score: NaN, not zero.

The module also mines the paper's three example categories from two classifiers' probabilities
(``mine_examples``, read from pheno-ml ``src/lens.py:plot_altered_morphology_maps``) and draws the figures. numpy,
pandas and matplotlib only: it works on arrays the lead's orchestration computed, never on models or files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellssl_jax.plotting import plt, save as save_figure

AUTHORS_EXPONENT = 1.5  # the authors' "magic number" in lens.py:plot_image_and_map
SCORE_COLUMNS = ("auroc", "enrichment", "precision_at_mask_area", "mask_fraction")
SUMMARY_SCORES = ("auroc", "enrichment", "precision_at_mask_area")
OVERALL = "all"  # the signature label of the summary row over every image of a map
CATEGORIES = ("control_fps", "drug_fps", "higher_confidence")
# Images scored per vectorised block: large enough to amortise numpy's per-call cost, small enough that the
# dozen [block, S²] int64 temporaries stay around 100 MB at S = 128.
_BLOCK = 64


# ----------------------------------------------------------------------------------------------------------------------
# Maps and masks


def importance_map(ae_recon: np.ndarray, lens_recon: np.ndarray, exponent: float = AUTHORS_EXPONENT) -> np.ndarray:
    """The authors' map |ae_recon − lens_recon|^exponent, elementwise, for arrays of any (equal) shape.

    Float32 in, float32 out (float64 stays float64). The exponent > 1 sharpens the map (large differences stand out);
    it changes no rank, so it changes neither ``auroc`` nor ``precision_at_mask_area``, only ``enrichment``.
    """
    a, b = np.asarray(ae_recon), np.asarray(lens_recon)
    if a.shape != b.shape:
        raise ValueError(f"importance_map: shapes differ, {a.shape} vs {b.shape}")
    if not exponent > 0:
        raise ValueError(f"importance_map: exponent must be > 0, got {exponent}")
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    return np.abs(a.astype(dtype, copy=False) - b.astype(dtype, copy=False)) ** dtype.type(exponent)


def baseline_maps(x: np.ndarray, ae_recon: np.ndarray, lens_recon: np.ndarray,
                  exponent: float = AUTHORS_EXPONENT) -> dict[str, np.ndarray]:
    """The lens map and two baselines, same exponent, under the names the report uses.

    'lens' = |AE(x) − L(x)|^e (the authors'); 'reconstruction error' = |AE(x) − x|^e (what the plain autoencoder
    fails to redraw: a map that needs no lens); 'lens change' = |x − L(x)|^e (what the lens redraws relative to the
    input, mixing the lens's effect with the autoencoder's blur). The lens map earns its place if it beats both.
    """
    return {
        "lens": importance_map(ae_recon, lens_recon, exponent),
        "reconstruction error": importance_map(ae_recon, x, exponent),
        "lens change": importance_map(x, lens_recon, exponent),
    }


def mask_at(masks_uint8: np.ndarray, size: int) -> np.ndarray:
    """Signature masks [N, H0, W0] (uint8 0/255, or bool) → bool [N, size, size] at the map's resolution.

    A target pixel is on the mask when at least half of the source pixels it covers are (block mean ≥ 0.5, counted
    in integers so 2 of 4 is exactly a half). H0 and W0 must be multiples of ``size``: the images were resized by
    an integer factor (256 → 128); anything else would need interpolation, which this refuses rather than guesses.
    """
    m = np.asarray(masks_uint8)
    if m.ndim != 3:
        raise ValueError(f"mask_at: masks must be [N, H, W], got shape {m.shape}")
    n, h0, w0 = m.shape
    if size <= 0 or h0 % size or w0 % size:
        raise ValueError(f"mask_at: mask size {h0}×{w0} is not an integer multiple of the target size {size}")
    if m.dtype == bool:
        on = m
    else:
        bad = (m != 0) & (m != 255)
        if bad.any():
            img = int(np.flatnonzero(bad.reshape(n, -1).any(axis=1))[0])
            raise ValueError(f"mask_at: masks must hold only 0 and 255; image {img} holds "
                             f"{sorted(np.unique(m[img]).tolist())[:8]}")
        on = m == 255
    fy, fx = h0 // size, w0 // size
    counts = on.reshape(n, size, fy, size, fx).sum(axis=(2, 4), dtype=np.int32)
    return 2 * counts >= fy * fx


def _as_bool_masks(masks: np.ndarray, map_hw: tuple[int, int]) -> np.ndarray:
    """Accept masks already at the map's resolution (bool) or the plate's 0/255 uint8 masks at a multiple of it."""
    m = np.asarray(masks)
    if m.dtype == bool and m.shape[-2:] == tuple(map_hw):
        return m
    if map_hw[0] != map_hw[1]:
        raise ValueError(f"masks {m.shape} {m.dtype} must be bool at the maps' resolution {map_hw}")
    return mask_at(m, map_hw[0])


# ----------------------------------------------------------------------------------------------------------------------
# Scores


def _rank_scores(values: np.ndarray, on_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and tie-aware precision@|mask| for each row of values [n, P] against on_mask [n, P] bool.

    Ranks: sort each row; a run of equal values (a tie group) occupying sorted columns [start, end) gets the midrank
    (start + end + 1) / 2 (1-based). Mann-Whitney: AUROC = (Σ ranks of positives − n₊(n₊+1)/2) / (n₊ n₋), which
    counts ties as half. Kept as twice the ranks in int64, so the sum is exact.

    Precision@k, k = n₊: the top k sorted columns are [P − k, P). A tie group straddling P − k is split as random
    tie-breaking would split it on average: each member counts with weight |group ∩ top k| / |group|. So a constant
    map scores mask_fraction, not an arbitrary 0 or 1 that depends on the sort's order.
    """
    n, p = values.shape
    order = np.argsort(values, axis=1)
    v = np.take_along_axis(values, order, axis=1)
    pos = np.take_along_axis(on_mask, order, axis=1)
    cols = np.arange(p, dtype=np.int64)
    first = np.ones((n, p), dtype=bool)
    first[:, 1:] = v[:, 1:] != v[:, :-1]
    last = np.ones((n, p), dtype=bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, cols, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, cols + 1, p)[:, ::-1], axis=1)[:, ::-1]

    n_pos = pos.sum(axis=1, dtype=np.int64)
    n_neg = p - n_pos
    twice_rank_sum = np.where(pos, start + end + 1, 0).sum(axis=1)
    twice_u = twice_rank_sum - n_pos * (n_pos + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = twice_u / (2.0 * n_pos * n_neg)  # 0/0 → NaN when the mask is empty or full

        top_from = (p - n_pos)[:, None]
        overlap = np.clip(end - np.maximum(start, top_from), 0, None)
        weight = overlap / (end - start)
        precision = np.where(pos, weight, 0.0).sum(axis=1) / n_pos  # NaN when the mask is empty
    return auroc, precision


def map_scores(maps: np.ndarray, masks: np.ndarray) -> pd.DataFrame:
    """Per-image scores of maps [N, S, S] against signature masks: one row per image (index = image index).

    Columns: ``auroc`` (NaN when the mask is empty or covers the whole image), ``enrichment`` (NaN when the mask is
    empty, or the map is zero everywhere), ``precision_at_mask_area`` (NaN when the mask is empty),
    ``mask_fraction``. Chance levels: auroc 0.5, enrichment 1, precision = mask_fraction (see the module docstring).

    ``masks``: bool [N, S, S], or the plate's uint8 0/255 masks at a multiple of S (converted by ``mask_at``).
    Maps must be finite; a map with NaN or inf is refused with the first offending image's index.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"map_scores: maps must be [N, S, S], got shape {maps.shape}")
    n = maps.shape[0]
    on = _as_bool_masks(masks, maps.shape[1:])
    if on.shape != maps.shape:
        raise ValueError(f"map_scores: masks {on.shape} do not match maps {maps.shape}")
    finite = np.isfinite(maps).reshape(n, -1).all(axis=1)
    if not finite.all():
        raise ValueError(f"map_scores: map of image {int(np.flatnonzero(~finite)[0])} holds NaN or inf")

    flat_maps = maps.reshape(n, -1)
    flat_on = on.reshape(n, -1)
    auroc = np.empty(n)
    precision = np.empty(n)
    blocks = range(0, n, _BLOCK)
    for lo in tqdm(blocks, desc="scoring maps", unit="block", disable=None, leave=False):
        hi = min(lo + _BLOCK, n)
        auroc[lo:hi], precision[lo:hi] = _rank_scores(flat_maps[lo:hi], flat_on[lo:hi])

    values = flat_maps.astype(np.float64)
    n_pos = flat_on.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_on = np.where(flat_on, values, 0.0).sum(axis=1) / n_pos
        enrichment = mean_on / values.mean(axis=1)
    return pd.DataFrame({"auroc": auroc, "enrichment": enrichment, "precision_at_mask_area": precision,
                         "mask_fraction": n_pos / flat_on.shape[1]}, index=pd.RangeIndex(n, name="image"))


def score_maps(named_maps: Mapping[str, np.ndarray], masks: np.ndarray, signature: Sequence[str]) -> pd.DataFrame:
    """``map_scores`` for several maps of the same images, in long format.

    One row per (map, image): columns map, image, signature, auroc, enrichment, precision_at_mask_area,
    mask_fraction. ``signature[i]`` is image i's planted signature name ('none' for controls and drugs without
    one). ``masks`` as in ``map_scores``; converted once and shared by every map.
    """
    if not named_maps:
        raise ValueError("score_maps: no maps given")
    signature = np.asarray(signature, dtype=object)
    shapes = {name: np.shape(m) for name, m in named_maps.items()}
    first_shape = next(iter(shapes.values()))
    if any(shape != first_shape for shape in shapes.values()):
        raise ValueError(f"score_maps: maps differ in shape: {shapes}")
    if len(first_shape) != 3:
        raise ValueError(f"score_maps: maps must be [N, S, S], got {first_shape}")
    if signature.shape != (first_shape[0],):
        raise ValueError(f"score_maps: {len(signature)} signature names for {first_shape[0]} images")
    on = _as_bool_masks(masks, first_shape[1:])
    frames = []
    for name, m in named_maps.items():
        scores = map_scores(m, on).reset_index()
        scores.insert(0, "map", name)
        scores.insert(2, "signature", signature)
        frames.append(scores)
    return pd.concat(frames, ignore_index=True)


def summarise_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (ddof 1) of auroc / enrichment / precision_at_mask_area per (map, signature), plus a row per map
    over every image (signature = 'all').

    NaN scores (images without signature pixels) are left out of the means; ``n_images`` counts every image of the
    group, ``n_scored`` those with a finite AUROC, so a signature row with n_scored = 0 (e.g. 'none') says there was
    nothing to score. ``mask_fraction_mean`` over the scored images is the chance level of the precision column.
    Chance levels: auroc 0.5, enrichment 1.
    """
    missing = {"map", "signature", *SCORE_COLUMNS} - set(df.columns)
    if missing:
        raise ValueError(f"summarise_scores: columns missing from the scores table: {sorted(missing)}")

    def summary(group: pd.DataFrame) -> dict:
        scored = group["auroc"].notna()
        row = {"n_images": len(group), "n_scored": int(scored.sum())}
        for col in SUMMARY_SCORES:
            row[f"{col}_mean"] = group[col].mean()
            row[f"{col}_sd"] = group[col].std()
        row["mask_fraction_mean"] = group.loc[scored, "mask_fraction"].mean()
        return row

    rows = []
    for map_name in pd.unique(df["map"]):
        of_map = df[df["map"] == map_name]
        for sig in sorted(pd.unique(of_map["signature"])):
            rows.append({"map": map_name, "signature": sig, **summary(of_map[of_map["signature"] == sig])})
        rows.append({"map": map_name, "signature": OVERALL, **summary(of_map)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------------
# Mining the paper's example categories


def mine_examples(p_nolens: np.ndarray, p_lens: np.ndarray, y: np.ndarray, control_classes: Sequence[int],
                  n: int = 8) -> dict[str, np.ndarray]:
    """Indices of the paper's three example categories (§6.5), at most ``n`` each, largest lens gain first.

    Read from pheno-ml ``src/lens.py:plot_altered_morphology_maps``, where ``no_lens_prob`` and ``lens_prob`` are
    each classifier's *top* probability (``predicted.max()``), i.e. its confidence in the class it predicts:

    - ``control_fps``: the image is a drug (y not a control); the no-lens classifier predicts a control class with
      top probability < 0.5; the lens classifier predicts y with probability > 0.5.
    - ``drug_fps``: the no-lens classifier predicts a wrong class with top probability < 0.5, the lens classifier
      predicts y with probability > 0.5, and the case is not a ``control_fps``. The authors' ``elif`` makes the two
      disjoint and admits every other wrong-to-right fix under this rule: a drug taken for another drug, but also a
      control taken for a drug or for the other control. We keep that reading. (Their ``elif`` also sends
      control_fps cases to drug_fps once control_fps holds n; that is an artefact of their counting, not kept.)
    - ``higher_confidence``: both predict y and p_lens(y) > p_nolens(y) + 0.5.

    Reading of ambiguities: "p_nolens < 0.5" is the no-lens *top* probability, as in the code; since its prediction
    is wrong, p_nolens(y) ≤ top < 0.5 follows, so this is stricter than asking p_nolens(y) < 0.5. Inequalities are
    strict, as in the code. The authors rounded probabilities to 4 decimals before comparing; we do not. They took
    the first n in data order; we order by gain = p_lens(y) − p_nolens(y), descending (ties: lower index first).
    Argmax ties go to the lower class index (as torch's argmax).
    """
    p0 = np.asarray(p_nolens, dtype=np.float64)
    p1 = np.asarray(p_lens, dtype=np.float64)
    y = np.asarray(y)
    if p0.ndim != 2 or p0.shape != p1.shape:
        raise ValueError(f"mine_examples: probabilities must both be [N, K], got {p0.shape} and {p1.shape}")
    n_img, k = p0.shape
    if y.shape != (n_img,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"mine_examples: y must be {n_img} integer labels, got shape {y.shape} dtype {y.dtype}")
    for name, p in (("p_nolens", p0), ("p_lens", p1)):
        bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1)).all(axis=1)
        if bad.any():
            raise ValueError(f"mine_examples: {name} row {int(np.flatnonzero(bad)[0])} is not a probability vector")
    if ((y < 0) | (y >= k)).any():
        raise ValueError(f"mine_examples: label of image {int(np.flatnonzero((y < 0) | (y >= k))[0])} is outside "
                         f"0..{k - 1}")
    controls = np.zeros(k, dtype=bool)
    control_classes = np.asarray(control_classes, dtype=np.int64).reshape(-1)
    if ((control_classes < 0) | (control_classes >= k)).any():
        raise ValueError(f"mine_examples: control classes {control_classes.tolist()} outside 0..{k - 1}")
    controls[control_classes] = True
    if n < 0:
        raise ValueError(f"mine_examples: n must be ≥ 0, got {n}")

    rows = np.arange(n_img)
    pred0, pred1 = p0.argmax(axis=1), p1.argmax(axis=1)
    top0, top1 = p0[rows, pred0], p1[rows, pred1]
    true0, true1 = p0[rows, y], p1[rows, y]

    fixed = (pred0 != y) & (pred1 == y) & (top0 < 0.5) & (top1 > 0.5)
    control_fp = fixed & controls[pred0] & ~controls[y]
    rules = {
        "control_fps": control_fp,
        "drug_fps": fixed & ~control_fp,
        "higher_confidence": (pred0 == y) & (pred1 == y) & (true1 > true0 + 0.5),
    }
    gain = true1 - true0
    out = {}
    for name, admitted in rules.items():
        idx = np.flatnonzero(admitted)
        idx = idx[np.argsort(-gain[idx], kind="stable")]
        out[name] = idx[:n]
    return out


def example_titles(rows: Sequence[int], p_nolens: np.ndarray, p_lens: np.ndarray, y: np.ndarray,
                   class_names: Sequence[str], signature: Sequence[str] | None = None) -> list[str]:
    """Row titles in the authors' style: 'true X [signature] / no lens: A p=.. / lens: B p=..'."""
    p0, p1, y = np.asarray(p_nolens), np.asarray(p_lens), np.asarray(y)
    titles = []
    for i in rows:
        a, b = int(p0[i].argmax()), int(p1[i].argmax())
        sig = f" [{signature[i]}]" if signature is not None else ""
        titles.append(f"#{i} true {class_names[int(y[i])]}{sig}\n"
                      f"no lens: {class_names[a]} p={p0[i, a]:.2f}\nlens: {class_names[b]} p={p1[i, b]:.2f}")
    return titles


# ----------------------------------------------------------------------------------------------------------------------
# Figures



def plot_examples(rows: Sequence[int], x: np.ndarray, ae_recon: np.ndarray, lens_recon: np.ndarray,
                  maps: np.ndarray, masks: np.ndarray | None, titles: Sequence[str], path) -> Path:
    """One row per example: image | AE(x) | L(x) | map | planted mask outlined over the image (no mask column when
    ``masks`` is None: real data has no planted truth). Returns the path.

    Image and reconstructions share the fixed grey scale [0, 1] so AE(x) and L(x) compare by eye; the map is grey
    on its own scale per row (as the authors' ``imshow``), its maximum printed in the panel. ``masks`` may be the
    plate's 0/255 masks at a multiple of the image size: the outline is drawn at the mask's own resolution, placed
    on the image's pixel grid, so it is not blurred by a resize.
    """
    rows = [int(i) for i in rows]
    if not rows:
        raise ValueError("plot_examples: no rows to plot (a mined category may be empty: skip it)")
    if len(titles) != len(rows):
        raise ValueError(f"plot_examples: {len(titles)} titles for {len(rows)} rows")
    s = np.shape(x)[-1]
    headers = ("image x", "AE(x)", "L(x)", f"map |AE(x) − L(x)|^{AUTHORS_EXPONENT:g}", "planted signature mask")
    columns = 5 if masks is not None else 4
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.5 * columns, 2.6 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        panels = (x[i], ae_recon[i], lens_recon[i])
        for c, img in enumerate(panels):
            axes[r, c].imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[r, 3].imshow(maps[i], cmap="gray", interpolation="nearest")
        axes[r, 3].text(2, 6, f"max {float(np.max(maps[i])):.3g}", color="yellow", fontsize=7, va="top")
        axes[r, 0].set_ylabel(titles[r], fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
        if masks is None:
            continue
        axes[r, 4].imshow(x[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        m = np.asarray(masks[i])
        on = m if m.dtype == bool else m >= 128
        if on.any() and not on.all():
            h0, w0 = on.shape
            yy = (np.arange(h0) + 0.5) * s / h0 - 0.5  # source pixel centres on the image's pixel grid
            xx = (np.arange(w0) + 0.5) * s / w0 - 0.5
            axes[r, 4].contour(xx, yy, on.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
        else:
            axes[r, 4].text(2, 6, "mask empty" if not on.any() else "mask full", color="red", fontsize=7, va="top")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for c in range(columns):
        axes[0, c].set_title(headers[c], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_map_scores(summary_df: pd.DataFrame, path, *, title: str = "") -> Path:
    """AUROC (mean ± sd over images) per signature, one bar per map, with the 0.5 chance line. Signatures with
    nothing scored (n_scored = 0, e.g. 'none') are left out; the 'all' group comes last. Returns the path."""
    need = {"map", "signature", "auroc_mean", "auroc_sd", "n_scored"}
    if need - set(summary_df.columns):
        raise ValueError(f"plot_map_scores: summary lacks columns {sorted(need - set(summary_df.columns))}")
    df = summary_df[summary_df["n_scored"] > 0]
    if df.empty:
        raise ValueError("plot_map_scores: no scored images in the summary (every mask empty?)")
    sigs = sorted(s for s in pd.unique(df["signature"]) if s != OVERALL)
    if (df["signature"] == OVERALL).any():
        sigs.append(OVERALL)
    maps = list(pd.unique(df["map"]))
    width = 0.8 / len(maps)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(sigs) * max(1, len(maps) / 2)), 3.6))
    xs = np.arange(len(sigs))
    for j, name in enumerate(maps):
        of_map = df[df["map"] == name].set_index("signature").reindex(sigs)
        ax.bar(xs + (j - (len(maps) - 1) / 2) * width, of_map["auroc_mean"], width, yerr=of_map["auroc_sd"],
               capsize=2, label=name, error_kw={"lw": 0.8})
    n_per_sig = df.groupby("signature")["n_scored"].max().reindex(sigs)
    ax.set_xticks(xs, [f"{s}\n(n={int(k)})" for s, k in zip(sigs, n_per_sig)], fontsize=8)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance (0.5)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUROC of map vs planted mask")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
