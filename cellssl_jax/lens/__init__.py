"""Morphological analysis with the lens (../shared/docs/original_method.md §6): evaluation of a lens trained by
``train.py --config configs/lens.py``.

- ``evaluate.evaluate_lens``: held-out top-1/top-3 of fresh linear probes with and without the lens, per cell line,
  the authors' comparison statistics, and importance maps scored against a synthetic plate's planted masks.
- ``probe``: the linear probes (the authors' DrugClassifier) and their statistics.
- ``importance``: the altered-morphology maps, their scores against masks, mined examples and figures.
"""

from cellssl_jax.lens.evaluate import evaluate_lens, load_lens

__all__ = ["evaluate_lens", "load_lens"]
