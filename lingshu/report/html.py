"""The report page: one self-contained HTML file (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from lingshu.evaluate.perturbation import PAPER_METRICS
from lingshu.models.spec import all_specs, parse_run
from lingshu.report.candidates import candidate_screen_html
from lingshu.report.screening import screening_html
from lingshu.report.tables import (
    AVERAGE_RANK,
    AVERAGE_SCORE,
    CEILING_ROW,
    VCC_SCORE,
    best_models,
    display_table,
)

METRIC_NOTES = {
    "DES": "Differential-expression overlap: of the top-k DE genes of the prediction (k = number "
    "of true DEGs, padj < 0.05, Wilcoxon + BH via pdex), the fraction that are true DEGs "
    "(cell-eval overlap_at_N). Higher is better.",
    "PDS": "Perturbation discrimination: 1 - normalised rank of the true perturbation among all "
    "real perturbation effects, by L1 distance to the predicted effect "
    "(discrimination_score_l1). Higher is better; 0.5 is chance.",
    "MAE": "Mean absolute error between predicted and real pseudobulks (mae). Lower is better.",
    "Spearman #DEG": "Spearman correlation, across all test conditions, of the number of DEGs "
    "called in the real vs the predicted cells (from de_nsig_counts). Higher is better.",
    "Spearman LFC": "Spearman correlation of log fold changes on the true DEGs "
    "(de_spearman_lfc_sig). Higher is better.",
    "AUPRC": "Area under the precision-recall curve of recovering the true DEGs from the "
    "prediction's DE p-values (pr_auc). Higher is better.",
    "Pearson-delta": "Pearson correlation of the predicted and real change from the control "
    "pseudobulk (pearson_delta). Higher is better.",
}
SCORE_NOTES = (
    "<b>Average score</b>: per metric the improvement over control_mean, MAE as (b - m) / b, the "
    "others as (m - b) / (1 - b), each clipped at 0 (undefined = 0), then averaged over the seven "
    "metrics. <b>VCC score</b>: the same over DES, PDS and MAE against perturbation_mean. "
    "<b>Average rank</b>: mean of the seven per-metric ranks (undefined values rank last). "
    "Brackets: 95% bootstrap interval over test conditions (resampled within each context); "
    "parentheses: rank among models. The <b>data ceiling</b> is cell-eval's split-half estimate "
    "of the best score the data allow (Spearman-Brown corrected); for MAE it is the MAE a model "
    "expects that samples each held-out condition's own distribution, as many cells as the "
    "truth holds (a model that predicts each condition's true mean expects 1/&radic;2 of it, "
    "so a mean-predicting baseline can score below it)."
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
tr.ceiling td { font-style: italic; color: #555; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
dt { font-weight: bold; margin-top: 0.4em; }
"""


def _embed(png: Path) -> str:
    """An <img> whose source is the PNG itself, so the page stands alone."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">'


def paper_table_html(table: pd.DataFrame) -> str:
    """The paper table as HTML, the best model(s) per column in bold, the ceiling row in
    italics."""
    shown = display_table(table)
    best = best_models(table)
    header = "".join(f"<th>{html.escape(c)}</th>" for c in shown.columns)
    rows = []
    for _, row in shown.iterrows():
        cells = []
        for column in shown.columns:
            text = html.escape(str(row[column]))
            if column != "model" and row["model"] in best.get(column, ()):
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        css = ' class="ceiling"' if row["model"] == CEILING_ROW else ""
        rows.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _frame_html(frame: pd.DataFrame, digits: int = 3) -> str:
    """A plain numeric table (full metrics, resources) as HTML."""
    return frame.to_html(index=False, float_format=lambda v: f"{v:.{digits}f}", na_rep="—", border=0)


def external_note(external: dict) -> str:
    """The line about predictions made outside the pipeline (a ``kind: external`` entry): the
    entry's note, else where they were read from."""
    source = external.get("source") or "a file"
    return external.get("note") or f"predictions made outside this pipeline, read from {source}"


def run_note(run: str, sampling: dict | None = None, external: dict | None = None) -> str:
    """The report's line about a run: its model's note (from the model's spec), and for a
    sampling variant (``<model>@<variant>``) the sampling settings it was predicted with;
    for predictions made outside the pipeline (``external``: their source and note, from the
    evaluation's summary), :func:`external_note`."""
    if external is not None:
        return external_note(external)
    model, variant = parse_run(run)
    spec = all_specs().get(model)
    note = spec.note if spec is not None else "a model this version of the benchmark does not know"
    if variant is not None:
        settings = ", ".join(f"{k} = {v}" for k, v in sorted((sampling or {}).items()))
        note = (f"{model}'s fitted model sampled with other settings (variant {variant!r}: "
                f"{settings or 'the model defaults'}). {note}")
    return note


def _notes_html(models: list[str], sampling: dict[str, dict] | None = None,
                external: dict[str, dict] | None = None) -> str:
    """Definitions of the metrics, the scores and the models of this report."""
    metrics = "".join(
        f"<dt>{html.escape(label)} <code>{html.escape(column)}</code></dt><dd>{html.escape(METRIC_NOTES[label])}</dd>"
        for label, column in PAPER_METRICS.items()
    )
    baselines = "".join(
        f"<dt>{html.escape(name)}</dt><dd>"
        f"{html.escape(run_note(name, (sampling or {}).get(name), (external or {}).get(name)))}</dd>"
        for name in models
    )
    return (
        f"<h2>Metrics</h2><dl>{metrics}</dl><p>{SCORE_NOTES}</p>"
        f"<h2>Models</h2><dl>{baselines}</dl>"
    )


def _ceiling_sentence(table: pd.DataFrame) -> str:
    """One line quoting the ceiling of the metrics where it is defined."""
    ceiling = table[table["model"] == CEILING_ROW]
    if ceiling.empty:
        return "<p>The data ceiling was not estimated for this run.</p>"
    parts = [
        f"{label} {ceiling[label].iloc[0]:.3f}"
        for label in PAPER_METRICS
        if pd.notna(ceiling[label].iloc[0])
    ]
    return f"<p><b>Data ceiling</b>: {html.escape(', '.join(parts) or 'undefined for every metric')}.</p>"


GENERATION_NOTES = (
    "Each generative model samples cells <b>unconditionally</b> (Lingshu-Cell: its pre-trained "
    "unconditional model, 256 unmasking steps, no guidance; scLDM: its latent flow model under "
    "the null condition), as many as the split's <b>reference cells</b>: real cells of training "
    "conditions that no model trained on. Everything is on log1p(CP10k). <b>Pearson / "
    "Spearman</b>: of the per-gene means. <b>MMD</b>: squared maximum mean discrepancy with a "
    "5-scale Gaussian kernel (base bandwidth = mean squared pairwise distance, multiplier 2) in "
    "a PCA fitted on real and generated cells together; lower is better. <b>1-Wasserstein</b>: "
    "per gene, averaged over genes; lower is better. <b>iLISI</b>: local inverse Simpson index "
    "of real vs generated in that PCA, median, scaled to 0 (no mixing) .. 1 (perfect mixing). "
    "<b>Cell-type TVD</b>: total-variation distance between the cell-type proportions of "
    "the generated cells and of the reference cells, both as judged by one classifier (PCA + "
    "logistic regression) trained on other real training cells, so that its errors cancel; "
    "<code>share</code> columns give the proportions. The <b>real (training cells)</b> row scores an equally large sample of real "
    "training cells: the floor that sampling noise sets at this number of cells. The "
    "<b>independent genes</b> row scores cells whose every gene is drawn on its own from the "
    "training cells: each gene's distribution exactly and no dependence between genes. A model "
    "that does no better on a metric has learnt none of the gene-gene dependence it measures "
    "(for the cell-type shares: which type a cell is)."
)


def _context_html(scores: pd.DataFrame | None, png: Path | None) -> str:
    if scores is None or not len(scores):
        return ""
    figure = _embed(png) if png is not None and png.exists() else ""
    return (
        "<h2>Held-out conditions per context (identity x perturbation)</h2>"
        "<p>The paper's average score (against control_mean of the same context) over each "
        "context's held-out conditions: which cell types or donors a model transfers "
        "perturbation responses to.</p>" + _frame_html(scores) + figure
    )


def _distribution_html(distribution: pd.DataFrame | None) -> str:
    if distribution is None or not len(distribution):
        return ""
    return (
        "<h2>Distribution of the predicted cells</h2>"
        "<p>Per held-out condition, the predicted cells against the real ones (generation-"
        "fidelity metrics, see below), averaged over conditions: Pearson of gene means (higher "
        "is better), MMD in a joint PCA and mean per-gene 1-Wasserstein (lower is better). "
        "Models that output one mean profile per condition have no spread and score poorly on "
        "MMD and 1-Wasserstein by construction.</p>" + _frame_html(distribution, 4)
    )


def _generation_html(generation: tuple[pd.DataFrame, list[Path]] | None) -> str:
    if generation is None:
        return ""
    table, pngs = generation
    return (
        "<h2>Generation fidelity (layout of the paper's Table 1)</h2>"
        f"<p>{GENERATION_NOTES}</p>" + _frame_html(table, 4) + "".join(_embed(p) for p in pngs)
    )


def _diagnostics_html(diagnostics: tuple[pd.DataFrame, Path] | None) -> str:
    if diagnostics is None:
        return ""
    table, png = diagnostics
    return (
        "<h2>Training diagnostics: held-out bits per masked gene</h2>"
        "<p>The model fills in the genes of the split's reference cells (never trained on) "
        "masked at fixed rates t; its cross-entropy on the masked genes, in bits per gene, at "
        "the last diagnosed step of each training stage, beside two floors on the same genes: "
        "each gene's own token distribution in the training cells (<code>bits_marginal</code>: "
        "a model that does not beat it has learned no gene-gene dependency) and the same per "
        "context (<code>bits_context</code>: what knowing the cell type alone is worth). A "
        "positive gain is bits saved over the floor. <code>training_diagnostics.tsv</code> "
        "holds every diagnosed step.</p>" + _frame_html(table, 4) + _embed(png)
    )


def _silent_html(silent: dict[str, str] | None) -> str:
    """The metrics that do not separate the models on this dataset, and why."""
    if not silent:
        return ""
    by_reason: dict[str, list[str]] = {}
    for label, why in silent.items():
        by_reason.setdefault(why, []).append(label)
    items = "; ".join(f"<b>{html.escape(', '.join(labels))}</b>: {html.escape(why)}"
                      for why, labels in by_reason.items())
    return (f"<p>Metrics that do not separate the models here (they still count in the "
            f"average rank, as a tie): {items}.</p>")


def _not_encoded_html(not_encoded: dict[str, list[dict]] | None) -> str:
    rows = [{"model": run, **c} for run, conditions in (not_encoded or {}).items()
            for c in conditions]
    if not rows:
        return ""
    return (
        "<p><b>Conditions a model could not encode</b> (they have no predicted cells; that "
        "model's scores average its other conditions, and the table's <code>not encoded</code> "
        "column counts them):</p>" + _frame_html(pd.DataFrame(rows))
    )


def render_report(
    dataset: str,
    table: pd.DataFrame,
    full_metrics: pd.DataFrame,
    figures: list[Path],
    n_conditions: int,
    n_contexts: int,
    benchmarks: pd.DataFrame | None = None,
    features_used: pd.DataFrame | None = None,
    distribution: pd.DataFrame | None = None,
    context_scores: pd.DataFrame | None = None,
    context_png: Path | None = None,
    generation: tuple[pd.DataFrame, list[Path]] | None = None,
    sampling: dict[str, dict] | None = None,
    diagnostics: tuple[pd.DataFrame, Path] | None = None,
    not_encoded: dict[str, list[dict]] | None = None,
    n_cells_no_counts: int | None = None,
    external: dict[str, dict] | None = None,
    screening: dict | None = None,
    candidate_screen: pd.DataFrame | None = None,
    silent: dict[str, str] | None = None,
) -> str:
    """The whole page as a string.

    Args:
        dataset: dataset name for the title.
        table: :func:`lingshu.report.tables.paper_table`.
        full_metrics: :func:`lingshu.report.tables.full_metrics_table`.
        figures: PNG files to embed, in order.
        n_conditions / n_contexts: size of the test set.
        benchmarks: :func:`lingshu.report.tables.benchmark_table`, or None.
        features_used: per test condition, the source of the perturbation features every
            model was given (``file``, ``target_pca``, ``unknown``), or None.
        distribution: per model, the mean over test conditions of the distribution metrics of
            its predicted cells against the real ones (pearson_mean, mmd, wasserstein).
        context_scores / context_png: average score per held-out context and model, and its
            figure (datasets with several contexts).
        generation: (table, figures) of generation fidelity, or None.
        sampling: run -> the sampling settings it was predicted with (named in the notes of
            sampling variants).
        diagnostics: (last diagnosed step per model and stage, its figure) of the models that
            diagnose their training, or None.
        not_encoded: run -> the conditions (context, perturbation, reason) its model could
            not encode.
        n_cells_no_counts: cells preprocessing dropped for having no counts (None: unknown).
        external: run -> source, sha256 and note of predictions made outside the pipeline
            (``kind: external`` entries), printed in the notes instead of a spec's note.
        screening: what :func:`lingshu.report.screening.draw_screening` returns (the
            "Screening" section), or None.
        candidate_screen: every run's candidate screen
            (:func:`lingshu.report.candidates.draw_candidate_screen`), or None without one.
        silent: paper metric -> why it does not separate the models here
            (:func:`lingshu.report.tables.silent_metrics`), said under the table.
    """
    models = [m for m in table["model"] if m != CEILING_ROW]
    title = f"lingshu-bench: {dataset}"
    scores_note = ""
    if table[AVERAGE_SCORE].isna().all() or table[VCC_SCORE].isna().all():
        scores_note = (
            "<p>An empty average score or VCC score means its baseline (control_mean / "
            "perturbation_mean) was not among the evaluated models.</p>"
        )
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Dataset <b>{html.escape(dataset)}</b>: {n_conditions} test conditions in "
        f"{n_contexts} context(s). Models: {html.escape(', '.join(models))}. Metrics by "
        "cell-eval on log1p(CP10k) expression, real control cells in every prediction; each "
        "metric is averaged per context, then over contexts."
        + (f" Preprocessing dropped {n_cells_no_counts:,} cell(s) without any count (no "
           "log1p(CP10k) profile)." if n_cells_no_counts else "") + "</p>",
        "<h2>Results (layout of the paper's Table 2)</h2>",
        paper_table_html(table),
        f"<p>Best model per column in bold; {html.escape(AVERAGE_RANK)} lower is better.</p>",
        _silent_html(silent),
        scores_note,
        _not_encoded_html(not_encoded),
        _ceiling_sentence(table),
        "<h2>Figures</h2>",
        *(_embed(f) for f in figures),
        _context_html(context_scores, context_png),
        screening_html(screening, _embed),
        candidate_screen_html(candidate_screen),
        _distribution_html(distribution),
        _generation_html(generation),
        _diagnostics_html(diagnostics),
        _notes_html(models, sampling, external),
        "<h2>Every cell-eval metric (mean over conditions)</h2>",
        f"<details><summary>show</summary>{_frame_html(full_metrics)}</details>",
    ]
    if features_used is not None and len(features_used):
        unknown = int((features_used["source"] == "unknown").sum())
        sections += [
            "<h2>Perturbation features given to the models</h2>",
            f"<p>{unknown} of {len(features_used)} test conditions were predicted without "
            "target information (<code>unknown</code>: no feature-table row and no target gene in "
            "the panel); <code>target_pca</code>: the target genes' loadings on the top "
            "principal components of the training cells; <code>file</code>: the configured "
            "feature table. Perturbations seen in other contexts are also known by identity.</p>",
            f"<details><summary>show</summary>{_frame_html(features_used)}</details>",
        ]
    if benchmarks is not None and len(benchmarks):
        sections += [
            "<h2>Compute: wall time, CPU time and peak memory per job</h2>",
            "<p>Wall time and peak memory from Snakemake's <code>benchmark:</code> files. CPU "
            "time sums user and system time over the job's processes, as the job itself counted "
            "it (the usage line at the end of its log; <code>cpu_from</code>: job log) or, for "
            "a job without one, as Snakemake sampled it (which misses what ran after its last "
            "sample). GPU time is not recorded (a GPU job holds its GPU for its wall time).</p>",
            _frame_html(benchmarks.rename(columns={"wall_s": "wall time (s)", "cpu_s": "CPU time (s)",
                                                   "max_rss_mb": "peak RSS (MB)"}), 1),
        ]
    body = "\n".join(s for s in sections if s)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )
