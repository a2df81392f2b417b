"""Raw h5ad -> canonical processed AnnData: validation, QC, gene alignment, canonical obs.

A dataset entry (:class:`~lingshu.config.DatasetEntry`: validated, every default filled) says
which obs columns hold the perturbation, the context and the batch, which label marks control
cells, where the raw counts are (``X`` or a layer), the QC thresholds and an optional gene list;
its ``name`` is the dataset's name.

- :func:`read_raw` reads the file, checking obs/var against the entry before loading counts.
- :func:`validate_raw` raises :class:`~lingshu.errors.InputError` for every bad input we know
  of, each naming the file, the field and the fix.
- :func:`preprocess` returns a new AnnData in the canonical form of :mod:`lingshu.constants`.

- :func:`preprocess_file` does the same from file to file, streaming the counts.

Count matrices reach 221k cells x 18k genes (millions of cells for the cytokine data), so the
counts are only ever read in row blocks: one pass checks the values, one gathers per-cell
statistics (and one per-gene statistics when genes are filtered), which decide the kept cells
and genes; the last pass writes the kept counts block by block (CSR int32). Memory is bounded
by the cell metadata and one block, whatever the number of cells.

Cells without any count (in the raw data, or in the genes kept) are always dropped, whatever
the ``qc`` thresholds: they have no log1p(CP10k) profile. Their number is logged and kept in
``uns['lingshu']['n_cells_no_counts']``. Error messages name the dataset entry and the file
the user configured (:func:`data_label`), not the pipeline's link to it.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.abc import CSCDataset, CSRDataset
from tqdm import tqdm

from lingshu.config import QC, DatasetEntry
from lingshu.constants import BATCH_COL, CONTEXT_COL, CONTROL, PERT_COL
from lingshu.errors import configured_source, input_error
from lingshu.io import atomic_path, write_h5ad, write_h5ad_streaming

logger = logging.getLogger(__name__)

BLOCK_ELEMENTS = 1 << 24  # values examined per block: bounds the temporary memory of checks
INT32_MAX = np.iinfo(np.int32).max
N_SHOWN = 8  # how many offending labels / genes / conditions an error message lists
MITO_PREFIX = "MT-"  # human mitochondrial genes; matched case-insensitively so mouse `mt-` works too


# ---------------------------------------------------------------------------------------------
# Small helpers on the entry
# ---------------------------------------------------------------------------------------------


def _shown(items: list[Any]) -> str:
    """``'a', 'b', ... (+N more)`` for error messages."""
    head = ", ".join(repr(str(x)) for x in items[:N_SHOWN])
    return head + (f" (+{len(items) - N_SHOWN} more)" if len(items) > N_SHOWN else "")


def data_label(entry: DatasetEntry, path: object) -> str:
    """How messages name the data read from ``path``: the dataset entry and the file the user
    configured (not the pipeline's link to it), e.g.
    ``config: datasets.kang (source.path '../data/kang.h5ad')``."""
    return configured_source(entry.name, entry.source, path)


def _counts_field(entry: DatasetEntry) -> str:
    """How error messages name the matrix holding the counts."""
    layer = entry.layer
    return f"layers[{layer!r}] (config `layer`)" if layer else "X"


# ---------------------------------------------------------------------------------------------
# Validation of obs / var (cheap: no counts needed)
# ---------------------------------------------------------------------------------------------


def _check_obs_columns(obs: pd.DataFrame, entry: DatasetEntry, path: str) -> None:
    """Every obs column named by ``columns.*`` must exist; ``columns.perturbation`` is required."""
    cols = entry.columns
    available = _shown(list(obs.columns)) or "(none)"
    if not cols.perturbation:
        raise input_error(path, "columns.perturbation", "no obs column is named for the perturbation label",
                          f"set `columns.perturbation` to one of the obs columns: {available}")
    for key in ("perturbation", "context", "batch"):
        name = getattr(cols, key)
        if name and name not in obs.columns:
            raise input_error(
                path, f"columns.{key}",
                f"obs column {name!r} (named by config key `columns.{key}`) is not in the file; "
                f"available obs columns: {available}",
                f"set `columns.{key}` to one of the available columns"
                + ("" if key == "perturbation" else ", or remove it"),
            )


def _check_no_missing_labels(obs: pd.DataFrame, entry: DatasetEntry, path: str) -> None:
    """Label columns must not hold NaN: a cell without a label cannot be placed in a condition."""
    for key in ("perturbation", "context", "batch"):
        name = getattr(entry.columns, key)
        if name:
            n_missing = int(obs[name].isna().sum())
            if n_missing:
                raise input_error(path, f"columns.{key}",
                                  f"obs column {name!r} has {n_missing} cells without a label (NaN)",
                                  "label every cell, or remove the unlabelled cells from the file")


def _check_control(obs: pd.DataFrame, entry: DatasetEntry, path: str) -> None:
    """Control cells must exist, and no other perturbation may be literally named ``control``."""
    col = entry.columns.perturbation
    control = entry.columns.control
    counts = obs[col].astype(str).value_counts()
    if control not in counts.index:
        top = [f"{label} ({n} cells)" for label, n in counts.head(N_SHOWN).items()]
        guess = _did_you_mean(control, list(counts.index))
        hint = f"did you mean {guess!r} ({counts[guess]} cells)? " if guess is not None else ""
        raise input_error(
            path, "columns.control",
            f"no cell of obs column {col!r} has the control label {control!r}; {hint}most frequent labels: "
            + ", ".join(top) + (f" (+{len(counts) - N_SHOWN} more)" if len(counts) > N_SHOWN else ""),
            (f"set `columns.control: {guess}` if those are the control cells; otherwise set "
             if guess is not None else "set ")
            + f"`columns.control` to the label of the control (unperturbed / non-targeting) cells in {col!r}",
        )
    if control != CONTROL and CONTROL in counts.index:
        raise input_error(
            path, "columns.control",
            f"obs column {col!r} has {counts[CONTROL]} cells labelled {CONTROL!r} but the control label is "
            f"{control!r}; controls are relabelled {CONTROL!r}, so the two groups would merge",
            f"if {CONTROL!r} cells are the controls set `columns.control: {CONTROL}`; otherwise rename that "
            "perturbation in the file",
        )


def _did_you_mean(label: str, labels: list[str]) -> str | None:
    """The label of ``labels`` that ``label`` most likely meant: one that differs only in case,
    else the closest near miss (difflib, case-insensitive); None when none is close."""
    same = [x for x in labels if x.casefold() == label.casefold()]
    if same:
        return same[0]  # labels come most frequent first
    folded: dict[str, str] = {}
    for x in labels:
        folded.setdefault(x.casefold(), x)
    close = difflib.get_close_matches(label.casefold(), list(folded), n=1, cutoff=0.7)
    return folded[close[0]] if close else None


def _check_genes(var_names: pd.Index, path: str) -> None:
    """Gene names must be unique: counts are aligned and compared by name."""
    dup = var_names[var_names.duplicated()].unique().tolist()
    if dup:
        raise input_error(
            path, "var_names", f"{len(dup)} gene names occur more than once, e.g. {_shown(dup)}",
            "make the gene names unique in the file (e.g. sum or drop duplicates, or use Ensembl IDs), "
            "or run `adata.var_names_make_unique()` before use",
        )


def _condition_sizes(obs: pd.DataFrame, pert: str, context: str | None, context_label: str) -> pd.Series:
    """Number of cells per (context, perturbation), labels as strings."""
    ctx = obs[context].astype(str) if context else pd.Series(context_label, index=obs.index)
    df = pd.DataFrame({"context": ctx.to_numpy(), "perturbation": obs[pert].astype(str).to_numpy()})
    return df.groupby(["context", "perturbation"], observed=True).size()


def _small_conditions(sizes: pd.Series, min_cells: int) -> pd.Series:
    return sizes[sizes < min_cells].sort_values()


def _raise_small(small: pd.Series, min_cells: int, path: str, when: str) -> None:
    """Error for conditions below ``min_cells_per_condition``, naming them."""
    names = [f"{ctx} x {pert} ({n} cells)" for (ctx, pert), n in small.items()]
    raise input_error(
        path, "min_cells_per_condition",
        f"{len(names)} (context x perturbation) conditions have fewer than {min_cells} cells {when}: "
        + ", ".join(names[:N_SHOWN]) + (f" (+{len(names) - N_SHOWN} more)" if len(names) > N_SHOWN else ""),
        "set `drop_small_conditions: true` to drop them, lower `min_cells_per_condition`, or loosen `qc`",
    )


def _check_not_empty(n_obs: int, n_vars: int, path: str, when: str, field: str = "qc") -> None:
    """Raise when no cell or no gene is left ``when`` (a phrase for the message)."""
    if n_obs == 0 or n_vars == 0:
        fix = ("provide a file with cells and genes" if field == "X" else
               "loosen the thresholds under `qc`, lower `min_cells_per_condition`, or check the gene list `genes`")
        raise input_error(path, field, f"the dataset is empty {when} ({n_obs} cells x {n_vars} genes)", fix)


def _validate_metadata(obs: pd.DataFrame, var_names: pd.Index, entry: DatasetEntry,
                       path: str) -> None:
    """All checks that need only obs and var (run before the counts are loaded)."""
    _check_not_empty(len(obs), len(var_names), path, "in the raw file", field="X")
    _check_obs_columns(obs, entry, path)
    _check_no_missing_labels(obs, entry, path)
    _check_control(obs, entry, path)
    _check_genes(pd.Index(var_names), path)
    if not entry.drop_small_conditions:
        cols = entry.columns
        sizes = _condition_sizes(obs, cols.perturbation, cols.context,
                                 cols.context_label or "(single context)")
        small = _small_conditions(sizes, entry.min_cells_per_condition)
        if len(small):
            _raise_small(small, entry.min_cells_per_condition, path, "in the raw data")


# ---------------------------------------------------------------------------------------------
# Validation of counts, block by block
# ---------------------------------------------------------------------------------------------


def _counts_matrix(adata: ad.AnnData, entry: DatasetEntry, path: str) -> Any:
    """The matrix holding raw counts: ``layers[entry.layer]`` or ``X``."""
    layer = entry.layer
    if layer:
        if layer not in adata.layers:
            raise input_error(path, "layer", f"layer {layer!r} is not in the file; available layers: "
                              f"{_shown(list(adata.layers.keys())) or '(none)'}",
                              "set `layer` to one of the available layers, or remove it to use X")
        return adata.layers[layer]
    if adata.X is None:
        raise input_error(path, "X", "the file has no X matrix", "set `layer` to the layer that holds raw counts")
    return adata.X


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of about BLOCK_ELEMENTS values each."""
    step = max(1, BLOCK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _value_blocks(X: Any) -> Iterator[np.ndarray]:
    """Yield the stored values of ``X`` in 1-D blocks, never the whole dense matrix at once.

    Sparse (in memory or backed): the stored nonzeros (implicit zeros are valid counts).
    Dense (numpy, h5py, anything sliceable by rows): row blocks.
    """
    if sp.issparse(X):
        data = X.data
        for start in range(0, data.size, BLOCK_ELEMENTS):
            yield data[start:start + BLOCK_ELEMENTS]
    elif isinstance(X, (CSRDataset, CSCDataset)):
        data = X.group["data"]  # h5py dataset of the nonzeros: read in slices
        for start in range(0, data.shape[0], BLOCK_ELEMENTS):
            yield data[start:start + BLOCK_ELEMENTS]
    else:
        n_rows, n_cols = X.shape
        for start, stop in _row_blocks(n_rows, n_cols):
            yield np.asarray(X[start:stop]).ravel()


def _n_blocks(X: Any) -> int:
    """How many blocks :func:`_value_blocks` yields (for the progress bar)."""
    if sp.issparse(X):
        n = X.data.size
    elif isinstance(X, (CSRDataset, CSCDataset)):
        n = X.group["data"].shape[0]
    else:
        return len(list(_row_blocks(X.shape[0], X.shape[1])))
    return -(-n // BLOCK_ELEMENTS)


def _check_counts(X: Any, entry: DatasetEntry, path: str, progress: bool = False,
                  layers: list[str] | None = None) -> None:
    """Counts must be finite, non-negative integers that fit in int32.

    ``layers`` (the file's layer names) are suggested in the fix, since raw counts often sit
    in a layer when X holds normalised values.
    """
    n_bad = {"nonfinite": 0, "negative": 0, "fraction": 0}
    example: dict[str, float | None] = {"negative": None, "fraction": None}
    vmax = 0.0
    is_int = np.issubdtype(np.dtype(X.dtype), np.integer) or np.dtype(X.dtype) == bool
    for block in tqdm(_value_blocks(X), total=_n_blocks(X), desc="checking counts", disable=not progress):
        if not is_int:  # integer storage cannot hold NaN or fractions
            finite = np.isfinite(block)
            if not finite.all():
                n_bad["nonfinite"] += int(block.size - np.count_nonzero(finite))
                block = block[finite]
            fraction = block != np.rint(block)
            if fraction.any():
                n_bad["fraction"] += int(np.count_nonzero(fraction))
                if example["fraction"] is None:
                    example["fraction"] = float(block[fraction][0])
        if block.size == 0:
            continue
        negative = block < 0
        if negative.any():
            n_bad["negative"] += int(np.count_nonzero(negative))
            example["negative"] = min(float(block[negative].min()), example["negative"] or 0.0)
        vmax = max(vmax, float(block.max()))
    _raise_count_errors(n_bad, example, vmax, entry, path, layers or [])


def _raise_count_errors(n_bad: dict, example: dict, vmax: float, entry: DatasetEntry, path: str,
                        layers: list[str]) -> None:
    """Turn the tallies of :func:`_check_counts` into the first relevant InputError."""
    field = _counts_field(entry)
    others = [name for name in layers if name != entry.layer]
    use_layer = ("set `layer` to the layer holding raw integer UMI counts"
                 + (f" (layers in the file: {_shown(others)})" if others else "")
                 + ", or supply the raw count matrix")
    if n_bad["nonfinite"]:
        raise input_error(path, field, f"{n_bad['nonfinite']} values are NaN or infinite; expected raw counts",
                          f"repair or remove the cells with NaN/infinite values; {use_layer}")
    if n_bad["negative"]:
        raise input_error(path, field, f"{n_bad['negative']} values are negative (min {example['negative']:g}); "
                          "expected raw counts, this looks like scaled or centred data", use_layer)
    if n_bad["fraction"]:
        raise input_error(path, field, f"{n_bad['fraction']} values are not integers (e.g. {example['fraction']:g}); "
                          "expected raw UMI counts, this looks like normalised or log-transformed data",
                          f"{use_layer} (not log-normalised values)")
    if vmax > INT32_MAX:
        raise input_error(path, field, f"largest value {vmax:g} exceeds the int32 range of stored counts",
                          "check that the matrix holds per-cell UMI counts")


def validate_raw(adata: ad.AnnData, entry: DatasetEntry, path: str) -> None:
    """Check a raw AnnData against its dataset entry; raise InputError on the first problem.

    Checks: obs columns named by ``columns.*`` exist (and have no NaN labels), control cells
    exist, no other perturbation is literally ``control``, gene names are unique, every
    (context, perturbation) condition has ``min_cells_per_condition`` cells (unless
    ``drop_small_conditions``), and the counts (``X`` or ``layer``) are finite non-negative
    integers. ``adata`` may be backed; nothing is modified.
    """
    where = data_label(entry, path)
    _validate_metadata(adata.obs, adata.var_names, entry, where)
    _check_counts(_counts_matrix(adata, entry, where), entry, where, layers=list(adata.layers.keys()))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _open_h5(path: str, where: object = None) -> h5py.File:
    """Open ``path`` as HDF5, or raise InputError saying why it cannot be read (naming it as
    ``where``, by default its path)."""
    where = path if where is None else where
    if not Path(path).is_file():
        raise input_error(where, "source", "the raw data file does not exist",
                          "check the dataset's `source` in the config")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise input_error(where, "source", f"cannot be read as an h5ad (HDF5) file: {exc}",
                          "provide an .h5ad file written by anndata (`adata.write_h5ad(...)`)") from exc


def read_raw(path: str, entry: DatasetEntry) -> ad.AnnData:
    """Read the raw h5ad at ``path`` into memory, validating obs and var before any counts.

    Only what preprocessing needs is loaded: obs, var, uns, obsm and the counts matrix (``X``,
    or only ``layers[entry.layer]`` when a layer is named, leaving ``X`` empty). Files of
    the old (pre-0.7) anndata layout are opened backed instead, validated, then loaded.
    Count values are checked later by :func:`validate_raw` / :func:`preprocess`.
    """
    where = data_label(entry, path)
    with _open_h5(path, where) as f:
        if "obs" not in f or "var" not in f or f["obs"].attrs.get("encoding-type") is None:
            return _read_raw_backed(path, entry)
        obs = ad.io.read_elem(f["obs"])
        var = ad.io.read_elem(f["var"])
        _validate_metadata(obs, var.index, entry, where)
        layer = entry.layer
        key = f"layers/{layer}" if layer else "X"
        if key not in f:
            available = list(f["layers"].keys()) if "layers" in f else []
            raise input_error(where, "layer" if layer else "X", f"{key} is not in the file; available layers: "
                              f"{_shown(available) or '(none)'}", "set `layer` to the layer holding raw counts")
        counts = ad.io.read_elem(f[key])
        uns = ad.io.read_elem(f["uns"]) if "uns" in f else {}
        obsm = ad.io.read_elem(f["obsm"]) if "obsm" in f else {}
    if layer:
        return ad.AnnData(obs=obs, var=var, uns=uns, obsm=obsm, layers={layer: counts})
    return ad.AnnData(X=counts, obs=obs, var=var, uns=uns, obsm=obsm)


def _read_raw_backed(path: str, entry: DatasetEntry) -> ad.AnnData:
    """Fallback for layouts read_elem cannot read piecewise: open backed, validate, load."""
    adata = ad.read_h5ad(path, backed="r")
    where = data_label(entry, path)
    try:
        _validate_metadata(adata.obs, adata.var_names, entry, where)
        _counts_matrix(adata, entry, where)  # fails early on a missing layer
        return adata.to_memory()
    finally:
        adata.file.close()


# ---------------------------------------------------------------------------------------------
# Canonical obs and var
# ---------------------------------------------------------------------------------------------


def _canonical_obs(obs: pd.DataFrame, entry: DatasetEntry) -> pd.DataFrame:
    """A copy of ``obs`` with canonical ``perturbation``, ``context`` and ``batch`` (str) columns.

    An original column that already bears a canonical name but is not the configured source
    for it (e.g. a ``perturbation`` column when ``columns.perturbation: condition``) is kept
    as ``<name>_original`` rather than overwritten.
    """
    cols = entry.columns
    labels = obs[cols.perturbation].astype(str).to_numpy(dtype=object)
    pert = np.where(labels == cols.control, CONTROL, labels).astype(object)
    if cols.context:
        context = obs[cols.context].astype(str).to_numpy(dtype=object)
    else:
        context = np.full(len(obs), cols.context_label or entry.name, dtype=object)
    batch = obs[cols.batch].astype(str).to_numpy(dtype=object) if cols.batch else context.copy()

    out = obs.copy()
    sources = {PERT_COL: cols.perturbation, CONTEXT_COL: cols.context, BATCH_COL: cols.batch}
    for canon, source in sources.items():
        if canon in out.columns and source != canon:
            kept = f"{canon}_original"
            while kept in out.columns:
                kept += "_"
            out = out.rename(columns={canon: kept})
            logger.info("obs column %r is not the configured %s column; kept as %r", canon, canon, kept)
    out[PERT_COL] = pert
    out[CONTEXT_COL] = context
    out[BATCH_COL] = batch
    return out




def read_gene_list(genes_path: str, config_path: str = "config") -> list[str]:
    """Gene symbols from a text file, one per line (blank lines and ``#`` comments skipped)."""
    p = Path(genes_path)
    if not p.is_file():
        raise input_error(config_path, "genes", f"gene list file {genes_path!r} does not exist",
                          "correct the `genes` path of the dataset entry, or remove it")
    genes = [ln.strip() for ln in p.read_text().splitlines()]
    genes = [g for g in genes if g and not g.startswith("#")]
    if not genes:
        raise input_error(genes_path, "genes", "the gene list is empty", "write one gene symbol per line")
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if dup:
        raise input_error(genes_path, "genes", f"{len(dup)} genes are listed twice, e.g. {_shown(dup)}",
                          "list each gene once")
    return genes


def _reindex_var(var: pd.DataFrame, genes: list[str]) -> pd.DataFrame:
    """``var`` reindexed to ``genes``; bool/int columns become nullable so absent genes get NA."""
    out = pd.DataFrame(index=pd.Index(genes, dtype=object))
    for col in var.columns:
        series = var[col]
        if pd.api.types.is_bool_dtype(series):
            series = series.astype("boolean")
        elif pd.api.types.is_integer_dtype(series):
            series = series.astype("Int64")
        out[col] = series.reindex(genes)  # aligned on the (unique) gene index
    return out




# ---------------------------------------------------------------------------------------------
# Row blocks: every pass over the counts reads a bounded number of values at a time
# ---------------------------------------------------------------------------------------------


def _rows_per_block(X: Any) -> int:
    """Rows per block so that a block holds about BLOCK_ELEMENTS stored values."""
    n_rows, n_cols = X.shape
    if isinstance(X, CSRDataset):
        stored = X.group["data"].shape[0]
    elif sp.issparse(X):
        stored = X.nnz
    else:
        stored = n_rows * n_cols
    per_row = max(1.0, stored / max(1, n_rows))
    return max(1, int(BLOCK_ELEMENTS // per_row))


def _csr_block_int32(block: Any) -> sp.csr_matrix:
    """One block (sparse or dense) as CSR int32, copying so the input is never shared."""
    if sp.issparse(block):
        csr = block.tocsr() if block.format != "csr" else block
        out = sp.csr_matrix((csr.data.astype(np.int32), csr.indices.copy(), csr.indptr.copy()), shape=csr.shape)
    else:
        out = sp.csr_matrix(np.asarray(block).astype(np.int32, copy=False))
    out.eliminate_zeros()  # explicit zeros would inflate genes-per-cell in QC
    out.sum_duplicates()
    return out


def _count_blocks(X: Any, desc: str, progress: bool) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR int32 block) over the validated counts ``X``, one row block at a time.

    ``X`` is anything sliceable by rows: CSR/dense in memory, a backed CSR dataset, an h5py
    dense dataset. Only one block is in memory at a time.
    """
    n_rows = X.shape[0]
    step = _rows_per_block(X)
    with tqdm(total=n_rows, desc=desc, unit="cells", unit_scale=True, disable=not progress) as bar:
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            yield start, _csr_block_int32(X[start:stop])
            bar.update(stop - start)


# ---------------------------------------------------------------------------------------------
# The plan: which cells and genes the processed data keeps (decided from per-cell statistics)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What preprocessing keeps, decided before any output is written.

    keep: (n_raw_cells,) bool, the cells that pass QC and the condition sizes.
    obs: canonical obs of the kept cells, with scanpy-named QC columns.
    var: var of the output genes.
    select: (n_raw_genes, n_out_genes) 0/1 CSR mapping raw genes to output genes (gene filter
        or gene-list alignment; absent listed genes are all-zero columns).
    n_zero_filled: listed genes absent from the data.
    n_no_counts: cells dropped because they have no counts (in the raw data, or in the output
        genes): a cell without counts has no log1p(CP10k) profile. Dropped whatever ``qc``.
    """

    keep: np.ndarray
    obs: pd.DataFrame
    var: pd.DataFrame
    select: sp.csr_matrix
    n_zero_filled: int
    n_no_counts: int = 0


def _cell_stats(X: Any, mito: np.ndarray | None, progress: bool,
                out_genes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell total counts, detected genes, (when ``mito`` is given) mitochondrial counts
    and (when ``out_genes``, a (n_genes,) 0/1 vector of the genes kept, is given) the counts
    in the genes kept."""
    total = np.zeros(X.shape[0], dtype=np.int64)
    n_genes = np.zeros(X.shape[0], dtype=np.int64)
    mt = np.zeros(X.shape[0], dtype=np.int64) if mito is not None else None
    out = np.zeros(X.shape[0], dtype=np.int64) if out_genes is not None else None
    for start, block in _count_blocks(X, "cell statistics", progress):
        rows = slice(start, start + block.shape[0])
        total[rows] = np.asarray(block.sum(axis=1, dtype=np.int64)).ravel()
        n_genes[rows] = np.diff(block.indptr)  # explicit zeros were removed: stored = nonzero
        if mt is not None:
            mt[rows] = np.asarray(block[:, mito].sum(axis=1, dtype=np.int64)).ravel()
        if out is not None:
            out[rows] = block.astype(np.int64) @ out_genes
    return {"total": total, "n_genes": n_genes, "mito": mt, "out_total": out}


def _no_counts(counts: np.ndarray, where: str, path: str) -> np.ndarray:
    """Cells without counts (``counts == 0``), logged with their number."""
    empty = counts == 0
    if empty.any():
        logger.warning("%s: dropping %d cells with no counts %s: a cell without counts has no "
                       "log1p(CP10k) profile (dropped whatever the `qc` thresholds)",
                       path, int(empty.sum()), where)
    return empty


def _cell_qc(obs: pd.DataFrame, stats: dict, qc: QC, var_names: pd.Index, path: str) -> np.ndarray:
    """Cells with counts (in the raw data and, with a gene list, in the listed genes), above
    the count / gene thresholds and below the mitochondrial percentage.

    Adds ``total_counts``, ``n_genes_by_counts`` (and ``pct_counts_mt`` when ``max_pct_mito``
    is set) to ``obs``, with scanpy's names, computed on the raw genes.
    """
    total, n_genes = stats["total"], stats["n_genes"]
    obs["total_counts"] = total
    obs["n_genes_by_counts"] = n_genes
    empty = _no_counts(total, "in the raw data", path)
    if stats.get("out_total") is not None:
        empty |= _no_counts(np.where(empty, 1, stats["out_total"]), "in the listed genes (`genes`)",
                            path)
    keep = (total >= qc.min_counts_per_cell) & (n_genes >= qc.min_genes_per_cell) & ~empty
    reasons = {"no_counts": int(empty.sum()),
               "min_counts_per_cell": int((total < qc.min_counts_per_cell).sum()),
               "min_genes_per_cell": int((n_genes < qc.min_genes_per_cell).sum())}
    if qc.max_pct_mito is not None:
        pct = 100.0 * stats["mito"] / np.maximum(total, 1)
        obs["pct_counts_mt"] = pct
        keep &= pct <= float(qc.max_pct_mito)
        reasons["max_pct_mito"] = int((pct > float(qc.max_pct_mito)).sum())
    logger.info("%s: cell QC keeps %d of %d cells (failing: %s)", path, int(keep.sum()), len(obs), reasons)
    _check_not_empty(int(keep.sum()), len(var_names), path, "after QC (cells)")
    return keep


def _mito_genes(var_names: pd.Index, qc: QC, path: str) -> np.ndarray | None:
    """Column indices of mitochondrial genes (None when ``max_pct_mito`` is not set)."""
    if qc.max_pct_mito is None:
        return None
    mito = pd.Index(var_names).str.upper().str.startswith(MITO_PREFIX)
    if not mito.any():
        logger.warning("%s: qc.max_pct_mito is set but no gene name starts with %r; no cell is removed by it",
                       path, MITO_PREFIX)
    return np.flatnonzero(mito)


def _enforce_condition_sizes(obs: pd.DataFrame, keep: np.ndarray, entry: DatasetEntry,
                             n_genes: int, path: str) -> np.ndarray:
    """After QC: raise on conditions below ``min_cells_per_condition``, or drop them."""
    min_cells = entry.min_cells_per_condition
    kept = obs[keep]
    sizes = _condition_sizes(kept, PERT_COL, CONTEXT_COL, "")
    small = _small_conditions(sizes, min_cells)
    if not len(small):
        return keep
    if not entry.drop_small_conditions:
        _raise_small(small, min_cells, path, "after QC")
    logger.warning("%s: dropping %d conditions with fewer than %d cells: %s", path, len(small), min_cells,
                   ", ".join(f"{c} x {p} ({n})" for (c, p), n in small.items()))
    pairs = pd.MultiIndex.from_arrays([obs[CONTEXT_COL].astype(str), obs[PERT_COL].astype(str)])
    keep = keep & ~pairs.isin(small.index)
    _check_not_empty(int(keep.sum()), n_genes, path, "after QC and dropping small conditions")
    if CONTROL not in set(obs[PERT_COL].to_numpy()[keep]):
        raise input_error(path, "min_cells_per_condition",
                          "no control cells are left after QC and dropping small conditions",
                          "lower `min_cells_per_condition` or loosen `qc`")
    return keep


def _selection(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A 0/1 CSR matrix with ones at (rows[i], cols[i])."""
    return sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=shape)


def _gene_qc(X: Any, keep: np.ndarray, var: pd.DataFrame, min_cells: int, path: str,
             progress: bool) -> tuple[pd.DataFrame, sp.csr_matrix, np.ndarray]:
    """Genes detected in at least ``min_cells`` kept cells (one more pass when the filter is
    on); also the genes it removes that some kept cell has counts in."""
    n_genes = var.shape[0]
    if min_cells <= 0:
        return (var.copy(), _selection(np.arange(n_genes), np.arange(n_genes), (n_genes, n_genes)),
                np.zeros(0, dtype=np.int64))
    n_cells = np.zeros(n_genes, dtype=np.int64)
    for start, block in _count_blocks(X, "gene statistics", progress):
        block = block[np.flatnonzero(keep[start:start + block.shape[0]])]
        n_cells += np.bincount(block.indices, minlength=n_genes)
    kept = np.flatnonzero(n_cells >= min_cells)
    logger.info("%s: gene QC keeps %d of %d genes", path, kept.size, n_genes)
    _check_not_empty(int(keep.sum()), kept.size, path, "after QC (genes)")
    removed_detected = np.flatnonzero((n_cells > 0) & (n_cells < min_cells))
    return (var.iloc[kept].copy(), _selection(kept, np.arange(kept.size), (n_genes, kept.size)),
            removed_detected)


def _empty_after_gene_qc(X: Any, keep: np.ndarray, select: sp.csr_matrix, progress: bool) -> np.ndarray:
    """Kept cells with no counts in the genes gene QC keeps (one more pass over the counts)."""
    out_genes = np.asarray(select.sum(axis=1)).ravel().astype(np.int64)  # (n_raw_genes,) 0/1
    empty = np.zeros(X.shape[0], dtype=bool)
    for start, block in _count_blocks(X, "cells without counts", progress):
        rows = slice(start, start + block.shape[0])
        empty[rows] = (block.astype(np.int64) @ out_genes) == 0
    return empty & keep


def _align_genes(var: pd.DataFrame, genes: list[str], genes_path: str,
                 path: str) -> tuple[pd.DataFrame, sp.csr_matrix]:
    """Reorder the genes to ``genes``: absent ones become all-zero columns, others are dropped.

    Returned as a 0/1 selection matrix (the counts stay sparse when multiplied by it).
    """
    pos = pd.Index(var.index).get_indexer(genes)
    present = pos >= 0
    n_present = int(present.sum())
    if n_present == 0:
        raise input_error(genes_path, "genes",
                          f"none of the {len(genes)} listed genes is in {path} (list starts {_shown(genes[:3])}, "
                          f"data genes start {_shown(list(var.index[:3]))})",
                          "use a gene list with the same identifiers as the data (symbols vs Ensembl IDs)")
    select = _selection(pos[present], np.flatnonzero(present), (var.shape[0], len(genes)))
    logger.info("%s: aligned to %d genes of %s: %d found, %d absent (added as zeros), %d data genes dropped",
                path, len(genes), genes_path, n_present, len(genes) - n_present, var.shape[0] - n_present)
    if n_present < len(genes) / 2:
        logger.warning("%s: only %d of %d listed genes are in the data", path, n_present, len(genes))
    out = _reindex_var(var, genes)
    out["in_raw_data"] = present
    return out, select


def _plan(X: Any, obs: pd.DataFrame, var: pd.DataFrame, entry: DatasetEntry, path: str,
          progress: bool) -> _Plan:
    """Decide the kept cells (QC, then condition sizes) and genes (filter or gene list)."""
    qc = entry.qc
    var = var.copy()
    var.index = var.index.astype(str)
    canon = _canonical_obs(obs, entry)
    canon.index = canon.index.astype(str)
    if not canon.index.is_unique:
        logger.info("%s: obs names are not unique; adding suffixes (-1, -2, ...)", path)
        canon.index = ad.utils.make_index_unique(canon.index)

    # With a gene list, the list defines the gene space (shared across datasets), so
    # min_cells_per_gene is not applied: it would remove listed genes. The list is known
    # before any cell is chosen, so cells without counts in the listed genes are dropped
    # with the cell QC.
    genes_path = entry.genes
    out_genes = None
    if genes_path:
        if qc.min_cells_per_gene > 0:
            logger.warning("%s: qc.min_cells_per_gene is ignored because a gene list (`genes`) is given", path)
        out_var, select = _align_genes(var, read_gene_list(genes_path, f"config: datasets.{entry.name}"),
                                       genes_path, path)
        out_genes = np.asarray(select.sum(axis=1)).ravel().astype(np.int64)
    stats = _cell_stats(X, _mito_genes(var.index, qc, path), progress, out_genes)
    keep = _cell_qc(canon, stats, qc, var.index, path)
    n_no_counts = int((stats["total"] == 0).sum()) + (
        0 if out_genes is None else int(((stats["total"] > 0) & (stats["out_total"] == 0)).sum()))
    keep = _enforce_condition_sizes(canon, keep, entry, var.shape[0], path)

    if genes_path:
        n_zero_filled = int((~out_var["in_raw_data"]).sum())
    else:
        out_var, select, removed = _gene_qc(X, keep, var, int(qc.min_cells_per_gene), path, progress)
        n_zero_filled = 0
        if removed.size:  # a cell whose counts are all in removed genes would have none left
            empty = _empty_after_gene_qc(X, keep, select, progress)
            if empty.any():
                logger.warning("%s: dropping %d cells with no counts in the genes kept by "
                               "qc.min_cells_per_gene: a cell without counts has no log1p(CP10k) "
                               "profile", path, int(empty.sum()))
                n_no_counts += int(empty.sum())
                # Conditions are checked again; genes are not filtered again (the dropped
                # cells have no count in any kept gene).
                keep = _enforce_condition_sizes(canon, keep & ~empty, entry, var.shape[0], path)
    _check_not_empty(int(keep.sum()), out_var.shape[0], path, "after QC")
    return _Plan(keep=keep, obs=canon[keep].copy(), var=out_var, select=select,
                 n_zero_filled=n_zero_filled, n_no_counts=n_no_counts)


def _output_blocks(X: Any, plan: _Plan, progress: bool) -> Iterator[sp.csr_matrix]:
    """The processed counts, one CSR int32 row block at a time (kept cells, output genes)."""
    for start, block in _count_blocks(X, "writing counts", progress):
        rows = np.flatnonzero(plan.keep[start:start + block.shape[0]])
        if rows.size:
            out = sp.csr_matrix(block[rows] @ plan.select, dtype=np.int32)
            out.sort_indices()
            yield out


def _summary(plan: _Plan, entry: DatasetEntry, n_cells_raw: int, n_genes_raw: int) -> dict:
    """``uns['lingshu']``: what the processed file is and how it was made."""
    return {
        "dataset": entry.name,
        "control_label": entry.columns.control,
        "perturbation_type": str(entry.perturbation_type),  # a string (h5ad cannot store None)
        "n_cells_raw": int(n_cells_raw),
        "n_genes_raw": int(n_genes_raw),
        "n_cells": int(plan.keep.sum()),
        "n_genes": int(plan.var.shape[0]),
        "n_genes_zero_filled": plan.n_zero_filled,
        "n_cells_no_counts": int(plan.n_no_counts),
    }


def _obsm_rows(obsm: Any, keep: np.ndarray) -> dict:
    """Copies of the obsm arrays / frames restricted to the kept cells."""
    out = {}
    for key, value in dict(obsm).items():
        out[key] = value.iloc[keep].copy() if isinstance(value, pd.DataFrame) else value[keep].copy()
    return out


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def preprocess(adata: ad.AnnData, entry: DatasetEntry, path: str,
               progress: bool = False) -> ad.AnnData:
    """Validate ``adata`` (read from ``path``) and return a NEW canonical AnnData.

    The result has raw counts as CSR int32 in X; obs with the original columns plus canonical
    ``perturbation`` (controls relabelled ``control``), ``context`` and ``batch`` as strings;
    unique str obs/var names; QC applied (cells, then condition sizes, then genes or the gene
    list); ``uns['lingshu']`` describing the dataset. Layers, obsp and varm are not carried
    over. The input object is not modified. Raises InputError (file, field, fix) on any bad
    input, including an empty result. :func:`preprocess_file` does the same from file to
    file without holding the counts in memory.
    """
    path = data_label(entry, path)  # messages name the dataset entry and its configured file
    _validate_metadata(adata.obs, adata.var_names, entry, path)
    X = _counts_matrix(adata, entry, path)
    _check_counts(X, entry, path, progress, layers=list(adata.layers.keys()))
    if sp.issparse(X) and X.format != "csr":
        X = X.tocsr()
    plan = _plan(X, adata.obs, adata.var, entry, path, progress)
    blocks = list(_output_blocks(X, plan, progress))
    counts = sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.int32)
    out = ad.AnnData(X=counts, obs=plan.obs, var=plan.var, uns=copy.deepcopy(dict(adata.uns)),
                     obsm=_obsm_rows(adata.obsm, plan.keep))
    out.uns["lingshu"] = _summary(plan, entry, adata.n_obs, adata.n_vars)
    logger.info("%s: preprocessed to %d cells x %d genes (raw %d x %d)", path,
                out.n_obs, out.n_vars, adata.n_obs, adata.n_vars)
    return out


def _streamable_counts(f: h5py.File, entry: DatasetEntry, path: str) -> Any:
    """The file's counts as something row-sliceable without loading them (CSR or dense).

    CSC counts cannot be read by rows piecewise: they are loaded and converted (with a warning).
    """
    layer = entry.layer
    key = f"layers/{layer}" if layer else "X"
    if key not in f:
        available = list(f["layers"].keys()) if "layers" in f else []
        raise input_error(path, "layer" if layer else "X", f"{key} is not in the file; available layers: "
                          f"{_shown(available) or '(none)'}", "set `layer` to the layer holding raw counts")
    elem = f[key]
    if isinstance(elem, h5py.Dataset):
        return elem  # dense: h5py reads row slices
    encoding = elem.attrs.get("encoding-type")
    if encoding == "csr_matrix":
        return ad.io.sparse_dataset(elem)
    logger.warning("%s: %s is stored as %s, which cannot be streamed by rows; loading it into memory "
                   "(store the counts as CSR to preprocess large files in bounded memory)", path, key, encoding)
    return sp.csr_matrix(ad.io.read_elem(elem))


def preprocess_file(raw_path: str, entry: DatasetEntry, out_path: str,
                    progress: bool = False) -> None:
    """Preprocess the raw h5ad at ``raw_path`` into ``out_path``, streaming the counts.

    Same result as ``preprocess(read_raw(raw_path, entry), ...)`` written with
    :func:`~lingshu.io.write_h5ad`, but the counts are read and written one row block at a time
    (about BLOCK_ELEMENTS values), so memory stays bounded by the cell metadata whatever the
    number of cells. Passes over the counts: value check, cell statistics, gene statistics (only
    with ``min_cells_per_gene``; then one more for the cells it leaves without counts, when it
    removes a gene some kept cell has counts in), writing. The output appears only when
    complete.
    """
    where = data_label(entry, raw_path)  # messages name the dataset entry and its configured file
    with _open_h5(raw_path, where) as f:
        if "obs" not in f or "var" not in f or f["obs"].attrs.get("encoding-type") is None:
            # Old (pre-0.7) layouts cannot be read piecewise: go through memory.
            write_h5ad(preprocess(read_raw(raw_path, entry), entry, raw_path, progress), out_path)
            return
        obs = ad.io.read_elem(f["obs"])
        var = ad.io.read_elem(f["var"])
        _validate_metadata(obs, var.index, entry, where)
        X = _streamable_counts(f, entry, where)
        layers = list(f["layers"].keys()) if "layers" in f else []
        _check_counts(X, entry, where, progress, layers=layers)
        plan = _plan(X, obs, var, entry, where, progress)
        uns = ad.io.read_elem(f["uns"]) if "uns" in f else {}
        uns["lingshu"] = _summary(plan, entry, len(obs), len(var))
        obsm = _obsm_rows(ad.io.read_elem(f["obsm"]), plan.keep) if "obsm" in f else {}
        with atomic_path(out_path) as tmp:
            write_h5ad_streaming(tmp, obs=plan.obs, var=plan.var, uns=uns, obsm=obsm,
                                 blocks=_output_blocks(X, plan, progress))
    logger.info("%s: preprocessed to %d cells x %d genes (raw %d x %d)", where,
                len(plan.obs), len(plan.var), len(obs), len(var))
