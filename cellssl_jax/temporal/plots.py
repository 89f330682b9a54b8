"""Figures of the temporal analysis (matplotlib, Agg). Each function reads tables/arrays the run wrote and saves
one PNG; none computes anything the CSV files do not hold."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cellssl_jax.temporal.effects import EFFECT_CODES, EFFECTS  # noqa: E402

# The original clustermap's colours (grey/orange/green/red for no effect / mixed / cytostatic / cytotoxic).
EFFECT_COLOURS = {"no_effect": "#b0b0b0", "mixed": "#f39c12", "cytostatic": "#27ae60", "cytotoxic": "#c0392b"}
DPI = 120


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend_handles():
    return [Patch(color=EFFECT_COLOURS[e], label=e.replace("_", " ")) for e in EFFECTS]


def plot_clusters(values: np.ndarray, labels: np.ndarray, centroids: np.ndarray, effects: list[str], path,
                  *, title: str = "", max_members: int = 300, seed: int = 0) -> Path:
    """One panel per cluster: member series (thin, grey; at most ``max_members`` drawn, a seeded sample) and the
    DBA centroid (thick, in the colour of its effect), like the paper's panel A."""
    k = len(centroids)
    ncols = min(4, k)
    nrows = int(np.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    rng = np.random.default_rng(seed)
    x = np.arange(values.shape[1])
    top = max(float(np.percentile(values, 99.5)), float(centroids.max())) * 1.05
    for c in range(nrows * ncols):
        ax = axes.flat[c]
        if c >= k:
            ax.axis("off")
            continue
        members = np.flatnonzero(labels == c)
        shown = rng.choice(members, size=min(len(members), max_members), replace=False) if len(members) else members
        for i in shown:
            ax.plot(x, values[i], color="0.55", lw=0.6, alpha=0.35)
        ax.plot(x, centroids[c], color=EFFECT_COLOURS[effects[c]], lw=2.5)
        ax.set_title(f"cluster {c}: {effects[c].replace('_', ' ')} (n={len(members)})", fontsize=9)
        ax.set_ylim(min(0.0, float(values.min())), top)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("image sequence (post-drug)")
    for ax in axes[:, 0]:
        ax.set_ylabel("scaled distance")
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(title or "DTW clusters: members and centroids", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_k_selection(table: pd.DataFrame, path, *, chosen_k: int | None = None) -> Path:
    """The four model-selection scores against k; the chosen k marked."""
    panels = [("silhouette_dtw", "silhouette (DTW) ↑ — chooses k"),
              ("silhouette_euclidean", "silhouette (Euclidean) ↑"),
              ("calinski_harabasz", "Calinski–Harabasz ↑"),
              ("davies_bouldin", "Davies–Bouldin ↓")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.0))
    for ax, (col, label) in zip(axes, panels):
        ax.plot(table["k"], table[col], "o-", color="#2c3e50")
        if chosen_k is not None and chosen_k in set(table["k"]):
            ax.axvline(chosen_k, color="#c0392b", ls="--", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("k")
        ax.set_xticks(table["k"])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _effect_matrix(table: pd.DataFrame, index: str, columns: str) -> pd.DataFrame:
    return table.pivot(index=index, columns=columns, values="effect")


def _draw_effect_grid(ax, grid: pd.DataFrame, *, annotate: bool = True):
    cmap = ListedColormap([EFFECT_COLOURS[e] for e in EFFECTS])
    codes = grid.apply(lambda col: col.map({e: i for i, e in enumerate(EFFECTS)})).to_numpy(dtype=float)
    ax.imshow(np.ma.masked_invalid(codes), cmap=cmap, vmin=-0.5, vmax=len(EFFECTS) - 0.5, aspect="auto",
              interpolation="nearest")
    if annotate:
        for (r, c), val in np.ndenumerate(grid.to_numpy(dtype=object)):
            if isinstance(val, str):
                ax.text(c, r, EFFECT_CODES[val], ha="center", va="center", fontsize=7, color="black")
    ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index], fontsize=7)
    ax.set_xticks(np.arange(-0.5, grid.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, grid.shape[0]), minor=True)
    ax.grid(which="minor", color="white", lw=0.8)
    ax.tick_params(which="minor", length=0)


def plot_effect_grid(clusters: pd.DataFrame, cell_line: str, path) -> Path:
    """Drug × concentration effects of one cell line, concentrations ranked low → high per drug (the paper's
    panel B); the concentrations of each row are listed at its right."""
    table = clusters[clusters["cell_line"] == cell_line].copy()
    table["conc_rank"] = table.groupby("drug")["concentration_uM"].rank(method="dense").astype(int) - 1
    grid = _effect_matrix(table, "drug", "conc_rank")
    height = max(3.0, 0.3 * len(grid) + 1.4)
    fig, ax = plt.subplots(figsize=(5.5, height))
    _draw_effect_grid(ax, grid)
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], fontsize=8)
    ax.set_xlabel("concentration index (low → high)")
    concs = table.sort_values("concentration_uM").groupby("drug")["concentration_uM"].apply(
        lambda s: ", ".join(f"{v:g}" for v in s))
    for r, drug in enumerate(grid.index):
        ax.text(grid.shape[1] - 0.4, r, f"{concs[drug]} µM", va="center", fontsize=6, color="0.3")
    ax.set_title(f"{cell_line}: effect per drug and concentration", fontsize=10)
    fig.tight_layout()
    fig.legend(handles=_legend_handles(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, frameon=False,
               fontsize=7)
    return _save(fig, path)


def plot_top_concentration_heatmap(clusters: pd.DataFrame, path) -> Path:
    """Cell line × drug effects at each drug's highest concentration (the original's clustermap, unclustered:
    rows and columns are sorted by name so figures of different runs line up)."""
    idx = clusters.groupby(["cell_line", "drug"])["concentration_uM"].idxmax()
    top = clusters.loc[idx]
    grid = _effect_matrix(top, "cell_line", "drug")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * grid.shape[1] + 2.5), max(2.5, 0.3 * grid.shape[0] + 1.8)))
    _draw_effect_grid(ax, grid)
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=70, ha="right", fontsize=7)
    ax.set_title("effect at the highest concentration", fontsize=10)
    ax.legend(handles=_legend_handles(), loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix, labels, path, *, title: str = "") -> Path:
    """Planted (rows) vs recovered (columns) effects, counts with row-normalised shading."""
    matrix = np.asarray(matrix)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (r, c), val in np.ndenumerate(matrix):
        ax.text(c, r, str(val), ha="center", va="center", fontsize=9,
                color="white" if norm[r, c] > 0.6 else "black")
    names = [lab.replace("_", " ") for lab in labels]
    ax.set_xticks(range(len(labels)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), names, fontsize=8)
    ax.set_xlabel("recovered")
    ax.set_ylabel("planted")
    ax.set_title(title or "effects: planted vs recovered", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_series_by_truth(values: np.ndarray, table: pd.DataFrame, noise: np.ndarray, path, *,
                         noise_multiple: float | None = None, title: str = "") -> Path:
    """One panel per planted effect: the scaled series of its conditions (one line style per cell line, coloured by
    the recovered effect) over the DMSO-vs-DMSO noise curves (black, dotted). It answers where effects are lost:
    classes whose curves overlap here cannot be told apart by any clustering of these curves (features or
    distance), while separate curves in a wrong colour point at the clustering or the rules.

    ``values`` (n, L) and ``table`` (n rows with ``cell_line``, ``effect``, ``effect_true``) are the drug series;
    ``noise`` the DMSO noise series; ``noise_multiple`` draws the no-effect band of the rules when given."""
    fig, axes = plt.subplots(1, len(EFFECTS), figsize=(4.0 * len(EFFECTS), 3.2), sharey=True)
    styles = ["-", "--", ":", "-."]
    lines = {c: styles[i % len(styles)] for i, c in enumerate(sorted(table["cell_line"].astype(str).unique()))}
    truth = table["effect_true"].astype(str).to_numpy()
    found = table["effect"].astype(str).to_numpy()
    cells = table["cell_line"].astype(str).to_numpy()
    for ax, effect in zip(axes, EFFECTS):
        members = np.flatnonzero(truth == effect)
        for i in members:
            ax.plot(values[i], lines[cells[i]], color=EFFECT_COLOURS[found[i]], lw=1.0)
        for curve in np.atleast_2d(noise):
            ax.plot(curve, ":", color="black", lw=1.2)
        if noise_multiple is not None and len(noise):
            ax.axhline(noise_multiple * float(np.median(noise)), color="black", lw=0.6, alpha=0.5)
        recall = float((found[members] == effect).mean()) if len(members) else float("nan")
        ax.set_title(f"planted {effect.replace('_', ' ')} (n={len(members)}, recall {recall:.2f})", fontsize=9)
        ax.set_xlabel("series point")
    axes[0].set_ylabel("distance to DMSO (scaled)")
    style_handles = [plt.Line2D([], [], color="black", ls=s, label=c) for c, s in lines.items()]
    fig.legend(handles=_legend_handles() + style_handles, loc="lower center", ncol=len(EFFECTS) + len(lines),
               fontsize=8, title="colour: recovered effect", title_fontsize=8, bbox_to_anchor=(0.5, -0.25))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
