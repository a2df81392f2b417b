"""Figures of generation fidelity: each writes a PNG atomically and checks its inputs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lingshu.report import generation_figures as figs


def _cells(n_per=60, n_genes=40, seed=0, prefix="c"):
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
    assert path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_umap(sets, tmp_path):
    real, gen = sets
    figs.umap_real_vs_generated(real, gen, tmp_path / "umap.png", seed=0)
    _written(tmp_path / "umap.png")


def test_marker_dotplot_and_single_type(sets, tmp_path):
    real, gen = sets
    figs.marker_dotplot(real, gen, tmp_path / "a" / "markers.png")
    _written(tmp_path / "a" / "markers.png")
    one = real.copy()
    one.obs["cell_type"] = "T0"
    figs.marker_dotplot(one, {"m": one.copy()}, tmp_path / "b" / "markers.png")
    _written(tmp_path / "b" / "markers.png")


def test_histograms_and_bars(sets, tmp_path):
    real, gen = sets
    figs.gene_histograms(real.layers["counts"], {k: v.layers["counts"] for k, v in gen.items()},
                         real.var_names.to_numpy(), tmp_path / "h" / "hist.png")
    _written(tmp_path / "h" / "hist.png")
    table = pd.DataFrame({"model": ["model_a", "model_b"], "pearson_mean": [0.9, 0.8],
                          "mmd": [0.01, 0.02], "wasserstein": [0.1, 0.2], "ilisi": [0.9, 0.5]})
    figs.fidelity_bars(table, tmp_path / "b" / "bars.png")
    _written(tmp_path / "b" / "bars.png")


def test_other_genes_are_refused(sets, tmp_path):
    real, gen = sets
    other = gen["model_a"][:, ::-1].copy()
    with pytest.raises(ValueError, match="other genes"):
        figs.umap_real_vs_generated(real, {"x": other}, tmp_path / "u.png")
    with pytest.raises(ValueError, match="other genes"):
        figs.marker_dotplot(real, {"x": other}, tmp_path / "m.png")
    with pytest.raises(ValueError, match="genes"):
        figs.gene_histograms(real.layers["counts"], {"x": real.layers["counts"][:, :5]},
                             real.var_names.to_numpy(), tmp_path / "h.png")
    assert not list(tmp_path.iterdir())
