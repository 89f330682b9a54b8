"""Encoder features of a built dataset, to Parquet (one row per image: Metadata_* columns, then f0000…)."""

from cellssl_jax.features.extract import (
    DEFAULT_POOLED_LAYERS,
    FEATURE_MODES,
    extract_features,
    extract_from_checkpoint,
    feature_function,
    feature_names,
    read_feature_metadata,
)

__all__ = ["DEFAULT_POOLED_LAYERS", "FEATURE_MODES", "extract_features", "extract_from_checkpoint",
           "feature_function", "feature_names", "read_feature_metadata"]
