"""Encoders × tasks (../shared/docs/original_method.md §4): the authors' comparison of feature extractors, the
yardstick for ablations of augmentation and crop settings.

- ``evaluate.compare_encoders`` / ``compare_feature_files``: run every task on every encoder and feature mode; write
  tables, figures and ``summary.json``.
- ``selection``: which images each task reads (from metadata).
- ``replicates`` (task A), ``probe`` (task B), ``clustering`` (task C): pure functions on feature arrays.
"""

from cellssl_jax.compare.evaluate import (compare_encoders, compare_feature_files, feature_file_mode, load_encoder,
                                          read_features)

__all__ = ["compare_encoders", "compare_feature_files", "feature_file_mode", "load_encoder", "read_features"]
