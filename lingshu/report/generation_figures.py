"""Figures of generation fidelity: UMAP of real vs generated cells, marker-gene dot plot,
count histograms of a few genes, and the fidelity metrics as bars. Each function writes one
PNG atomically (see :func:`lingshu.report.figures._save`)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu.report.figures import _colors, _grid, _save

CELL_TYPE = "cell_type"
REAL = "real"


def _check_genes(real: ad.AnnData, generated: dict[str, ad.AnnData]) -> None:
    for name, gen in generated.items():
        if list(gen.var_names) != list(real.var_names):
            raise ValueError(f"generated cells of {name!r} have other genes than the real cells "
                             f"({gen.n_vars} vs {real.n_vars}); both must share one gene list")


def _joint(real: ad.AnnData, generated: dict[str, ad.AnnData]) -> ad.AnnData:
    """Real and generated cells in one AnnData (X log1p), obs ``source`` and ``cell_type``."""
    parts = []
    for name, cells in {REAL: real, **generated}.items():
        obs = pd.DataFrame({"source": name, CELL_TYPE: cells.obs[CELL_TYPE].astype(str).to_numpy()},
                           index=[f"{name}-{i}" for i in range(cells.n_obs)])
        parts.append(ad.AnnData(X=sp.csr_matrix(cells.X, dtype=np.float32), obs=obs))
    joint = ad.concat(parts)
    joint.var_names = real.var_names.astype(str)
    return joint


def umap_real_vs_generated(real: ad.AnnData, generated: dict[str, ad.AnnData],
                           path: str | Path, seed: int = 0) -> None:
    """One row per model: its cells and the real ones on a UMAP of the two together, coloured
    by source and by cell type (real: annotated; generated: the classifier's label)."""
    import scanpy as sc

    _check_genes(real, generated)
    fig, axes = _grid(2 * len(generated), 2, (4.6, 4.0))
    types = sorted(set(real.obs[CELL_TYPE].astype(str)).union(
        *(set(g.obs[CELL_TYPE].astype(str)) for g in generated.values())))
    type_colors = dict(zip(types, plt.get_cmap("tab10")(np.arange(len(types)) % 10),
                           strict=True))
    for i, (name, gen) in enumerate(generated.items()):
        joint = _joint(real, {name: gen})
        n_comps = max(2, min(50, joint.n_obs - 1, joint.n_vars - 1))
        sc.pp.pca(joint, n_comps=n_comps, random_state=seed)
        sc.pp.neighbors(joint, n_neighbors=min(15, joint.n_obs - 1), random_state=seed)
        sc.tl.umap(joint, random_state=seed)
        xy = joint.obsm["X_umap"]
        is_real = (joint.obs["source"] == REAL).to_numpy()
        order = np.random.default_rng(seed).permutation(joint.n_obs)  # no side drawn on top
        ax = axes[2 * i]
        colors = np.where(is_real[order], "#444444", "#e4572e")
        ax.scatter(xy[order, 0], xy[order, 1], s=4, c=colors, linewidths=0, alpha=0.7)
        ax.scatter([], [], s=12, c="#444444", label=f"real ({int(is_real.sum())})")
        ax.scatter([], [], s=12, c="#e4572e", label=f"{name} ({int((~is_real).sum())})")
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
    fig.tight_layout()
    _save(fig, path)


def _markers(real: ad.AnnData, n_markers: int) -> list[str]:
    """Top marker genes per cell type of the real cells (Wilcoxon); the most variable genes
    when there is a single cell type."""
    import scanpy as sc

    types = real.obs[CELL_TYPE].astype(str)
    if types.nunique() < 2:
        x = real.X.toarray() if sp.issparse(real.X) else np.asarray(real.X)
        top = np.argsort(-x.var(axis=0), kind="stable")[: 3 * n_markers]
        return [str(g) for g in real.var_names[top]]
    tmp = ad.AnnData(X=real.X.copy(), obs=pd.DataFrame({CELL_TYPE: pd.Categorical(types)},
                                                       index=real.obs_names),
                     var=pd.DataFrame(index=real.var_names.astype(str)))
    sc.tl.rank_genes_groups(tmp, CELL_TYPE, method="wilcoxon", n_genes=n_markers)
    names = tmp.uns["rank_genes_groups"]["names"]
    genes: list[str] = []
    for group in names.dtype.names:
        genes += [str(g) for g in names[group][:n_markers] if str(g) not in genes]
    return genes


def marker_dotplot(real: ad.AnnData, generated: dict[str, ad.AnnData], path: str | Path,
                   n_markers: int = 3) -> None:
    """Marker genes of the real cell types: per cell type, real and each model's cells (by
    the classifier's label); dot size = fraction of cells expressing, colour = mean log1p."""
    _check_genes(real, generated)
    genes = _markers(real, n_markers)
    gene_idx = [real.var_names.get_loc(g) for g in genes]
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
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(genes), 0.9 + 0.32 * len(rows)))
    yy, xx = np.meshgrid(np.arange(len(rows)), np.arange(len(genes)), indexing="ij")
    dots = ax.scatter(xx.ravel(), yy.ravel(), s=10 + 190 * frac.ravel(), c=mean.ravel(),
                      cmap="Reds", edgecolors="#666", linewidths=0.3)
    ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.invert_yaxis()
    for k in range(1, len(types)):
        ax.axhline(k * len(sets) - 0.5, color="#bbb", linewidth=0.6)
    fig.colorbar(dots, ax=ax, shrink=0.6, label="mean log1p(CP10k)")
    ax.set_title("Marker genes of the real cell types: real vs generated\n"
                 "(dot size: fraction of cells expressing)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def gene_histograms(real_counts, generated_counts: dict, genes, path: str | Path,
                    n_genes: int = 4) -> None:
    """Raw-count histograms of a few genes, real against each model: the genes at the 50th,
    90th and 99th percentile of the real mean count and the highest-mean gene."""
    real = real_counts.toarray() if sp.issparse(real_counts) else np.asarray(real_counts)
    gens = {k: (v.toarray() if sp.issparse(v) else np.asarray(v))
            for k, v in generated_counts.items()}
    for name, g in gens.items():
        if g.shape[1] != real.shape[1]:
            raise ValueError(f"generated counts of {name!r} have {g.shape[1]} genes, the real "
                             f"counts {real.shape[1]}")
    means = real.mean(0)
    order = np.argsort(means, kind="stable")
    picks = [order[int(q * (len(order) - 1))] for q in (0.5, 0.9, 0.99)] + [order[-1]]
    picks = list(dict.fromkeys(picks))[:n_genes]
    colors = _colors(list(gens))
    fig, axes = _grid(len(picks), len(picks), (3.2, 2.6))
    for ax, j in zip(axes, picks, strict=False):
        top = max([np.percentile(real[:, j], 99.5)]
                  + [np.percentile(g[:, j], 99.5) for g in gens.values()])
        bins = np.arange(0, max(2, int(np.ceil(top))) + 2) - 0.5
        ax.hist(real[:, j], bins=bins, density=True, histtype="stepfilled", color="#bbbbbb",
                label="real")
        for name, g in gens.items():
            ax.hist(g[:, j], bins=bins, density=True, histtype="step", linewidth=1.4,
                    color=colors[name], label=name)
        ax.set_title(f"{genes[j]} (real mean {means[j]:.2f})", fontsize=9)
        ax.set_xlabel("UMI count", fontsize=8)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Counts per cell: real vs generated", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


BAR_METRICS = {"pearson_mean": ("Pearson of gene means", True),
               "spearman_mean": ("Spearman of gene means", True),
               "ilisi": ("iLISI", True),
               "mmd": ("MMD", False),
               "wasserstein": ("1-Wasserstein", False),
               "celltype_tvd": ("cell-type TVD", False)}


def fidelity_bars(table: pd.DataFrame, path: str | Path) -> None:
    """One panel per fidelity metric, one bar per row of ``table`` (column ``model``)."""
    metrics = [m for m in BAR_METRICS if m in table]
    models = table["model"].astype(str).tolist()
    colors = _colors(models)
    fig, axes = _grid(len(metrics), 3, (3.4, 2.8))
    for ax, metric in zip(axes, metrics, strict=False):
        title, higher = BAR_METRICS[metric]
        values = pd.to_numeric(table[metric], errors="coerce").to_numpy(float)
        ax.bar(range(len(models)), np.nan_to_num(values), color=[colors[m] for m in models])
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    fig.suptitle("Generation fidelity against the reference cells", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
