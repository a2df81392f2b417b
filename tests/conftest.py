"""Shared fixtures: tiny processed datasets built in memory, and paths to the shared real data."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
PAPALEXI = SHARED_DATA / "papalexi2021_thp1_eccite_sceptredata.h5ad"
KANG = SHARED_DATA / "kang2018_ifnb_pbmc_muscat.h5ad"


def make_entry(perturbation_type: str = "genetic", split: dict | None = None,
               name: str = "tiny", **fields):
    """A parsed :class:`~lingshu.config.DatasetEntry` for tests (source and split are required
    by the schema; the default split draws one test perturbation)."""
    from lingshu.config import DatasetEntry

    raw = {"source": {"path": "x.h5ad"},
           "split": split or {"kind": "heldout_perturbations", "n_test_perturbations": 1},
           "perturbation_type": perturbation_type, **fields}
    return DatasetEntry.parse(name, raw)


def make_processed(n_genes: int = 40, contexts=("A", "B"), perts=("G1", "G2", "G3", "G4"),
                   n_per: int = 30, n_ctrl: int = 60, seed: int = 0) -> ad.AnnData:
    """A tiny processed dataset: canonical columns, CSR int32 counts, genes G0..G{n-1}.

    Each perturbation ``Gk`` knocks down gene ``Gk`` and raises gene ``G{k+10}`` so that
    perturbation effects are real and gene-specific.
    """
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i}" for i in range(n_genes)])
    base = rng.gamma(2.0, 2.0, size=n_genes)
    rows, obs = [], []
    for ci, ctx in enumerate(contexts):
        ctx_mu = base * (1 + 0.5 * ci * (np.arange(n_genes) % 3 == 0))
        for pert in ("control",) + tuple(perts):
            mu = ctx_mu.copy()
            if pert != "control":
                k = int(pert[1:])
                mu[k] *= 0.1
                mu[(k + 10) % n_genes] *= 4
            n = n_ctrl if pert == "control" else n_per
            rows.append(rng.poisson(mu, size=(n, n_genes)))
            obs += [(ctx, pert)] * n
    x = sp.csr_matrix(np.vstack(rows).astype(np.int32))
    obs = pd.DataFrame(obs, columns=["context", "perturbation"])
    obs["batch"] = obs["context"]
    obs.index = [f"c{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
    adata.uns["lingshu"] = {"dataset": "tiny", "control_label": "control",
                            "perturbation_type": "genetic"}
    return adata


@pytest.fixture
def tiny_processed() -> ad.AnnData:
    return make_processed()
