"""Clustering of distance-to-control series under DTW, and the choice of k.

Three methods, all on our DTW kernels (``cellssl_jax.temporal.dtw``), all deterministic for a given seed:

- ``kmeans_dtw``: k-means with DTW assignments and DBA barycentres, the semantics of the paper's
  ``tslearn.clustering.TimeSeriesKMeans(metric="dtw")``: k-means++ seeding with ``2 + int(log k)`` local trials on
  squared DTW, ``max_iter=50``, ``tol=1e-6`` on the inertia (mean squared DTW to the assigned centre), ``n_init=1``,
  a restart on an empty cluster (up to 10 attempts), and after the loop a last assignment to the final centres.
  Note on ``max_iter_barycenter``: tslearn exposes it (default 100) but for ``metric="dtw"`` never passes it to
  DBA, which then runs its own default of 30 iterations with ``tol=1e-5``; our defaults are those 30 / 1e-5, so the
  results match tslearn's (checked in the tests on the same seed).
- ``kmedoids``: PAM (greedy BUILD, then steepest-descent SWAP) on the precomputed DTW matrix.
- ``average_linkage``: scipy's UPGMA on the precomputed DTW matrix, cut at k clusters.

Every result is relabelled canonically (clusters ordered by the mean of their centroid, lowest first), so cluster
ids do not depend on the method's internal order and a hand-made mapping file stays valid across re-runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from cellssl_jax.temporal import dtw

log = logging.getLogger(__name__)

METHODS = ("kmeans", "kmedoids", "average_linkage")
# tslearn's DBA defaults, which TimeSeriesKMeans(metric="dtw") actually uses (see the module docstring).
DBA_MAX_ITER = 30
DBA_TOL = 1e-5
# tslearn retries an initialisation that leaves a cluster empty, up to max(n_init, 10) attempts.
MAX_INIT_ATTEMPTS = 10


@dataclass
class ClusterResult:
    """``labels[i]`` is the cluster of series i; ``centroids[c]`` the DBA barycentre of cluster c."""

    method: str
    k: int
    labels: np.ndarray  # (n,) int
    centroids: np.ndarray  # (k, L)
    medoids: np.ndarray | None = None  # (k,) series index per cluster (k-medoids, linkage)
    inertia: float = float("nan")  # mean squared DTW to the assigned centroid
    n_iter: int = 0


class EmptyClusterError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# DBA and k-means


def dba(series: np.ndarray, init: np.ndarray, *, max_iter: int = DBA_MAX_ITER, tol: float = DBA_TOL,
        window: int | None = None) -> np.ndarray:
    """DTW barycentre averaging (Petitjean et al. 2011) of ``series`` (m, L) starting from ``init`` (L,).

    Each iteration aligns every series to the barycentre with ``dtw.warping_path`` and replaces each barycentre
    point by the mean of the series points aligned to it. Stops when the mean squared DTW cost changes by less than
    ``tol``, or (like tslearn) as soon as it increases; the barycentre of that last update is returned.
    """
    series = np.asarray(series, dtype=np.float64)
    bary = np.array(init, dtype=np.float64, copy=True)
    length = len(bary)
    cost_prev = np.inf
    for _ in range(max_iter):
        sums = np.zeros(length)
        counts = np.zeros(length)
        cost = 0.0
        for x in series:
            path, dist = dtw.warping_path(x, bary, window=window)
            path = np.asarray(path)
            sums += np.bincount(path[:, 1], weights=x[path[:, 0]], minlength=length)
            counts += np.bincount(path[:, 1], minlength=length)
            cost += dist * dist
        cost /= len(series)
        bary = sums / counts
        if abs(cost_prev - cost) < tol:
            break
        if cost_prev < cost:
            log.debug("DBA cost increased (%.6g -> %.6g); stopping", cost_prev, cost)
            break
        cost_prev = cost
    return bary


def kmeans_plusplus(series: np.ndarray, k: int, rng: np.random.RandomState, *, window: int | None = None
                    ) -> np.ndarray:
    """k-means++ seeding on squared DTW, greedy with ``2 + int(log k)`` local trials (tslearn / scikit-learn)."""
    n = len(series)
    n_local_trials = 2 + int(np.log(k))
    centers = np.empty((k, series.shape[1]))
    centers[0] = series[rng.randint(n)]
    closest = dtw.cross_distance(centers[:1], series, window=window)[0] ** 2
    potential = closest.sum()
    for c in range(1, k):
        rand_vals = rng.random_sample(n_local_trials) * potential
        candidates = np.searchsorted(np.cumsum(closest, dtype=np.float64), rand_vals)
        np.clip(candidates, None, n - 1, out=candidates)
        cand_dist = dtw.cross_distance(series[candidates], series, window=window) ** 2
        np.minimum(closest, cand_dist, out=cand_dist)
        potentials = cand_dist.sum(axis=1)
        best = int(np.argmin(potentials))
        potential, closest = potentials[best], cand_dist[best]
        centers[c] = series[candidates[best]]
    return centers


def _assign(series: np.ndarray, centers: np.ndarray, window: int | None) -> tuple[np.ndarray, float]:
    dist = np.asarray(dtw.cross_distance(series, centers, window=window))
    labels = dist.argmin(axis=1)
    inertia = float((dist[np.arange(len(series)), labels] ** 2).sum() / len(series))
    return labels, inertia


def _kmeans_one_init(series, k, rng, *, max_iter, tol, window, max_iter_barycenter, barycenter_tol):
    centers = kmeans_plusplus(series, k, rng, window=window)
    old_inertia = np.inf
    it = 0
    for it in range(max_iter):
        labels, inertia = _assign(series, centers, window)
        if np.bincount(labels, minlength=k).min() == 0:
            raise EmptyClusterError
        for c in range(k):
            centers[c] = dba(series[labels == c], centers[c], max_iter=max_iter_barycenter, tol=barycenter_tol,
                             window=window)
        if abs(old_inertia - inertia) < tol:
            break
        old_inertia = inertia
    return centers, inertia, it + 1


def kmeans_dtw(series: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 50, tol: float = 1e-6,
               n_init: int = 1, max_iter_barycenter: int = DBA_MAX_ITER, barycenter_tol: float = DBA_TOL,
               window: int | None = None) -> ClusterResult:
    """k-means under DTW with DBA barycentres (tslearn ``TimeSeriesKMeans(metric="dtw")`` semantics).

    ``seed`` seeds one ``numpy.random.RandomState`` used for every draw, as tslearn's ``random_state`` does: with
    the same seed both make the same k-means++ choices.
    """
    series = np.ascontiguousarray(series, dtype=np.float64)
    if not 1 <= k <= len(series):
        raise ValueError(f"k = {k} with {len(series)} series")
    rng = np.random.RandomState(seed)
    best = None
    successes = attempts = 0
    while successes < n_init and attempts < max(n_init, MAX_INIT_ATTEMPTS):
        attempts += 1
        try:
            centers, inertia, n_iter = _kmeans_one_init(
                series, k, rng, max_iter=max_iter, tol=tol, window=window,
                max_iter_barycenter=max_iter_barycenter, barycenter_tol=barycenter_tol)
        except EmptyClusterError:
            log.info("k-means (k=%d): empty cluster, restarting (attempt %d)", k, attempts)
            continue
        successes += 1
        if best is None or inertia < best[1]:
            best = (centers.copy(), inertia, n_iter)
    if best is None:
        n_distinct = len(np.unique(series, axis=0))
        raise RuntimeError(f"k-means (k={k}) left a cluster empty in all {attempts} attempts ({len(series)} series, "
                           f"{n_distinct} of them distinct)")
    centers, inertia, n_iter = best
    labels, _ = _assign(series, centers, window)  # tslearn's last assignment to the final centres
    return ClusterResult("kmeans", k, labels, centers, inertia=inertia, n_iter=n_iter)


# ----------------------------------------------------------------------------------------------------------------------
# Methods on the precomputed DTW matrix


def kmedoids(dist: np.ndarray, k: int, *, max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """PAM on a square distance matrix: greedy BUILD, then SWAP taking the best (medoid, non-medoid) exchange
    while it lowers the total distance. Deterministic (ties to the lowest index). Returns (labels, medoids).

    The swap gain of every pair is computed at once: for a candidate h and medoid i, the new cost of point j is
    ``min(D[j,h], near[j])`` unless j belongs to i, where it is ``min(D[j,h], second[j])``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    n = len(dist)
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} with {n} series")
    medoids = [int(np.argmin(dist.sum(axis=0)))]
    near = dist[:, medoids[0]].copy()
    for _ in range(1, k):
        gain = np.maximum(near[:, None] - dist, 0.0).sum(axis=0)
        gain[medoids] = -np.inf
        h = int(np.argmax(gain))
        medoids.append(h)
        np.minimum(near, dist[:, h], out=near)
    medoids = np.array(medoids)
    scale = max(float(dist.max()), 1e-300)
    for _ in range(max_iter):
        to_medoids = dist[:, medoids]  # (n, k)
        order = np.argsort(to_medoids, axis=1, kind="stable")
        nearest = order[:, 0]
        near = to_medoids[np.arange(n), nearest]
        second = to_medoids[np.arange(n), order[:, 1]] if k > 1 else np.full(n, np.inf)
        a = np.minimum(dist - near[:, None], 0.0)  # (j, h): change of j if h is added, its medoid kept
        b = np.minimum(dist, second[:, None]) - near[:, None]  # (j, h): change of j if its own medoid leaves
        member = np.zeros((k, n))
        member[nearest, np.arange(n)] = 1.0
        delta = a.sum(axis=0)[None, :] + member @ (b - a)  # (i, h)
        delta[:, medoids] = np.inf
        i, h = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if delta[i, h] >= -1e-12 * scale:
            break
        medoids[i] = h
    labels = np.argmin(dist[:, medoids], axis=1)
    return labels, medoids


def average_linkage(dist: np.ndarray, k: int) -> np.ndarray:
    """Average-linkage (UPGMA) hierarchical clustering of a square distance matrix, cut into at most k clusters."""
    dist = np.asarray(dist, dtype=np.float64)
    if len(dist) < 2:
        return np.zeros(len(dist), dtype=int)
    tree = linkage(squareform(dist, checks=False), method="average")
    labels = fcluster(tree, t=k, criterion="maxclust") - 1
    return np.unique(labels, return_inverse=True)[1]


def cluster_medoids(dist: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each cluster, the member with the smallest summed distance to the other members."""
    medoids = []
    for c in range(labels.max() + 1):
        members = np.flatnonzero(labels == c)
        medoids.append(members[np.argmin(dist[np.ix_(members, members)].sum(axis=1))])
    return np.array(medoids)


def _with_barycentres(method, series, dist, labels, medoids, window) -> ClusterResult:
    """Centroids of a matrix-based clustering: DBA barycentres of the members, started from the medoid."""
    k = int(labels.max()) + 1
    centroids = np.stack([dba(series[labels == c], series[medoids[c]], window=window) for c in range(k)])
    per_series = np.asarray(dtw.cross_distance(series, centroids, window=window))[np.arange(len(series)), labels]
    return ClusterResult(method, k, labels, centroids, medoids=medoids, inertia=float((per_series ** 2).mean()))


def canonical_order(result: ClusterResult) -> ClusterResult:
    """Relabel clusters by increasing centroid mean (stable), so ids do not depend on the method's order."""
    order = np.argsort(result.centroids.mean(axis=1), kind="stable")
    new_id = np.empty_like(order)
    new_id[order] = np.arange(len(order))
    return ClusterResult(result.method, result.k, new_id[result.labels], result.centroids[order],
                         medoids=None if result.medoids is None else result.medoids[order],
                         inertia=result.inertia, n_iter=result.n_iter)


def cluster_series(series: np.ndarray, k: int, *, method: str = "kmeans", dist: np.ndarray | None = None,
                   window: int | None = None, seed: int = 0) -> ClusterResult:
    """Cluster ``series`` (n, L) into k groups with ``method``; ``dist`` (the DTW matrix) for the matrix methods."""
    series = np.ascontiguousarray(series, dtype=np.float64)
    if method == "kmeans":
        result = kmeans_dtw(series, k, seed=seed, window=window)
    elif method in ("kmedoids", "average_linkage"):
        if dist is None:
            dist = np.asarray(dtw.distance_matrix(series, window=window))
        if method == "kmedoids":
            labels, medoids = kmedoids(dist, k)
        else:
            labels = average_linkage(dist, k)
            medoids = cluster_medoids(dist, labels)
        result = _with_barycentres(method, series, dist, labels, medoids, window)
    else:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {METHODS}")
    return canonical_order(result)


# ----------------------------------------------------------------------------------------------------------------------
# Choosing k


def selection_metrics(series: np.ndarray, dist: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Silhouette on the DTW matrix (what we choose k by), and the original's Euclidean silhouette,
    Calinski–Harabasz and Davies–Bouldin on the scaled series. NaN where a score is undefined (one cluster)."""
    n_labels = len(np.unique(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return dict(silhouette_dtw=np.nan, silhouette_euclidean=np.nan, calinski_harabasz=np.nan,
                    davies_bouldin=np.nan)
    return dict(
        silhouette_dtw=float(silhouette_score(dist, labels, metric="precomputed")),
        silhouette_euclidean=float(silhouette_score(series, labels, metric="euclidean")),
        calinski_harabasz=float(calinski_harabasz_score(series, labels)),
        davies_bouldin=float(davies_bouldin_score(series, labels)),
    )


def select_k(series: np.ndarray, k_values, *, method: str = "kmeans", dist: np.ndarray | None = None,
             window: int | None = None, seed: int = 0, progress: bool = True
             ) -> tuple[pd.DataFrame, dict[int, ClusterResult], int]:
    """Cluster for each k; returns (metrics table, results by k, the k with the best DTW silhouette).

    Ties in the DTW silhouette go to the smaller k.
    """
    from tqdm.auto import tqdm

    series = np.ascontiguousarray(series, dtype=np.float64)
    if dist is None:
        dist = np.asarray(dtw.distance_matrix(series, window=window))
    rows, results = [], {}
    # k-means cannot fill more clusters than there are distinct series (identical series share every centre)
    n_distinct = len(np.unique(series, axis=0)) if method == "kmeans" else len(series)
    for k in tqdm(list(k_values), desc=f"{method} over k", disable=not progress):
        if k > len(series):
            log.warning("skipping k=%d: only %d series", k, len(series))
            continue
        if k > n_distinct:
            log.warning("skipping k=%d: only %d distinct series of %d", k, n_distinct, len(series))
            continue
        res = cluster_series(series, k, method=method, dist=dist, window=window, seed=seed)
        results[k] = res
        rows.append(dict(k=k, n_clusters_found=len(np.unique(res.labels)), inertia=res.inertia,
                         **selection_metrics(series, dist, res.labels)))
    if not rows:
        raise ValueError(f"no k in {list(k_values)} fits {len(series)} series ({n_distinct} distinct)")
    table = pd.DataFrame(rows)
    scores = table["silhouette_dtw"].to_numpy()
    best_k = int(table["k"].iloc[int(np.nanargmax(scores))]) if np.isfinite(scores).any() else int(table["k"].iloc[0])
    table["chosen"] = table["k"] == best_k
    return table, results, best_k
