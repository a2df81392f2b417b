"""Generation fidelity in the report (SPEC 2.2): its table as Markdown and its figures.

The scores come from the evaluation (:mod:`lingshu.evaluate.generation`: ``table.tsv``,
``cell_types.tsv``, ``reference.h5ad`` in ``generation/``); :func:`draw_generation` turns them,
with the generated cells, into the UMAP of real vs generated cells, a marker-gene dot plot,
count histograms of a few genes and the fidelity metrics as bars. Each figure function draws
one PNG and writes it atomically (see :func:`lingshu.report.figures._save`)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Snakemake jobs and CI have no display

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from lingshu.evaluate.fidelity import CELL_TYPE, FIDELITY_METRICS  # noqa: E402
from lingshu.evaluate.generation import (  # noqa: E402
    CELL_TYPES,
    INDEPENDENT,
    REAL_FLOOR,
    REAL_REFERENCE,
    REFERENCE,
    TABLE,
    TABLE_COLUMNS,
)
from lingshu.io import atomic_path, read_table  # noqa: E402
from lingshu.report.figures import _colors, _grid, _save  # noqa: E402

REAL = "real"
REAL_COLOR, GENERATED_COLOR = "#444444", "#e4572e"
MAX_BINS = 60  # histogram bins at most (integer-wide bins grow past that)

# column -> (panel title, higher is better)
BAR_METRICS = FIDELITY_METRICS


def _check_inputs(real: ad.AnnData, generated: dict[str, ad.AnnData]) -> None:
    """Same genes in the same order everywhere, and a ``cell_type`` column on every set."""
    if not generated:
        raise ValueError("no generated cells given")
    for name, gen in generated.items():
        if list(gen.var_names) != list(real.var_names):
            raise ValueError(f"generated cells of {name!r} have other genes than the real cells "
                             f"({gen.n_vars} vs {real.n_vars}, or another order); both must "
                             "share one gene list")
    for name, cells in {REAL: real, **generated}.items():
        if CELL_TYPE not in cells.obs:
            raise ValueError(f"the {name!r} cells have no obs[{CELL_TYPE!r}] column")


def _type_colors(types: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(types)}


def _joint(real: ad.AnnData, name: str, gen: ad.AnnData) -> ad.AnnData:
    """Real and generated cells in one AnnData (X log1p, CSR float32), obs ``source`` and
    ``cell_type``."""
    parts = []
    for source, cells in ((REAL, real), (name, gen)):
        obs = pd.DataFrame({"source": source,
                            CELL_TYPE: cells.obs[CELL_TYPE].astype(str).to_numpy()},
                           index=[f"{source}-{i}" for i in range(cells.n_obs)])
        parts.append(ad.AnnData(X=sp.csr_matrix(cells.X, dtype=np.float32), obs=obs))
    joint = ad.concat(parts)
    joint.var_names = real.var_names.astype(str)
    return joint


def umap_real_vs_generated(real: ad.AnnData, generated: dict[str, ad.AnnData],
                           path: str | Path, seed: int = 0) -> None:
    """UMAP of real and generated cells together, one row of two panels per model.

    Parameters
    ----------
    real : AnnData, shape (n_real, n_genes)
        Real cells in log1p space with obs ``cell_type``.
    generated : dict of str to AnnData
        Model name -> its cells (same genes, same order), obs ``cell_type`` = the label the
        real-cell classifier gave them.
    path : str or Path
        The PNG to write.
    seed : int
        ``random_state`` of scanpy's PCA, neighbours and UMAP (and of the drawing order).

    Notes
    -----
    Each model gets its own embedding of the joint set real + that model (PCA with up to 50
    components -> 15-NN graph -> UMAP): left panel coloured by source, right by cell type
    (dots real, crosses generated).
    """
    import scanpy as sc

    _check_inputs(real, generated)
    types = sorted(set(real.obs[CELL_TYPE].astype(str)).union(
        *(set(g.obs[CELL_TYPE].astype(str)) for g in generated.values())))
    type_colors = _type_colors(types)
    fig, axes = _grid(2 * len(generated), 2, (4.6, 4.0))
    for i, (name, gen) in enumerate(generated.items()):
        joint = _joint(real, name, gen)
        n_comps = max(2, min(50, joint.n_obs - 1, joint.n_vars - 1))
        sc.pp.pca(joint, n_comps=n_comps, random_state=seed)
        sc.pp.neighbors(joint, n_neighbors=min(15, joint.n_obs - 1), random_state=seed)
        sc.tl.umap(joint, random_state=seed)
        xy = joint.obsm["X_umap"]
        is_real = (joint.obs["source"] == REAL).to_numpy()
        order = np.random.default_rng(seed).permutation(joint.n_obs)  # no side drawn on top
        ax = axes[2 * i]
        ax.scatter(xy[order, 0], xy[order, 1], s=4, linewidths=0, alpha=0.7,
                   c=np.where(is_real[order], REAL_COLOR, GENERATED_COLOR))
        ax.scatter([], [], s=12, c=REAL_COLOR, label=f"real ({int(is_real.sum())})")
        ax.scatter([], [], s=12, c=GENERATED_COLOR, label=f"{name} ({int((~is_real).sum())})")
        ax.legend(fontsize=7, frameon=False, markerscale=1.5)
        ax.set_title(f"{name}: real vs generated", fontsize=10)
        ax = axes[2 * i + 1]
        labels = joint.obs[CELL_TYPE].astype(str).to_numpy()
        for t in types:
            at = labels == t
            ax.scatter(xy[at & is_real, 0], xy[at & is_real, 1], s=4, color=type_colors[t],
                       linewidths=0, alpha=0.6, label=t)
            ax.scatter(xy[at & ~is_real, 0], xy[at & ~is_real, 1], s=6, color=type_colors[t],
                       marker="x", linewidths=0.6, alpha=0.6)
        ax.legend(fontsize=7, frameon=False, markerscale=2, title="dot real, x generated",
                  title_fontsize=7)
        ax.set_title(f"{name}: cell type", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1", fontsize=7)
        ax.set_ylabel("UMAP 2", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _gene_variance(x) -> np.ndarray:
    """Per-gene variance of dense or sparse ``x`` without densifying it."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        return np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean ** 2
    return np.asarray(x, dtype=np.float64).var(axis=0)


def _markers(real: ad.AnnData, n_markers: int) -> list[str]:
    """Top ``n_markers`` marker genes per cell type of the real cells (scanpy Wilcoxon, types
    with at least 2 cells); the ``3 * n_markers`` most variable genes when fewer than two
    cell types qualify."""
    import scanpy as sc

    types = real.obs[CELL_TYPE].astype(str)
    sizes = types.value_counts()
    usable = sorted(sizes.index[sizes >= 2])
    if len(usable) < 2:
        top = np.argsort(-_gene_variance(real.X), kind="stable")[: 3 * n_markers]
        return [str(g) for g in real.var_names[top]]
    keep = types.isin(usable).to_numpy()
    tmp = ad.AnnData(X=real.X[keep].copy(),
                     obs=pd.DataFrame({CELL_TYPE: pd.Categorical(types[keep])},
                                      index=real.obs_names[keep].astype(str)),
                     var=pd.DataFrame(index=real.var_names.astype(str)))
    sc.tl.rank_genes_groups(tmp, CELL_TYPE, method="wilcoxon", n_genes=n_markers)
    names = tmp.uns["rank_genes_groups"]["names"]
    genes: list[str] = []
    for group in names.dtype.names:
        genes += [str(g) for g in names[group][:n_markers] if str(g) not in genes]
    return genes


def marker_dotplot(real: ad.AnnData, generated: dict[str, ad.AnnData], path: str | Path,
                   n_markers: int = 3) -> None:
    """Marker genes of the real cell types, real cells against each model's cells.

    Parameters
    ----------
    real : AnnData, shape (n_real, n_genes)
        Real cells in log1p space with obs ``cell_type``; the markers are found on them
        (scanpy ``rank_genes_groups``, Wilcoxon; the most variable genes when there is a
        single cell type).
    generated : dict of str to AnnData
        Model name -> its cells, obs ``cell_type`` = the classifier's label.
    path : str or Path
        The PNG to write.
    n_markers : int
        Marker genes per cell type.

    Notes
    -----
    Rows are ``real: <type> (n)`` then ``<model>: <type> (n)`` for each real cell type,
    columns the marker genes; dot size = fraction of cells expressing the gene, colour = mean
    log1p expression.
    """
    _check_inputs(real, generated)
    genes = _markers(real, n_markers)
    gene_idx = real.var_names.get_indexer(genes)
    sets = {REAL: real, **generated}
    types = sorted(set(real.obs[CELL_TYPE].astype(str)))
    rows, frac, mean = [], [], []
    for t in types:
        for name, cells in sets.items():
            at = (cells.obs[CELL_TYPE].astype(str) == t).to_numpy()
            x = cells.X[at][:, gene_idx]
            x = x.toarray() if sp.issparse(x) else np.asarray(x)
            rows.append(f"{name}: {t} ({int(at.sum())})")
            frac.append((x > 0).mean(0) if at.any() else np.zeros(len(genes)))
            mean.append(x.mean(0) if at.any() else np.zeros(len(genes)))
    frac, mean = np.array(frac), np.array(mean)
    fig, ax = plt.subplots(figsize=(2.2 + 0.45 * len(genes), 1.2 + 0.3 * len(rows)))
    yy, xx = np.meshgrid(np.arange(len(rows)), np.arange(len(genes)), indexing="ij")
    dots = ax.scatter(xx.ravel(), yy.ravel(), s=5 + 195 * frac.ravel(), c=mean.ravel(),
                      cmap="Reds", edgecolors="#666666", linewidths=0.3)
    ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlim(-0.6, len(genes) - 0.4)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    for k in range(1, len(types)):
        ax.axhline(k * len(sets) - 0.5, color="#bbbbbb", linewidth=0.6)
    fig.colorbar(dots, ax=ax, shrink=0.6, label="mean log1p(CP10k)")
    for f in (0.25, 0.5, 1.0):  # size legend
        ax.scatter([], [], s=5 + 195 * f, c="white", edgecolors="#666666", linewidths=0.3,
                   label=f"{f:.0%}")
    ax.legend(title="expressing", fontsize=6, title_fontsize=6, frameon=False,
              loc="upper left", bbox_to_anchor=(1.25, 1.0))
    ax.set_title("Marker genes of the real cell types: real vs generated", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _columns(x, idx: list[int]) -> np.ndarray:
    """Dense (n_cells, len(idx)) float64 copy of some columns of dense or sparse ``x``."""
    x = sp.csc_matrix(x)[:, idx].toarray() if sp.issparse(x) else np.asarray(x)[:, idx]
    return np.asarray(x, dtype=np.float64)


def _pick_genes(means: np.ndarray, n_genes: int) -> list[int]:
    """Genes at the 50th, 90th and 99th percentile of the mean and the top gene (for
    ``n_genes=4``; evenly spaced percentiles from the 50th to the top otherwise), distinct."""
    order = np.argsort(means, kind="stable")
    n_genes = max(1, min(int(n_genes), len(order)))
    qs = (0.5, 0.9, 0.99, 1.0)[4 - n_genes:] if n_genes <= 4 else np.linspace(0.5, 1.0, n_genes)
    picks = list(dict.fromkeys(int(order[round(q * (len(order) - 1))]) for q in qs))
    for j in order[::-1]:  # duplicates (few genes): top up with the highest-mean genes
        if len(picks) >= n_genes:
            break
        if int(j) not in picks:
            picks.append(int(j))
    return sorted(picks, key=lambda j: means[j])


def gene_histograms(real_counts, generated_counts: dict, genes, path: str | Path,
                    n_genes: int = 4) -> None:
    """Raw-count histograms of a few genes, real cells against each model.

    Parameters
    ----------
    real_counts : array or sparse matrix, shape (n_real, n_genes_total)
        Raw UMI counts of the real cells.
    generated_counts : dict of str to array or sparse matrix, shape (n_gen, n_genes_total)
        Model name -> raw counts of its cells, same genes in the same order.
    genes : sequence of str, length n_genes_total
        Gene names (panel titles).
    path : str or Path
        The PNG to write.
    n_genes : int
        Panels; with 4, the genes at the 50th, 90th and 99th percentile of the real mean
        count and the highest-mean gene (deterministic).

    Notes
    -----
    Only the chosen columns are densified. Bins are integer-aligned and integer-wide, from 0
    to the largest 99.5th percentile of the sets (at most ``MAX_BINS`` bins; wider bins past
    that); values beyond fall into the last bin. Histograms are density-normalised steps.
    """
    n_total = real_counts.shape[1]
    if len(genes) != n_total:
        raise ValueError(f"{len(genes)} gene names for {n_total} genes of the real counts")
    if not generated_counts:
        raise ValueError("no generated counts given")
    for name, g in generated_counts.items():
        if g.shape[1] != n_total:
            raise ValueError(f"generated counts of {name!r} have {g.shape[1]} genes, the real "
                             f"counts {n_total}; both must share one gene list")
    means = np.asarray(real_counts.mean(axis=0), dtype=np.float64).ravel()
    picks = _pick_genes(means, n_genes)
    real = _columns(real_counts, picks)
    gens = {k: _columns(v, picks) for k, v in generated_counts.items()}
    colors = _colors(list(gens))
    fig, axes = _grid(len(picks), min(len(picks), 4), (3.2, 2.6))
    for col, (ax, j) in enumerate(zip(axes, picks, strict=False)):
        values = [real[:, col]] + [g[:, col] for g in gens.values()]
        top = max(1, math.ceil(max(np.percentile(v, 99.5) for v in values)))
        width = max(1, math.ceil((top + 1) / MAX_BINS))
        n_bins = math.ceil((top + 1) / width)
        bins = np.arange(n_bins + 1) * width - 0.5
        last = bins[-1] - 0.5 * width  # the tail is clipped into the last bin
        ax.hist(np.minimum(values[0], last), bins=bins, density=True, histtype="stepfilled",
                color="#bbbbbb", label="real")
        for name, v in zip(gens, values[1:], strict=True):
            ax.hist(np.minimum(v, last), bins=bins, density=True, histtype="step",
                    linewidth=1.4, color=colors[name], label=name)
        ax.set_title(f"{genes[j]} (real mean {means[j]:.2f})", fontsize=9)
        ax.set_xlabel(f"UMI count (last bin: >= {int(bins[-2] + 0.5)})", fontsize=8)
    axes[0].set_ylabel("density", fontsize=8)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Counts per cell: real vs generated", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def fidelity_bars(table: pd.DataFrame, path: str | Path) -> None:
    """One panel per fidelity metric, one bar per row of ``table``.

    Parameters
    ----------
    table : DataFrame
        Column ``model`` and any of ``pearson_mean``, ``spearman_mean``, ``ilisi`` (higher is
        better) and ``mmd``, ``wasserstein``, ``celltype_tvd`` (lower is better); the panel
        title says which. A missing value draws no bar and is marked ``n/a``.
    path : str or Path
        The PNG to write.
    """
    if "model" not in table:
        raise ValueError("the fidelity table has no 'model' column")
    metrics = [m for m in BAR_METRICS if m in table]
    if not metrics:
        raise ValueError(f"the fidelity table has none of the metric columns {list(BAR_METRICS)}")
    models = table["model"].astype(str).tolist()
    colors = _colors(models)
    fig, axes = _grid(len(metrics), 3, (3.4, 2.8))
    x = np.arange(len(models))
    for ax, metric in zip(axes, metrics, strict=False):
        title, higher = BAR_METRICS[metric]
        values = pd.to_numeric(table[metric], errors="coerce").to_numpy(float)
        ax.bar(x, np.nan_to_num(values), color=[colors[m] for m in models])
        for xi in x[np.isnan(values)]:
            ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, models, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{title}\n({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.axhline(0, color="grey", linewidth=0.5)
    fig.suptitle("Generation fidelity against the reference cells", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ------------------------------------------------------------------------------------------
# The report's section: table and figures from the evaluation's files
# ------------------------------------------------------------------------------------------


def figure_names() -> list[str]:
    """The figure files :func:`draw_generation` writes (when a run generated cells)."""
    return ["fidelity_bars.png", "umap.png", "markers.png", "histograms.png"]


def draw_generation(generation_dir: str | Path, outdir: str | Path,
                    seed: int = 0) -> tuple[pd.DataFrame, list[Path]]:
    """Write ``table.md`` and ``figures/*.png`` of generation fidelity into ``outdir``.

    generation_dir: the ``generation/`` folder (the evaluation's ``table.tsv``,
    ``cell_types.tsv`` and ``reference.h5ad``, and each run's ``<run>.h5ad``).
    Returns the table and the figures written.
    """
    gen_dir, out = Path(generation_dir), Path(outdir)
    table = read_table(gen_dir / TABLE)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(to_markdown(table))
    fig_dir = out / "figures"
    pngs = [fig_dir / "fidelity_bars.png"]
    fidelity_bars(table[table["model"] != REAL_REFERENCE], pngs[0])
    labels = read_table(gen_dir / CELL_TYPES)
    runs = list(dict.fromkeys(labels["run"].astype(str)))
    if runs:
        reference = ad.read_h5ad(gen_dir / REFERENCE)
        generated = {}
        for run in runs:
            cells = ad.read_h5ad(gen_dir / f"{run}.h5ad")
            mine = labels[labels["run"].astype(str) == run].set_index("cell")[CELL_TYPE]
            cells.obs[CELL_TYPE] = pd.Categorical(mine.reindex(cells.obs_names.astype(str))
                                                  .astype(str).to_numpy())
            generated[run] = cells
        pngs += [fig_dir / name for name in figure_names()[1:]]
        umap_real_vs_generated(reference, generated, pngs[1], seed=seed)
        marker_dotplot(reference, generated, pngs[2])
        gene_histograms(reference.layers["counts"],
                        {k: v.layers["counts"] for k, v in generated.items()},
                        reference.var_names.to_numpy(), pngs[3])
    return table, pngs


def to_markdown(table: pd.DataFrame) -> str:
    """The generation table as Markdown in the layout of the paper's Table 1 (best in bold)."""
    models = table[table[list(TABLE_COLUMNS)].notna().any(axis=1)]
    shown = models[["model"]].copy()
    for column, (title, higher) in TABLE_COLUMNS.items():
        values = models[column]
        scored = values[~models["model"].isin([REAL_FLOOR, INDEPENDENT])].dropna()
        best = (scored.idxmax() if higher else scored.idxmin()) if len(scored) else None
        shown[title] = [("**{:.4f}**" if i == best else "{:.4f}").format(v)
                        if np.isfinite(v) else "—" for i, v in values.items()]
    ref = table[table["model"] == REAL_REFERENCE]
    for column, title in (("library_size", "median library size"),
                          ("detected_genes", "detected genes")):
        if column not in table:  # tables written before these columns existed
            continue
        real = float(ref[column].iloc[0]) if len(ref) else np.nan
        head = f"{title} (reference {real:,.0f})" if np.isfinite(real) else title
        shown[head] = [f"{v:,.0f}" if np.isfinite(v) else "—" for v in models[column]]
    shown["cells"] = models["n_cells"].astype(int).astype(str)
    shown["generation (s)"] = [f"{v:.1f}" if np.isfinite(v) else "—"
                               for v in models["generate_seconds"]]
    lines = ["| " + " | ".join(shown.columns) + " |",
             "|" + "|".join("---" for _ in shown.columns) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"
