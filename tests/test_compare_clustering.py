"""Task C (clustering within cell lines): the sweep on planted structure and on none, the skips, the authors' filter."""

import numpy as np
import pandas as pd
import pytest

from cellssl_jax.compare.clustering import (COLUMNS, cluster_all, cluster_cell_line, paper_filter, plot_clustering,
                                            summarise)

EFFECTS = ("cytotoxic", "cytostatic", "no_effect")


def make_cell_line(rng, *, line="L", n_drugs=6, n_wells=4, n_frames=10, n_features=32, spread=0.5, separation=10.0):
    """Drug rows of one cell line: every drug a Gaussian blob (centres ``separation`` apart on average)."""
    rows, feats = [], []
    for d in range(n_drugs):
        centre = separation * rng.normal(size=n_features) / np.sqrt(2)
        for w in range(n_wells):
            for t in range(n_frames):
                rows.append({"Metadata_CellLine": line, "Metadata_Drug": f"D{d}", "Metadata_Plate": "P1",
                             "Metadata_Well": f"C{d * n_wells + w + 1}", "Metadata_Time_h": 4.0 * t,
                             "Metadata_Effect": EFFECTS[d % 3]})
                feats.append(centre + spread * rng.normal(size=n_features) / np.sqrt(n_features) * 4)
    return np.asarray(feats, np.float32), pd.DataFrame(rows)


@pytest.mark.parametrize("spread", [9.0, 0.5])
def test_separated_drug_blobs_are_found(spread):
    """spread 9: one connected kNN graph, the spectral layout does the work; spread 0.5: the graph falls apart into
    the six drugs, each collapses to a point in the layout, and the authors' CH / DB filters drop those rows."""
    x, meta = make_cell_line(np.random.default_rng(0), spread=spread)
    table = cluster_cell_line(x, meta, min_cluster_sizes=(10, 20, 30))
    assert list(table.columns) == list(COLUMNS) and list(table.mcs) == [10, 20, 30]
    best = table.loc[table.ari_drug.idxmax()]
    assert best.ari_drug > 0.95 and best.n_clusters == 6 and best.noise_pct < 5 and best.silhouette > 0.8
    # six drugs, three planted effects two drugs each: clusters by drug agree only partly with the effects
    assert 0.2 < best.ari_effect < best.ari_drug
    disconnected = table.note.str.contains("not fully connected")
    if spread > 1:
        assert not disconnected[table.ari_drug > 0.95].any()
    else:
        assert disconnected.all() and paper_filter(table).empty


def test_pure_noise_does_not_cluster_by_drug():
    rng = np.random.default_rng(1)
    _, meta = make_cell_line(rng)
    x = rng.normal(size=(len(meta), 32)).astype(np.float32)
    table = cluster_cell_line(x, meta, min_cluster_sizes=(10, 20, 40))
    assert table.n_clusters.notna().all()
    assert table.ari_drug.abs().max() < 0.05 and table.ari_effect.abs().max() < 0.05


def test_min_cluster_size_at_or_above_n_is_skipped_and_recorded():
    x, meta = make_cell_line(np.random.default_rng(2), n_drugs=3, n_wells=2, n_frames=10)  # 60 points
    table = cluster_cell_line(x, meta, min_cluster_sizes=(10, 60, 70)).set_index("mcs")
    assert table.loc[10, "n_clusters"] >= 1
    for mcs in (60, 70):
        assert np.isnan(table.loc[mcs, "n_clusters"]) and np.isnan(table.loc[mcs, "silhouette"])
        assert table.loc[mcs, "note"].startswith("skipped") and "60 points" in table.loc[mcs, "note"]


def test_collapsed_encoder_finds_nothing_and_row_order_cannot_leak():
    rng = np.random.default_rng(3)
    _, meta = make_cell_line(rng)
    collapsed = cluster_cell_line(np.ones((len(meta), 8), np.float32), meta, min_cluster_sizes=(10, 40))
    assert (collapsed.n_clusters == 0).all() and (collapsed.noise_pct == 100).all()
    assert (collapsed.silhouette == -1).all() and (collapsed.ari_drug == 0).all()
    assert paper_filter(collapsed).empty
    # many exact duplicates (4 distinct vectors for 240 rows, unrelated to the drugs): ties must not follow row order
    x = rng.normal(size=(4, 8))[np.arange(len(meta)) % 4].astype(np.float32)
    table = cluster_cell_line(x, meta, min_cluster_sizes=(10, 40))
    assert table.ari_drug.abs().max() < 0.05


def test_same_seed_same_sweep():
    x, meta = make_cell_line(np.random.default_rng(4), spread=3.0)
    first = cluster_cell_line(x, meta, min_cluster_sizes=(10, 30), seed=7)
    pd.testing.assert_frame_equal(first, cluster_cell_line(x, meta, min_cluster_sizes=(10, 30), seed=7))


def test_cluster_all_loops_cell_lines_and_one_line_means_one():
    rng = np.random.default_rng(5)
    xa, ma = make_cell_line(rng, line="A", n_drugs=3)
    xb, mb = make_cell_line(rng, line="B", n_drugs=3)
    x, meta = np.concatenate([xb, xa]), pd.concat([mb, ma], ignore_index=True)
    table = cluster_all(x, meta.drop(columns="Metadata_Effect"), min_cluster_sizes=(10, 20))
    assert list(table.cell_line) == ["A", "A", "B", "B"] and list(table.mcs) == [10, 20, 10, 20]
    assert table.ari_effect.isna().all() and (table.ari_drug > 0.9).all()
    with pytest.raises(ValueError, match="one cell line"):
        cluster_cell_line(x, meta)


def test_paper_filter_rules():
    base = dict(n_clusters=5, noise_pct=10.0, silhouette=0.4, calinski_harabasz=500.0, davies_bouldin=0.8)
    cases = {
        "kept": {},
        "noise 33.9 (int 33) kept": dict(noise_pct=33.9),
        "noise 34 dropped": dict(noise_pct=34.0),
        "silhouette failed": dict(silhouette=-1.0),
        "CH too high": dict(calinski_harabasz=10000.0),
        "CH at 9999 kept": dict(calinski_harabasz=9999.0),
        "DB too low": dict(davies_bouldin=0.32),
        "DB failed": dict(davies_bouldin=-1.0),
        "skipped": dict(n_clusters=np.nan, noise_pct=np.nan, silhouette=np.nan, calinski_harabasz=np.nan,
                        davies_bouldin=np.nan),
    }
    df = pd.DataFrame([{"case": name, **base, **change} for name, change in cases.items()])
    assert list(paper_filter(df).case) == ["kept", "noise 33.9 (int 33) kept", "CH at 9999 kept"]


def test_summarise_by_hand():
    df = pd.DataFrame({"n_clusters": [3, 4, 5, 2], "noise_pct": [10.0, 20.0, 0.0, 90.0],
                       "silhouette": [0.2, 0.5, 0.8, 0.9], "calinski_harabasz": [100.0, 200.0, 400.0, 50.0],
                       "davies_bouldin": [2.0, 1.0, 0.5, 1.0], "ari_drug": [0.1, 0.2, 0.6, 0.0],
                       "ari_effect": [np.nan] * 4})
    out = summarise({"m": df}).set_index("measure")  # the last row goes (90 % noise)
    assert (out.n_kept == 3).all() and (out.n_rows == 4).all()
    assert out.loc["silhouette", "median"] == pytest.approx(0.5)
    assert out.loc["silhouette", "mad"] == pytest.approx(0.2)
    assert out.loc["inv_davies_bouldin", "median"] == pytest.approx(1.0)
    assert out.loc["inv_davies_bouldin", "mad"] == pytest.approx((2 / 3 + 1 / 6 + 5 / 6) / 3)
    assert out.loc["not_noise_pct", "median"] == pytest.approx(90.0)
    assert np.isnan(out.loc["ari_effect", "median"])


def test_bad_inputs_are_named():
    x, meta = make_cell_line(np.random.default_rng(6), n_drugs=2)
    with pytest.raises(ValueError, match="Metadata_Drug"):
        cluster_cell_line(x, meta.drop(columns="Metadata_Drug"))
    bad = x.copy()
    bad[11, 0] = np.inf
    with pytest.raises(ValueError, match="row 11"):
        cluster_cell_line(bad, meta)
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        cluster_cell_line(x[:, 0], meta)
    with pytest.raises(ValueError, match="Metadata_Effect is missing at row 2"):
        cluster_cell_line(x, meta.assign(Metadata_Effect=meta.Metadata_Effect.where(meta.index != 2)))


def test_plot_clustering_writes_a_png(tmp_path):
    x, meta = make_cell_line(np.random.default_rng(8), spread=6.0)
    table = cluster_cell_line(x, meta, min_cluster_sizes=(10, 20, 30))
    path = plot_clustering({"a": table, "b": table.iloc[:0]}, tmp_path / "clustering.png", apply_filter=False)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_knn_table_gives_sklearns_own_graph_and_embedding():
    """The one-search shortcut must be the graph and layout SpectralEmbedding(nearest_neighbors) makes itself."""
    from sklearn.manifold import SpectralEmbedding
    from sklearn.neighbors import NearestNeighbors

    from cellssl_jax.compare.clustering import knn_graph

    x = np.random.default_rng(9).normal(size=(150, 12))
    neighbours = NearestNeighbors(n_neighbors=40).fit(x).kneighbors(x, return_distance=False)
    for k in (10, 25):
        own = SpectralEmbedding(n_components=2, affinity="nearest_neighbors", n_neighbors=k, random_state=0)
        layout = own.fit_transform(x)
        assert abs(knn_graph(neighbours, k) - own.affinity_matrix_).max() == 0
        ours = SpectralEmbedding(n_components=2, affinity="precomputed", random_state=0).fit_transform(
            knn_graph(neighbours, k))
        np.testing.assert_allclose(ours, layout, atol=1e-8)
