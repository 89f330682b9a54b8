"""Task A (replicate similarity): distances, exact well matching, the chance-referenced ratio, the authors' summary."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from cellssl_jax.compare.replicates import (METRICS, check_inputs, compare_similarity, mean_abs_deviation,
                                            paper_similarity, plot_replicates, ratio_summary, replicate_distances,
                                            similarity_scores)


def make_plate(rng, *, n_lines=2, n_drugs=10, n_wells=3, n_frames=5, n_features=48, noise=0.3):
    """Images of each (cell line, drug) scattered around one centre; each replicate well on its own plate/well."""
    rows, feats = [], []
    for line in range(n_lines):
        for d in range(n_drugs):
            centre = rng.normal(size=n_features)
            for w in range(n_wells):
                for t in range(n_frames):
                    rows.append({"Metadata_CellLine": f"L{line}", "Metadata_Drug": f"D{d}",
                                 "Metadata_Plate": f"P{w % 2 + 1}", "Metadata_Well": f"B{d * n_wells + w + 1}",
                                 "Metadata_Time_h": 4.0 * t, "Metadata_Effect": "cytotoxic" if d % 2 else "no_effect"})
                    feats.append(centre + noise * rng.normal(size=n_features))
    return np.asarray(feats, np.float32), pd.DataFrame(rows)


def test_replicates_of_a_drug_are_closer_than_other_drugs():
    x, meta = make_plate(np.random.default_rng(0))
    table = replicate_distances(x, meta)
    assert len(table) == 20 and set(table.effect) == {"cytotoxic", "no_effect"}
    assert (table.n_wells == 3).all() and (table.n_replicate_pairs == 3).all()
    assert (table.n_replicate_distances == 3 * 5).all()
    # other drugs of the same cell line: 9 drugs x 3 wells, against 3 wells, 5 frames
    assert (table.n_other_distances == 3 * 27 * 5).all()
    for m in METRICS:
        assert (table[f"replicate_{m}"] < table[f"other_{m}"]).all(), m
        assert table[f"ratio_{m}"].max() < 0.5, m


def test_shuffled_drug_labels_score_chance():
    rng = np.random.default_rng(1)
    x, meta = make_plate(rng, n_lines=1, n_drugs=16)
    wells = meta[["Metadata_Plate", "Metadata_Well"]].drop_duplicates()
    shuffled = dict(zip(map(tuple, wells.to_numpy()), rng.permutation(meta.drop_duplicates(
        ["Metadata_Plate", "Metadata_Well"]).Metadata_Drug.to_numpy())))
    meta = meta.assign(Metadata_Drug=[shuffled[k] for k in zip(meta.Metadata_Plate, meta.Metadata_Well)])
    summary = ratio_summary({"shuffled": replicate_distances(x, meta)}).set_index("metric")
    clean = ratio_summary({"clean": replicate_distances(*make_plate(rng, n_lines=1, n_drugs=16))}).set_index("metric")
    for m in METRICS:
        assert 0.85 < summary.loc[m, "median"] < 1.15, (m, summary.loc[m, "median"])
        assert clean.loc[m, "median"] < 0.5 * summary.loc[m, "median"]


@pytest.mark.parametrize("value", [0.0, 1.0, "random"])
def test_collapsed_encoder_is_never_better_than_chance(value):
    """Every image at one point: 0/0 ratios are NaN (documented), a non-zero constant distance gives exactly 1."""
    rng = np.random.default_rng(2)
    _, meta = make_plate(rng, n_lines=1, n_drugs=4)
    point = rng.normal(size=48) if value == "random" else np.full(48, value)
    x = np.tile(point, (len(meta), 1)).astype(np.float32)
    table = replicate_distances(x, meta)
    for m in METRICS:
        ratio = table[f"ratio_{m}"].to_numpy()
        assert np.all(np.isnan(ratio) | (ratio == 1.0)), (m, ratio)
    assert table["ratio_euclidean"].isna().all()  # 0 / 0
    # the authors' measure, by contrast, calls the collapsed encoder infinitely similar next to a real one
    real = replicate_distances(*make_plate(rng, n_lines=1, n_drugs=4))
    sim = compare_similarity({"real": real, "collapsed": table}).set_index(["model", "metric"])
    assert np.isinf(sim.loc[("collapsed", "euclidean"), "median"])
    assert np.isfinite(sim.loc[("real", "euclidean"), "median"])


def test_wells_match_exactly_with_their_plate():
    """C1 and C10 on one plate are two wells; C1 on plates P1 and P2 are two replicate wells."""
    rng = np.random.default_rng(3)
    wells = [("P1", "C1", "A"), ("P2", "C1", "A"), ("P1", "C10", "B"), ("P1", "C11", "B"), ("P1", "C12", "E")]
    rows = [{"Metadata_CellLine": "L", "Metadata_Drug": d, "Metadata_Plate": p, "Metadata_Well": w,
             "Metadata_Time_h": float(t)} for p, w, d in wells for t in (10, 20, 30)]
    meta = pd.DataFrame(rows)
    x = rng.normal(size=(len(meta), 8)).astype(np.float32)
    table = replicate_distances(x, meta, metrics=("euclidean", "braycurtis")).set_index("drug")
    assert table.loc["A", "n_wells"] == 2 and table.loc["A", "n_replicate_pairs"] == 1
    assert table.loc["B", "n_wells"] == 2 and table.loc["B", "n_replicate_pairs"] == 1
    assert table.loc["E", "n_replicate_pairs"] == 0 and np.isnan(table.loc["E", "replicate_euclidean"])
    assert np.isnan(table.loc["E", "ratio_euclidean"])

    def frames(plate, well):
        return x[((meta.Metadata_Plate == plate) & (meta.Metadata_Well == well)).to_numpy()]

    for metric in ("euclidean", "braycurtis"):
        by_hand = [cdist(frames("P1", "C1")[k:k + 1], frames("P2", "C1")[k:k + 1], metric)[0, 0] for k in range(3)]
        assert table.loc["A", f"replicate_{metric}"] == pytest.approx(np.median(by_hand), rel=1e-12)
        others = [cdist(frames(*a)[k:k + 1], frames(*b)[k:k + 1], metric)[0, 0]
                  for a in (("P1", "C1"), ("P2", "C1")) for b in (("P1", "C10"), ("P1", "C11"), ("P1", "C12"))
                  for k in range(3)]
        assert table.loc["A", f"other_{metric}"] == pytest.approx(np.median(others), rel=1e-12)
        assert table.loc["A", f"ratio_{metric}"] == pytest.approx(np.median(by_hand) / np.median(others))


def test_frame_index_is_rank_by_time_and_only_shared_frames_pair():
    rng = np.random.default_rng(4)
    x, meta = make_plate(rng, n_lines=1, n_drugs=3)
    table = replicate_distances(x, meta)
    order = rng.permutation(len(meta))  # row order must not matter, only the time within each well
    shuffled = replicate_distances(x[order], meta.iloc[order])
    pd.testing.assert_frame_equal(table, shuffled)
    # drop the first two frames of one well: its pairs only have k = 0..2 (its own ranks), 3 of them
    one_well = (meta.Metadata_Well == "B1") & (meta.Metadata_Time_h < 8)
    short = replicate_distances(x[~one_well.to_numpy()], meta[~one_well])
    assert short.loc[short.drug == "D0", "n_replicate_distances"].item() == 5 + 3 + 3


def test_sites_are_paired_site_by_site():
    rng = np.random.default_rng(5)
    rows = [{"Metadata_CellLine": "L", "Metadata_Drug": d, "Metadata_Plate": "P1", "Metadata_Well": w,
             "Metadata_Site": s, "Metadata_Time_h": float(t)}
            for d, w in (("A", "B2"), ("A", "B3"), ("B", "B4")) for s in (1, 2) for t in (0, 4)]
    meta = pd.DataFrame(rows)
    table = replicate_distances(rng.normal(size=(len(meta), 6)), meta).set_index("drug")
    assert table.loc["A", "n_replicate_distances"] == 2 * 2  # (site, k) slots, not sites x sites
    with pytest.raises(ValueError, match="share a time"):
        replicate_distances(rng.normal(size=(len(meta), 6)), meta.drop(columns="Metadata_Site"))


def test_paper_similarity_normalises_over_all_models_by_hand():
    a = pd.DataFrame({"cell_line": "L", "drug": ["x", "y", "z"], "replicate_euclidean": [1.0, 2.0, 4.0]})
    b = pd.DataFrame({"cell_line": "L", "drug": ["x", "y", "z"], "replicate_euclidean": [2.0, 8.0, np.nan]})
    together = compare_similarity({"a": a, "b": b}).set_index("model")
    # max over both models is 8: a -> 8, 4, 2 ; b -> 4, 1 (z has no replicate)
    assert together.loc["a", "median"] == pytest.approx(4.0)
    assert together.loc["a", "mad"] == pytest.approx((10 / 3 + 2 / 3 + 8 / 3) / 3)
    assert together.loc["b", "median"] == pytest.approx(2.5) and together.loc["b", "mad"] == pytest.approx(1.5)
    assert together.loc["b", "n"] == 2 and together.loc["b", "n_rows"] == 3
    alone = paper_similarity(a).set_index("metric")  # max 4: 4, 2, 1
    assert alone.loc["euclidean", "median"] == pytest.approx(2.0)
    assert alone.loc["euclidean", "mad"] == pytest.approx((5 / 3 + 1 / 3 + 4 / 3) / 3)
    long = similarity_scores({"a": a, "b": b})
    assert long.similarity.to_numpy()[:3] == pytest.approx([8.0, 4.0, 2.0])


def test_mean_abs_deviation_is_the_old_pandas_mad():
    values = pd.Series([1.0, 2.0, np.nan, 7.0])
    assert mean_abs_deviation(values) == pytest.approx((values - values.mean()).abs().mean())
    assert np.isnan(mean_abs_deviation([np.nan]))


def test_bad_inputs_are_named():
    x, meta = make_plate(np.random.default_rng(6), n_lines=1, n_drugs=2)
    with pytest.raises(ValueError, match="Metadata_Well"):
        replicate_distances(x, meta.drop(columns="Metadata_Well"))
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"row 7 \(.*well B2"):
        replicate_distances(bad, meta)
    with pytest.raises(ValueError, match="rows"):
        replicate_distances(x[:-1], meta)
    with pytest.raises(ValueError, match="Metadata_Drug is missing at row 3"):
        replicate_distances(x, meta.assign(Metadata_Drug=meta.Metadata_Drug.where(meta.index != 3)))
    mixed = meta.copy()
    mixed.loc[0, "Metadata_Drug"] = "D1"
    with pytest.raises(ValueError, match="several drugs"):
        replicate_distances(x, mixed)
    features, checked = check_inputs(x, meta.set_index(meta.index + 100))
    assert list(checked.index[:2]) == [0, 1] and features.shape == x.shape


def test_plot_replicates_writes_a_png(tmp_path):
    rng = np.random.default_rng(7)
    tables = {"clean": replicate_distances(*make_plate(rng, n_lines=1, n_drugs=3)),
              "other": replicate_distances(*make_plate(rng, n_lines=1, n_drugs=3, noise=2.0))}
    path = plot_replicates(tables, tmp_path / "fig" / "replicates.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
