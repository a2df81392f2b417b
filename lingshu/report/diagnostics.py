"""What the models measured about their own training (Lingshu-Cell's held-out bits per masked
gene beside the per-gene floors), read from their predictions, tabulated and drawn."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pandas as pd

COLUMNS = ["model", "stage", "step", "mask_rate", "bits_model", "bits_marginal", "bits_context"]


def read_diagnostics(pred_paths: dict[str, str]) -> pd.DataFrame:
    """One row per model, training stage, diagnosed step and mask rate (``COLUMNS``).

    Variants of one model share its fit, so each model is read once (from its first run).
    """
    rows, seen = [], set()
    for run, path in pred_paths.items():
        uns = ad.read_h5ad(path, backed="r").uns.get("lingshu", {})
        model = str(uns.get("model", run))
        if model in seen or "diagnostics" not in uns:
            continue
        seen.add(model)
        for stage, stage_rows in json.loads(uns["diagnostics"]).items():
            rows += [{"model": model, "stage": stage, **r} for r in stage_rows]
    return pd.DataFrame(rows, columns=COLUMNS)


def final_diagnostics(table: pd.DataFrame) -> pd.DataFrame:
    """The last diagnosed step of each model and stage, with the model's gain in bits over
    each floor (positive: better than the floor)."""
    if not len(table):
        return table
    last = table.loc[table.groupby(["model", "stage"])["step"].transform("max") == table["step"]]
    last = last.copy()
    last["gain_over_marginal"] = last["bits_marginal"] - last["bits_model"]
    last["gain_over_context"] = last["bits_context"] - last["bits_model"]
    return last.reset_index(drop=True)


def draw_diagnostics(table: pd.DataFrame, png: Path) -> None:
    """Bits per masked gene against training step, one panel per model and stage, one line
    per mask rate; the marginal floor dashed, the per-context floor dotted."""
    import matplotlib.pyplot as plt

    from lingshu.report.figures import _save as save_figure

    panels = list(table.groupby(["model", "stage"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, ((model, stage), part) in zip(axes[0], panels):
        for i, (rate, by_rate) in enumerate(part.groupby("mask_rate")):
            colour = f"C{i}"
            by_rate = by_rate.sort_values("step")
            ax.plot(by_rate["step"], by_rate["bits_model"], "o-", color=colour,
                    label=f"t = {rate:g}")
            ax.axhline(by_rate["bits_marginal"].iloc[0], color=colour, ls="--", lw=1)
            ax.axhline(by_rate["bits_context"].iloc[0], color=colour, ls=":", lw=1)
        ax.set_title(f"{model}: {stage}")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out bits per masked gene")
        ax.legend(fontsize=8, title="mask rate (dashed: marginal, dotted: per context)",
                  title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)
