"""The benchmark report of one dataset: tables, figures and a self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL
from lingshu.evaluate.perturbation import DISTRIBUTION, read_summary
from lingshu.io import atomic_path, read_table, write_table
from lingshu.report import figures
from lingshu.report.candidates import draw_candidate_screen
from lingshu.report.diagnostics import draw_diagnostics, final_diagnostics, read_diagnostics
from lingshu.report.generation import draw_generation
from lingshu.report.html import render_report
from lingshu.report.screening import draw_screening
from lingshu.report.tables import (
    benchmark_table,
    context_scores,
    full_metrics_table,
    load_ceiling,
    load_per_condition,
    paper_table,
    silent_metrics,
    to_markdown,
)

__all__ = ["build_report"]


def _test_set_size(truth_path: str) -> tuple[int, int, int | None]:
    """(number of test conditions, number of contexts, cells preprocessing dropped for having
    no counts, or None when the truth does not say) of the truth file."""
    truth = ad.read_h5ad(truth_path, backed="r")  # obs only: X stays on disk
    try:
        obs = truth.obs[[CONTEXT_COL, PERT_COL]].astype(str)
        no_counts = truth.uns.get("lingshu", {}).get("n_cells_no_counts")
    finally:
        truth.file.close()
    conditions = obs[obs[PERT_COL] != CONTROL].drop_duplicates()
    return (len(conditions), obs[CONTEXT_COL].nunique(),
            None if no_counts is None else int(no_counts))


def _write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def build_report(
    dataset: str,
    eval_dirs: dict[str, str],
    ceiling_dir: str | None,
    truth_path: str,
    pred_paths: dict[str, str],
    outdir: str,
    benchmark_files: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    features_used: str | None = None,
    generation_dir: str | None = None,
    screening_dir: str | None = None,
    screen_paths: dict[str, str] | None = None,
) -> None:
    """Build the report of one dataset into ``outdir``.

    Args:
        dataset: dataset name (title of the page).
        eval_dirs: run name -> folder written by :func:`lingshu.evaluate.evaluate_to_dir`
            (``per_condition.tsv``, ``summary.json``, ``distribution.tsv``).
        ceiling_dir: folder of the ceiling evaluation (``ceiling=True``), or None.
        truth_path: the truth h5ad (for the test-set size and the delta scatter).
        pred_paths: run name -> prediction h5ad (for the delta scatter).
        outdir: receives ``table.tsv``, ``table.md``, ``full_metrics.tsv``, ``benchmarks.tsv``
            (when benchmark files are given), ``prediction_distribution.tsv``,
            ``figures/*.png``, ``generation/`` (with generation fidelity),
            ``training_diagnostics.tsv`` (models that diagnose their training),
            ``screening.tsv`` (with ``screening_dir``), ``candidate_screen.tsv`` (with
            ``screen_paths``) and ``report.html``.
        benchmark_files: Snakemake ``benchmark:`` TSVs to tabulate (wall time, peak memory).
        n_boot: bootstrap resamples for the 95% intervals (0: none).
        seed: seed of the bootstrap (and of the plot jitter).
        features_used: the features rule's ``features_used.tsv`` (which perturbation features
            each test condition got, the same for every model).
        generation_dir: the ``generation/`` folder of :func:`lingshu.evaluate.generation.
            evaluate_generation` (scores of generation fidelity), or None.
        screening_dir: the folder holding ``screening.tsv`` and ``screening_effects.tsv`` of
            :func:`lingshu.evaluate.screening.screening_job` (the "Screening" section,
            ``screening.tsv`` and ``figures/screening.png``), or None.
        screen_paths: run -> its candidate screen (``screen/<run>.tsv`` of
            :func:`lingshu.evaluate.candidates.candidate_screen_job`): the "Candidate screen"
            section and ``candidate_screen.tsv``; None or empty without a screen.
    """
    out = Path(outdir)
    per_condition = load_per_condition(eval_dirs)
    ceiling = load_ceiling(ceiling_dir)

    table = paper_table(per_condition, ceiling, n_boot=n_boot, seed=seed)
    summaries = {run: read_summary(folder) for run, folder in eval_dirs.items()}
    not_encoded = {run: s.get("not_encoded") or [] for run, s in summaries.items()}
    if any(not_encoded.values()):  # scored on fewer conditions: say so in the table itself
        table["not encoded"] = [len(not_encoded.get(m, [])) if m in not_encoded else None
                                for m in table["model"]]
    full = full_metrics_table(per_condition, ceiling)
    write_table(table, out / "table.tsv")
    _write_text(to_markdown(table), out / "table.md")
    write_table(full, out / "full_metrics.tsv")
    benchmarks = benchmark_table(benchmark_files) if benchmark_files else None
    if benchmarks is not None:
        write_table(benchmarks, out / "benchmarks.tsv")

    fig_dir = out / "figures"
    pngs = [fig_dir / "metric_bars.png", fig_dir / "delta_scatter.png", fig_dir / "per_condition_distributions.png"]
    figures.metric_bars(table, pngs[0])
    figures.delta_scatter(truth_path, pred_paths, pngs[1])
    figures.per_condition_distributions(per_condition, pngs[2], seed=seed)

    n_conditions, n_contexts, n_no_counts = _test_set_size(truth_path)
    features = read_table(features_used) if features_used else None

    # Distribution of the predicted cells of each held-out condition against the real ones
    # (scored by the evaluation), averaged over conditions.
    distribution = pd.DataFrame([
        {"model": run, **read_table(Path(folder) / DISTRIBUTION)
         [["pearson_mean", "mmd", "wasserstein"]].mean().to_dict()}
        for run, folder in eval_dirs.items()])
    write_table(distribution, out / "prediction_distribution.tsv")

    by_context = context_scores(per_condition) if n_contexts > 1 else pd.DataFrame()
    context_png = None
    if len(by_context):
        write_table(by_context, out / "context_scores.tsv")
        context_png = fig_dir / "context_scores.png"
        figures.context_score_bars(by_context, context_png)

    generation = None
    if generation_dir is not None:
        generation = draw_generation(generation_dir, out / "generation", seed=seed)
    screening = draw_screening(screening_dir, out) if screening_dir is not None else None
    candidate_screen = draw_candidate_screen(screen_paths or {}, out)
    diagnostics = read_diagnostics(pred_paths)
    diagnostics_png = None
    if len(diagnostics):
        write_table(diagnostics, out / "training_diagnostics.tsv")
        diagnostics_png = fig_dir / "training_diagnostics.png"
        draw_diagnostics(diagnostics, diagnostics_png)
    sampling = {run: s.get("sampling") or {} for run, s in summaries.items()}
    external = {run: s["external"] for run, s in summaries.items() if s.get("external")}
    page = render_report(dataset, table, full, pngs, n_conditions, n_contexts, benchmarks,
                         features, distribution=distribution, context_scores=by_context,
                         context_png=context_png, generation=generation, sampling=sampling,
                         not_encoded=not_encoded, n_cells_no_counts=n_no_counts,
                         external=external, screening=screening,
                         candidate_screen=candidate_screen,
                         silent=silent_metrics(table, per_condition),
                         diagnostics=(final_diagnostics(diagnostics), diagnostics_png)
                         if diagnostics_png else None)
    _write_text(page, out / "report.html")
