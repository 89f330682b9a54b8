"""Importance maps scored against planted signature masks, example mining and figures (cellssl_jax.lens.importance)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cellssl_jax.lens.importance import (
    CATEGORIES,
    baseline_maps,
    example_titles,
    importance_map,
    map_scores,
    mask_at,
    mine_examples,
    plot_examples,
    plot_map_scores,
    score_maps,
    summarise_scores,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _blob_masks(rng, n, size, max_blobs=4):
    """Masks made of a few discs, like cells carrying a signature."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(1, max_blobs + 1)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 16, size / 6)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return masks


# ----------------------------------------------------------------------------------------------------------------------
# importance_map, mask_at


def test_importance_map_is_the_authors_formula_for_any_leading_shape():
    a = np.array([[[0.0, 0.5], [1.0, 0.25]]], dtype=np.float32)
    b = np.array([[[1.0, 0.5], [0.0, 0.5]]], dtype=np.float32)
    m = importance_map(a, b)
    assert m.dtype == np.float32 and m.shape == a.shape
    np.testing.assert_allclose(m, [[[1.0, 0.0], [1.0, 0.25 ** 1.5]]], rtol=1e-6)
    np.testing.assert_allclose(importance_map(a, b, exponent=2.0), (a - b) ** 2, rtol=1e-6)
    assert importance_map(np.zeros((2, 3, 4, 4)), np.ones((2, 3, 4, 4))).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        importance_map(a, b[..., :1])


def test_baseline_maps_use_the_documented_pairs():
    rng = np.random.default_rng(1)
    x, ae, lens = (rng.random((2, 8, 8), dtype=np.float32) for _ in range(3))
    maps = baseline_maps(x, ae, lens)
    np.testing.assert_allclose(maps["lens"], np.abs(ae - lens) ** 1.5, rtol=1e-6)
    np.testing.assert_allclose(maps["reconstruction error"], np.abs(ae - x) ** 1.5, rtol=1e-6)
    np.testing.assert_allclose(maps["lens change"], np.abs(x - lens) ** 1.5, rtol=1e-6)


def test_mask_at_block_area_fraction_hand_case():
    # Four 2×2 blocks holding 0, 1, 2 and 4 signature pixels: only ≥ half (2 of 4) is on the mask.
    m = np.array([[[0, 0, 255, 0],
                   [0, 0, 0, 0],
                   [255, 255, 255, 255],
                   [0, 0, 255, 255]]], dtype=np.uint8)
    out = mask_at(m, 2)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, [[[False, False], [True, True]]])
    np.testing.assert_array_equal(mask_at(m, 4), m == 255)  # same size: unchanged
    np.testing.assert_array_equal(mask_at(m == 255, 2), out)  # bool input too


def test_mask_at_refuses_non_multiples_and_non_binary_values():
    with pytest.raises(ValueError, match="not an integer multiple"):
        mask_at(np.zeros((1, 6, 6), np.uint8), 4)
    bad = np.zeros((3, 4, 4), np.uint8)
    bad[2, 1, 1] = 128
    with pytest.raises(ValueError, match="image 2"):
        mask_at(bad, 2)


# ----------------------------------------------------------------------------------------------------------------------
# map_scores


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, s = 12, 16
    # Heavy ties: integer levels, and a float map quantised to a few values; mask fractions from one pixel to most.
    maps = rng.integers(0, 4 + seed, (n, s, s)).astype(np.float32)
    maps[n // 2:] = np.round(rng.random((n - n // 2, s, s)) * 3, 0).astype(np.float32) / 3
    fractions = np.linspace(1.5 / (s * s), 0.9, n)
    masks = rng.random((n, s, s)) < fractions[:, None, None]
    masks[0] = False
    masks[0, 3, 5] = True  # exactly one signature pixel
    df = map_scores(maps, masks)
    for i in range(n):
        expected = roc_auc_score(masks[i].ravel(), maps[i].ravel())
        assert df.loc[i, "auroc"] == pytest.approx(expected, abs=1e-12), i
    np.testing.assert_allclose(df["mask_fraction"], masks.reshape(n, -1).mean(axis=1))


def test_map_equal_to_mask_is_perfect_and_inverted_map_is_worst():
    masks = _blob_masks(np.random.default_rng(2), 6, 32)
    fraction = masks.reshape(6, -1).mean(axis=1)
    assert ((fraction > 0) & (fraction < 1)).all()
    perfect = map_scores(masks.astype(np.float32), masks)
    np.testing.assert_allclose(perfect["auroc"], 1.0)
    np.testing.assert_allclose(perfect["enrichment"], 1.0 / fraction, rtol=1e-12)
    np.testing.assert_allclose(perfect["precision_at_mask_area"], 1.0)
    inverted = map_scores((~masks).astype(np.float32), masks)
    np.testing.assert_allclose(inverted["auroc"], 0.0)
    np.testing.assert_allclose(inverted["enrichment"], 0.0)
    np.testing.assert_allclose(inverted["precision_at_mask_area"], 0.0)


def test_random_map_scores_chance():
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 200, 64)
    df = map_scores(rng.random((200, 64, 64), dtype=np.float32), masks)
    assert abs(df["auroc"].mean() - 0.5) < 0.01
    assert abs(df["enrichment"].mean() - 1.0) < 0.02
    assert abs((df["precision_at_mask_area"] - df["mask_fraction"]).mean()) < 0.01


def test_exponent_changes_no_rank_score():
    rng = np.random.default_rng(4)
    ae, lens = rng.random((2, 5, 32, 32), dtype=np.float32)
    masks = _blob_masks(rng, 5, 32)
    a = map_scores(importance_map(ae, lens, 1.0), masks)
    b = map_scores(importance_map(ae, lens, 1.5), masks)
    np.testing.assert_allclose(a["auroc"], b["auroc"], atol=1e-12)
    np.testing.assert_allclose(a["precision_at_mask_area"], b["precision_at_mask_area"], atol=1e-12)


def test_precision_splits_a_tie_at_the_boundary_as_random_tie_breaking_would():
    # 8 pixels, mask = pixels 0-2 (k=3). Map: pixel 0 highest; pixels 1, 5, 6, 7 tied below it; rest lowest.
    # The top 3 = pixel 0 + 2 of the 4 tied pixels, of which 1 of 4 is on the mask: expected hits 1 + 2·(1/4).
    values = np.array([9, 5, 0, 0, 0, 5, 5, 5], dtype=np.float32).reshape(1, 2, 4)
    mask = np.zeros((1, 2, 4), dtype=bool)
    mask[0, 0, :3] = True
    df = map_scores(values, mask)
    assert df.loc[0, "precision_at_mask_area"] == pytest.approx((1 + 2 * 0.25) / 3)
    constant = map_scores(np.ones((1, 2, 4), np.float32), mask)
    assert constant.loc[0, "precision_at_mask_area"] == pytest.approx(3 / 8)
    assert constant.loc[0, "auroc"] == pytest.approx(0.5)


def test_empty_and_full_masks_give_nan_not_a_crash():
    rng = np.random.default_rng(5)
    maps = rng.random((3, 8, 8), dtype=np.float32)
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[1] = True
    masks[2, :4] = True
    maps[2] = 0.0  # a map that is zero everywhere: no enrichment to speak of
    df = map_scores(maps, masks)
    assert np.isnan(df.loc[0, ["auroc", "enrichment", "precision_at_mask_area"]].astype(float)).all()
    assert df.loc[0, "mask_fraction"] == 0.0
    assert np.isnan(df.loc[1, "auroc"]) and df.loc[1, "enrichment"] == pytest.approx(1.0)
    assert df.loc[1, "precision_at_mask_area"] == pytest.approx(1.0)
    assert np.isnan(df.loc[2, "enrichment"]) and df.loc[2, "auroc"] == pytest.approx(0.5)


def test_map_scores_refuses_bad_input_with_the_image_index():
    maps = np.zeros((4, 8, 8), np.float32)
    maps[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="image 3"):
        map_scores(maps, np.zeros((4, 8, 8), bool))
    with pytest.raises(ValueError, match="do not match"):
        map_scores(np.zeros((4, 8, 8), np.float32), np.zeros((3, 8, 8), bool))


def test_score_maps_long_format_and_plate_masks_at_twice_the_resolution():
    rng = np.random.default_rng(6)
    n, s = 6, 16
    small = _blob_masks(rng, n, s)
    plate_masks = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2).astype(np.uint8) * 255  # [N, 2S, 2S] 0/255
    named = {"lens": small.astype(np.float32) + rng.random((n, s, s), dtype=np.float32) * 0.1,
             "noise": rng.random((n, s, s), dtype=np.float32)}
    signature = ["rounding", "rounding", "elongation", "elongation", "elongation", "none"]
    df = score_maps(named, plate_masks, signature)
    assert list(df.columns) == ["map", "image", "signature", "auroc", "enrichment", "precision_at_mask_area",
                                "mask_fraction"]
    assert len(df) == 2 * n
    assert (df.groupby("map")["image"].apply(list) == pd.Series({"lens": list(range(n)), "noise": list(range(n))})
            ).all()
    pd.testing.assert_frame_equal(df[df["map"] == "lens"].reset_index(drop=True)[["auroc", "enrichment"]],
                                  map_scores(named["lens"], small).reset_index(drop=True)[["auroc", "enrichment"]])
    np.testing.assert_allclose(df.loc[df["map"] == "lens", "auroc"], 1.0)
    with pytest.raises(ValueError, match="signature names"):
        score_maps(named, plate_masks, signature[:-1])


def test_summarise_scores_means_sds_and_counts():
    df = pd.DataFrame({
        "map": ["a"] * 5,
        "signature": ["rounding", "rounding", "rounding", "elongation", "none"],
        "auroc": [0.6, 0.8, np.nan, 0.9, np.nan],
        "enrichment": [1.5, 2.5, np.nan, 3.0, np.nan],
        "precision_at_mask_area": [0.2, 0.4, np.nan, 0.5, np.nan],
        "mask_fraction": [0.1, 0.3, 0.0, 0.2, 0.0],
    })
    out = summarise_scores(df).set_index("signature")
    assert list(out.index) == ["elongation", "none", "rounding", "all"]
    r = out.loc["rounding"]
    assert (r["n_images"], r["n_scored"]) == (3, 2)
    assert r["auroc_mean"] == pytest.approx(0.7) and r["auroc_sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert r["mask_fraction_mean"] == pytest.approx(0.2)
    assert out.loc["none", "n_scored"] == 0 and np.isnan(out.loc["none", "auroc_mean"])
    assert out.loc["all", "n_images"] == 5 and out.loc["all", "auroc_mean"] == pytest.approx(np.mean([0.6, 0.8, 0.9]))


# ----------------------------------------------------------------------------------------------------------------------
# mine_examples

CONTROLS = [0, 1]  # classes 0 and 1 are controls (DMSO, PBS), 2 and 3 drugs


def _probs(rows):
    """Hand-written probability vectors over 4 classes, checked to sum to 1."""
    out = np.zeros((len(rows), 4))
    for i, spec in enumerate(rows):
        out[i] = spec
    assert np.allclose(out.sum(axis=1), 1.0)
    return out


def test_mine_examples_hand_built_cases():
    # Each row: p_nolens, p_lens, y; comment says which rule should admit it.
    cases = [
        ([0.45, 0.05, 0.30, 0.20], [0.10, 0.05, 0.70, 0.15], 2),  # 0 control_fps (nolens DMSO 0.45; lens right 0.70)
        ([0.60, 0.00, 0.20, 0.20], [0.10, 0.00, 0.80, 0.10], 2),  # 1 none: nolens top p 0.60 ≥ 0.5
        ([0.10, 0.20, 0.40, 0.30], [0.05, 0.05, 0.10, 0.80], 3),  # 2 drug_fps (drug taken for another drug)
        ([0.30, 0.00, 0.40, 0.30], [0.60, 0.00, 0.20, 0.20], 0),  # 3 drug_fps (control taken for a drug)
        ([0.40, 0.00, 0.30, 0.30], [0.25, 0.00, 0.50, 0.25], 2),  # 4 none: lens p exactly 0.5 (strict)
        ([0.20, 0.20, 0.30, 0.30], [0.05, 0.00, 0.85, 0.10], 2),  # 5 higher_confidence: 0.30 → 0.85 (argmax tie → 2)
        ([0.25, 0.25, 0.25, 0.25], [0.75, 0.25, 0.00, 0.00], 0),  # 6 none: 0.25 → 0.75, gain exactly 0.5 (strict)
        ([0.10, 0.10, 0.50, 0.30], [0.00, 0.10, 0.80, 0.10], 2),  # 7 none: both right, gain 0.3
        ([0.40, 0.10, 0.30, 0.20], [0.40, 0.10, 0.30, 0.20], 2),  # 8 none: lens wrong
        ([0.00, 0.35, 0.33, 0.32], [0.00, 0.00, 0.95, 0.05], 2),  # 9 control_fps (PBS), larger gain than case 0
        ([0.30, 0.45, 0.10, 0.15], [0.90, 0.05, 0.05, 0.00], 0),  # 10 drug_fps (DMSO taken for PBS: not control_fp)
        ([0.00, 0.00, 0.40, 0.60], [0.00, 0.00, 0.95, 0.05], 2),  # 11 none: nolens top p 0.60
    ]
    p0 = _probs([c[0] for c in cases])
    p1 = _probs([c[1] for c in cases])
    y = np.array([c[2] for c in cases])
    got = mine_examples(p0, p1, y, CONTROLS, n=10)
    assert set(got) == set(CATEGORIES)
    assert got["control_fps"].tolist() == [9, 0]  # ordered by gain: 0.62 vs 0.40
    assert got["drug_fps"].tolist() == [10, 2, 3]  # gains 0.60, 0.50, 0.30
    assert got["higher_confidence"].tolist() == [5]
    capped = mine_examples(p0, p1, y, CONTROLS, n=1)
    assert capped["control_fps"].tolist() == [9] and capped["drug_fps"].tolist() == [10]


def _authors_rules(p0, p1, y, controls):
    """The authors' loop (lens.py:plot_altered_morphology_maps) without their count caps, one image at a time."""
    found = {c: [] for c in CATEGORIES}
    for i in range(len(y)):
        no_lens_label, lens_label = int(np.argmax(p0[i])), int(np.argmax(p1[i]))
        no_lens_prob, lens_prob = float(p0[i].max()), float(p1[i].max())
        if no_lens_label != y[i] and lens_label == y[i]:
            if no_lens_label in controls and y[i] not in controls and no_lens_prob < 0.5 < lens_prob:
                found["control_fps"].append(i)
            elif no_lens_prob < 0.5 < lens_prob:
                found["drug_fps"].append(i)
        elif no_lens_label == lens_label == y[i] and no_lens_prob + 0.5 < lens_prob:
            found["higher_confidence"].append(i)
    return found


def test_mine_examples_admits_exactly_what_the_authors_rules_admit():
    rng = np.random.default_rng(7)
    n, k = 3000, 6
    y = rng.integers(0, k, n)
    # Lens probabilities sharper and more often right than the no-lens ones, so every category gets members.
    p0 = rng.dirichlet(np.full(k, 0.7), n)
    logits = np.log(rng.dirichlet(np.full(k, 0.4), n) + 1e-9)
    logits[np.arange(n), y] += rng.uniform(0, 4, n)
    p1 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = mine_examples(p0, p1, y, CONTROLS, n=n)
    expected = _authors_rules(p0, p1, y, CONTROLS)
    gain = p1[np.arange(n), y] - p0[np.arange(n), y]
    for cat in CATEGORIES:
        assert len(expected[cat]) > 5, cat
        assert sorted(got[cat].tolist()) == expected[cat], cat
        assert (np.diff(gain[got[cat]]) <= 0).all(), cat
    few = mine_examples(p0, p1, y, CONTROLS, n=4)
    for cat in CATEGORIES:
        top4 = sorted(expected[cat], key=lambda i: -gain[i])[:4]
        assert few[cat].tolist() == top4


def test_mine_examples_refuses_bad_input():
    p = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="outside"):
        mine_examples(p, p, np.array([0, 1, 4]), CONTROLS)
    bad = p.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        mine_examples(bad, p, np.array([0, 1, 2]), CONTROLS)


# ----------------------------------------------------------------------------------------------------------------------
# Figures


def test_plots_write_non_empty_pngs(tmp_path):
    rng = np.random.default_rng(8)
    n, s = 4, 32
    x, ae, lens = (rng.random((n, s, s), dtype=np.float32) for _ in range(3))
    small = _blob_masks(rng, n, s)
    small[3] = False  # one image without signature: panel says so instead of drawing an empty contour
    plate_masks = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2).astype(np.uint8) * 255
    maps = baseline_maps(x, ae, lens)
    p0, p1 = rng.dirichlet(np.ones(3), n), rng.dirichlet(np.ones(3), n)
    y = np.array([0, 1, 2, 2])
    titles = example_titles([1, 3], p0, p1, y, ["DMSO", "drug A", "drug B"], signature=["none", "a", "b", "none"])
    assert titles[0].startswith("#1 true drug A [a]")
    out = plot_examples([1, 3], x, ae, lens, maps["lens"], plate_masks, titles, tmp_path / "ex" / "examples.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no rows"):
        plot_examples([], x, ae, lens, maps["lens"], plate_masks, [], tmp_path / "none.png")
    # real data has no planted masks: four panels, and a narrower figure than the five-panel one
    from PIL import Image

    no_mask = plot_examples([1, 3], x, ae, lens, maps["lens"], None, titles, tmp_path / "no_mask.png")
    assert Image.open(no_mask).width < Image.open(out).width

    summary = summarise_scores(score_maps(maps, plate_masks, ["rounding", "rounding", "elongation", "none"]))
    out = plot_map_scores(summary, tmp_path / "scores.png", title="test")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
