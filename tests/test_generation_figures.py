"""Figures of generation fidelity: each writes a PNG atomically and checks its inputs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib import image

from lingshu.report import generation_figures as figs


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
