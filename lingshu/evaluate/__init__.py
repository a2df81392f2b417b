"""Evaluation of perturbation predictions with cell-eval (SPEC 2.1)."""

from lingshu.evaluate.perturbation import (
    PAPER_METRICS,
    VCC_METRICS,
    average_score,
    bootstrap_ci,
    ceiling_summary,
    evaluate_predictions,
    evaluate_to_dir,
    read_summary,
    sampler_gene_error,
    sampler_mae_floor,
    summarize,
    vcc_score,
)

__all__ = [
    "PAPER_METRICS",
    "VCC_METRICS",
    "average_score",
    "bootstrap_ci",
    "ceiling_summary",
    "evaluate_predictions",
    "evaluate_to_dir",
    "read_summary",
    "sampler_gene_error",
    "sampler_mae_floor",
    "summarize",
    "vcc_score",
]
