"""Temporal drug-effect analysis: distance curves, DTW clustering, effect rules, pipeline outputs.

The feature tables are built here: per cell line one plate with DMSO wells and drugs whose features drift away from
DMSO along a planted shape (rising = cytotoxic, rise-then-fall = cytostatic, rise-then-level = mixed, flat = no
effect), 4 replicate wells of 2 sites each, every well imaged a little off the nominal times, and a growth trend
shared by all wells so that matching the wrong control time shows.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score


def _install_reference_dtw():
    """Until cellssl_jax/temporal/dtw.py (another helper's) lands: the same API on tslearn, for these tests only.
    Used only when that module does not exist at all; a broken dtw.py still fails loudly."""
    from scipy.spatial.distance import squareform
    from tslearn.metrics import cdist_dtw, dtw, dtw_path

    def _kw(window):
        return {} if window is None else dict(global_constraint="sakoe_chiba", sakoe_chiba_radius=window)

    mod = types.ModuleType("cellssl_jax.temporal.dtw")
    mod.dtw_distance = lambda a, b, *, window=None: float(dtw(a, b, **_kw(window)))
    mod.cross_distance = lambda X, Y, *, window=None: cdist_dtw(np.asarray(X)[..., None], np.asarray(Y)[..., None],
                                                                  **_kw(window))

    def distance_matrix(series, *, window=None, condensed=False, parallel=True):
        full = cdist_dtw(np.asarray(series)[..., None], **_kw(window))
        np.fill_diagonal(full, 0.0)
        return squareform(full, checks=False) if condensed else full

    def warping_path(a, b, *, window=None):
        path, dist = dtw_path(a, b, **_kw(window))
        return np.asarray(path, dtype=np.int64), float(dist)

    mod.distance_matrix = distance_matrix
    mod.warping_path = warping_path
    sys.modules[mod.__name__] = mod
    import cellssl_jax.temporal as pkg

    pkg.dtw = mod


if importlib.util.find_spec("cellssl_jax.temporal.dtw") is None:
    _install_reference_dtw()

from cellssl_jax.temporal import clustering, effects  # noqa: E402
from cellssl_jax.temporal import distances as curves  # noqa: E402
from cellssl_jax.temporal.pipeline import run_temporal  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Synthetic data

POST_DRUG_SPAN_H = 72.0
TIMES = np.arange(-6.0, POST_DRUG_SPAN_H + 1, 2.0)  # 40 frames; with the wells' delays 37 after the drug


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


SHAPES = {  # effect magnitude (0..1) against the fraction x of the post-drug span
    "cytotoxic": lambda x: np.clip(x, 0, 1) ** 1.3,  # rises to the end
    "cytostatic": lambda x: np.where(x < 0.45, _smoothstep(x / 0.45), 1 - 0.7 * _smoothstep((x - 0.45) / 0.4)),
    "mixed": lambda x: _smoothstep(x / 0.4),  # rises, then levels off
    "no_effect": lambda x: np.zeros_like(np.asarray(x, dtype=float)),
}

DRUGS = {  # drug: (planted mechanism, index of the lowest active concentration)
    "Toxin": ("cytotoxic", 1),
    "Static": ("cytostatic", 2),
    "Partial": ("mixed", 2),
    "Inert": ("no_effect", 0),
}
CONCENTRATIONS = (0.011, 0.11, 1.1, 11.0)


def make_plate_tables(cell_lines=("ACHN", "HT29"), *, n_features=16, noise=0.02, n_rep=4, n_dmso=8, n_sites=2,
                      sensitivity=None, seed=0):
    """(features table, ground truth) for one plate per cell line. ``sensitivity`` (cell line → factor on every
    effect's amplitude, default 1) makes lines more or less sensitive; 0 makes a resistant line (all no effect)."""
    sensitivity = sensitivity or {}
    rng = np.random.default_rng(seed)
    rows, feats, truth = [], [], []
    for cell in cell_lines:
        plate = f"{cell}_P1"
        base = rng.normal(0, 1, n_features)
        growth = rng.normal(0, 1, n_features)
        growth *= 0.8 / np.linalg.norm(growth)
        conditions = [("DMSO", 367.0, "no_effect", 0.0, n_dmso), ("PBS", 0.0, "no_effect", 0.0, n_rep)]
        for drug, (mechanism, lowest) in DRUGS.items():
            for i, conc in enumerate(CONCENTRATIONS):
                active = mechanism != "no_effect" and i >= lowest and sensitivity.get(cell, 1.0) > 0
                top = i == len(CONCENTRATIONS) - 1
                amplitude = (1.0 if top else 0.7) * sensitivity.get(cell, 1.0) if active else 0.0
                conditions.append((drug, conc, mechanism if active else "no_effect", amplitude, n_rep))
                truth.append(dict(cell_line=cell, drug=drug, concentration_uM=conc,
                                  effect=mechanism if active else "no_effect"))
        well_no = 0
        for drug, conc, effect, amplitude, reps in conditions:
            direction = rng.normal(0, 1, n_features)
            direction /= np.linalg.norm(direction)
            for _ in range(reps):
                well = f"{'ABCDEFGHIJKLMNOP'[well_no // 24]}{well_no % 24 + 1:02d}"
                well_no += 1
                times = TIMES + rng.uniform(0.05, 0.4)  # each well imaged a little after the nominal time
                post = np.clip(times / POST_DRUG_SPAN_H, 0, 1)
                mean = (base[None] + np.clip(times / POST_DRUG_SPAN_H, -0.1, 1)[:, None] * growth[None]
                        + amplitude * SHAPES[effect](post)[:, None] * direction[None])
                for site in range(1, n_sites + 1):
                    feats.append(mean + rng.normal(0, noise, mean.shape))
                    for t in times:
                        rows.append(dict(Metadata_Plate=plate, Metadata_Well=well, Metadata_Site=site,
                                         Metadata_CellLine=cell, Metadata_Drug=drug,
                                         Metadata_Concentration_uM=conc, Metadata_Time_h=float(t)))
    meta = pd.DataFrame(rows)
    values = np.concatenate(feats).astype(np.float32)
    table = pd.concat([meta, pd.DataFrame(values, columns=[f"f{j:04d}" for j in range(n_features)])], axis=1)
    return table, pd.DataFrame(truth)


@pytest.fixture(scope="module")
def plate_tables():
    return make_plate_tables()


def shape_series(n_per_shape=8, length=32, noise=0.03, seed=0):
    """Scaled series of three planted shapes, each with a random time shift (what DTW absorbs)."""
    rng = np.random.default_rng(seed)
    series, labels = [], []
    for label, name in enumerate(("cytotoxic", "cytostatic", "mixed")):
        for _ in range(n_per_shape):
            x = np.linspace(0, 1, length) - rng.uniform(-0.06, 0.06)
            series.append(SHAPES[name](x) + rng.normal(0, noise, length))
            labels.append(label)
    return np.array(series), np.array(labels)


# ----------------------------------------------------------------------------------------------------------------------
# Distances


def _hand_table():
    """DMSO: wells A01 [t, 0] and A02 [t, 2] at t = -1, 0, 2, 4, 6 → mean [t, 1].
    Drug X: well B01 with two sites ([10, 0] and [20, 0]) and B02 ([30, 0]), at t = -0.5, 1.5, 3.5, 5.5, 7."""
    rows = []
    for well, y in (("A01", 0.0), ("A02", 2.0)):
        for t in (-1.0, 0.0, 2.0, 4.0, 6.0):
            rows.append(("DMSO", 367.0, well, 1, t, t, y))
    for well, site, x in (("B01", 1, 10.0), ("B01", 2, 20.0), ("B02", 1, 30.0)):
        for t in (-0.5, 1.5, 3.5, 5.5, 7.0):
            rows.append(("X", 1.0, well, site, t, x, 0.0))
    table = pd.DataFrame(rows, columns=["Metadata_Drug", "Metadata_Concentration_uM", "Metadata_Well",
                                        "Metadata_Site", "Metadata_Time_h", "f0", "f1"])
    table["Metadata_Plate"] = "P1"
    table["Metadata_CellLine"] = "C"
    return table.sample(frac=1.0, random_state=0).reset_index(drop=True)  # order must not matter


@pytest.mark.parametrize("floor, expected_control_t", [(False, [-1, 2, 4, 6, 6]), (True, [-1, 0, 2, 4, 6])])
def test_hand_example_averaging_and_time_matching(floor, expected_control_t):
    # Raw features (no DMSO standardisation): the hand-computed distances below are in feature units.
    out = curves.distances_from_features(_hand_table(), paper_faithful=floor, noise_curve=False, progress=False,
                                         feature_scale="none")
    drug = out[out["drug"] == "X"].sort_values("time_h")
    assert drug["time_h"].tolist() == [-0.5, 1.5, 3.5, 5.5, 7.0]
    # Sites of B01 are averaged first (15), then wells (15 and 30 → 22.5): each well weighs the same.
    # t = -0.5 lies halfway between control times -1 and 0: a tie goes to the earlier.
    expected = np.sqrt((22.5 - np.array(expected_control_t, float)) ** 2 + 1.0)
    np.testing.assert_allclose(drug["distance"].to_numpy(), expected, rtol=1e-12)
    assert set(out.columns) == set(curves.DISTANCE_COLUMNS)


def test_the_control_is_the_dmso_wells_at_one_concentration():
    """The original's control: DMSO wells with Final_conc_uM == 367. DMSO wells at another concentration join
    neither the control nor the drugs (they used to be averaged into the control, shifting every curve)."""
    table = _hand_table()
    other = table[table["Metadata_Drug"] == "DMSO"].copy()
    other["Metadata_Well"] = other["Metadata_Well"].str.replace("A", "C")
    other["Metadata_Concentration_uM"] = 0.1
    other["f1"] += 100.0  # far from everything: averaged into the control, it would move every distance
    plus_one = pd.concat([table, other[other["Metadata_Well"] == "C01"]], ignore_index=True)  # 1 well at 0.1 µM
    want = curves.distances_from_features(table, noise_curve=False, progress=False, feature_scale="none")
    with pytest.warns(UserWarning, match=r"control is the 2 DMSO wells at 367 µM; 1 DMSO wells at \[0.1\] µM"):
        got = curves.distances_from_features(plus_one, noise_curve=False, progress=False, feature_scale="none")
    pd.testing.assert_frame_equal(got, want)
    both = pd.concat([table, other], ignore_index=True)  # 2 wells each: a tie, so name it (the original's 367)
    with pytest.warns(UserWarning, match="left out"):
        got = curves.distances_from_features(both, noise_curve=False, progress=False, feature_scale="none",
                                             control_concentration_uM=367.0)
    pd.testing.assert_frame_equal(got, want)
    with pytest.raises(ValueError, match=r"no DMSO wells at 5 µM; its DMSO wells are at \[0.1, 367.0\] µM"):
        curves.distances_from_features(both, progress=False, control_concentration_uM=5.0)


def test_control_time_index_nearest_and_floor():
    control = np.array([0.0, 2.0, 4.0, 6.0])
    times = np.array([-1.0, 0.9, 1.0, 1.1, 3.9, 7.0])
    assert curves.control_time_index(times, control).tolist() == [0, 0, 0, 1, 2, 3]  # a tie goes to the earlier
    assert curves.control_time_index(times, control, floor=True).tolist() == [0, 0, 0, 0, 1, 3]


@pytest.mark.parametrize("metric", curves.METRICS)
def test_rowwise_distance_matches_scipy(metric):
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 2, (5, 7)), rng.uniform(0.1, 2, (5, 7))
    np.testing.assert_allclose(curves.rowwise_distance(a, b, metric), np.diag(cdist(a, b, metric)), rtol=1e-12)


def test_well_with_odd_number_of_frames_is_dropped():
    table = _hand_table()
    extra = table[(table["Metadata_Well"] == "B02")].iloc[[0]].assign(Metadata_Time_h=9.0, f0=1e6)
    with pytest.warns(UserWarning, match="B02"):
        out = curves.distances_from_features(pd.concat([table, extra], ignore_index=True), noise_curve=False,
                                             progress=False, feature_scale="none")
    drug = out[out["drug"] == "X"].sort_values("time_h")
    # Only B01 (mean 15) is left; times are its own.
    np.testing.assert_allclose(drug["distance"].to_numpy(), np.sqrt((15 - np.array([-1, 2, 4, 6, 6.0])) ** 2 + 1))


def test_bad_inputs_name_the_row(tmp_path):
    table = _hand_table()
    table.loc[3, "f1"] = np.nan
    with pytest.raises(ValueError, match="row 3, column f1"):
        curves.distances_from_features(table, progress=False)
    path = tmp_path / "d.csv"
    pd.DataFrame(dict(cell_line=["C"], drug=["X"], concentration_uM=[1.0], time_h=["soon"], distance=[1.0])).to_csv(
        path, index=False)
    with pytest.raises(ValueError, match=r"d\.csv: row 0: time_h"):
        curves.read_distances(path)


def test_large_parquet_is_read_plate_by_plate_with_the_same_result(plate_tables, tmp_path, monkeypatch):
    table, _ = plate_tables
    path = tmp_path / "features.parquet"
    table.to_parquet(path)
    whole = curves.distances_from_parquet(path, progress=False)
    monkeypatch.setattr(curves, "MAX_FEATURES_IN_MEMORY_BYTES", 0)
    per_plate = curves.distances_from_parquet(path, progress=False)
    pd.testing.assert_frame_equal(whole, per_plate)
    assert set(per_plate["plate"]) == {"ACHN_P1", "HT29_P1"}


def _dmso_table(values_by_well: dict[str, list[list[float]]], times=(0.0, 4.0)) -> pd.DataFrame:
    """A plate of DMSO wells only: ``values_by_well[well][t]`` is the feature vector of that well at times[t]."""
    rows = []
    for well, per_time in values_by_well.items():
        for t, vec in zip(times, per_time):
            rows.append(dict(Metadata_Plate="P", Metadata_Well=well, Metadata_Site=1, Metadata_CellLine="C",
                             Metadata_Drug="DMSO", Metadata_Concentration_uM=0.0, Metadata_Time_h=t,
                             **{f"f{j}": v for j, v in enumerate(vec)}))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1).reset_index(drop=True)  # order must not matter


def test_dmso_spread_is_replicate_spread_at_each_time_not_growth():
    # Feature 0: wells differ by 1, 2, 3 at t0 and by 2, 4, 6 at t1 (variances 1 and 4), all shifted by +10 at t1
    # (growth, shared by every well: not spread). Feature 1: the same in every well: no spread.
    table = _dmso_table({"A01": [[1, 5], [12, 7]], "A02": [[2, 5], [14, 7]], "A03": [[3, 5], [16, 7]]})
    spread = curves.dmso_feature_spread(table, table[["f0", "f1"]].to_numpy())
    np.testing.assert_allclose(spread, [np.sqrt((1.0 + 4.0) / 2), 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 DMSO images"):
        one = table[table["Metadata_Well"] == "A01"]
        curves.dmso_feature_spread(one, one[["f0", "f1"]].to_numpy(), label="plate 'P'")


def _with_extra_features(table, rng, *, loud_sd=None, dead=False):
    """The plate table plus extra feature columns: one of pure replicate noise with sd ``loud_sd`` (no effect,
    much larger than the planted features), and/or a dead channel (constant, with float-rounding jitter)."""
    extra = {}
    n_feat = len(curves.feature_columns(table.columns))
    if loud_sd is not None:
        extra[f"f{n_feat:04d}"] = rng.normal(0, loud_sd, len(table))
        n_feat += 1
    if dead:
        extra[f"f{n_feat:04d}"] = 0.5 + rng.normal(0, 1e-9, len(table))
    return pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1)


def _strong_over_noise(raw):
    """Peak of the top-concentration toxin curve in units of the DMSO-vs-DMSO noise curve (median)."""
    series = curves.build_series(raw)
    return _rows(series, "Toxin").max()


def test_dmso_standardisation_keeps_effects_out_of_a_loud_noise_feature(plate_tables):
    table, _ = plate_tables
    loud = _with_extra_features(table, np.random.default_rng(0), loud_sd=2.0)  # 100 × the planted noise of 0.02
    clean_dmso = _strong_over_noise(curves.distances_from_features(table, progress=False))
    loud_dmso = _strong_over_noise(curves.distances_from_features(loud, progress=False))
    loud_raw = _strong_over_noise(curves.distances_from_features(loud, progress=False, feature_scale="none"))
    # Raw Euclidean: the one loud channel buries the effect near the noise level; in DMSO-spread units it is one
    # feature among 17 and the effect stays far above the noise, close to its level without that feature.
    assert loud_raw < 3 * effects.NOISE_MULTIPLE
    assert loud_dmso > 5 * loud_raw
    assert loud_dmso > 0.5 * clean_dmso


def test_dead_features_are_dropped_not_amplified(plate_tables, monkeypatch):
    table, _ = plate_tables
    with_dead = _with_extra_features(table, np.random.default_rng(0), dead=True)
    clean = curves.distances_from_features(table, progress=False)
    pd.testing.assert_frame_equal(clean, curves.distances_from_features(with_dead, progress=False))
    # Without the cut, the rounding jitter of the dead channel weighs like a live feature and adds its own noise.
    monkeypatch.setattr(curves, "MIN_RELATIVE_SPREAD", 0.0)
    amplified = curves.distances_from_features(with_dead, progress=False)
    assert np.abs(amplified["distance"].to_numpy() - clean["distance"].to_numpy()).max() > 0.1
    with pytest.raises(ValueError, match="feature_scale"):
        curves.distances_from_features(table, progress=False, feature_scale="zscore")


def test_denoise_is_pandas_rolling_median_without_nan_head():
    v = np.random.default_rng(0).normal(size=20)
    expected = pd.Series(v).rolling(5).median().dropna().to_numpy()
    np.testing.assert_allclose(curves.denoise(v, 5), expected)


def test_paper_faithful_series_drop_first_and_last_points():
    times = np.arange(1.0, 13.0)
    dist = np.random.default_rng(2).uniform(size=12)
    table = pd.DataFrame(dict(cell_line="C", drug="X", concentration_uM=1.0, time_h=times, distance=dist))
    table = pd.concat([table.assign(time_h=-1.0, distance=9.0).iloc[:1], table])  # a pre-drug point, ignored
    ours = curves.build_series(table, scale="none")
    paper = curves.build_series(table, scale="none", paper_faithful=True)
    np.testing.assert_allclose(ours.values[0], curves.denoise(dist))
    np.testing.assert_allclose(ours.time_h[0], times[4:])
    np.testing.assert_allclose(paper.values[0], curves.denoise(dist[1:])[:-1])


def test_noise_curve_and_series_shapes(plate_tables):
    table, _ = plate_tables
    raw = curves.distances_from_features(table, progress=False)
    series = curves.build_series(raw)
    n_conditions = 2 * (1 + 1 + len(DRUGS) * len(CONCENTRATIONS))  # per cell line: DMSO noise, PBS, drugs
    assert series.values.shape == (n_conditions, 37 - 4)  # 37 post-drug points, rolling median of 5
    # DMSO-vs-DMSO noise is far below a planted effect at its highest concentration.
    meta = series.meta
    noise = series.values[meta["drug"].to_numpy() == "DMSO"]
    strong = series.values[(meta["drug"] == "Toxin").to_numpy() & (meta["concentration_uM"] == 11.0).to_numpy()]
    assert noise.max() < 0.1 * strong.max()


def _rows(series, drug=None, cell_line=None):
    keep = np.ones(len(series.meta), bool)
    if drug is not None:
        keep &= (series.meta["drug"] == drug).to_numpy()
    if cell_line is not None:
        keep &= (series.meta["cell_line"] == cell_line).to_numpy()
    return series.values[keep]


def test_no_effect_drug_flat_and_low_by_default_but_stretched_by_paper_scale(plate_tables):
    table, _ = plate_tables
    raw = curves.distances_from_features(table, progress=False)
    default = curves.build_series(raw)
    paper = curves.build_series(raw, scale="cell_drug")
    assert default.scale == "noise"
    inert, toxin = _rows(default, "Inert"), _rows(default, "Toxin")
    # Default: the inert drug sits at the noise level (1 unit), below the no-effect threshold, and flat.
    assert 0.5 < np.median(inert) < 1.5
    assert inert.max() < effects.NOISE_MULTIPLE
    assert inert.std() < 0.05 * toxin.max()
    # Paper: every drug is min-max scaled on its own, so the inert drug spans [0, 1] like the toxin.
    inert_p, toxin_p = _rows(paper, "Inert"), _rows(paper, "Toxin")
    assert inert_p.min() == pytest.approx(0.0) and inert_p.max() == pytest.approx(1.0)
    assert inert_p.std() / toxin_p.std() > 10 * inert.std() / toxin.std()


def test_resistant_cell_line_is_not_stretched_by_default():
    table, _ = make_plate_tables(("SENS", "RES"), sensitivity={"RES": 0.0}, seed=4)
    raw = curves.distances_from_features(table, progress=False)
    default = curves.build_series(raw)
    per_plate = curves.build_series(raw, scale="plate")
    drugs = ~default.is_control()
    res = _rows(default, cell_line="RES")[drugs[(default.meta["cell_line"] == "RES").to_numpy()]]
    assert res.max() < effects.NOISE_MULTIPLE  # nothing on the resistant plate leaves the noise band
    assert _rows(default, "Toxin", "SENS").max() > 5 * effects.NOISE_MULTIPLE
    # Divided by its own 95th percentile, the resistant plate's noise looks like the sensitive plate's effects.
    assert np.percentile(_rows(per_plate, cell_line="RES"), 95) > 0.8


# ----------------------------------------------------------------------------------------------------------------------
# Clustering


def test_dba_of_identical_series_is_that_series():
    x = SHAPES["cytostatic"](np.linspace(0, 1, 20))
    np.testing.assert_allclose(clustering.dba(np.stack([x, x, x]), np.zeros(20)), x, atol=1e-12)


@pytest.mark.slow  # tslearn's numba functions compile on first use: ~20 s of CPU
@pytest.mark.filterwarnings("ignore:h5py not installed")
def test_kmeans_dtw_matches_tslearn():
    from tslearn.clustering import TimeSeriesKMeans

    series, _ = shape_series(n_per_shape=6, length=20, noise=0.05, seed=3)
    ours = clustering.kmeans_dtw(series, 3, seed=10)
    ref = TimeSeriesKMeans(n_clusters=3, metric="dtw", random_state=10).fit(series[..., None])
    assert ours.labels.tolist() == ref.labels_.tolist()
    np.testing.assert_allclose(ours.centroids, ref.cluster_centers_[..., 0], atol=1e-8)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-8)


@pytest.mark.parametrize("method", clustering.METHODS)
def test_methods_recover_planted_groups(method):
    series, truth = shape_series()
    result = clustering.cluster_series(series, 3, method=method, seed=0)
    assert adjusted_rand_score(truth, result.labels) == 1.0
    again = clustering.cluster_series(series, 3, method=method, seed=0)
    assert again.labels.tolist() == result.labels.tolist()
    # canonical order: centroid means increase with the cluster id
    assert np.all(np.diff(result.centroids.mean(axis=1)) >= 0)


def test_kmedoids_is_optimal_on_small_problem():
    from itertools import combinations

    rng = np.random.default_rng(5)
    pts = rng.normal(size=(12, 2))
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    labels, medoids = clustering.kmedoids(dist, 3)
    best = min(dist[:, list(m)].min(axis=1).sum() for m in combinations(range(12), 3))
    assert dist[:, medoids].min(axis=1).sum() == pytest.approx(best)
    assert labels.tolist() == dist[:, medoids].argmin(axis=1).tolist()


def test_select_k_prefers_planted_k():
    series, _ = shape_series()
    # A Sakoe–Chiba band: unconstrained DTW warps "rises to the end" onto "rises, then levels off" so closely that
    # the DTW silhouette prefers k = 2 on these data (measured: 0.88 at k=2 vs 0.55 at k=3; with radius 2–8: k = 3).
    table, results, best_k = clustering.select_k(series, range(2, 6), window=3, progress=False)
    assert best_k == 3
    assert table.columns.tolist()[:3] == ["k", "n_clusters_found", "inertia"]
    assert {"silhouette_dtw", "silhouette_euclidean", "calinski_harabasz", "davies_bouldin"} <= set(table.columns)
    assert table.loc[table["chosen"], "k"].tolist() == [3]


# ----------------------------------------------------------------------------------------------------------------------
# Effects


@pytest.mark.parametrize("name", ["cytotoxic", "cytostatic", "mixed", "no_effect"])
def test_rules_label_prototype_shapes(name):
    x = np.linspace(0, 1, 33)
    curve = 0.05 + 0.9 * SHAPES[name](x)
    assert effects.classify_shape(effects.shape_features(curve)) == name


def test_paper_prototypes_and_noise_guard():
    x = np.arange(33)
    cytotoxic = 0.1 + 0.8 * x / 32  # rises monotonically from ~0.1 to ~0.9
    cytostatic = np.where(x <= 20, 0.1 + 0.6 * x / 20, 0.7 - 0.45 * (x - 20) / 12)  # peak ~0.7 near 20, ends ~0.25
    assert effects.classify_shape(effects.shape_features(cytotoxic)) == "cytotoxic"
    assert effects.classify_shape(effects.shape_features(cytostatic)) == "cytostatic"
    # A rising curve that never leaves NOISE_MULTIPLE × the DMSO noise level is no effect.
    feats = effects.shape_features(0.4 * x / 32)
    assert effects.classify_shape(feats) == "cytotoxic"
    assert effects.classify_shape(feats, noise_level=0.9 * 0.4 / effects.NOISE_MULTIPLE) == "cytotoxic"
    assert effects.classify_shape(feats, noise_level=1.1 * 0.4 / effects.NOISE_MULTIPLE) == "no_effect"


def test_rules_on_demo_plate_shapes():
    """Centroid shapes seen on the rendered demo plates (20 points, in noise units, noise level 1)."""
    x = np.arange(20)
    rise = 1.0 + 8.0 * _smoothstep((x - 3) / 16)  # still gaining over the last third
    # A cytotoxic drug whose dying cells first round up: a quick jump at the start that settles, then the gap
    # widens to the end without reaching the early transient (ends at ~0.85 of its peak).
    transient = np.where(x < 6, 1.0 + 9.0 * _smoothstep(x / 2), 0.0) + np.where(
        x >= 6, 6.0 + 3.0 * (x - 6) / 13, 0.0)
    plateau = 1.0 + 6.0 * _smoothstep((x - 3) / 9)  # rises, then levels off: mixed
    fallen = 1.0 + 5.0 * np.exp(-0.5 * ((x - 10) / 3.5) ** 2)  # rises, then falls back: cytostatic
    regrow = np.where(x < 17, fallen, fallen[16] + 0.4 * (x - 16))  # falls back, then creeps up a little
    flat_high = np.full(20, 1.9)  # a no-effect drug 1.9 × above the DMSO half-vs-half noise (seen on seed 1)

    def label(curve):
        return effects.classify_shape(effects.shape_features(curve), noise_level=1.0)

    feats = effects.shape_features(transient)
    assert feats.peak_position < 0.3 and feats.end_peak_ratio < 0.9  # the peak is the early transient
    assert label(rise) == "cytotoxic"
    assert label(transient) == "cytotoxic"
    assert label(plateau) == "mixed"
    assert label(fallen) == "cytostatic"
    assert label(regrow) == "cytostatic"
    assert label(flat_high) == "no_effect"
    assert label(flat_high + 1.0) != "no_effect"  # 2.9 × noise: beyond the band


def test_mapping_file_json_and_csv(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"0": "no_effect", "1": "cytotoxic"}))
    assert effects.load_mapping(path, 2) == {0: "no_effect", 1: "cytotoxic"}
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        effects.load_mapping(path, 3)
    bad = tmp_path / "m.csv"
    pd.DataFrame(dict(cluster=[0, 1], effect=["no_effect", "toxic"])).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="'toxic'"):
        effects.load_mapping(bad, 2)


def test_score_effects():
    truth = pd.DataFrame(dict(cell_line="C", drug=["a", "b", "c", "d", "DMSO"], concentration_uM=[1.1, 1, 1, 1, 3],
                              effect=["cytotoxic", "cytotoxic", "no_effect", "mixed", "no_effect"]))
    pred = truth.assign(concentration_uM=[1.1000000000000001, 1, 1, 1, 3],
                        effect=["cytotoxic", "cytotoxic", "no_effect", "no_effect", "cytotoxic"])
    score = effects.score_effects(pred, truth)
    assert score["n_scored"] == 4  # DMSO excluded
    assert score["recall"]["cytotoxic"] == 1.0 and score["recall"]["mixed"] == 0.0
    assert score["recall"]["cytostatic"] is None
    assert score["adjusted_rand_index"] == pytest.approx(adjusted_rand_score([0, 0, 1, 2], [0, 0, 1, 1]))


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline


# The pipeline tests use a Sakoe–Chiba radius of 3 (~10 % of the 33-point series). Unconstrained DTW (the paper's,
# window=None) warps "rises to the end" onto "rises, then levels off" closely enough that k-means groups these
# curves by their level rather than their late shape: measured ARI 0.90 on these tables (cytotoxic and mixed
# partly swapped) against 1.0 with radius 3 or 5.
WINDOW = 3


@pytest.fixture(scope="module")
def pipeline_run(plate_tables, tmp_path_factory):
    table, truth = plate_tables
    out = tmp_path_factory.mktemp("temporal")
    features = out / "features.parquet"
    table.to_parquet(features)
    truth_path = out / "ground_truth.csv"
    truth.to_csv(truth_path, index=False)
    summary = run_temporal(features=features, out_dir=out / "run", k_range=(2, 6), window=WINDOW,
                           ground_truth=truth_path, progress=False)
    return out, summary


def test_pipeline_recovers_planted_effects_and_writes_outputs(pipeline_run):
    out, summary = pipeline_run
    run = out / "run"
    for name in ("distances.csv", "series.csv", "clusters.csv", "k_selection.csv", "cluster_effects.csv",
                 "summary.json", "figures/clusters.png", "figures/k_selection.png", "figures/effects_ACHN.png",
                 "figures/effects_HT29.png", "figures/effects_top_concentration.png", "figures/confusion.png",
                 "figures/series_by_truth.png"):
        assert (run / name).is_file(), name
    assert summary["score"]["adjusted_rand_index"] == 1.0
    assert all(r == 1.0 for r in summary["score"]["recall"].values())
    assert summary["score"]["n_scored"] == 2 * len(DRUGS) * len(CONCENTRATIONS)
    assert json.loads((run / "summary.json").read_text())["chosen_k"] == summary["chosen_k"]
    k_sel = pd.read_csv(run / "k_selection.csv")
    assert k_sel["k"].tolist() == [2, 3, 4, 5, 6]
    clusters = pd.read_csv(run / "clusters.csv")
    # controls are clustered too, and noise lands in no_effect
    assert set(clusters.loc[clusters["is_control"], "effect"]) == {"no_effect"}
    assert (clusters["effect"] == clusters["effect_true"]).loc[~clusters["is_control"]].all()


def test_distances_input_gives_the_same_result(pipeline_run):
    out, summary = pipeline_run
    again = run_temporal(distances=out / "run" / "distances.csv", out_dir=out / "from_distances", k_range=(2, 6),
                         window=WINDOW, ground_truth=out / "ground_truth.csv", figures=False, progress=False)
    first = pd.read_csv(out / "run" / "clusters.csv")
    second = pd.read_csv(out / "from_distances" / "clusters.csv")
    pd.testing.assert_frame_equal(first, second)
    assert again["chosen_k"] == summary["chosen_k"]
    assert again["score"] == summary["score"]


def test_mapping_file_overrides_rules(pipeline_run, tmp_path):
    out, summary = pipeline_run
    k = summary["chosen_k"]
    mapping = {str(c): "cytostatic" if c == k - 1 else "no_effect" for c in range(k)}
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(mapping))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing should be silently dropped on this clean input
        result = run_temporal(distances=out / "run" / "distances.csv", out_dir=tmp_path / "mapped", k=k,
                              window=WINDOW, mapping=path, figures=False, progress=False)
    clusters = pd.read_csv(tmp_path / "mapped" / "clusters.csv")
    assert (clusters["effect"] == clusters["cluster"].astype(str).map(mapping)).all()
    shapes = pd.read_csv(tmp_path / "mapped" / "cluster_effects.csv")
    assert set(shapes["effect_source"]) == {"mapping"}
    assert result["cluster_effects"] == mapping
    with pytest.raises(ValueError, match="give k"):
        run_temporal(distances=out / "run" / "distances.csv", out_dir=tmp_path / "x", mapping=path)


def test_cli_runs_with_its_defaults_and_offers_exactly_the_library_choices(pipeline_run, tmp_path, capsys):
    """``evaluate.py temporal`` without --scale runs the default scale (it used to pass None and fail), and its
    --scale/--method choices are the library's (it offered a method 'average' that no code knew)."""
    out, _ = pipeline_run
    spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).resolve().parents[1] / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit):
        cli.main(["temporal", "--help"])
    usage = capsys.readouterr().out
    assert "{" + ",".join(clustering.METHODS) + "}" in usage
    assert set(usage.split("--scale {")[1].split("}")[0].split(",")) == set(curves.SCALES)
    cli.main(["temporal", "--distances", str(out / "run" / "distances.csv"), "--out", str(tmp_path / "cli"),
              "--k", "4", "--window", str(WINDOW), "--method", "average_linkage"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["options"]["scale"] == curves.DEFAULT_SCALE
    assert summary["options"]["method"] == "average_linkage"


def test_rerun_in_the_same_folder_leaves_no_stale_figures(pipeline_run, tmp_path):
    out, _ = pipeline_run
    stale = tmp_path / "rerun" / "figures" / "confusion.png"  # e.g. from an earlier run with --ground-truth
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    result = run_temporal(distances=out / "run" / "distances.csv", out_dir=tmp_path / "rerun", k=4, window=WINDOW,
                          figures=False, progress=False)
    assert not stale.exists()
    assert "figures/confusion.png" not in result["files"]


def test_drug_times_without_a_control_image_nearby_are_flagged():
    table, _ = make_plate_tables(("ACHN",), n_features=8, n_rep=2, n_dmso=4, n_sites=1)
    is_dmso = table["Metadata_Drug"] == "DMSO"
    times = table["Metadata_Time_h"]
    for name, keep in (("control wells stop at 40 h", ~is_dmso | (times < 40)),
                       ("control images missing 20-50 h", ~is_dmso | (times < 20) | (times > 50))):
        with pytest.warns(UserWarning, match="no DMSO image within one control frame interval"):
            curves.distances_from_features(table[keep.to_numpy()], progress=False)
    for floor in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a complete plate, wells imaged a little off the nominal times: silent
            curves.distances_from_features(table, progress=False, paper_faithful=floor)
    gaps = curves.unmatched_control_times([0.1, 2.2, 9.0], [0.0, 2.0, 4.0])
    np.testing.assert_allclose(gaps, [0.0, 0.0, 5.0])


def test_select_k_skips_k_above_the_number_of_distinct_series():
    x = np.linspace(0, 1, 20)
    series = np.stack([x, x, x, 1 - x, 1 - x])  # 2 distinct curves: k-means cannot fill 3 clusters
    table, results, best_k = clustering.select_k(series, range(2, 5), progress=False)
    assert table["k"].tolist() == [2] and best_k == 2
    with pytest.raises(ValueError, match="2 distinct"):
        clustering.select_k(series, [3], progress=False)
    with pytest.raises(RuntimeError, match="2 of them distinct"):
        clustering.kmeans_dtw(series, 3)
