"""One HTML report from a run folder."""

from cellssl_jax.report.html import write_report

__all__ = ["write_report"]
