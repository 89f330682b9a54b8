"""DTW kernels (cellssl_jax/temporal/dtw.py) against dtaidistance, tslearn and a plain-numpy reference.

Every comparison runs on random data with unequal lengths, so the 8-lane all-pairs kernel sees chunks whose lanes
differ in both lengths and bands (its padded and masked paths), not only the uniform case.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from scipy.spatial.distance import squareform

from cellssl_jax.temporal import dtw
from cellssl_jax.temporal import dtw_reference as ref

TOL = 1e-9
WINDOWS = [None, 0, 3]  # radius r; dtaidistance's window is r + 1, tslearn's sakoe_chiba_radius is r


def _random_series(rng, count, low, high, d=None):
    lengths = rng.integers(low, high + 1, count)
    shape = (lambda n: (n,)) if d is None else (lambda n: (n, d))
    # Random walks: neighbouring values are correlated as in real profiles, so warping matters.
    return [np.cumsum(rng.standard_normal(shape(n)), axis=0) for n in lengths]


def _assert_close(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)


@pytest.fixture(scope="module")
def univariate():
    return _random_series(np.random.default_rng(0), 23, 4, 40)


@pytest.fixture(scope="module")
def multivariate():
    return _random_series(np.random.default_rng(1), 17, 3, 30, d=3)


def _dtai_window(radius):
    return None if radius is None else radius + 1


def _tslearn_band(radius):
    return {} if radius is None else dict(global_constraint="sakoe_chiba", sakoe_chiba_radius=radius)


# ---- plain reference -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS)
def test_matches_plain_reference_on_small_pairs(window):
    rng = np.random.default_rng(7)
    for d in (None, 2):
        series = _random_series(rng, 6, 1, 12, d=d)
        for a in series:
            for b in series:
                assert dtw.dtw_distance(a, b, window=window) == pytest.approx(ref.dtw(a, b, window), rel=TOL, abs=TOL)


def test_equal_series_have_zero_distance_and_radius_zero_is_euclidean():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(30), rng.standard_normal(30)
    assert dtw.dtw_distance(a, a) == 0.0
    assert dtw.dtw_distance(a, b, window=0) == pytest.approx(np.linalg.norm(a - b), rel=1e-12)
    assert dtw.dtw_distance(a, b) <= dtw.dtw_distance(a, b, window=2) <= dtw.dtw_distance(a, b, window=0)


# ---- dtaidistance ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS)
def test_univariate_matches_dtaidistance(univariate, window):
    from dtaidistance import dtw as dtai

    theirs = dtai.distance_matrix_fast(univariate, window=_dtai_window(window))
    ours = dtw.distance_matrix(univariate, window=window)
    upper = np.triu_indices(len(univariate), 1)
    _assert_close(ours[upper], theirs[upper])
    for a, b in [(0, 1), (2, 5), (7, 3)]:
        expected = dtai.distance(univariate[a], univariate[b], window=_dtai_window(window), use_c=True)
        assert dtw.dtw_distance(univariate[a], univariate[b], window=window) == pytest.approx(expected, rel=TOL)


@pytest.mark.parametrize("window", WINDOWS)
def test_multivariate_matches_dtaidistance(multivariate, window):
    from dtaidistance import dtw_ndim

    theirs = dtw_ndim.distance_matrix_fast(multivariate, window=_dtai_window(window))
    ours = dtw.distance_matrix(multivariate, window=window)
    upper = np.triu_indices(len(multivariate), 1)
    _assert_close(ours[upper], theirs[upper])
    expected = dtw_ndim.distance(multivariate[0], multivariate[4], window=_dtai_window(window), use_c=True)
    assert dtw.dtw_distance(multivariate[0], multivariate[4], window=window) == pytest.approx(expected, rel=TOL)
    wide = _random_series(np.random.default_rng(8), 11, 5, 25, d=16)  # the benchmark's d, odd and even loops
    theirs = dtw_ndim.distance_matrix_fast(wide, window=_dtai_window(window))
    upper = np.triu_indices(len(wide), 1)
    _assert_close(dtw.distance_matrix(wide, window=window)[upper], theirs[upper])


# ---- tslearn -----------------------------------------------------------------------------------------------------

@pytest.mark.slow  # tslearn's own numba kernels compile on first use (tens of seconds on a busy machine)
@pytest.mark.parametrize("window", [None, 3])
def test_matches_tslearn(univariate, multivariate, window):
    from tslearn.metrics import cdist_dtw
    from tslearn.metrics import dtw as tslearn_dtw

    _assert_close(dtw.cross_distance(univariate[:9], univariate[9:], window=window),
                  cdist_dtw(univariate[:9], univariate[9:], **_tslearn_band(window)))
    for a, b in [(0, 1), (5, 2)]:
        expected = tslearn_dtw(multivariate[a], multivariate[b], **_tslearn_band(window))
        assert dtw.dtw_distance(multivariate[a], multivariate[b], window=window) == pytest.approx(expected, rel=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 3])
def test_warping_path_is_tslearns_path(univariate, multivariate, window):
    from tslearn.metrics import dtw_path

    for a, b in [(univariate[0], univariate[1]), (univariate[4], univariate[9]), (multivariate[2], multivariate[3])]:
        path, dist = dtw.warping_path(a, b, window=window)
        their_path, their_dist = dtw_path(a, b, **_tslearn_band(window))
        assert dist == pytest.approx(their_dist, rel=TOL)
        assert ref.path_cost(a, b, np.asarray(their_path)) == pytest.approx(dist, rel=TOL)
        np.testing.assert_array_equal(path, np.asarray(their_path))


# ---- warping path ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS)
def test_warping_path_is_a_valid_monotone_path_with_the_distance_as_cost(univariate, multivariate, window):
    for a, b in [(univariate[3], univariate[8]), (univariate[8], univariate[3]), (multivariate[1], multivariate[6])]:
        path, dist = dtw.warping_path(a, b, window=window)
        n, m = len(a), len(b)
        assert path.dtype == np.int64 and path.shape[1] == 2
        assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (n - 1, m - 1)
        steps = {tuple(s) for s in np.diff(path, axis=0)}
        assert steps <= {(0, 1), (1, 0), (1, 1)}
        assert ref.band_mask(n, m, window)[path[:, 0], path[:, 1]].all()
        assert dist == dtw.dtw_distance(a, b, window=window)
        assert ref.path_cost(a, b, path) == pytest.approx(dist, rel=TOL)


# ---- matrix layouts and blocking ---------------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS)
def test_matrix_layouts_blocks_and_threads_agree(univariate, window):
    full = dtw.distance_matrix(univariate, window=window)
    assert np.array_equal(full, full.T)
    assert np.all(np.diag(full) == 0.0)
    assert np.all(full[~np.eye(len(full), dtype=bool)] > 0)
    condensed = dtw.distance_matrix(univariate, window=window, condensed=True)
    assert condensed.shape == (len(univariate) * (len(univariate) - 1) // 2,)
    assert np.array_equal(condensed, squareform(full, checks=False))
    assert np.array_equal(dtw.distance_matrix(univariate, window=window, block_size=3), full)
    assert np.array_equal(dtw.distance_matrix(univariate, window=window, block_size=5, condensed=True), condensed)
    assert np.array_equal(dtw.distance_matrix(univariate, window=window, parallel=False), full)


@pytest.mark.parametrize("window", [None, 3])
def test_threaded_kernel_equals_single_thread(univariate, multivariate, window, monkeypatch):
    # Small jobs run on one thread by design; lift the threshold so both threads share these.
    serial = [dtw.distance_matrix(s, window=window, parallel=False) for s in (univariate, multivariate)]
    monkeypatch.setattr(dtw, "_SERIAL_BELOW_CELLS", 0)
    assert numba.get_num_threads() >= 2 or numba.config.NUMBA_NUM_THREADS < 2
    for series, expected in zip((univariate, multivariate), serial):
        assert np.array_equal(dtw.distance_matrix(series, window=window), expected)
        assert np.array_equal(dtw.distance_matrix(series, window=window, block_size=11), expected)


def test_every_entry_point_gives_identical_distances(univariate, multivariate):
    for series in (univariate, multivariate):
        full = dtw.distance_matrix(series, window=2)
        pairwise = np.array([[dtw.dtw_distance(a, b, window=2) for b in series] for a in series])
        np.fill_diagonal(pairwise, 0.0)
        assert np.array_equal(full, pairwise)
        cross = dtw.cross_distance(series[:5], series, window=2, block_size=7)
        assert np.array_equal(cross, full[:5])


@pytest.mark.parametrize("window", [None, 0, 1, 4])
def test_multivariate_two_row_sweep_on_short_and_mixed_lengths(window):
    # The multivariate lane kernel runs two rows per sweep until the first lane ends, then one row at a time; lengths
    # 1-13 in one chunk give odd and even row counts, lanes that end on either row of a pair, and bands of every width.
    rng = np.random.default_rng(11)
    series = _random_series(rng, 19, 1, 13, d=5)
    full = dtw.distance_matrix(series, window=window)
    pairwise = np.array([[dtw.dtw_distance(a, b, window=window) for b in series] for a in series])
    np.fill_diagonal(pairwise, 0.0)
    assert np.array_equal(full, pairwise)
    expected = np.array([[ref.dtw(a, b, window) for b in series] for a in series])
    np.fill_diagonal(expected, 0.0)
    _assert_close(full, expected)


def test_array_inputs_equal_list_inputs():
    rng = np.random.default_rng(4)
    uni = rng.standard_normal((9, 21))
    multi = rng.standard_normal((9, 21, 4))
    assert np.array_equal(dtw.distance_matrix(uni), dtw.distance_matrix(list(uni)))
    assert np.array_equal(dtw.distance_matrix(multi, window=1), dtw.distance_matrix(list(multi), window=1))
    assert np.array_equal(dtw.distance_matrix(uni[:, :, None]), dtw.distance_matrix(uni))


def test_degenerate_collections():
    assert dtw.distance_matrix([]).shape == (0, 0)
    assert dtw.distance_matrix([np.arange(3.0)]).tolist() == [[0.0]]
    assert dtw.distance_matrix([np.arange(3.0)], condensed=True).shape == (0,)
    assert dtw.cross_distance([np.arange(3.0)], []).shape == (1, 0)


# ---- lower bound and nearest neighbour ---------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS)
def test_lb_keogh_matches_reference_and_bounds_dtw(univariate, multivariate, window):
    for series in (univariate, multivariate):
        for a in series[:6]:
            for b in series[6:12]:
                bound = dtw.lb_keogh(a, b, window=window)
                assert bound == pytest.approx(ref.lb_keogh(a, b, window), rel=TOL, abs=TOL)
                assert bound <= dtw.dtw_distance(a, b, window=window) * (1 + 1e-12)


@pytest.mark.parametrize("window", [None, 5])
def test_nearest_neighbour_equals_brute_force_and_prunes(window):
    rng = np.random.default_rng(5)
    database = _random_series(rng, 200, 40, 60)
    for trial in range(5):
        target = database[rng.integers(len(database))]
        query = target + 0.3 * rng.standard_normal(len(target))
        brute = np.array([dtw.dtw_distance(query, s, window=window) for s in database])
        found = dtw.nearest_neighbour_search(query, database, window=window)
        assert found.index == int(np.argmin(brute))
        assert found.distance == brute.min()
        assert dtw.nearest_neighbour(query, database, window=window) == (found.index, found.distance)
        assert found.candidates == len(database)
        # A noisy copy of a random walk is far closer to its source than to the others, so LB_Keogh prunes many
        # candidates: most with a band, fewer without one (the envelope is then the query's global min and max).
        assert found.dtw_evaluations < {None: 0.75, 5: 0.1}[window] * len(database), found


def test_nearest_neighbour_ties_go_to_the_lowest_index():
    rng = np.random.default_rng(6)
    database = _random_series(rng, 30, 10, 20)
    database[17] = database[4].copy()
    query = database[4] + 0.01
    assert dtw.nearest_neighbour(query, database, window=2)[0] == 4


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_culprit():
    good = np.arange(5.0)
    with pytest.raises(ValueError, match=r"series\[2\] has a non-finite value"):
        dtw.distance_matrix([good, good, np.array([1.0, np.nan])])
    with pytest.raises(ValueError, match=r"series\[1\] has a non-finite value"):
        dtw.distance_matrix(np.stack([good, good + np.inf]))
    with pytest.raises(ValueError, match=r"series\[1\] has 3 dimensions"):
        dtw.distance_matrix([np.zeros((4, 2)), np.zeros((4, 3))])
    with pytest.raises(ValueError, match="b has 2"):
        dtw.dtw_distance(np.zeros(4), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="empty"):
        dtw.dtw_distance(np.zeros(0), good)
    with pytest.raises(ValueError, match="window"):
        dtw.dtw_distance(good, good, window=-1)
    with pytest.raises(ValueError, match="window"):
        dtw.distance_matrix([good, good], window=1.5)
