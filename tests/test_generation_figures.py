"""Figures of generation fidelity: each writes a PNG atomically and checks its inputs; the
evaluation writes the scores and the report draws the figures from them."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib import image

from lingshu.report import generation as figs


def _cells(n_per=60, n_genes=40, seed=0, prefix="c"):
    """3 cell types x n_per cells; type k expresses genes 5k..5k+4 highly."""
    rng = np.random.default_rng(seed)
    counts, types = [], []
    for k, t in enumerate(("T0", "T1", "T2")):
        lam = np.full(n_genes, 0.5)
        lam[k * 5:(k + 1) * 5] = 6.0  # five marker genes per type
        counts.append(rng.poisson(lam, size=(n_per, n_genes)))
        types += [t] * n_per
    counts = sp.csr_matrix(np.vstack(counts).astype(np.float32))
    x = counts.multiply(1e4 / counts.sum(1)).tocsr().log1p()
    obs = pd.DataFrame({"cell_type": types}, index=[f"{prefix}{i}" for i in range(len(types))])
    out = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), obs=obs,
                     var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))
    out.layers["counts"] = counts
    return out


@pytest.fixture(scope="module")
def sets():
    return _cells(seed=0), {"model_a": _cells(seed=1, prefix="a"),
                            "model_b": _cells(seed=2, prefix="b")}


def _written(path):
    """A readable, non-trivial PNG and nothing else in its folder (no temporary file)."""
    assert path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert image.imread(path).shape[2] in (3, 4)


def test_umap(sets, tmp_path):
    real, gen = sets
    figs.umap_real_vs_generated(real, gen, tmp_path / "umap.png", seed=0)
    _written(tmp_path / "umap.png")


def test_marker_dotplot_and_single_type(sets, tmp_path):
    real, gen = sets
    markers = figs._markers(real, 3)  # each type's markers are among its own five genes
    for k in range(3):
        assert set(markers[3 * k:3 * k + 3]) <= {f"G{j}" for j in range(5 * k, 5 * k + 5)}
    figs.marker_dotplot(real, gen, tmp_path / "a" / "markers.png")
    _written(tmp_path / "a" / "markers.png")
    one = real.copy()
    one.obs["cell_type"] = "T0"
    assert len(figs._markers(one, 2)) == 6  # most variable genes instead
    figs.marker_dotplot(one, {"m": one.copy()}, tmp_path / "b" / "markers.png")
    _written(tmp_path / "b" / "markers.png")


def test_histograms_pick_genes_by_mean_and_write(sets, tmp_path):
    real, gen = sets
    means = np.arange(100, dtype=float)[::-1]  # gene j has mean 99 - j
    picked = figs._pick_genes(means, 4)
    assert sorted(means[picked]) == [50.0, 89.0, 98.0, 99.0]  # 50th/90th/99th pct, top
    assert len(figs._pick_genes(np.zeros(3), 4)) == 3
    figs.gene_histograms(real.layers["counts"], {k: v.layers["counts"] for k, v in gen.items()},
                         real.var_names.to_numpy(), tmp_path / "h" / "hist.png")
    _written(tmp_path / "h" / "hist.png")
    # a model with huge counts: bins stay bounded, the tail is clipped into the last bin
    wild = real.layers["counts"].toarray() * 1000
    figs.gene_histograms(real.layers["counts"], {"wild": wild}, real.var_names.to_numpy(),
                         tmp_path / "w" / "hist.png", n_genes=2)
    _written(tmp_path / "w" / "hist.png")


def test_fidelity_bars(tmp_path):
    table = pd.DataFrame({"model": ["model_a", "model_b"], "pearson_mean": [0.9, 0.8],
                          "mmd": [0.01, np.nan], "wasserstein": [0.1, 0.2], "ilisi": [0.9, 0.5],
                          "celltype_tvd": [0.1, 0.3]})
    figs.fidelity_bars(table, tmp_path / "b" / "bars.png")
    _written(tmp_path / "b" / "bars.png")
    with pytest.raises(ValueError, match="metric"):
        figs.fidelity_bars(table[["model"]], tmp_path / "c" / "bars.png")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_other_genes_are_refused(sets, tmp_path):
    real, gen = sets
    other = gen["model_a"][:, ::-1].copy()  # same genes, another order
    with pytest.raises(ValueError, match="other genes"):
        figs.umap_real_vs_generated(real, {"x": other}, tmp_path / "u.png")
    with pytest.raises(ValueError, match="other genes"):
        figs.marker_dotplot(real, {"x": other}, tmp_path / "m.png")
    with pytest.raises(ValueError, match="gene list"):
        figs.gene_histograms(real.layers["counts"], {"x": real.layers["counts"][:, :5]},
                             real.var_names.to_numpy(), tmp_path / "h.png")
    no_types = gen["model_a"].copy()
    del no_types.obs["cell_type"]
    with pytest.raises(ValueError, match="cell_type"):
        figs.marker_dotplot(real, {"x": no_types}, tmp_path / "m.png")
    assert not list(tmp_path.iterdir())


def make_generation_dir(folder):
    """The generation/ folder of a tiny dataset as the pipeline leaves it: one run's generated
    cells (``<run>.h5ad``) scored by :func:`evaluate_generation`. Returns (adata, split)."""
    from conftest import make_processed

    from lingshu.data.normalize import log1p_cp10k
    from lingshu.data.split import make_split
    from lingshu.evaluate.generation import evaluate_generation
    from lingshu.io import write_h5ad

    adata = make_processed(n_genes=40)
    split = make_split(adata.obs, {"kind": "heldout_perturbations", "test_perturbations": ["G1"],
                                   "reference_fraction": 0.2}, seed=0)
    n = int(split.reference_rows().size)
    rows = np.flatnonzero(split.cells["in_train"].to_numpy())[::2][:n]  # stand-in "generated"
    counts = sp.csr_matrix(adata.X[rows], dtype=np.float32)
    gen = ad.AnnData(X=sp.csr_matrix(log1p_cp10k(counts), dtype=np.float32),
                     obs=pd.DataFrame(index=[f"gen_{i}" for i in range(n)]),
                     var=pd.DataFrame(index=adata.var_names.astype(str)))
    gen.layers["counts"] = counts
    gen.uns["lingshu"] = {"model": "model_a", "run": "model_a", "generate_seconds": 1.5}
    write_h5ad(gen, folder / "model_a.h5ad")
    evaluate_generation(adata, split, {"model_a": str(folder / "model_a.h5ad")}, folder, seed=0)
    return adata, split


def test_evaluation_writes_scores_and_the_report_draws_the_figures(tmp_path):
    from lingshu.evaluate.generation import INDEPENDENT, REAL_FLOOR, REAL_REFERENCE
    from lingshu.io import read_table

    gen_dir = tmp_path / "generation"
    _, split = make_generation_dir(gen_dir)
    # the evaluation writes scores only: no figures, no Markdown
    assert sorted(p.name for p in gen_dir.iterdir()) == [
        "cell_types.tsv", "model_a.h5ad", "reference.h5ad", "table.tsv"]
    table = read_table(gen_dir / "table.tsv")
    assert list(table["model"]) == ["model_a", REAL_FLOOR, INDEPENDENT, REAL_REFERENCE]
    reference = ad.read_h5ad(gen_dir / "reference.h5ad")
    assert reference.n_obs == split.reference_rows().size
    assert list(reference.obs_names) == list(split.cells.index[split.reference_rows()])
    labels = read_table(gen_dir / "cell_types.tsv")
    assert set(labels["run"]) == {"model_a"} and len(labels) == reference.n_obs

    drawn, pngs = figs.draw_generation(gen_dir, tmp_path / "report", seed=0)
    assert [p.name for p in pngs] == figs.figure_names()
    assert sorted(p.name for p in (tmp_path / "report" / "figures").iterdir()) == sorted(
        figs.figure_names())
    for png in pngs:
        assert png.stat().st_size > 1000 and image.imread(png).shape[2] in (3, 4)
    assert (tmp_path / "report" / "table.md").read_text() == figs.to_markdown(drawn)
    assert "model_a" in figs.to_markdown(drawn)
    assert sorted(p.name for p in gen_dir.iterdir()) == [  # the scores are left as they were
        "cell_types.tsv", "model_a.h5ad", "reference.h5ad", "table.tsv"]


def test_independent_genes_keep_each_gene_s_marginal_and_break_the_cell_types():
    """Two cell types with opposite marker genes: the independent-genes cells draw each gene
    from the pool's own values (its marginal), so markers of both types meet in one cell, which
    no real cell has; the draw is seeded."""
    from lingshu.data.normalize import log1p_cp10k
    from lingshu.evaluate.generation import independent_genes

    a = np.array([[9, 0, 1, 2], [8, 0, 3, 2], [7, 0, 2, 2]], np.float32)  # type A: gene 0 on
    b = np.array([[0, 6, 1, 2], [0, 5, 3, 2], [0, 4, 2, 2]], np.float32)  # type B: gene 1 on
    counts = np.vstack([a, b])
    pool = ad.AnnData(X=np.zeros_like(counts), var=pd.DataFrame(index=list("wxyz")))
    pool.layers["counts"] = sp.csr_matrix(counts)
    cells = independent_genes(pool, 4000, np.random.default_rng(0))
    drawn = cells.layers["counts"].toarray()
    assert drawn.shape == (4000, 4) and list(cells.var_names) == list("wxyz")
    for g in range(4):  # each gene's values come from its own column, at its own frequencies
        values, freq = np.unique(drawn[:, g], return_counts=True)
        want, want_freq = np.unique(counts[:, g], return_counts=True)
        np.testing.assert_array_equal(values, want)
        np.testing.assert_allclose(freq / 4000, want_freq / 6, atol=0.03)
    both_on = np.mean((drawn[:, 0] > 0) & (drawn[:, 1] > 0))
    assert abs(both_on - 0.25) < 0.03  # real cells: never
    expect = log1p_cp10k(sp.csr_matrix(drawn))
    expect = expect.toarray() if sp.issparse(expect) else np.asarray(expect)
    np.testing.assert_allclose(cells.X.toarray(), expect, rtol=1e-5)
    again = independent_genes(pool, 4000, np.random.default_rng(0)).layers["counts"]
    assert (again != cells.layers["counts"]).nnz == 0


def test_the_table_gives_library_size_and_detected_genes_beside_the_reference(tmp_path):
    """Each set's median library size and mean detected genes per cell, counted from its
    counts; the reference's own values in the Markdown column titles."""
    from lingshu.evaluate.generation import REAL_REFERENCE, count_profile
    from lingshu.io import read_table

    cells = ad.AnnData(X=np.zeros((3, 4), np.float32))
    cells.layers["counts"] = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 0, 0, 5],
                                                     [3, 3, 3, 3]], np.float32))
    assert count_profile(cells) == pytest.approx({"library_size": 5.0, "detected_genes": 7 / 3})
    assert all(np.isnan(v) for v in count_profile(ad.AnnData(np.ones((2, 2)))).values())

    gen_dir = tmp_path / "generation"
    make_generation_dir(gen_dir)
    table = read_table(gen_dir / "table.tsv")
    ref = table[table["model"] == REAL_REFERENCE].iloc[0]
    assert ref["library_size"] > 0 and ref["detected_genes"] > 0
    md = figs.to_markdown(table)
    assert f"median library size (reference {ref['library_size']:,.0f})" in md
    assert f"detected genes (reference {ref['detected_genes']:,.0f})" in md
