"""The encoder comparison as a training-time evaluator (big_vision's habit: evaluators named in ``config.evals``,
run by the one training loop on a schedule).

    python train.py --config configs/ablation.py:aug_one,demo --workdir runs/ablation/aug_one \
        --config.evals.compare.every_steps=20

Every ``every_steps`` steps (and at the last) the loop hands the current ConvAE parameters to ``CompareEvaluator.run``:
the features of the images the tasks read (selected once, from the dataset's manifest), then the three tasks, with
tables and figures under ``<workdir>/evals/compare/step_<N>/`` and the figures that mean something for one encoder
alone (ours: replicate / other-drug distance, held-out balanced accuracy and F1, ARI against drugs and planted
effects; the authors' training accuracy) returned as scalars, which the loop writes to metrics.jsonl and TensorBoard as
``eval/compare/<mode>/<figure>``. The authors' similarity and strategy scores are relative to the encoders compared
together, so they are left to ``evaluate.py compare`` over the finished runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax

from cellssl_jax.compare.evaluate import check_modes, compare_feature_files, extract_selected
from cellssl_jax.compare.selection import select_compare_rows

# Summary columns → short scalar names (the ones that stand alone for a single encoder).
SCALARS = {
    "replicate/other distance (euclidean, median)": "replicate_other_ratio",
    "probe test balanced accuracy (val-chosen, mean over cell lines)": "probe_test_balanced_accuracy",
    "probe test F1": "probe_test_f1",
    "clustering ARI vs planted effect (best mcs)": "ari_effect",
    "clustering ARI vs drug (best mcs)": "ari_drug",
    "authors: probe train accuracy (median, lr > 0.01)": "authors_probe_train_accuracy",
}


class CompareEvaluator:
    """``run(params, model, out_dir) -> {name: float}``; the image selection is made once, at construction."""

    def __init__(self, dataset_dir: str | Path, *, every_steps: int, modes: Sequence[str] = ("pooled",),
                 batch_size: int = 128, seed: int = 0):
        from data_pipelines.source import load_dataset_manifest, readable_rows

        if every_steps < 1:
            raise ValueError(f"evals.compare.every_steps must be >= 1 to run, got {every_steps}")
        self.dataset_dir, self.every_steps = Path(dataset_dir), int(every_steps)
        self.modes, self.batch_size, self.seed = check_modes(modes), int(batch_size), int(seed)
        self.selection = select_compare_rows(readable_rows(load_dataset_manifest(dataset_dir)), seed=seed)

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every_steps == 0 or step == total_steps

    def run(self, params, model, out_dir: str | Path) -> dict[str, float]:
        files = extract_selected(params, model, self.dataset_dir, out_dir, self.selection, name="run",
                                 modes=self.modes, batch_size=self.batch_size, progress=False,
                                 description="training-time evaluation")
        if jax.process_index() != 0:  # only process 0 wrote the feature files
            return {}
        summary = compare_feature_files({"run": files}, out_dir, seed=self.seed, progress=False)
        return {f"{row['mode']}/{short}": float(row[column])
                for row in summary["table"] for column, short in SCALARS.items()}
