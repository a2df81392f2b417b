"""Perturbation features shared by every model (SPEC 1.2a).

For each perturbation label, in order of preference:

1. ``file``: a row of the user's feature table (config ``perturbation_features``);
2. ``target_pca``: for genetic perturbations whose target genes are in the panel, the targets'
   loadings on the top principal components of the training cells (log1p CP10k), summed over
   the targets of a combination (Ahlmann-Eltze et al.'s linear-model gene embedding);
3. ``unknown``: a zero vector; the report marks those perturbations as predicted without
   target information.

The table is computed once per dataset from training cells only, so no held-out cell shapes it
(:func:`compute_features`, the ``features`` rule), together with the table of which features
each test condition got (:func:`condition_features`). Its rows are every perturbation of the
data and the candidates of the dataset's screen (:mod:`lingshu.data.candidates`), so that
every model is fitted knowing each label it may be asked about.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA

from lingshu.config import DatasetEntry
from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL, SPLIT_TRAIN
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import read_rows
from lingshu.data.split import Split
from lingshu.errors import input_error
from lingshu.io import read_table

SOURCE_COL = "source"


EMBEDDING_CELLS = 5000  # training cells the gene embedding's PCA sees at most


def embedding_rows(n_cells: int, seed: int, max_cells: int = EMBEDDING_CELLS) -> np.ndarray:
    """The sorted seeded subsample of ``n_cells`` training cells that the gene embedding uses.

    A caller holding the counts on disk reads only these rows; the embedding of the subsample
    is the embedding of all the cells (a subsample of at most ``max_cells`` keeps every row).
    """
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cells, size=min(max_cells, n_cells), replace=False))


def gene_embedding(train_log, n_components: int, seed: int,
                   max_cells: int = EMBEDDING_CELLS) -> np.ndarray:
    """Return (n_genes, n_components) gene loadings on the top PCs of the training cells.

    train_log: (n_cells, n_genes) log1p(CP10k), sparse or dense. At most ``max_cells`` cells
    (a seeded subsample, :func:`embedding_rows`) are densified, so memory stays bounded.
    """
    x = train_log[embedding_rows(train_log.shape[0], seed, max_cells)]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    k = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed)
    pca.fit(x)
    loadings = pca.components_.T * np.sqrt(pca.explained_variance_)[None, :]
    if k < n_components:  # pad so that the feature width is what the config says
        loadings = np.pad(loadings, ((0, 0), (0, n_components - k)))
    return loadings.astype(np.float32)


def read_feature_file(path: str) -> pd.DataFrame:
    """Read a user feature table: first column the perturbation label, the rest numeric."""
    sep = "," if path.endswith(".csv") else "\t"
    try:
        table = pd.read_csv(path, sep=sep, index_col=0)
    except (OSError, pd.errors.ParserError) as err:
        raise input_error(path, "perturbation_features", f"cannot read the table ({err})",
                          "give a TSV/CSV whose first column is the perturbation label") from err
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric or table.shape[1] == 0:
        raise input_error(path, f"columns {non_numeric[:5]}", "feature columns must be numeric",
                          "keep the label in the first column and only numbers after it")
    if table.isna().to_numpy().any():
        raise input_error(path, "values", "the feature table has missing values",
                          "fill or drop the rows with missing values")
    table.index = table.index.astype(str)
    return table


def perturbation_features(
    perturbations: list[str],
    genes: np.ndarray,
    train_log,
    perturbation_type: str,
    combo_separator: str = "+",
    n_components: int = 16,
    feature_file: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Return a table indexed by perturbation: numeric columns ``f0..`` and ``source``.

    perturbations: every perturbation label of the dataset (control excluded or not).
    genes: (n_genes,) panel gene symbols, the columns of ``train_log``.
    train_log: (n_train_cells, n_genes) log1p(CP10k) of training cells only.
    """
    labels = [p for p in dict.fromkeys(map(str, perturbations)) if p != CONTROL]
    user = read_feature_file(feature_file) if feature_file else None
    width = user.shape[1] if user is not None else n_components
    values = np.zeros((len(labels), width), dtype=np.float32)
    sources = np.array(["unknown"] * len(labels), dtype=object)

    gene_index = {g: i for i, g in enumerate(map(str, genes))}
    loadings = None
    if perturbation_type == "genetic" and (user is None):
        loadings = gene_embedding(train_log, n_components, seed)
    for i, label in enumerate(labels):
        if user is not None and label in user.index:
            values[i] = user.loc[label].to_numpy(dtype=np.float32)
            sources[i] = "file"
            continue
        if loadings is None:
            continue
        targets = [t for t in label.split(combo_separator) if t in gene_index]
        if targets:
            values[i] = loadings[[gene_index[t] for t in targets]].sum(axis=0)
            sources[i] = "target_pca"
    table = pd.DataFrame(values, index=pd.Index(labels, name="perturbation"),
                         columns=[f"f{j}" for j in range(width)])
    table[SOURCE_COL] = sources
    return table


def feature_matrix(table: pd.DataFrame | None, labels: list[str]) -> np.ndarray:
    """Numeric features for ``labels`` in order; zeros for labels missing from ``table``."""
    if table is None:
        return np.zeros((len(labels), 0), dtype=np.float64)
    numeric = table.drop(columns=[SOURCE_COL], errors="ignore")
    out = np.zeros((len(labels), numeric.shape[1]), dtype=np.float64)
    for i, label in enumerate(labels):
        if label in numeric.index:
            out[i] = numeric.loc[label].to_numpy(dtype=np.float64)
    return out


def compute_features(adata: ad.AnnData, split: Split, entry: DatasetEntry, n_components: int,
                     seed: int) -> pd.DataFrame:
    """Perturbation features of every perturbation of ``adata``, and of the candidates of the
    entry's screen (:func:`lingshu.data.candidates.screen_candidates`; rows after the data's),
    from training cells only.

    adata: the processed data (may be backed: only the training cells the gene embedding
    samples are read, :func:`embedding_rows`).
    """
    from lingshu.data.candidates import screen_candidates

    train = split.rows(SPLIT_TRAIN, adata.obs_names)
    train = train[embedding_rows(train.size, seed)]
    labels = sorted(set(adata.obs[PERT_COL].astype(str)))
    return perturbation_features(
        perturbations=labels + [c for c in screen_candidates(entry) if c not in labels],
        genes=adata.var_names.to_numpy(),
        train_log=log1p_cp10k(read_rows(adata, train)),
        perturbation_type=entry.perturbation_type,
        combo_separator=entry.combo_separator,
        n_components=n_components,
        feature_file=entry.perturbation_features,
        seed=seed,
    )


def condition_features(features: pd.DataFrame | None, conditions: pd.DataFrame) -> pd.DataFrame:
    """For each test condition (context, perturbation), the source of the features every model
    is given (``file``, ``target_pca``, ``unknown``; ``none`` without a feature table)."""
    table = conditions[[CONTEXT_COL, PERT_COL]].copy().reset_index(drop=True)
    if features is None:
        table[SOURCE_COL] = "none"
    else:
        table[SOURCE_COL] = [features[SOURCE_COL].get(p, "unknown") for p in table[PERT_COL]]
    return table


def read_features(path: str) -> pd.DataFrame:
    """Read the features table written by the features rule (index: perturbation)."""
    table = read_table(path).set_index("perturbation")
    table.index = table.index.astype(str)
    return table


def features_job(processed: str, split_dir: str, entry: DatasetEntry, n_components: int,
                 seed: int, out: str, out_used: str) -> None:
    """The ``features`` rule: every perturbation's features to ``out``, and which features
    each test condition got to ``out_used`` (shown in the report)."""
    from lingshu.data.split import read_split
    from lingshu.io import write_table

    adata = ad.read_h5ad(processed, backed="r")
    split = read_split(split_dir)
    table = compute_features(adata, split, entry, n_components, seed)
    write_table(table.reset_index(), out)
    write_table(condition_features(table, split.test_conditions()), out_used)
